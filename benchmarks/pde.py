r"""PDE solution fields: Random Grid Neural Processes against baselines and a gold posterior (issue 21).

Vadeboncoeur et al., *Random Grid Neural Processes for Parametric PDEs*, ICML 2023. For one built-in problem
(default: the 1-D nonlinear Poisson problem with Chebyshev conductivity) and each method:

* forward, on ``--cases`` prior draws against the reference solver at the interior nodes of a mesh (1-D: 199 of
  201 nodes; Burgers 25 x 25 in x-t; cavity 10^3 in x-y-t, rel-L2 of the velocity, coverage/NLL over u, v, p):
  relative L2 of the mean (median, mean), coverage of the central 95 % interval (the ELBO's own std and the
  calibrated std), Gaussian NLL per point, RMS PDE residual of the mean, training CPU seconds;
* inverse, on ``--inverse-cases`` draws: the amortised GICNet from the full noise-free field, and the surrogate
  posterior (:meth:`RGNP.posterior`) from M noisy sensors (M in ``--sensors``, noise ``--noise``, uniform in
  |x| <= 0.9): z relative error of the posterior mean, coverage of 90 % and 95 % intervals, and the distance to the
  gold posterior (:func:`flowdiff.pde.gold_posterior`, MCMC with the reference solver) for M = 16:
  |mean - gold mean| / gold std and std / gold std (medians over case and coordinate);
* cost: ``predict`` for 1,000 new draws against the reference solver on the same draws, as a ratio.

Methods: ``rgnp-diag`` (default model), ``rgnp-lowrank`` (rank 2), ``fixed-grid`` (PDDLVM: the same ELBO on a
fixed grid), ``pinn`` (deterministic, mean-squared residual; its error bar comes from the calibration only),
``rgnp-fourier`` (the paper's Fourier-feature MLP as the forward net), ``diffusion-2k`` / ``diffusion-20k``
(:class:`flowdiff.pde.DiffusionPrior` trained on 2,000 / 20,000 reference solves; forward by SMC inpainting of u
given (z, w); inverse through ``fd.inverse``: ``smc`` at every sensor count, ``dps`` and ``dps`` with DiffusionPDE's
residual guidance at 16 sensors).

Each method can run in its own process (``--stem pde_poisson_<method> --samples-dir D``, the gold posterior cached
with ``--gold-cache``); ``--merge stem1,stem2,...`` then writes one table with the gold distances.

``--problem burgers|cavity`` runs the same rows on the other built-in problems (x-t and x-y-t; the cavity's sensors
read u, v and p). Their gold posterior (2 parameters each) is quadrature on a z grid with the reference solver
(:func:`grid_gold`); the diffusion prior applies to one-field problems only (not the cavity). The RGNP-type models
on the cavity run at batch 16 with 64 points (``PROBLEM_SETTINGS``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/pde.py --methods rgnp-diag`` (about 5 CPU minutes per method with the
default 6,000 steps). Writes ``benchmarks/results/pde_<problem>.md/.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402
from flowdiff.pde import reference as R  # noqa: E402

METHODS = {
    "rgnp-diag": dict(),
    "rgnp-lowrank": dict(family="lowrank", rank=2),
    "fixed-grid": dict(cls="PDDLVM"),
    "pinn": dict(cls="PINN"),
    "rgnp-fourier": dict(net="fourier"),
}
DIFFUSION = {"diffusion-2k": 2000, "diffusion-20k": 20000}


# per-problem settings of the RGNP-type models at the sizes this shared 2-core machine affords (stated in the docs):
# the cavity's 3-D residual costs ~0.3 CPU s per step at batch 16 with 64 points (batch 64: ~1.5 s)
PROBLEM_SETTINGS = {"poisson": {}, "burgers": {}, "cavity": dict(batch=16, points=64)}
# the fixed grid: 30 points in 1-D (the paper's), 6 x 6 = 36 in x-t (RGNP's 32 random points per step), 4^3 in 3-D
FIXED_POINTS = {"poisson": 30, "burgers": 36, "cavity": 64}
EVAL_NODES = {1: 199, 2: 25, 3: 10}  # interior evaluation nodes per axis
EVAL_DESCRIPTION = {1: "199 interior nodes of a 201-node mesh", 2: "25 x 25 interior nodes in x-t",
                    3: "10^3 interior nodes in x-y-t, fields u, v, p; rel-L2 of the velocity"}


def mesh_points(problem, b: int, nodes: int = 201) -> torch.Tensor:
    """The evaluation points (b, N, d): the interior nodes of a uniform mesh (1-D: 199 of 201; x-t: 25 x 25;
    x-y-t: 10^3), the same for every case."""
    per_axis = EVAL_NODES[problem.dim] if problem.dim > 1 else nodes - 2
    axes = [torch.linspace(float(lo), float(hi), per_axis + 2)[1:-1] for lo, hi in problem.domain]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, problem.dim)
    return mesh.expand(b, -1, -1).contiguous()


SOLVER_TIME_CACHE: dict = {}


def solver_seconds(problem, z, w, x) -> float:
    """CPU seconds of the reference solver (the problem's, at its default resolution) for the draws at x (measured
    once per problem and process, or read from ``$PDE_SOLVER_TIME_DIR/solver_<problem>.json`` when set)."""
    import json
    import os

    key = (problem.name, z.shape[0])
    cache = os.environ.get("PDE_SOLVER_TIME_DIR")
    path = Path(cache) / f"solver_{problem.name}_{z.shape[0]}.json" if cache else None
    if key not in SOLVER_TIME_CACHE and path is not None and path.exists():
        SOLVER_TIME_CACHE[key] = json.loads(path.read_text())["cpu_s"]
    if key not in SOLVER_TIME_CACHE:
        t0 = time.process_time()
        problem.reference(z, w, x)
        SOLVER_TIME_CACHE[key] = time.process_time() - t0
        if path is not None:
            path.write_text(json.dumps({"cpu_s": SOLVER_TIME_CACHE[key]}))
    return SOLVER_TIME_CACHE[key]


def rel_l2(err: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-case relative L2; with several fields (the cavity's u, v, p) that of the velocity (u, v)."""
    if err.ndim == 3:
        err, truth = err[..., :2].flatten(1), truth[..., :2].flatten(1)
    return err.norm(dim=1) / truth.norm(dim=1)


