"""SDE samplers scored by sliced-W2 to exact mixture samples, next to diffusers' stochastic schedulers.

Problem (issue 4, item 6): the diagonal Gaussian-mixture oracle in d = 32 with anisotropic
component scales (``fd.testing.random_mixture(32, 8, anisotropic=True)``), on DDPM's linear-β
table made continuous (``fd.paths.Discrete.linear()``, σ/α from 0.01 to 157: the range of
diffusers' default schedulers, so that every sampler sees the same noise levels). The field
is exact (noise prediction), so what is measured is the sampler alone.

Score: sliced Wasserstein-2 (``flowdiff.metrics.sliced_wasserstein``, fixed projections)
between ``n`` samples and ``n`` exact draws of the mixture, next to the *floor*: the same
distance between two independent exact samples of size ``n``. A sampler at the floor cannot
be told from the data at this sample size.

Every sampler starts from the same noise and spends exactly the stated NFE, final denoising
included (flowdiff's ``nfe`` counts it; diffusers' last step to σ = 0 is the same jump). The
diffusers schedulers are driven with the noise level they really use: the model is called at
the ``t`` whose log-SNR matches ``scheduler.sigmas[step_index]`` (or ``alphas_cumprod[t]``).

Run: ``.venv/bin/python benchmarks/sde_solvers.py`` (a few minutes on 2 CPU cores);
writes ``benchmarks/results/sde_solvers.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.metrics import sliced_wasserstein
from flowdiff.solvers import sample

NFES = (10, 20, 50, 100, 200)

#: flowdiff configurations: label -> (solver, options, grid or None for the solver's default)
FLOWDIFF_CONFIGS: dict[str, tuple[str, dict, str | None]] = {
    "euler-maruyama (reverse diffusion), uniform": ("euler-maruyama", {}, "uniform"),
    "euler-maruyama (reverse diffusion), quadratic": ("euler-maruyama", {}, "quadratic"),
    "ddpm (eta=1), uniform": ("ddpm", {}, "uniform"),
    "ddpm (eta=1), quadratic": ("ddpm", {}, "quadratic"),
    "sde-dpm-solver++1, quadratic": ("sde-dpm-solver++1", {}, "quadratic"),
    "sde-dpm-solver++1, logsnr": ("sde-dpm-solver++1", {}, "logsnr"),
    "sde-dpm-solver++2 (midpoint), quadratic": ("sde-dpm-solver++2", {}, "quadratic"),
    "sde-dpm-solver++2 (heun), quadratic": ("sde-dpm-solver++2", {"solver_type": "heun"}, "quadratic"),
    "sde-dpm-solver++2 (midpoint), logsnr": ("sde-dpm-solver++2", {}, "logsnr"),
    "sde-dpm-solver++2 (midpoint), uniform": ("sde-dpm-solver++2", {}, "uniform"),
    "edm churn (S_churn=40), karras": ("edm", {}, "karras"),
    "edm churn (S_churn=40), quadratic": ("edm", {}, "quadratic"),
    "pc (snr=0.16, 1 corrector), uniform": ("pc", {}, "uniform"),
}


def _t_of_sigma_tilde(path: fd.GaussianPath, sigma_tilde: float) -> float:
    """The time whose noise level σ/α equals ``sigma_tilde`` (λ = −log σ̃)."""
    return float(path.t_of_log_snr(torch.tensor(-math.log(sigma_tilde), dtype=torch.float64)))


def _t_of_alpha_bar(path: fd.GaussianPath, alpha_bar: float) -> float:
    return float(path.t_of_log_snr(torch.tensor(0.5 * math.log(alpha_bar / (1 - alpha_bar)), dtype=torch.float64)))


def diffusers_samplers(path: fd.GaussianPath, noise_fn: Callable[[Tensor, float], Tensor]) -> dict[str, Callable]:
    """diffusers' stochastic schedulers, each ``run(x_T, nfe, generator) -> samples`` (empty if not installed).

    ``noise_fn(x, t)`` is the exact noise prediction at flowdiff time ``t`` (VP state ``x``).
    """
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return {}
    from diffusers import (
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
    )

    def dpm_sde(order: int) -> Callable:
        def run(x: Tensor, nfe: int, generator: torch.Generator) -> Tensor:
            sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=order)
            sched.set_timesteps(nfe)
            x = x.float() * sched.init_noise_sigma
            for k in sched.timesteps:
                if sched.step_index is None:
                    sched._init_step_index(k)
                t = _t_of_sigma_tilde(path, float(sched.sigmas[sched.step_index]))
                x = sched.step(noise_fn(x, t), k, x, generator=generator).prev_sample
            return x

        return run

    def ddpm(x: Tensor, nfe: int, generator: torch.Generator) -> Tensor:
        sched = DDPMScheduler(clip_sample=False)  # the default clips x̂ to [-1, 1], wrong for this data
        sched.set_timesteps(nfe)
        x = x.float() * sched.init_noise_sigma
        for k in sched.timesteps:
            t = _t_of_alpha_bar(path, float(sched.alphas_cumprod[int(k)]))
            x = sched.step(noise_fn(x, t), k, x, generator=generator).prev_sample
        return x

    def euler_ancestral(x: Tensor, nfe: int, generator: torch.Generator) -> Tensor:
        sched = EulerAncestralDiscreteScheduler()
        sched.set_timesteps(nfe)
        # Karras-type state x̃ = x/α; the VP noise x_T ≈ ε becomes x̃ = σ̃_max ε (init_noise_sigma ≈ σ̃_max)
        x = x.float() * sched.init_noise_sigma
        for k in sched.timesteps:
            inp = sched.scale_model_input(x, k)  # = x̃/√(σ̃² + 1), the VP state
            t = _t_of_sigma_tilde(path, float(sched.sigmas[sched.step_index]))
            x = sched.step(noise_fn(inp, t), k, x, generator=generator).prev_sample
        return x

    return {
        "diffusers DPMSolverMultistep sde-dpmsolver++ (2M)": dpm_sde(2),
        "diffusers DPMSolverMultistep sde-dpmsolver++ (1)": dpm_sde(1),
        "diffusers DDPMScheduler": ddpm,
        "diffusers EulerAncestralDiscrete": euler_ancestral,
    }


def run_sde_benchmark(
    dim: int = 32,
    num_components: int = 8,
    num_samples: int = 4096,
    nfes: tuple[int, ...] = NFES,
    seed: int = 0,
    num_projections: int = 512,
    include_diffusers: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Score flowdiff's SDE samplers (and diffusers', if installed) by sliced-W2 to exact samples.

    Returns:
        ``{"config": …, "floor": {"mean", "std"}, "results": {label: {nfe: sw2}}, "seconds": {label: s}}``.
    """
    torch.manual_seed(seed)
    path = fd.paths.Discrete.linear()
    mix = fd.testing.random_mixture(dim, num_components, seed=seed, anisotropic=True, path=path)
    noise_model = mix.model("noise")
    field = fd.Field(noise_model, path, "noise")
    gen = torch.Generator().manual_seed(seed + 1)
    data = mix.sample(num_samples, gen)
    x_init = path.prior_sample((num_samples, dim), generator=gen, dtype=torch.float64)

    def sw2(x: Tensor) -> float:
        return float(
            sliced_wasserstein(x.double(), data, num_projections, generator=torch.Generator().manual_seed(12345))
        )

    floors = [sw2(mix.sample(num_samples, torch.Generator().manual_seed(1000 + r))) for r in range(5)]
    floor_mean = sum(floors) / len(floors)
    floor_std = (sum((f - floor_mean) ** 2 for f in floors) / (len(floors) - 1)) ** 0.5
    if verbose:
        print(f"d={dim}, K={num_components}, n={num_samples}: data-vs-data floor {floor_mean:.4f} ± {floor_std:.4f}")

    results: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}
    for label, (solver, options, grid) in FLOWDIFF_CONFIGS.items():
        results[label], start = {}, time.perf_counter()
        for nfe in nfes:
            res = sample(
                field,
                x_init,
                solver=solver,
                nfe=nfe,
                grid=grid,
                generator=torch.Generator().manual_seed(nfe),
                **options,
            )
            if res.nfe > nfe:
                raise RuntimeError(f"{label}: spent {res.nfe} model calls, more than nfe={nfe}")
            results[label][nfe] = sw2(res.x)
        seconds[label] = time.perf_counter() - start
        if verbose:
            print(f"{label:50s} " + " ".join(f"{results[label][n]:.4f}" for n in nfes))

    def noise_fn(x: Tensor, t: float) -> Tensor:
        xd = x.double()
        return noise_model(xd, torch.full((x.shape[0],), t, dtype=torch.float64)).to(x.dtype)

    peers = diffusers_samplers(path, noise_fn) if include_diffusers else {}
    for label, run in peers.items():
        results[label], start = {}, time.perf_counter()
        for nfe in nfes:
            results[label][nfe] = sw2(run(x_init, nfe, torch.Generator().manual_seed(nfe)))
        seconds[label] = time.perf_counter() - start
        if verbose:
            print(f"{label:50s} " + " ".join(f"{results[label][n]:.4f}" for n in nfes))

    return {
        "config": {
            "dim": dim,
            "num_components": num_components,
            "num_samples": num_samples,
            "nfes": list(nfes),
            "seed": seed,
            "num_projections": num_projections,
            "path": repr(path),
            "sigma_tilde_range": [
                math.exp(-float(path.log_snr(path.t_max))),
                math.exp(-float(path.log_snr(path.t_min))),
            ],
            "run": run_metadata(),
        },
        "floor": {"mean": floor_mean, "std": floor_std, "values": floors},
        "results": results,
        "seconds": seconds,
    }


