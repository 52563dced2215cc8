"""Likelihood on stiff mixtures the defaults were never tuned on (issue 12): flowdiff vs flow_matching.

Problem (float64, exact velocity): a d = 16 Gaussian mixture of 4 components, each with a randomly
rotated covariance whose standard deviations are log-uniform over ``decades`` decades (2 or 3) —
stiff near the data end, like image spectra — on the linear path over [0, 0.999], so that the
N(0, I) prior at t = 0 is exact and the density at t = 0.999 is the data law convolved with
N(0, 0.001² I), in closed form. 128 points drawn from that law per seed; seeds 0-2.

Error = |log p̂(x) − log p(x)| (nats): mean and max over the points, averaged over seeds.
``evals/point``: model evaluations per point (a call on k points counts k), each with an exact
divergence. flow_matching: ``ODESolver.compute_likelihood`` (dopri5, exact divergence), its time
s ∈ [0, 1] mapped onto t = 0.999 s.

Run: ``.venv/bin/python benchmarks/likelihood_stiff.py`` (about 4 minutes; ``--quick`` one seed).
A second table runs the adaptive default on mixtures nothing was tuned on (d = 8 and 32 rotated,
d = 16 axis-aligned, 2 and 3 decades, seeds 3-4).
Writes ``benchmarks/results/likelihood_stiff.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import flow_matching_log_likelihood, markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.solvers import logp
from flowdiff.testing import GaussianMixture

T_END = 0.999


def stiff_mixture(decades: float, seed: int, dim: int = 16, components: int = 4, rotated: bool = True) -> GaussianMixture:
    """Rotated (or axis-aligned) components with standard deviations log-uniform in [10^-decades, 1]."""
    g = torch.Generator().manual_seed(seed)
    path = fd.paths.Linear(t_min=0.0, t_max=T_END)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(components):
        sd = torch.exp(torch.empty(dim, dtype=torch.float64).uniform_(-decades * math.log(10), 0.0, generator=g))
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        q = q if rotated else torch.eye(dim, dtype=torch.float64)
        covs.append(q @ torch.diag(sd**2) @ q.T)
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, torch.stack(covs), weights, path=path)


def problem(decades: float, seed: int, n: int = 128, dim: int = 16, rotated: bool = True):
    mix = stiff_mixture(decades, seed, dim=dim, rotated=rotated)
    field = fd.Field(mix.model("velocity"), mix.path, "velocity")
    g = torch.Generator().manual_seed(1000 + seed)
    x = T_END * mix.sample(n, generator=g) + (1 - T_END) * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return mix, field, x, mix.log_prob_t(x, torch.tensor(T_END, dtype=torch.float64))


def flowdiff_settings() -> list[tuple[str, dict]]:
    return [("default: adaptive, atol=3e-4", {}),
            ("adaptive, atol=1e-4 (the <= 50-evaluation setting)", {"atol": 1e-4}),
            ("adaptive, atol=3e-5", {"atol": 3e-5}),
            ("adaptive, atol=1e-3", {"atol": 1e-3}),
            ("adaptive, atol=1e-2", {"atol": 1e-2}),
            ("adaptive, atol=3e-4, no Gaussian frame", {"atol": 3e-4, "_no_frame": True}),
            ("adaptive, atol=1e-4, no Gaussian frame", {"atol": 1e-4, "_no_frame": True}),
            ("adams 48, refine_tol=3e-4 (default before)", {"solver": "adams"}),
            ("adams 48, refine_tol=5e-3 (default before that)", {"solver": "adams", "refine_tol": 5e-3}),
            ("adams, nfe=100", {"solver": "adams", "nfe": 100}),
            ("rk4, nfe=200", {"solver": "rk4", "nfe": 200}),
            ("dopri5, tol 1e-4", {"solver": "dopri5", "rtol": 1e-4, "atol": 1e-4}),
            ("dopri5, tol 1e-5", {"solver": "dopri5", "rtol": 1e-5, "atol": 1e-5})]


def run(field, x, kw: dict):
    """``fd.log_likelihood`` with ``kw``; ``_no_frame``: the ablation without the Gaussian frame (the
    solver's own switch for fields without a Jacobian, forced here)."""
    kw = dict(kw)
    if kw.pop("_no_frame", False):
        saved, logp._LINEARIZE_MAX_DIM = logp._LINEARIZE_MAX_DIM, 0
        try:
            return fd.log_likelihood(field, x, **kw)
        finally:
            logp._LINEARIZE_MAX_DIM = saved
    return fd.log_likelihood(field, x, **kw)


def generalisation_rows(seeds: list[int]) -> tuple[list[tuple], list[dict]]:
    """The adaptive default and the <= 50-evaluation setting on mixtures nothing was tuned on: d = 8, 16, 32,
    rotated and axis-aligned, 2 and 3 decades, other seeds."""
    rows, payload = [], []
    for dim, rotated in ((8, True), (32, True), (16, False)):
        for decades in (2.0, 3.0):
            for name, kw in (("default (atol=3e-4)", {}), ("atol=1e-4", {"atol": 1e-4}), ("atol=1e-2", {"atol": 1e-2})):
                vals = []
                for seed in seeds:
                    _, field, x, truth = problem(decades, seed, dim=dim, rotated=rotated)
                    res = fd.log_likelihood(field, x, **kw)
                    err = (res.log_prob - truth).abs()
                    vals.append((float(err.mean()), float(err.max()), res.evals_per_sample, float((err <= res.error_estimate).double().mean())))
                m = [sum(v[i] for v in vals) / len(vals) for i in range(4)]
                label = f"d={dim} {'rotated' if rotated else 'axis-aligned'}"
                rows.append((label, f"{decades:g}", name, f"{m[0]:.2e}", f"{m[1]:.2e}", f"{m[2]:.1f}", f"{m[3]:.2f}"))
                payload.append({"problem": label, "decades": decades, "setting": name, "mean_error": m[0], "max_error": m[1],
                                "evals_per_point": m[2], "covered": m[3]})
    return rows, payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    rows, payload = [], {"meta": run_metadata(seeds=seeds), "rows": []}
    for decades in (2.0, 3.0):
        stats: dict[str, list] = {}
        for seed in seeds:
            mix, field, x, truth = problem(decades, seed)
            for name, kw in flowdiff_settings():
                t0 = time.process_time()
                res = run(field, x, kw)
                err = (res.log_prob - truth).abs()
                covered = float((err <= res.error_estimate).double().mean()) if res.error_estimate is not None else float("nan")
                stats.setdefault("flowdiff " + name, []).append((float(err.mean()), float(err.max()), res.evals_per_sample,
                                                                 time.process_time() - t0, covered))
            for tol in (1e-3, 1e-5):
                calls = [0]

                def velocity(x, t, _f=field, **_):
                    calls[0] += x.shape[0]
                    s = torch.as_tensor(t, dtype=x.dtype).clamp(0.0, 1.0)  # its adaptive steps overshoot [0, 1]
                    return T_END * _f.velocity(x, T_END * (s.expand(x.shape[0]) if s.ndim == 0 else s))

                def log_p0(z):
                    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)

                t0 = time.process_time()
                lp = flow_matching_log_likelihood(velocity, x, log_p0, method="dopri5", step_size=None, atol=tol, rtol=tol, exact_divergence=True)
                err = (lp - truth).abs()
                stats.setdefault(f"flow_matching dopri5, tol {tol:g}", []).append(
                    (float(err.mean()), float(err.max()), calls[0] / len(x), time.process_time() - t0, float("nan")))
        for name, vals in stats.items():
            mean_err, max_err, evals, cpu, covered = (sum(v[i] for v in vals) / len(vals) for i in range(5))
            per_seed = " ".join(f"{v[0]:.1e}@{v[2]:.0f}" for v in vals)
            rows.append((f"{decades:g}", name, f"{mean_err:.2e}", f"{max_err:.2e}", f"{evals:.1f}", per_seed,
                         "" if math.isnan(covered) else f"{covered:.2f}", f"{cpu:.2f}"))
            payload["rows"].append({"decades": decades, "setting": name, "mean_error": mean_err, "max_error": max_err,
                                    "evals_per_point": evals, "cpu_s": cpu, "covered": covered,
                                    "per_seed": [{"mean_error": v[0], "evals_per_point": v[2]} for v in vals]})
    gen_rows, payload["generalisation"] = generalisation_rows([3] if args.quick else [3, 4])
    lines = ["# Likelihood on stiff rotated mixtures (d = 16, K = 4; linear path on [0, 0.999])", "",
             metadata_line(payload["meta"]), "",
             "`covered`: fraction of points whose error is at most the solver's own `error_estimate`.", "",
             *markdown_table(["decades", "setting", "mean err (nats)", "max err", "evals/point", "per seed (err@evals)",
                              "covered", "CPU s"], rows),
             "", "## Mixtures nothing was tuned on (seeds 3-4; K = 4)", "",
             *markdown_table(["problem", "decades", "setting", "mean err", "max err", "evals/point", "covered"], gen_rows)]
    print("\n".join(lines))
    write_results("likelihood_stiff", lines, payload)


if __name__ == "__main__":
    main()