def residual_rms_of_mean(model, z, w, x) -> float:
    x = x.clone().requires_grad_(True)
    mean, _, _ = model._outputs(z, w, x)
    u = model.problem.compose(mean[..., 0] if mean.shape[-1] == 1 else mean, x, w)
    r = model.problem.residual(u, x, z, w).detach()
    return float(r.pow(2).mean().sqrt())


def forward_metrics(model, problem, cases: int, seed: int) -> dict:
    z, w = problem.sample_params(cases, torch.Generator().manual_seed(seed))
    x = mesh_points(problem, cases)
    truth = problem.reference(z, w, x).float()
    out = {}
    for label, calibrated in (("raw", False), ("calibrated", True)):
        mean, std = model.predict(z, w, x, calibrated=calibrated)
        err = mean - truth
        out[f"coverage95_{label}"] = float((err.abs() <= 1.96 * std).float().mean())
        var = std.double() ** 2 + 1e-30
        out[f"nll_{label}"] = float((0.5 * (err.double() ** 2 / var + torch.log(2 * math.pi * var))).mean())
    rel = rel_l2(err, truth)
    out["rel_l2_per_case"] = rel.tolist()
    if err.ndim == 3:  # the cavity's pressure, separately
        out["rel_l2_p_median"] = float((err[..., 2].norm(dim=1) / truth[..., 2].norm(dim=1)).median())
    out.update(rel_l2_median=float(rel.median()), rel_l2_mean=float(rel.mean()),
               residual_rms=residual_rms_of_mean(model, z, w, problem.uniform_points(cases, 64, torch.Generator().manual_seed(seed + 1), margin=0.01)))
    return out


