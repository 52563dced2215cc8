"""Deterministic samplers: error against the exact probability-flow ODE solution, per NFE,
for flowdiff, diffusers and k-diffusion in the same run (issue 4, item 6).

Problem. The diagonal Gaussian-mixture oracle in d = 32 with anisotropic component scales
(``fd.testing.random_mixture(32, 8, seed=0, anisotropic=True)``) on DDPM's 1000-step linear-β
table made continuous (``fd.paths.Discrete.linear()``: σ/α from 157 at ``t = 0`` to 0.01 at
``t = t_max``, exactly the noise levels of diffusers' ``beta_schedule="linear"`` between
timesteps 999 and 0). The field is exact (noise prediction, float64), so what is measured
is the solver alone.

The same ODE from the same start for every library. All samplers integrate the
probability-flow ODE :math:`d\\tilde x/d\\tilde\\sigma = (\\tilde x - \\hat x)/\\tilde\\sigma` (in whatever
variables they use) from the same draw at σ̃ = 157 — the VP state ``x = σ(0)·z`` for flowdiff
and diffusers' VP-state schedulers, ``x̃ = x/α(0)`` for the σ̃-space ones and k-diffusion —
and end with a denoising jump: flowdiff's ``denoise_final`` (counted in its ``nfe``), the
last step to σ = 0 of diffusers and k-diffusion (one model call), or an explicit denoise at
σ̃_min where a sampler stops there (diffusers DEIS and UniPC-bh1 with ``sigma_min``,
k-diffusion ``dpm_fast``), counted in its NFE. The oracle is evaluated at the noise level the
peer really uses: ``scheduler.sigmas[scheduler.step_index]`` for diffusers, the ``sigma``
argument for k-diffusion, mapped to ``t`` through the exact inverse of λ = −log σ̃.

Error. The reference is a float64 solve of ``dx̃/dλ = x̂(α x̃, t(λ)) − x̃`` by scipy's DOP853
(rtol = atol = 1e-10) from the same start to ``t_max``, followed by the same denoise. The
error of a sample is the RMS over coordinates of its difference to the reference; the table
gives the median over the samples (robust to the rare sample that switches mode).

Also: configurations on the :func:`~flowdiff.solvers.grids.jump_grid` rule; with ``--tuned``,
:func:`~flowdiff.solvers.tuning.tune_solver` per NFE on separate pilot noise (its cost in the
metadata); with ``--official FILE``, the official DPM-Solver code (``dpm_solver_pytorch.py`` of
LuChengTHU/dpm-solver, not on PyPI, so not vendored) in 156 configurations as a peer; with
``--seeds 0,1,2``, one run per mixture seed and ``<stem>_seeds.md`` with each ratio's median and
worst (issue 12: the external check uses unseen seeds).

Run: ``.venv/bin/python benchmarks/solvers.py`` (a few minutes on 2 cores) or ``--quick``; the
issue-12 tables: ``--dim 48 --samples 256 --official FILE --tuned --tuned-nfe 3,4,5,8
--stem solvers_d48 --seeds K`` per seed (about 35 minutes each on a shared CPU), then
``--seeds 0,1,2 --reuse``.
Writes ``benchmarks/results/solvers.{md,json,csv,png}``. Needs ``scipy``, and ``diffusers``
/ ``k-diffusion`` for the peers (skipped with a note when missing; k-diffusion is loaded
through ``k_diffusion/sampling.py`` alone, as its package ``__init__`` pulls torchvision).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402 - the benchmarks folder first
    RESULTS,
    SigmaInterface,
    diffusers_configs,
    kdiff_configs,
    load_k_sampling,
    metadata_line,
    run_diffusers,
    run_kdiff,
    run_metadata,
    sigma_range,
    write_results,
)

import flowdiff as fd
from flowdiff.solvers import available, get_solver, sample
from flowdiff.solvers.grids import jump_grid
from flowdiff.solvers.tuning import grid_steps, tune_solver

NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 50)
#: NFEs at which ``--tuned`` fits ``tune_solver`` (tuned-multistep) on separate pilot noise.
TUNED_NFES = (3, 4, 5, 6, 8, 10)
#: Generic (untuned) solvers run on the :func:`flowdiff.solvers.grids.jump_grid` rule.
JUMP_SOLVERS = (
    ("unipc", {"order": 2, "variant": "bh2", "prediction": "data", "lower_order_final": False}),
    ("unipc", {"order": 3, "variant": "bh1", "prediction": "data", "lower_order_final": False}),
    ("unipc", {"order": 3, "variant": "bh2", "prediction": "data", "lower_order_final": False}),
    ("dpm-solver++2m", {"lower_order_final": False}),
    ("deis", {"order": 3, "lower_order_final": False}),
)
GRIDS = ("logsnr", "quadratic", "karras", "uniform")  # "shifted" is for flow paths: off here


# ---------------------------------------------------------------------------------------
# Problem
# ---------------------------------------------------------------------------------------


class Problem(SigmaInterface):
    """The oracle, the start and the reference solution; counts oracle calls for the peers."""

    def __init__(self, n: int, dim: int, components: int, seed: int):
        self.path = fd.paths.Discrete.linear()
        self.mix = fd.testing.random_mixture(dim, components, seed=seed, anisotropic=True, path=self.path)
        g = torch.Generator().manual_seed(seed + 1)
        z = torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.t0, self.t1 = self.path.t_min, self.path.t_max
        self.alpha0, self.alpha1, self.sigma_max, self.sigma_min = sigma_range(self.path)
        self.x_vp = self.path.sigma(torch.tensor(self.t0, dtype=torch.float64)) * z  # VP state at t0
        self.x_tilde = self.x_vp / self.alpha0  # sigma~-space state (k-diffusion, Karras-type)
        self.calls = 0
        self.seed = seed
        self.reference = self._reference()

    def _denoise(self, x: Tensor, t: float) -> Tensor:
        return self.mix.denoise(x, t)

    def _noise(self, x: Tensor, t: float) -> Tensor:
        return self.mix.noise(x, t)

    # -- reference ----------------------------------------------------------------------
    def _reference(self) -> Tensor:
        from scipy.integrate import solve_ivp

        path, mix = self.path, self.mix
        shape = self.x_tilde.shape
        lam0, lam1 = path.table([self.t0, self.t1]).log_snr.tolist()

        def rhs(lam: float, y: np.ndarray) -> np.ndarray:
            t = float(path.t_of_log_snr(torch.tensor([lam], dtype=torch.float64)))
            t = min(max(t, self.t0), self.t1)
            a = float(path.alpha(torch.tensor([t], dtype=torch.float64)))
            xt = torch.from_numpy(y).reshape(shape)
            return (mix.denoise(xt * a, t) - xt).reshape(-1).numpy()

        sol = solve_ivp(rhs, (lam0, lam1), self.x_tilde.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-10)
        if not sol.success:
            raise RuntimeError(f"reference solve failed: {sol.message}")
        x_end = torch.from_numpy(sol.y[:, -1]).reshape(shape) * self.alpha1
        return mix.denoise(x_end, self.t1)



# ---------------------------------------------------------------------------------------
# flowdiff
# ---------------------------------------------------------------------------------------


def flowdiff_configs(quick: bool) -> list[tuple[str, str | None, dict, str | None]]:
    """(label, solver, options, grid): every deterministic fixed-step solver × grid, plus variants."""
    configs: list[tuple[str, str | None, dict, str | None]] = [("default (solver=None)", None, {}, None)]
    grids = ("logsnr", "quadratic", "karras") if quick else GRIDS
    for name in available():
        spec = get_solver(name)
        if (spec.kind == "sde" or spec.stochastic or spec.adaptive or spec.alias_of is not None
                or spec.required_options or name in ("dpm-solver", "dpm-solver-v3")):
            continue  # "dpm-solver" is dpm-solver-3m; v3 needs statistics estimated per model
        for grid in grids:
            configs.append((f"{name} [{grid}]", name, {}, grid))
            if spec.kind == "ode" and grid in ("karras", "logsnr"):
                configs.append((f"{name} space=sigma [{grid}]", name, {"space": "sigma"}, grid))
    variants = [
        ("dpm-solver-3m", {"solver_type": "taylor"}),
        ("dpm-solver++3m", {"solver_type": "taylor"}),
        ("dpm-solver++2m", {"solver_type": "taylor"}),
        ("dpm-solver-3m", {"lower_order_final": True}),
        ("dpm-solver++2m", {"lower_order_final": 10}),
        ("dpm-solver++3m", {"lower_order_final": 10}),
        ("unipc", {"order": 2}),
        ("unipc", {"order": 3}),
        ("unipc", {"prediction": "data"}),
        ("unipc", {"prediction": "data", "variant": "bh2"}),
        ("unipc", {"order": 2, "prediction": "data", "variant": "bh2"}),
        ("unipc", {"lower_order_final": 10}),
        ("unipc", {"order": 3, "lower_order_final": 10}),
        ("deis", {"order": 2}),
        ("deis", {"order": 4}),
        ("deis", {"order": 3, "prediction": "data"}),
    ]
    for name, opts in variants:
        for grid in ("logsnr", "quadratic"):
            label = f"{name} {' '.join(f'{k}={v}' for k, v in opts.items())} [{grid}]"
            configs.append((label, name, opts, grid))
    for name, opts in JUMP_SOLVERS:  # the jump_grid rule: steps on sigma~ in [0.45/nfe, 7], final denoise from there
        label = f"{name} {' '.join(f'{k}={v}' for k, v in opts.items())} [jump_grid]"
        configs.append((label, name, opts, "jump"))
    return configs


def run_flowdiff(problem: Problem, solver: str | None, options: dict, grid: str | None, nfe: int) -> tuple[float, int]:
    field = fd.Field(problem.mix.model("noise"), problem.path, "noise")
    if grid == "jump":  # an explicit grid from the rule: it ends where the final denoise jumps from
        steps = grid_steps(field, solver, nfe, True, options)
        if steps < 2:
            return float("nan"), 0
        grid = jump_grid(problem.path, steps)
    res = sample(field, problem.x_vp.clone(), solver=solver, nfe=nfe, grid=grid, **options)
    return problem.error(res.x), res.nfe


def run_tuned(problem: Problem, nfe: int, pilots: int, max_evals: int, time_budget: float) -> tuple[float, int, dict]:
    """tune_solver on ``pilots`` separate noise draws (never the evaluation draws), then the evaluation."""
    field = fd.Field(problem.mix.model("noise"), problem.path, "noise")
    noise = problem.path.prior_sample((pilots, *problem.x_vp.shape[1:]),
                                      generator=torch.Generator().manual_seed(problem.seed + 1000), dtype=torch.float64)
    tuned = tune_solver(field, nfe, noise, max_evals=max_evals, time_budget=time_budget)
    res = sample(field, problem.x_vp.clone(), **tuned.sample_kwargs(field))
    return problem.error(res.x), res.nfe, tuned.cost


# ---------------------------------------------------------------------------------------
# The official DPM-Solver code (Lu et al.; not on PyPI: --official FILE loads dpm_solver_pytorch.py)
# ---------------------------------------------------------------------------------------

#: (algorithm_type, method, order, skip_type, solver_type, denoise_to_zero) of the official ``DPM_Solver.sample``.
OFFICIAL_CONFIGS = [
    (algo, method, order, skip, solver_type, dtz)
    for algo in ("dpmsolver", "dpmsolver++")
    for method, order in (("multistep", 1), ("multistep", 2), ("multistep", 3), ("singlestep", 2), ("singlestep", 3),
                          ("singlestep_fixed", 2), ("singlestep_fixed", 3))
    for skip in ("logSNR", "time_uniform", "time_quadratic")
    for solver_type in ("dpmsolver", "taylor")
    for dtz in (False, True)
    if not (method == "multistep" and order == 1 and solver_type == "taylor")
]


def load_official(file: Path):
    """Import the official ``dpm_solver_pytorch.py`` (LuChengTHU/dpm-solver) from a file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpm_solver_pytorch", file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run_official(problem: Problem, module, config: tuple, nfe: int) -> tuple[float, int]:
    """One configuration of the official code on the same β table (``NoiseScheduleVP("discrete")``),
    the oracle called at the path time with the same λ; ``denoise_to_zero`` counts its call."""
    algo, method, order, skip, solver_type, dtz = config
    ns = module.NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                                dtype=torch.float64)
    calls = [0]

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        t_path = float(problem.path.t_of_log_snr(ns.marginal_lambda(t[:1]).to(torch.float64)))
        return problem.mix.noise(x, min(max(t_path, problem.t0), problem.t1))

    steps = nfe - 1 if dtz else nfe
    if steps < 1 or (method == "multistep" and steps < order):
        return float("nan"), 0
    solver = module.DPM_Solver(model_fn, ns, algorithm_type=algo)
    x = solver.sample(problem.x_vp.clone(), steps=steps, order=order, skip_type=skip, method=method,
                      lower_order_final=True, denoise_to_zero=dtz, solver_type=solver_type)
    return problem.error(x), calls[0]


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, NFE values and grids")
    parser.add_argument("--samples", type=int, default=None, help="number of samples (default 512, quick 128)")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=str, default=None,
                        help="comma-separated mixture seeds: run each and write <stem>_seeds.md (ratios, median/worst)")
    parser.add_argument("--nfe", type=str, default=None, help="comma-separated NFE values (default all)")
    parser.add_argument("--official", type=Path, default=None,
                        help="the official dpm_solver_pytorch.py (LuChengTHU/dpm-solver) to run as a peer")
    parser.add_argument("--tuned", action="store_true", help="also fit tune_solver (tuned-multistep) per NFE")
    parser.add_argument("--pilots", type=int, default=128, help="pilot noise draws for --tuned")
    parser.add_argument("--tune-evals", type=int, default=3000)
    parser.add_argument("--tune-seconds", type=float, default=600.0)
    parser.add_argument("--stem", type=str, default="solvers", help="results file stem")
    parser.add_argument("--reuse", action="store_true", help="with --seeds: load a seed's results if already written")
    parser.add_argument("--tuned-nfe", type=str, default=None, help="comma-separated NFEs for --tuned (default 3,4,5,6,8,10)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: threads only add overhead
    nfes = tuple(int(v) for v in args.nfe.split(",")) if args.nfe else ((5, 10, 20) if args.quick else NFES)
    if args.seeds:
        return run_seeds(args, nfes)
    return run_one(args, nfes, args.seed, args.stem)


def run_one(args: argparse.Namespace, nfes: tuple[int, ...], seed: int, stem: str) -> dict:
    """Every configuration of every library on the mixture of ``seed``; writes ``<stem>.*``."""
    n = args.samples or (128 if args.quick else 512)
    start, cpu = time.time(), time.process_time()
    problem = Problem(n, args.dim, args.components, seed)
    print(f"reference solved in {time.time() - start:.1f}s; sigma~ from {problem.sigma_max:.4g} to {problem.sigma_min:.4g}")
    rows: list[dict] = []

    def record(library: str, label: str, fn: Callable[[int], tuple[float, int]], only: tuple[int, ...] = ()) -> None:
        errors, calls = {}, {}
        for nfe in nfes:
            if only and nfe not in only:
                errors[nfe], calls[nfe] = float("nan"), 0
                continue
            try:
                err, used = fn(nfe)
            except Exception as exc:  # noqa: BLE001 - a peer failing at some NFE is reported, not fatal
                err, used = float("nan"), -1
                print(f"  {label} @ {nfe}: {type(exc).__name__}: {exc}")
            if used > nfe:
                raise RuntimeError(f"{label} used {used} model calls at nfe={nfe}")
            errors[nfe], calls[nfe] = err, used
        rows.append({"library": library, "config": label, "errors": errors, "nfe_used": calls})

    for label, solver, opts, grid in flowdiff_configs(args.quick):
        record("flowdiff", label, lambda nfe, s=solver, o=opts, g=grid: run_flowdiff(problem, s, o, g, nfe))
    tune_costs: dict[int, dict] = {}
    if args.tuned:
        def tuned(nfe: int) -> tuple[float, int]:
            err, used, cost = run_tuned(problem, nfe, args.pilots, args.tune_evals, args.tune_seconds)
            tune_costs[nfe] = cost
            print(f"  tuned-multistep @ {nfe}: {err:.4g} (tuning: {cost})", flush=True)
            return err, used

        only = tuple(int(v) for v in args.tuned_nfe.split(",")) if args.tuned_nfe else TUNED_NFES
        record("flowdiff tuned", f"tune_solver (tuned-multistep, {args.pilots} pilot draws)", tuned, only)
    peers_note = []
    if args.official is not None:
        module = load_official(args.official)
        for config in OFFICIAL_CONFIGS:
            record("official DPM-Solver", "official " + " ".join(map(str, config)),
                   lambda nfe, c=config: run_official(problem, module, c, nfe))
        peers_note.append(f"official DPM-Solver ({args.official.name}, {len(OFFICIAL_CONFIGS)} configurations)")
    try:
        import diffusers

        for label, cls_name, overrides, ending in diffusers_configs():
            record("diffusers", f"diffusers {label}",
                   lambda nfe, c=cls_name, o=overrides, e=ending: run_diffusers(problem, c, o, e, nfe))
        peers_note.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        peers_note.append("diffusers not installed: skipped")
    kds = load_k_sampling()
    if kds is not None:
        for label, fn, sig in kdiff_configs():
            record("k-diffusion", label, lambda nfe, f=fn, s=sig: run_kdiff(problem, kds, f, s, nfe))
        peers_note.append("k-diffusion sampling.py")
    else:
        peers_note.append("k-diffusion not installed: skipped")
    elapsed, cpu = time.time() - start, time.process_time() - cpu

    summary = summarize(rows, nfes)
    meta = run_metadata(
        problem=f"random_mixture(dim={args.dim}, components={args.components}, seed={seed}, anisotropic) "
        f"on Discrete.linear() (sigma~ {problem.sigma_max:.4g} -> {problem.sigma_min:.4g}), exact noise prediction, float64",
        samples=n,
        metric="median over samples of the per-sample RMS distance to a DOP853 (rtol=atol=1e-10) reference + denoise",
        nfe=list(nfes),
        peers=peers_note,
        seconds=round(elapsed, 1),
        cpu_seconds=round(cpu, 1),
        tuning={str(k): v for k, v in tune_costs.items()},
    )
    write_outputs(args.out, rows, summary, meta, nfes, plot=not args.no_plot, stem=stem)
    print(render_summary(summary, nfes))
    print(f"done in {elapsed:.0f}s ({cpu:.0f} CPU s); wrote {args.out}/{stem}.*")
    return {"rows": rows, "summary": summary, "meta": meta}


def ratios(summary: dict, nfe: int) -> dict[str, float]:
    """The issue-12 ratios at one NFE (NaN where a library did not run)."""
    def err(lib: str) -> float:
        return summary.get(lib, {}).get(nfe, ("-", math.nan))[1]

    generic, tuned, official = err("flowdiff"), err("flowdiff tuned"), err("official DPM-Solver")
    ours = min((e for e in (generic, tuned) if math.isfinite(e)), default=math.nan)
    peer = min((e for e in (err("diffusers"), err("k-diffusion")) if math.isfinite(e)), default=math.nan)
    return {"generic/official": generic / official, "best/official": ours / official,
            "best/peer": ours / peer, "generic/peer": generic / peer}


def run_seeds(args: argparse.Namespace, nfes: tuple[int, ...]) -> dict:
    """:func:`run_one` per seed, then ``<stem>_seeds.md``: each ratio per seed, its median and worst."""
    seeds = [int(v) for v in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        stem = f"{args.stem}_seed{seed}"
        done = args.out / f"{stem}.json"
        if args.reuse and done.is_file():  # a seed run earlier (e.g. in a parallel process): its rows
            payload = json.loads(done.read_text())
            rows = [{**r, "errors": {int(k): v for k, v in r["errors"].items()}} for r in payload["rows"]]
            per_seed[seed] = {"rows": rows, "summary": summarize(rows, nfes), "meta": payload["meta"]}
            continue
        per_seed[seed] = run_one(args, nfes, seed, stem)
    keys = ("best/official", "generic/official", "best/peer", "generic/peer")
    md = [f"# Solver error ratios over mixture seeds {seeds}", "",
          f"random_mixture(dim={args.dim}, components={args.components}, seed, anisotropic) on Discrete.linear(); "
          f"{per_seed[seeds[0]]['meta']['samples']} samples per seed; per-seed tables in {args.stem}_seed<k>.md. "
          "'best' is the best flowdiff configuration, tuned ones (tune_solver on separate pilot draws) included; "
          "'generic' the best without EMS or tuning; 'official' the best of the official DPM-Solver code's "
          f"{len(OFFICIAL_CONFIGS)} configurations; 'peer' the best diffusers / k-diffusion configuration.", "",
          "| NFE | " + " | ".join(f"{k} median | worst" for k in keys) + " | best flowdiff configuration (seed " + str(seeds[0]) + ") |",
          "|---|" + "---|---|" * len(keys) + "---|"]
    table = {}
    for nfe in nfes:
        cells, table[nfe] = [], {}
        for key in keys:
            vals = [ratios(per_seed[s]["summary"], nfe)[key] for s in seeds]
            vals = [v for v in vals if math.isfinite(v)]
            med = statistics.median(vals) if vals else math.nan
            worst = max(vals) if vals else math.nan
            table[nfe][key] = {"per_seed": vals, "median": med, "worst": worst}
            cells.append(f"{med:.2f} | {worst:.2f}")
        first = per_seed[seeds[0]]["summary"]
        cand = [first.get(lib, {}).get(nfe) for lib in ("flowdiff", "flowdiff tuned")]
        cand = [c for c in cand if c is not None]
        best_cfg = min(cand, key=lambda c: c[1])[0] if cand else "-"
        md.append(f"| {nfe} | " + " | ".join(cells) + f" | {best_cfg} |")
    write_results(f"{args.stem}_seeds", md, {"seeds": seeds, "ratios": {str(k): v for k, v in table.items()}}, args.out)
    print("\n".join(md))
    return {"per_seed": per_seed, "ratios": table}


def summarize(rows: list[dict], nfes: tuple[int, ...]) -> dict:
    """Best configuration per library and NFE."""
    best: dict[str, dict[int, tuple[str, float]]] = {}
    for row in rows:
        lib = row["library"]
        for nfe in nfes:
            e = row["errors"][nfe]
            if not math.isfinite(e):
                continue
            cur = best.setdefault(lib, {}).get(nfe)
            if cur is None or e < cur[1]:
                best[lib][nfe] = (row["config"], e)
    return best


LIBRARIES = ("flowdiff", "flowdiff tuned", "official DPM-Solver", "diffusers", "k-diffusion")


def render_summary(summary: dict, nfes: tuple[int, ...]) -> str:
    libs = [lib for lib in LIBRARIES if lib in summary]
    lines = ["| NFE | " + " | ".join(f"best {lib}" for lib in libs) + " | flowdiff / best peer | generic / official "
             "| best / official |", "|---|" + "---|" * (len(libs) + 3)]
    for nfe in nfes:
        cells = []
        for lib in libs:
            cfg, e = summary[lib].get(nfe, ("-", math.nan))
            cells.append(f"{e:.3g} ({cfg})" if math.isfinite(e) else "–")
        r = ratios(summary, nfe)
        lines.append(f"| {nfe} | " + " | ".join(cells) + f" | {r['best/peer']:.2f} | {r['generic/official']:.2f} | "
                     f"{r['best/official']:.2f} |")
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], summary: dict, meta: dict, nfes: tuple[int, ...], plot: bool,
                  stem: str = "solvers") -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows,
               "best": {lib: {str(k): v for k, v in d.items()} for lib, d in summary.items()}}
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["library", "config", *[f"nfe_{k}" for k in nfes]])
        for row in rows:
            w.writerow([row["library"], row["config"], *[f"{row['errors'][k]:.6g}" for k in nfes]])
    md = ["# Deterministic solvers: median RMS error to the exact ODE solution", "",
          f"Problem: {meta['problem']}; {meta['samples']} samples. Metric: {meta['metric']}.",
          f"Peers: {', '.join(meta['peers'])}. {meta['seconds']} s on {metadata_line(meta)}", "",
          "## Best configuration per library", "", render_summary(summary, nfes), "",
          "## Every configuration", "",
          "| library | configuration | " + " | ".join(str(k) for k in nfes) + " |",
          "|---|---|" + "---|" * len(nfes)]
    for row in sorted(rows, key=lambda r: (r["library"] != "flowdiff", r["errors"][nfes[len(nfes) // 2]] if math.isfinite(r["errors"][nfes[len(nfes) // 2]]) else math.inf)):
        md.append(f"| {row['library']} | {row['config']} | " + " | ".join(f"{row['errors'][k]:.3g}" for k in nfes) + " |")
    write_results(stem, md, payload, out)
    if plot:
        write_plot(out / f"{stem}.png", rows, summary, nfes)


def write_plot(path: Path, rows: list[dict], summary: dict, nfes: tuple[int, ...]) -> None:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"flowdiff": ("-", 2.2), "diffusers": ("--", 1.6), "k-diffusion": (":", 1.8)}
    for lib, best in summary.items():  # envelope: the best configuration of the library at each NFE
        xs = [k for k in nfes if k in best]
        ls, lw = styles.get(lib, ("-", 1.5))
        ax.plot(xs, [best[k][1] for k in xs], ls, lw=lw, marker="o", ms=4, label=f"{lib}: best configuration per NFE")
    by_label = {r["config"]: r for r in rows}
    for cfg, style in (("default (solver=None)", "-s"), ("dpm-solver-3m [logsnr]", "-^"), ("dpm-solver++2m [quadratic]", "-v")):
        if cfg in by_label:
            r = by_label[cfg]
            xs = [k for k in nfes if math.isfinite(r["errors"][k])]
            label = {"default (solver=None)": "flowdiff sample() defaults",
                     "dpm-solver-3m [logsnr]": "dpm-solver-3m, log-SNR (official DPM-Solver configuration)",
                     "dpm-solver++2m [quadratic]": "dpm-solver++2m, time-quadratic"}[cfg]
            ax.plot(xs, [r["errors"][k] for k in xs], style, lw=1, ms=3, alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(nfes))
    ax.set_xticklabels([str(k) for k in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("NFE (model evaluations, final denoise included)")
    ax.set_ylabel("median RMS error to the exact ODE solution")
    ax.set_title("d=32 anisotropic GMM, DDPM linear betas (solid: flowdiff, dashed: diffusers, dotted: k-diffusion)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
