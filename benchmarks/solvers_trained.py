"""Low-NFE solver error on TRAINED digits models (issue 12: defaults chosen on trained models, not only on
exact mixtures).

For each checkpoint (the digits UNet of ``configs/digits.yaml`` and the digits MLPs), 128 noise
draws are integrated by every solver at NFE 3-20 on its default grid, and by a reference solve of
the same probability-flow ODE (``dpm-solver++3m`` at 300 NFE on a log-SNR grid, float32; its distance to
``unipc`` at 300 NFE is printed as the reference's own error). Error = RMS over pixels of the final
sample against the reference, median over the draws. The row ``default`` is what ``fd.sample``
picks with no solver named; the question the table answers is whether it is ever worse than
DPM-Solver++(2M) on the same grid.

Run: ``.venv/bin/python benchmarks/solvers_trained.py --checkpoint RUN/checkpoints/latest [...]``
(train one with ``flowdiff train --config configs/digits.yaml``). Writes
``benchmarks/results/solvers_trained.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.pipeline import load_field

SOLVERS = [("default", None, {}), ("dpm-solver++2m", "dpm-solver++2m", {}), ("dpm-solver++3m", "dpm-solver++3m", {}),
           ("unipc", "unipc", {}), ("unipc data bh2", "unipc", {"prediction": "data", "variant": "bh2"}),
           ("deis", "deis", {}), ("ddim", "ddim", {}), ("heun", "heun", {})]
NFES = [3, 4, 5, 6, 8, 10, 15, 20]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).flatten(1).mean(1).sqrt().median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint folders (name=path or path)")
    parser.add_argument("--count", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    payload = {"meta": run_metadata(count=args.count), "models": {}}
    lines = ["# Solver error on trained digits models (RMS vs a 300-NFE reference, median over draws)", "",
             metadata_line(payload["meta"]), ""]
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=")
        field, cfg = load_field(path)
        name = name or Path(path).parts[-3]
        shape = tuple(cfg["data"]["shape"]) if cfg["data"].get("shape") else (64,)
        x0 = field.path.prior_sample((args.count, *shape), generator=torch.Generator().manual_seed(0))
        t0 = time.process_time()
        ref = fd.sample(field, x0, solver="dpm-solver++3m", nfe=300, grid="logsnr").x
        ref_err = rms(fd.sample(field, x0, solver="unipc", nfe=300, grid="logsnr").x, ref)
        rows, table = [], {}
        for label, solver, opts in SOLVERS:
            errs = []
            for n in NFES:
                try:
                    res = fd.sample(field, x0, solver=solver, nfe=n, **opts)
                    errs.append(rms(res.x, ref))
                except ValueError:
                    errs.append(float("nan"))  # budget too small for the solver
            table[label] = errs
            rows.append([label] + [f"{e:.3g}" for e in errs])
        default_vs_2m = [d / m for d, m in zip(table["default"], table["dpm-solver++2m"])]
        rows.append(["default / 2M"] + [f"{r:.2f}" for r in default_vs_2m])
        payload["models"][name] = {"errors": table, "nfes": NFES, "reference_error": ref_err,
                                   "path": type(field.path).__name__, "prediction": field.prediction,
                                   "cpu_s": time.process_time() - t0}
        lines += [f"## {name} ({type(field.path).__name__} path, {field.prediction} prediction; reference error {ref_err:.1e})",
                  "", *markdown_table(["solver"] + [f"NFE {n}" for n in NFES], rows), ""]
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    write_results("solvers_trained", lines, payload)


if __name__ == "__main__":
    main()
