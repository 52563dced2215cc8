"""Posterior samplers on held-out digits with the trained digits prior (issue 14).

Tasks (``flowdiff.pipeline.restore_operator``): centre-box inpainting (the 4x4 centre of an 8x8
digit hidden), random inpainting (half the pixels), 2x super-resolution (2x2 averages), 3x3 Gaussian
blur and MRI-style subsampling (half of the 2-D Fourier coefficients); measurement noise
sigma_y = 0.05 on images in [-1, 1]. Every method of ``fd.inverse.available()`` that accepts the
task's operator draws ``--samples`` posterior samples per image at ``--nfe`` model evaluations per
sample. Columns: PSNR of the posterior mean and of one sample (dB, range 2), the digits classifier's
accuracy on the posterior mean (against the true label), the spread (per-pixel std across samples:
large where the measurement is ambiguous, e.g. the centre box), evaluations per sample, seconds.
The prior is the checkpoint's unconditional network (the null label of a class-conditional one).

Run: ``.venv/bin/python benchmarks/inverse_digits.py --checkpoint RUN`` (``flowdiff train --data digits
--config configs/digits.yaml -o RUN``). Writes ``benchmarks/results/inverse_digits.{md,json}`` and a
PNG grid per task into ``benchmarks/results/inverse_digits/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.data import load_dataset
from flowdiff.metrics.frechet import DigitsFeatureExtractor
from flowdiff.pipeline import RESTORE_TASKS, load_field, restore, restore_operator, save_restore_png


def accepts(method: str, operator, sigma_y: float) -> bool:
    spec = fd.inverse.describe(method)
    if spec.linear_only and not operator.linear:
        return False
    if spec.needs_svd and operator.svd() is None:
        return False
    if spec.noiseless_only and sigma_y > 0:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--count", type=int, default=32, help="held-out digits per task")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--nfe", type=int, default=100)
    parser.add_argument("--sigma-y", type=float, default=0.05)
    parser.add_argument("--tasks", nargs="*", default=list(RESTORE_TASKS))
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method of fd.inverse.available()")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    field, config = load_field(args.checkpoint, unlabeled="null")
    data = load_dataset("digits", split="heldout", seed=int((config.get("extra") or {}).get("seed", 0)))
    truth, labels = data.x[: args.count].float(), data.y[: args.count]
    classifier = DigitsFeatureExtractor.load_or_train()
    methods = args.methods or fd.inverse.available()
    rows, payload = [], []
    pictures = RESULTS / "inverse_digits"
    for task in args.tasks:
        operator = restore_operator(task, tuple(truth.shape[1:]))
        best = None
        for method in methods:
            if not accepts(method, operator, args.sigma_y):
                continue
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    result = restore(field, truth, task, method=method, sigma_y=args.sigma_y,
                                     num_samples=args.samples, nfe=args.nfe, seed=0)
            except Exception as error:  # a failing method is a row of the table, not a crash of the run
                rows.append([task, method, f"error: {str(error).splitlines()[0][:60]}", "", "", "", "", ""])
                payload.append({"task": task, "method": method, "error": str(error)})
                continue
            seconds = time.perf_counter() - t0
            mean = result["samples"].mean(1)
            with torch.no_grad():
                accuracy = float((classifier(mean).argmax(1) == labels).float().mean())
            row = {"task": task, "method": method, "psnr_mean": float(result["psnr_mean"].mean()),
                   "psnr_sample": float(result["psnr_sample"].mean()), "accuracy": accuracy,
                   "spread": float(result["spread"].mean()), "nfe": result["nfe"], "seconds": seconds}
            payload.append(row)
            rows.append([task, method, f"{row['psnr_mean']:.2f}", f"{row['psnr_sample']:.2f}", f"{accuracy:.2f}",
                         f"{row['spread']:.3f}", f"{row['nfe']:.0f}", f"{seconds:.0f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
            if best is None or row["psnr_mean"] > best[0]:
                best = (row["psnr_mean"], result)
            save_restore_png(result, pictures / f"{task}_{method}.png")
    with torch.no_grad():
        base_accuracy = float((classifier(truth).argmax(1) == labels).float().mean())
    meta = run_metadata(checkpoint=str(args.checkpoint), count=args.count, samples=args.samples, nfe=args.nfe,
                        sigma_y=args.sigma_y, classifier_accuracy_on_truth=base_accuracy)
    lines = [f"# Posterior samplers on held-out digits (sigma_y = {args.sigma_y}, {args.count} digits, "
             f"{args.samples} samples each, {args.nfe} evaluations per sample)", "", metadata_line(meta), "",
             f"Classifier accuracy on the clean digits: {base_accuracy:.2f}.", ""]
    lines += markdown_table(["task", "method", "PSNR mean (dB)", "PSNR sample (dB)", "class. acc.", "spread",
                             "nfe/sample", "s"], rows)
    write_results("inverse_digits", lines, {"meta": meta, "rows": payload})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