def write_tables(report: dict[str, Any], stem: str = "sde_solvers") -> tuple[Path, Path]:
    """Write ``results/<stem>.json`` and a Markdown table ``results/<stem>.md``."""
    cfg, floor = report["config"], report["floor"]
    nfes = cfg["nfes"]
    lines = [
        "# SDE samplers: sliced-W2 to exact mixture samples",
        "",
        f"d = {cfg['dim']} diagonal Gaussian mixture ({cfg['num_components']} anisotropic components), "
        f"path {cfg['path']} (σ/α from {cfg['sigma_tilde_range'][0]:.3g} to {cfg['sigma_tilde_range'][1]:.3g}), "
        f"exact noise-prediction field; {cfg['num_samples']} samples, {cfg['num_projections']} projections, seed {cfg['seed']}. "
        f"NFE counts every model call, the final denoise included. Run on {metadata_line(cfg['run'])}",
        "",
        (
            f"**Floor** (two independent exact samples of the same size): {floor['mean']:.4f} ± {floor['std']:.4f}. "
            "Bold: best at that NFE."
        ),
        "",
        "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|" + "---|" * len(nfes),
    ]
    best = {n: min(r[n] if n in r else r[str(n)] for r in report["results"].values()) for n in nfes}
    for label, row in report["results"].items():
        cells = []
        for n in nfes:
            v = row[n] if n in row else row[str(n)]
            cells.append(f"**{v:.4f}**" if v == best[n] else f"{v:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    md_path, json_path = write_results(stem, lines, report, indent=2)
    return json_path, md_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small oracles)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run_sde_benchmark(num_samples=args.samples, seed=args.seed, include_diffusers=not args.no_diffusers)
    for p in write_tables(report):
        print("wrote", p)


if __name__ == "__main__":
    main()
