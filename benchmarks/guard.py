"""The multistep stability guard (issue 12): where does lowering the order help, where does it hurt?

``guard=θ`` (UniPC, DPM-Solver(++) multistep; off by default) lowers a sample's order on a step
when its order-p correction outgrows θ times its order-(p−1) one. Error with the guard off and
at θ = 1, 2, 4, same noise, same grid, on:

* the trained digits UNet (``--checkpoint``): RMS over pixels against a 300-NFE
  ``dpm-solver++3m`` log-SNR reference, median over ``--count`` draws;
* exact Gaussian mixtures (``benchmarks/solvers.py``'s problem: the DDPM linear-β path from
  σ = 157 to 0.01, anisotropic diagonal mixtures in d = 32 and 48): RMS against the DOP853 reference;
* a stiff single Gaussian (scales 0.1, 0.5, 2; tests/test_solvers_exponential.py), exact, data
  model: RMS against a 2000-NFE reference;
* a "jittery network": an exact d = 16 mixture's denoiser plus 0.05·sin(60 t)·u (a model error
  that oscillates in time, as a poorly fitted network's can): RMS against a 2000-NFE reference.

Columns: the unguarded error, the ratio to it at each θ, and the fraction of (sample, step) pairs
lowered at θ = 1. The default solver at these NFE is UniPC-2 (order 2 below 20 steps), which
the guard never lowered.

Run: ``.venv/bin/python benchmarks/guard.py --checkpoint RUN`` (a few minutes). Writes
``benchmarks/results/guard.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402
from solvers import Problem  # noqa: E402

import flowdiff as fd
from flowdiff.solvers import exponential

CONFIGS = [
    ("unipc (default order)", "unipc", {}),
    ("unipc order 3", "unipc", {"order": 3}),
    ("unipc noise form", "unipc", {"prediction": "noise", "variant": "bh1"}),
    ("unipc-3 noise form", "unipc", {"order": 3, "prediction": "noise", "variant": "bh1"}),
    ("dpm-solver++3m", "dpm-solver++3m", {}),
    ("dpm-solver-3m (noise)", "dpm-solver-3m", {}),
]
# (the default UniPC switches to the model's own form, noise for a noise field, from 12 steps on)
NFES = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30)


class Counter:
    """Counts the (sample, step) pairs the guard lowers during a run."""

    def __init__(self):
        self.lowered = self.total = 0
        self._orig = exponential.guarded_orders

    def __enter__(self):
        def counting(x_base, updates, theta):
            order = self._orig(x_base, updates, theta)
            self.lowered += int((order < len(updates)).sum())
            self.total += int(order.numel())
            return order

        exponential.guarded_orders = counting
        return self

    def __exit__(self, *exc):
        exponential.guarded_orders = self._orig


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).flatten(1).mean(1).sqrt().median())


def run_cases(name: str, field, x0, ref, nfes, error=None) -> list[list]:
    error = error or (lambda x: rms(x, ref))
    rows = []
    for label, solver, opts in CONFIGS:
        for nfe in nfes:
            off = error(fd.sample(field, x0.clone(), solver=solver, nfe=nfe, guard=None, **opts).x)
            with Counter() as c:
                one = error(fd.sample(field, x0.clone(), solver=solver, nfe=nfe, guard=1.0, **opts).x)
            frac = c.lowered / max(c.total, 1)
            two, four = (error(fd.sample(field, x0.clone(), solver=solver, nfe=nfe, guard=g, **opts).x) for g in (2.0, 4.0))
            rows.append([name, label, nfe, f"{off:.4g}", f"{one / off:.2f}", f"{two / off:.2f}", f"{four / off:.2f}",
                         f"{frac:.3f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="trained digits run (skipped if not given)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--dims", default="32,48")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.process_time()
    rows: list[list] = []
    if args.checkpoint:
        from flowdiff.pipeline import load_field

        field, cfg = load_field(args.checkpoint)
        shape = tuple(cfg["data"]["shape"]) if cfg["data"].get("shape") else (64,)
        x0 = field.path.prior_sample((args.count, *shape), generator=torch.Generator().manual_seed(0))
        ref = fd.sample(field, x0, solver="dpm-solver++3m", nfe=300, grid="logsnr").x
        rows += run_cases(f"digits {field.prediction} UNet", field, x0, ref, NFES)
    path = fd.paths.Discrete.linear()
    g = torch.Generator().manual_seed(1)
    gauss = fd.testing.GaussianMixture(torch.tensor([[1.0, -0.5, 0.3]], dtype=torch.float64),
                                       scales=torch.tensor([[0.1, 0.5, 2.0]], dtype=torch.float64), path=path)
    mix = fd.testing.random_mixture(16, 6, seed=3, anisotropic=True, path=path)
    u = torch.randn(16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = mix.model("data")

    def jittery(x, t):
        tt = t.reshape(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(t) else t
        return base(x, t) + 0.05 * torch.sin(60.0 * tt) * u

    for name, field, dim in [("stiff single Gaussian d=3", fd.Field(gauss.model("data"), path, "data"), 3),
                             ("jittery mixture model d=16", fd.Field(jittery, path, "data"), 16)]:
        x0 = path.prior_sample((args.count, dim), generator=g, dtype=torch.float64)
        ref = fd.sample(field, x0, solver="dpm-solver++3m", nfe=2000, grid="logsnr").x
        rows += run_cases(name, field, x0, ref, NFES)
    for dim in map(int, args.dims.split(",")):
        for seed in map(int, args.seeds.split(",")):
            problem = Problem(args.count, dim, 8, seed)
            field = fd.Field(problem.mix.model("noise"), problem.path, "noise")
            rows += run_cases(f"mixture d={dim} seed {seed}", field, problem.x_vp, None, NFES, problem.error)
    header = ["problem", "solver", "NFE", "error, guard off", "θ=1 / off", "θ=2 / off", "θ=4 / off", "lowered (θ=1)"]
    meta = run_metadata(count=args.count, cpu_seconds=round(time.process_time() - t0, 1))
    lines = ["# Multistep stability guard: error with the guard off and on (same noise, same grid)", "",
             metadata_line(meta), "", *markdown_table(header, rows)]
    write_results("guard", lines, {"meta": meta, "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
