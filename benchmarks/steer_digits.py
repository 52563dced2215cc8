"""Reward steering of the trained digits model toward one class: RBF, best-of-N, beam, SMC and gradient guidance.

The reward is the digits classifier's log-probability of a target class,
``r(x) = log softmax(classifier(x))[c]`` (the CNN of ``flowdiff.metrics.DigitsFeatureExtractor``
that the accuracy and Fréchet metrics use). With temperature β = 1 the tilted target
``p(x) exp(r(x))/Z = p(x) p_clf(c | x)/p_clf(c)`` is the class-conditional law under the
classifier, so SMC aims at class-``c`` digits *with their diversity*, while the searches
(best-of-N, beam, RBF) maximise r. Every method spends the same model evaluations per returned
sample (the unconditional network, null label). Columns: mean reward (log-prob), mean class
probability, accuracy (argmax = c), diversity (mean pairwise L2 distance between returned
samples, pixels in [-1, 1]), Fréchet distance in the classifier's features to the held-out digits
of class c (biased upwards at small sample sizes: compare rows of equal size; the floor row is real
training digits of class c), CPU seconds.

Run: ``.venv/bin/python benchmarks/steer_digits.py --checkpoint /tmp/runs/digits [--samples 64]
[--nfe 50 200] [--digit 8] [--resume]``. Writes ``benchmarks/results/steer_digits.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.metrics import DigitsFeatureExtractor, digits_frechet_distance, load_digits_split
from flowdiff.pipeline import load_field

METHODS = ["bon", "beam", "rbf", "smc", "dps"]


def diversity(x: torch.Tensor) -> float:
    flat = x.reshape(x.shape[0], -1).double()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/runs/digits")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--nfe", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--digit", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the rows of an earlier (interrupted) run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    field, cfg = load_field(args.checkpoint, unlabeled="null")
    shape = tuple(cfg["data"]["shape"])
    clf = DigitsFeatureExtractor.load_or_train()
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    c = args.digit

    def reward(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(clf(x.float()), dim=-1)[:, c].to(x.dtype)

    split = load_digits_split()
    ref = split.test_images[split.test_labels == c]
    train_c = split.train_images[split.train_labels == c]
    n = args.samples
    floor_x = train_c[torch.randperm(train_c.shape[0], generator=torch.Generator().manual_seed(0))[:n]]
    floor_fd = float(digits_frechet_distance(floor_x, ref, clf))
    floor_div = diversity(floor_x)
    payload = {"meta": run_metadata(samples=n, digit=c, checkpoint=str(args.checkpoint)), "rows": []}
    rows = [["real class-%d train digits" % c, "-", f"{float(reward(floor_x.reshape(n, *shape)).mean()):.3f}",
             f"{float(reward(floor_x.reshape(n, *shape)).exp().mean()):.3f}", "-", f"{floor_div:.2f}",
             f"{floor_fd:.1f}", "-"]]
    done = {}
    if args.resume and (RESULTS / "steer_digits.json").exists():
        old = json.loads((RESULTS / "steer_digits.json").read_text())
        done = {(r["method"], int(r["budget"])): r for r in old.get("rows", []) if "budget" in r}

    def render() -> str:
        lines = [f"# Steering the digits model toward class {c} (reward log p_clf({c}|x), beta = 1)", "",
                 metadata_line(payload["meta"]), "",
                 f"{n} returned samples per row, same seed; Fréchet distance to the {ref.shape[0]} held-out "
                 f"class-{c} digits (floor: {n} real training digits of class {c}).", ""]
        lines += markdown_table(["method", "nfe/sample", "mean r", "mean p(c|x)", "accuracy", "diversity",
                                 "Fréchet", "CPU s"], rows)
        return "\n".join(lines)

    for nfe in args.nfe:
        for method in args.methods:
            if (method, nfe) in done:
                row = done[(method, nfe)]
                payload["rows"].append(row)
                rows.append([method, f"{row['nfe']:.0f}", f"{row['reward']:.3f}", f"{row['prob']:.3f}",
                             f"{row['accuracy']:.2f}", f"{row['diversity']:.2f}", f"{row['frechet']:.1f}",
                             f"{row['cpu_s']:.0f}"])
                continue
            t0, w0 = time.process_time(), time.perf_counter()
            try:
                res = fd.steer.sample(field, reward, method=method, num_samples=n, nfe=nfe, temperature=1.0,
                                      generator=torch.Generator().manual_seed(args.seed), shape=shape)
            except Exception as error:  # a failing method is a row, not a crash
                rows.append([method, nfe, f"error: {str(error)[:60]}", "", "", "", "", ""])
                continue
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
            x = res.x.clamp(-1, 1)
            with torch.no_grad():
                logp = torch.log_softmax(clf(x.float()), -1)
            row = {"method": method, "budget": nfe, "nfe": res.nfe, "reward": float(res.reward.mean()),
                   "prob": float(logp[:, c].exp().mean()), "accuracy": float((logp.argmax(1) == c).float().mean()),
                   "diversity": diversity(x), "frechet": float(digits_frechet_distance(x, ref, clf)),
                   "cpu_s": cpu, "wall_s": wall, "vjp": res.vjp}
            payload["rows"].append(row)
            rows.append([method, f"{res.nfe:.0f}", f"{row['reward']:.3f}", f"{row['prob']:.3f}",
                         f"{row['accuracy']:.2f}", f"{row['diversity']:.2f}", f"{row['frechet']:.1f}", f"{cpu:.0f}"])
            print(rows[-1], flush=True)
            write_results("steer_digits", render(), payload)  # after every row: an interrupted run keeps its rows
    text = render()
    print(text)
    write_results("steer_digits", text, payload)


if __name__ == "__main__":
    main()