def cost_ratio(model, problem, draws: int = 1000) -> dict:
    z, w = problem.sample_params(draws, torch.Generator().manual_seed(99))
    x = mesh_points(problem, draws)
    t0 = time.process_time()
    model.predict(z, w, x)
    t_pred = time.process_time() - t0
    t_solve = solver_seconds(problem, z, w, x)
    return {"predict_cpu_s": t_pred, "solver_cpu_s": t_solve, "predict_over_solver": t_pred / t_solve}


def inverse_cases(problem, cases: int, m: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    z, w = problem.sample_params(cases, g)
    x = problem.uniform_points(cases, m, g, margin=0.05)
    y = problem.reference(z, w, x).float()
    y = y + noise * torch.randn(y.shape, generator=g)
    return z, w, x, y


def z_metrics(samples: torch.Tensor, z: torch.Tensor) -> dict:
    mean = samples.mean(0)
    lo90, hi90 = samples.quantile(0.05, 0), samples.quantile(0.95, 0)
    lo95, hi95 = samples.quantile(0.025, 0), samples.quantile(0.975, 0)
    return {"z_rel_err": float(((mean - z).norm(dim=1) / z.norm(dim=1)).mean()),
            "z_rmse": float((mean - z).pow(2).mean().sqrt()),
            "z_rel_err_per_coord": ((mean - z).abs() / z.abs()).mean(0).tolist(),
            "coverage90": float(((z >= lo90) & (z <= hi90)).float().mean()),
            "coverage95": float(((z >= lo95) & (z <= hi95)).float().mean())}


def save_samples(args, name: str, label: str, m: int, zs: torch.Tensor) -> None:
    if args.samples_dir and m == 16:
        Path(args.samples_dir).mkdir(parents=True, exist_ok=True)
        torch.save(zs, Path(args.samples_dir) / f"{args.problem}_{name}_{label}_{m}.pt")


def merge(args, problem) -> tuple[dict, dict]:
    """Results of several runs (``--merge`` stems) with the gold distances computed from the saved samples."""
    import json

    from _common import RESULTS

    results, gold = {}, None
    cache = Path(args.gold_cache) if args.gold_cache else None
    if cache is not None and cache.exists():
        gold = torch.load(cache, weights_only=False)
    for stem in args.merge.split(","):
        payload = json.loads((RESULTS / f"{stem}.json").read_text())
        for name, row in payload["results"].items():
            for key, entry in row.items():
                if not (key.startswith("sensors_16") and isinstance(entry, dict)) or gold is None:
                    continue
                label = "posterior" if key == "sensors_16" and name not in DIFFUSION else (
                    "smc" if key == "sensors_16" else key.split("_", 2)[2])
                path = Path(args.samples_dir or ".") / f"{args.problem}_{name}_{label}_16.pt"
                if path.exists():
                    gold_distances(entry, torch.load(path), gold)
            results[name] = row
    return results, gold


def gold_distances(entry: dict, zs: torch.Tensor, gold) -> None:
    gm, gsd = gold["samples"].mean(0), gold["samples"].std(0)
    entry["mean_dist_over_gold_std"] = float(((zs.mean(0) - gm).abs() / gsd).median())
    entry["std_over_gold_std"] = float((zs.std(0) / gsd).median())
    entry["err_over_gold_err"] = entry["z_rmse"] / gold["z_rmse"]


def diffusion_row(problem, pairs: int, args, sensors, gold, get_gold) -> dict:
    """The flowdiff diffusion prior over (z, w, u on a 65-node mesh), trained on ``pairs`` reference solves."""
    t0, w0 = time.process_time(), time.perf_counter()
    saved = Path(args.model_dir) / f"{args.problem}_diffusion_{pairs}.pt" if args.model_dir else None
    if saved is not None and saved.exists():
        dp = fd.pde.DiffusionPrior.load(saved, problem)
    else:
        dp = fd.pde.DiffusionPrior(problem, pairs=pairs, steps=args.diffusion_steps, nodes=args.diffusion_nodes).fit(seed=0)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            dp.save(saved)
    h = dp.history
    row = {"solver_calls": dp.solver_calls, "train_cpu_s": h["solve_cpu_seconds"] + h["train_cpu_seconds"],
           "solve_cpu_s": h["solve_cpu_seconds"], "train_wall_s": time.perf_counter() - w0,
           "final_loss": sum(h["loss"][-200:]) / len(h["loss"][-200:])}
    print(f"diffusion {pairs}: trained {row['train_cpu_s']:.0f} CPU s, loss {row['final_loss']:.4f}", flush=True)
    # forward: (z, w) observed, u sampled (SMC), on the same draws as the RGNP rows (the first cases of them)
    nf = args.diffusion_forward_cases
    z, w = problem.sample_params(args.cases, torch.Generator().manual_seed(777))
    z, w = z[:nf], w[:nf]
    x = mesh_points(problem, nf)
    truth = problem.reference(z, w, x).float()
    t0 = time.process_time()
    u = dp.sample_u(z, w, 64, generator=torch.Generator().manual_seed(5), nfe=100)
    t_pred = time.process_time() - t0
    vals = dp.at_points(u, w, x)
    mean, std = vals.mean(0), vals.std(0)
    err = mean - truth
    rel = rel_l2(err, truth)
    var = std.double() ** 2 + 1e-30
    # residual of the mean: the problem's autograd residual of the Chebyshev fit at the 63 interior mesh nodes
    # (the guidance's residual; the reference solution's own value on this measure is reported as well)
    u_mean = u.mean(0)
    vstd = torch.cat([(z - dp.mean[:dp.dz]) / dp.std[:dp.dz], (w - dp.mean[dp.dz:dp.dz + dp.dw]) / dp.std[dp.dz:dp.dz + dp.dw],
                      (u_mean - dp.mean[dp.dz + dp.dw:]) / dp.std[dp.dz + dp.dw:]], 1)
    truth_mesh = problem.reference(z, w, dp.mesh.unsqueeze(0).expand(nf, -1, -1).contiguous()).float()
    vtrue = vstd.clone()
    vtrue[:, dp.dz + dp.dw:] = (truth_mesh - dp.mean[dp.dz + dp.dw:]) / dp.std[dp.dz + dp.dw:]
    res = torch.cat([dp.residual(vstd[i:i + 1], w[i]).detach() for i in range(nf)])
    res_true = torch.cat([dp.residual(vtrue[i:i + 1], w[i]).detach() for i in range(nf)])
    zc, wc = problem.sample_params(1000, torch.Generator().manual_seed(99))
    t_solve = solver_seconds(problem, zc, wc, mesh_points(problem, 1000))
    row.update(rel_l2_median=float(rel.median()), rel_l2_mean=float(rel.mean()), rel_l2_per_case=rel.tolist(),
               coverage95_calibrated=float((err.abs() <= 1.96 * std).float().mean()),
               nll_calibrated=float((0.5 * (err.double() ** 2 / var + torch.log(2 * math.pi * var))).mean()),
               residual_rms=float(res.pow(2).mean().sqrt()), residual_rms_reference=float(res_true.pow(2).mean().sqrt()),
               predict_cpu_s_per_draw=t_pred / nf, solver_cpu_s=t_solve,
               predict_over_solver=(t_pred / nf * 1000) / t_solve)
    print(f"diffusion {pairs} forward: {row['rel_l2_median']:.4f} median rel-L2, cov95 {row['coverage95_calibrated']:.3f}",
          flush=True)
    n = args.diffusion_samples
    variants = [("smc", dict(method="smc"))]
    extra = [("dps", dict(method="dps", zeta=args.dps_zeta)),
             ("dps+pde", dict(method="dps", zeta=args.dps_zeta, pde_weight=args.pde_weight))]
    for m in sensors:
        z, w, x, y = inverse_cases(problem, args.inverse_cases, m, args.noise, seed=500 if m == 16 else 500 + m)
        for label, kw in variants + (extra if m == 16 else []):
            t0 = time.process_time()
            zs, us = dp.posterior(x, y, w, args.noise, n=n, generator=torch.Generator().manual_seed(4), nfe=100,
                                  return_u=True, **kw)
            entry = {"cpu_s": time.process_time() - t0, "nfe_per_sample": dp.last_posterior["nfe_per_sample"],
                     **z_metrics(zs, z)}
            fit = dp.at_points(us, w, x).mean(0) - y
            entry["data_fit_rms"] = float(fit.pow(2).mean().sqrt())
            if m == 16 and gold is not None:
                gold_distances(entry, zs, gold)
            save_samples(args, f"diffusion-{pairs // 1000}k", label, m, zs)
            key = f"sensors_{m}" if label == "smc" else f"sensors_{m}_{label}"
            row[key] = entry
            print(f"diffusion {pairs} {label} {m} sensors: z rel err {entry['z_rel_err']:.3f}, cov90 "
                  f"{entry['coverage90']:.3f}, {entry['cpu_s']:.0f} CPU s", flush=True)
    return row


def grid_gold(problem, x, y, w, noise: float, n: int, generator, coarse=(31, 21), fine=(301, 201)) -> tuple:
    """Gold posterior of a 2-parameter problem by quadrature (uniform prior on ``problem.support``).

    The reference solver runs on a ``coarse`` tensor grid of z (per case; once for all cases when they share w),
    a bicubic spline of its sensor predictions in z gives the likelihood on a ``fine`` grid, and ``n`` samples are
    drawn from the normalised grid posterior with a uniform jitter inside each fine cell. Also returns the
    spline's largest error at the sensors on 8 random z against direct solves (it must be far below the noise).
    """
    from scipy.interpolate import RectBivariateSpline

    (lo0, hi0), (lo1, hi1) = problem.support
    a0, a1 = np.linspace(lo0, hi0, coarse[0]), np.linspace(lo1, hi1, coarse[1])
    f0, f1 = np.linspace(lo0, hi0, fine[0]), np.linspace(lo1, hi1, fine[1])
    zg = torch.tensor(np.stack(np.meshgrid(a0, a1, indexing="ij"), -1).reshape(-1, 2), dtype=torch.float32)
    b, m = x.shape[:2]
    shared = bool((w == w[:1]).all())
    calls = 0

    def solve(zq, case):  # (Q, 2) -> predictions at the sensors of `case` (or all cases): (Q, b or 1, m, c)
        nonlocal calls
        cases = range(b) if case is None else [case]
        xs = torch.cat([x[i] for i in cases]).unsqueeze(0).expand(zq.shape[0], -1, -1).contiguous()
        wq = w[cases[0]:cases[0] + 1].expand(zq.shape[0], -1)
        out = []
        for zc, wc, xc in zip(zq.split(64), wq.split(64), xs.split(64)):
            out.append(torch.as_tensor(problem.reference(zc, wc, xc)).double())
        calls += zq.shape[0]
        u = torch.cat(out)
        return u.reshape(zq.shape[0], len(cases), m, -1)

    preds = solve(zg, None) if shared else torch.cat([solve(zg, i) for i in range(b)], dim=1)  # (Q, b, m, c)
    c = preds.shape[-1]
    grid = preds.reshape(coarse[0], coarse[1], b, m * c).numpy()
    yv = y.double().reshape(b, m * c).numpy()
    samples = torch.empty(n, b, 2, dtype=torch.float64)
    splines = []
    for i in range(b):
        sp = [RectBivariateSpline(a0, a1, grid[:, :, i, k], kx=3, ky=3) for k in range(m * c)]
        splines.append(sp)
        loglik = np.zeros((fine[0], fine[1]))
        for k in range(m * c):
            loglik -= 0.5 * ((sp[k](f0, f1) - yv[i, k]) / noise) ** 2
        p = np.exp(loglik - loglik.max()).ravel()
        p /= p.sum()
        idx = torch.multinomial(torch.tensor(p), n, replacement=True, generator=generator)
        jitter = torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5
        samples[:, i, 0] = torch.tensor(f0)[idx // fine[1]] + jitter[:, 0] * (f0[1] - f0[0])
        samples[:, i, 1] = torch.tensor(f1)[idx % fine[1]] + jitter[:, 1] * (f1[1] - f1[0])
    samples[..., 0] = samples[..., 0].clamp(lo0, hi0)
    samples[..., 1] = samples[..., 1].clamp(lo1, hi1)
    # interpolation check on random z (case 0)
    zt, _ = problem.sample_params(8, torch.Generator().manual_seed(31))
    direct = solve(zt, 0)[:, 0].reshape(8, m * c).numpy()
    interp = np.array([[splines[0][k](float(zt[j, 0]), float(zt[j, 1]))[0, 0] for k in range(m * c)] for j in range(8)])
    return samples, {"solver_calls": calls, "spline_max_error": float(np.abs(direct - interp).max())}


def load_gold(problem, args, cache):
    """The gold posterior at 16 sensors: from ``cache`` (waiting ``--gold-wait`` minutes for it), or computed.

    Poisson (5 parameters): adaptive Metropolis with the 201-node FD solver (:func:`fd.pde.gold_posterior`).
    Burgers and the cavity (2 parameters): quadrature on a z grid (:func:`grid_gold`) with the problem's reference.
    """
    gold = None
    if cache is not None and not cache.exists() and args.gold_wait > 0:
        deadline = time.time() + 60 * args.gold_wait
        while not cache.exists() and time.time() < deadline:
            time.sleep(10)
        time.sleep(2)
    if cache is not None and cache.exists():
        gold = torch.load(cache, weights_only=False)
        print(f"gold loaded from {cache}", flush=True)
    elif args.gold:
        z, w, x, y = inverse_cases(problem, args.inverse_cases, 16, args.noise, seed=500)
        t0 = time.process_time()
        extra = {}
        if problem.name == "poisson":
            # the 201-node mesh (within 5e-4 of the limit, far below the sensor noise) keeps the MCMC affordable
            solver = lambda z_, w_, x_: fd.pde.problems._poisson_reference(z_, w_, x_, 201)  # noqa: E731
            gs, info = fd.pde.gold_posterior(problem, x, y, w, args.noise, n=256,
                                             generator=torch.Generator().manual_seed(3), solver=solver, prior_draws=2048)
            extra["method"] = "adaptive Metropolis, 201-node FD solver"
        else:
            gs, info = grid_gold(problem, x, y, w, args.noise, 256, torch.Generator().manual_seed(3))
            extra.update(method="quadrature on a 31 x 21 z grid (bicubic spline to 301 x 201), reference solver",
                         spline_max_error=info["spline_max_error"])
        gold = {"samples": gs.float(), "cpu_s": time.process_time() - t0, "solver_calls": info["solver_calls"],
                **extra, **z_metrics(gs.float(), z)}
        print(f"gold: {gold['cpu_s']:.0f} CPU s, {gold['solver_calls']} solves, z rel err {gold['z_rel_err']:.3f}, "
              f"cov90 {gold['coverage90']:.3f} {extra}", flush=True)
        if cache is not None:
            torch.save(gold, cache)
    return gold


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="poisson", choices=["poisson", "burgers", "cavity"])
    ap.add_argument("--methods", default="rgnp-diag")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the model's)")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--inverse-cases", type=int, default=40)
    ap.add_argument("--sensors", default="8,16,32")
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--gold", type=int, default=1, help="1: run the gold posterior at 16 sensors")
    ap.add_argument("--stem", default=None)
    ap.add_argument("--model-dir", default=None, help="save each fitted model here (or load it when present)")
    ap.add_argument("--gold-cache", default=None, help="load the gold posterior from this file (or save it there)")
    ap.add_argument("--gold-wait", type=float, default=0.0, help="minutes to wait for --gold-cache to appear")
    ap.add_argument("--samples-dir", default=None, help="save the 16-sensor posterior samples of z here")
    ap.add_argument("--merge", default=None, help="comma-separated result stems to merge into one table (with the "
                    "gold distances from --gold-cache and --samples-dir); no fitting")
    ap.add_argument("--diffusion-steps", type=int, default=4000)
    ap.add_argument("--diffusion-nodes", type=int, default=65, help="mesh nodes per axis of the diffusion prior")
    ap.add_argument("--diffusion-forward-cases", type=int, default=40)
    ap.add_argument("--diffusion-samples", type=int, default=128)
    ap.add_argument("--pde-weight", type=float, default=0.003)
    ap.add_argument("--dps-zeta", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    problem = fd.pde.get(args.problem)
    sensors = [int(s) for s in args.sensors.split(",") if s]
    results = {}
    gold = None
    cache = Path(args.gold_cache) if args.gold_cache else None
    if args.merge:
        results, gold = merge(args, problem)
        args.methods = ""
    elif not args.gold_wait or (cache is not None and cache.exists()) or args.gold:
        gold = load_gold(problem, args, cache)
    for name in [m for m in args.methods.split(",") if m]:
        if name in DIFFUSION:
            results[name] = diffusion_row(problem, DIFFUSION[name], args, sensors, gold, None)
            continue
        kwargs = dict(PROBLEM_SETTINGS[args.problem], **METHODS[name])
        cls = getattr(fd.pde, kwargs.pop("cls", "RGNP"))
        if name == "fixed-grid":
            kwargs["points"] = FIXED_POINTS[args.problem]
        if args.steps:
            kwargs["steps"] = args.steps
        t0, w0 = time.process_time(), time.perf_counter()
        saved = Path(args.model_dir) / f"{args.problem}_{name}.pt" if args.model_dir else None
        if saved is not None and saved.exists():
            model = cls.load(saved, problem)
            train_cpu = model.history.get("total_cpu_seconds")
        else:
            model = cls(problem, **kwargs).fit(seed=0)
            train_cpu = time.process_time() - t0
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                model.save(saved)
        row = {"train_cpu_s": train_cpu, "train_wall_s": time.perf_counter() - w0,
               "calibration": model.history.get("calibration")}
        row.update(forward_metrics(model, problem, args.cases, seed=777))
        row.update(cost_ratio(model, problem))
        # amortised inverse from the full field on the 201-node mesh (another grid than training)
        zf, wf = problem.sample_params(args.inverse_cases, torch.Generator().manual_seed(600))
        xf = mesh_points(problem, args.inverse_cases)
        m_inv, s_inv = model.invert(xf, problem.reference(zf, wf, xf).float(), wf)
        row["amortised_full"] = {"z_rel_err": float(((m_inv - zf).norm(dim=1) / zf.norm(dim=1)).mean()),
                                 "coverage95": float(((m_inv - zf).abs() <= 1.96 * s_inv).float().mean())}
        for m in sensors:
            z, w, x, y = inverse_cases(problem, args.inverse_cases, m, args.noise, seed=500 if m == 16 else 500 + m)
            t0 = time.process_time()
            zs = model.posterior(x, y, w, noise=args.noise, n=256, generator=torch.Generator().manual_seed(4))
            entry = {"cpu_s": time.process_time() - t0, **z_metrics(zs, z)}
            save_samples(args, name, "posterior", m, zs)
            mi, si = model.invert(x, y, w)
            entry["amortised_z_rel_err"] = float(((mi - z).norm(dim=1) / z.norm(dim=1)).mean())
            if m == 16 and gold is not None:
                gold_distances(entry, zs, gold)
            row[f"sensors_{m}"] = entry
        results[name] = row
        print(name, {k: v for k, v in row.items() if not isinstance(v, dict)}, flush=True)
    meta = run_metadata(problem=args.problem, steps=args.steps, noise=args.noise)
    fmt = lambda r, key, spec: format(r[key], spec) if r.get(key) is not None else "–"  # noqa: E731
    lines = [f"# PDE fields: {args.problem}", "", metadata_line(meta), "",
             f"## Forward ({args.cases} draws for RGNP-type models, {args.diffusion_forward_cases} for the diffusion "
             f"prior; {EVAL_DESCRIPTION[problem.dim]})", ""]
    lines += markdown_table(["method", "solver calls", "rel-L2 median", "rel-L2 mean", "cov95 raw", "cov95 calibrated",
                             "NLL calibrated", "residual RMS", "train CPU s", "predict/solver cost"],
                            [[k, str(r.get("solver_calls", 0)), fmt(r, "rel_l2_median", ".4f"), fmt(r, "rel_l2_mean", ".4f"),
                              fmt(r, "coverage95_raw", ".3f"), fmt(r, "coverage95_calibrated", ".3f"),
                              fmt(r, "nll_calibrated", ".2f"), fmt(r, "residual_rms", ".3g"), fmt(r, "train_cpu_s", ".0f"),
                              fmt(r, "predict_over_solver", ".3g")] for k, r in results.items()])
    lines += ["", f"## Inverse ({args.inverse_cases} cases, sensor noise {args.noise})", ""]
    rows = []
    if gold is not None:
        label = "gold quadrature (reference solver)" if "quadrature" in gold.get("method", "") else "gold MCMC (reference solver)"
        rows.append([label, "16", f"{gold['z_rel_err']:.3f}", f"{gold['coverage90']:.3f}",
                     f"{gold['coverage95']:.3f}", "0", "1", "1", f"{gold['cpu_s']:.0f}"])
    for k, r in results.items():
        if "amortised_full" in r:
            rows.append([f"{k} amortised, full field", "all", f"{r['amortised_full']['z_rel_err']:.3f}", "",
                         f"{r['amortised_full']['coverage95']:.3f}", "", "", "", ""])
        for key, e in r.items():
            if not key.startswith("sensors_"):
                continue
            m = key.split("_")[1]
            label = f"{k} posterior" + (f" ({key.split('_', 2)[2]})" if key.count("_") > 1 else "")
            rows.append([label, m, f"{e['z_rel_err']:.3f}", f"{e['coverage90']:.3f}", f"{e['coverage95']:.3f}",
                         f"{e.get('mean_dist_over_gold_std', float('nan')):.3f}", f"{e.get('std_over_gold_std', float('nan')):.3f}",
                         f"{e.get('err_over_gold_err', float('nan')):.3f}", f"{e['cpu_s']:.0f}"])
    lines += markdown_table(["method", "sensors", "z rel err", "cov90", "cov95", "|mean-gold|/gold std",
                             "std/gold std", "RMSE/gold RMSE", "CPU s"], rows)
    print("\n".join(lines))
    payload = {"meta": meta, "results": results,
               "gold": None if gold is None else {k: v for k, v in gold.items() if k != "samples"}}
    write_results(args.stem or f"pde_{args.problem}", lines, payload)


if __name__ == "__main__":
    main()
