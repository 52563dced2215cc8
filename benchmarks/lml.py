"""LML (Wang et al. 2025, "Unleashing High-Quality Image Generation in Diffusion Sampling Using
Second-Order Levenberg-Marquardt-Langevin") against the plain multistep solvers, same runs.

1. Exact mixture (VP path, D = 8, 3 components, 1000 samples): mean L2 error to a DOP853-class
   reference (dopri5, rtol = atol = 1e-10) of DPM-Solver++(3M) (data form) and DPM-Solver-3M
   (noise form, LML's released CIFAR-10 setting) at NFE 5–20: plain; LML as released (κ = 0,
   λ from the README's table: the identity); κ ∈ {0.1, 0.5} with the released λ; and the one
   (κ, λ) per solver that minimises the mean error over the NFEs of a grid (tuned).
2. The trained digits UNet (/tmp/runs/digits, data prediction on the linear path, labels of the
   359 held-out digits): digits Fréchet distance of 359 samples to the held-out split for the same
   configurations (tuned on a small grid on the digits model itself).

    python benchmarks/lml.py [--checkpoint /tmp/runs/digits] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402
from flowdiff.solvers.lml import lml_damping, lml_sample  # noqa: E402
from flowdiff.testing import random_mixture  # noqa: E402

SOLVERS = {"dpm-solver++3m": "data", "dpm-solver-3m": "noise"}
KAPPAS = (0.01, 0.05, 0.1, 0.2, 0.5)
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def gmm_part(nfes: list[int], batch: int) -> tuple[list[str], dict]:
    path = fd.paths.VP()
    mixture = random_mixture(8, 3, seed=0).with_path(path)
    x = path.prior_sample((batch, 8), torch.Generator().manual_seed(0), torch.float64)
    lines, payload = [], {}
    for solver, form in SOLVERS.items():
        field = fd.Field(mixture.model(form), path, form)
        ref = fd.sample(field, x, solver="dopri5", nfe=20000, rtol=1e-10, atol=1e-10)

        def err(**kw):
            r = lml_sample(field, x, solver=solver, **kw) if "kappa" in kw else fd.sample(field, x, solver=solver, nfe=kw["nfe"])
            return float((r.x - ref.x).norm(dim=1).mean())

        grid = {(k, lam): [err(nfe=n, kappa=k, damping=lam) for n in nfes] for k, lam in itertools.product(KAPPAS, DAMPINGS)}
        tuned = min(grid, key=lambda key: sum(grid[key]) / len(nfes))
        rows = []
        for j, n in enumerate(nfes):
            plain = err(nfe=n)
            released = err(nfe=n, kappa=0.0)
            per_nfe = min(grid, key=lambda key: grid[key][j])
            rows.append([n, f"{plain:.4f}", f"{released:.4f}", f"{err(nfe=n, kappa=0.1):.4f}", f"{err(nfe=n, kappa=0.5):.4f}",
                         f"{grid[tuned][j]:.4f}", f"{grid[per_nfe][j]:.4f} (κ={per_nfe[0]}, λ={per_nfe[1]:g})"])
        lines += [f"**{solver}** ({form} form); tuned: κ = {tuned[0]}, λ = {tuned[1]:g} (best mean over NFE of "
                  f"κ ∈ {KAPPAS} × λ ∈ {DAMPINGS})", ""]
        lines += markdown_table(["NFE", "plain", "LML released (κ=0)", "κ=0.1, released λ", "κ=0.5, released λ",
                                 "LML tuned", "best per NFE"], rows) + [""]
        payload[solver] = {"rows": rows, "tuned": list(tuned), "grid": {f"{k},{lam}": v for (k, lam), v in grid.items()}}
    return lines, payload


def digits_part(checkpoint: str, nfes: list[int]) -> tuple[list[str], dict]:
    from flowdiff.metrics.frechet import DigitsFeatureExtractor, digits_frechet_distance, load_digits_split
    from flowdiff.pipeline import load_field

    field, _ = load_field(checkpoint, unlabeled="null")
    split = load_digits_split()
    labels = split.test_labels
    extractor = DigitsFeatureExtractor.load_or_train()
    x = field.path.prior_sample((len(labels), 1, 8, 8), torch.Generator().manual_seed(0), torch.float32)
    cond = {"y": labels}

    def fid(solver: str, nfe: int, **kw) -> tuple[float, Tensor]:
        with torch.no_grad():
            if "kappa" in kw:
                r = lml_sample(field, x, solver=solver, nfe=nfe, cond=cond, **kw)
            else:
                r = fd.sample(field, x, solver=solver, nfe=nfe, cond=cond)
        return float(digits_frechet_distance(r.x.clamp(-1, 1), split.test_images, extractor)), r.x

    configs = [(0.1, None), (0.5, None)] + [(k, lam) for k in (0.1, 0.5) for lam in (1.0, 10.0, 100.0)]
    lines, payload = [], {}
    for solver in SOLVERS:
        rows = []
        for n in nfes:
            t0 = time.process_time()
            plain, xp = fid(solver, n)
            released, xr = fid(solver, n, kappa=0.0)
            values = {cfg: fid(solver, n, kappa=cfg[0], damping=cfg[1])[0] for cfg in configs}
            best = min(values, key=values.get)
            rows.append([n, f"{plain:.1f}", f"{released:.1f} (max |Δx| {float((xr - xp).abs().max()):.1e})"]
                        + [f"{values[c]:.1f}" for c in configs] + [f"{time.process_time() - t0:.0f}"])
            payload[f"{solver}/{n}"] = {"plain": plain, "released": released, **{f"{k},{lam}": v for (k, lam), v in values.items()},
                                        "best": list(best)}
        head = ["NFE", "plain", "released (κ=0)"] + [f"κ={k}, λ={'released' if lam is None else f'{lam:g}'}" for k, lam in configs] + ["CPU s"]
        lines += [f"**{solver}** on the digits UNet (digits Fréchet distance d_F², 359 samples vs 359 held-out; "
                  "real-vs-real floor about 27)", ""] + markdown_table(head, rows) + [""]
    return lines, payload


Tensor = torch.Tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="/tmp/runs/digits")
    parser.add_argument("--quick", action="store_true", help="fewer NFEs and samples")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    nfes = [5, 10] if args.quick else [5, 6, 8, 10, 15, 20]
    wall, cpu = time.perf_counter(), time.process_time()
    lines = ["# LML: exact-mixture solver error and digits Fréchet distance, with and without the correction", "",
             metadata_line(run_metadata()), "", f"Released damping λ by NFE: {[(n, lml_damping(n)) for n in nfes]}", ""]
    gmm_lines, gmm_payload = gmm_part(nfes, 200 if args.quick else 1000)
    lines += ["## Exact mixture: mean L2 error to the reference ODE solution", ""] + gmm_lines
    payload = {"gmm": gmm_payload}
    if not args.skip_digits and Path(args.checkpoint).exists():
        digit_lines, payload["digits"] = digits_part(args.checkpoint, [5, 10] if args.quick else [5, 10, 15, 20])
        lines += ["## Digits UNet", ""] + digit_lines
    lines += [f"Total: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU."]
    print("\n".join(lines))
    write_results("lml" if not args.quick else "lml_quick", "\n".join(lines), payload)


if __name__ == "__main__":
    main()
