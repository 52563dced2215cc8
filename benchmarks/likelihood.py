"""Exact log-likelihood accuracy against closed form: flowdiff vs Meta flow_matching, same run (issue 6).

Problems (float64, exact velocity, the rectified-flow / CondOT path on the full interval [0, 1], so
that the base N(0, I) at t = 0 is exact and the density at t = 1 is the data density in closed form):

* ``gaussian16``: one Gaussian in d = 16 with a dense random covariance;
* ``gmm16``: ``fd.testing.random_mixture(16, 4, seed=0)`` (axis-aligned anisotropic components);
* ``gmm16-rotated``: the same mixture with every component covariance randomly rotated (dense
  Jacobians; one of its 256 points crosses a stiff decision boundary).

256 points drawn from the data law. Error = |log p̂(x) − log p(x)| in nats; the table gives the
mean, the 99th percentile and the max over the points.

flowdiff's default since issue 12 is ``solver="adaptive"`` (per-sample variable-step Adams in
log-SNR time, in the Gaussian frame read off the data-end Jacobian; ``atol`` in nats, default 3e-4);
the ``adams`` rows are the fixed-grid solver that was the default before.

Cost. ``model calls``: calls of the velocity model (each on a batch; flowdiff's per-sample
solves call it on the unfinished or flagged points only). ``evals/point``: model evaluations per point
(a call on k points counts k), the fair measure when batches shrink; for flow_matching the two are
equal (every call evaluates all 256 points). Wall and CPU seconds of the whole likelihood call,
measured in the same process, one thread (``torch.set_num_threads(1)``; the machine is shared, so
CPU seconds are the steadier number).

flow_matching: ``ODESolver(velocity_model).compute_likelihood(x_1, log_p0, step_size, method,
atol, rtol, time_grid=[1, 0], exact_divergence)`` from the PyPI package (version printed below), with
the same oracle velocity. Its adaptive torchdiffeq solvers step past t = 0 and interpolate back,
so the model is asked for t < 0: the oracle is evaluated at t clamped into [0, 1] there, and the
requested range is reported (column ``t range``). Its Hutchinson probe is created in the default
dtype (float32), so float64 inputs fail: the Hutchinson runs set torch's default dtype to float64
(a workaround a user would need); the failure itself is recorded.

Run: ``.venv/bin/python benchmarks/likelihood.py`` (a few minutes) or ``--quick``. Writes
``benchmarks/results/likelihood.{md,json,png}``.
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
from _common import (  # noqa: E402
    RESULTS,
    flow_matching_log_likelihood,
    metadata_line,
    package_version,
    run_metadata,
    write_results,
)

import flowdiff as fd
from flowdiff.likelihood import log_likelihood
from flowdiff.testing import GaussianMixture, random_mixture


def rotated_mixture(dim: int, components: int, seed: int, path: fd.paths.GaussianPath) -> GaussianMixture:
    """``random_mixture`` with each component covariance rotated by a random orthogonal matrix."""
    base = random_mixture(dim, components, seed=seed, path=path)
    covs = []
    for j in range(components):
        g = torch.Generator().manual_seed(100 + j)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        covs.append(q @ torch.diag(base.eigvals[j]) @ q.T)
    return GaussianMixture(base.means, torch.stack(covs), base.weights, path=path)


def problems(quick: bool) -> dict[str, GaussianMixture]:
    path = fd.paths.Linear(t_min=0.0, t_max=1.0)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    cov = a @ a.T / 16 + 0.05 * torch.eye(16, dtype=torch.float64)
    out = {
        "gmm16": random_mixture(16, 4, seed=0, path=path),
        "gmm16-rotated": rotated_mixture(16, 4, 0, path),
    }
    if not quick:
        out = {"gaussian16": fd.testing.Gaussian(torch.zeros(16), cov, path=path), **out}
    return out


class CountingVelocity:
    """The oracle velocity as a model, counting calls and evaluated points and recording the times asked for."""

    def __init__(self, oracle: GaussianMixture):
        self.oracle = oracle
        self.calls = 0
        self.points = 0
        self.t_lo, self.t_hi = math.inf, -math.inf

    def reset(self) -> None:
        self.calls = self.points = 0
        self.t_lo, self.t_hi = math.inf, -math.inf

    def __call__(self, x: Tensor, t: Tensor, **_: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self.calls += 1
        self.points += x.shape[0]
        self.t_lo = min(self.t_lo, float(t.min()))
        self.t_hi = max(self.t_hi, float(t.max()))
        return self.oracle.velocity(x.reshape(x.shape[0], -1), t.clamp(0.0, 1.0)).reshape(x.shape)


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor | None, float, float, str | None]:
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        out = fn()
        error = None
    except Exception as exc:  # noqa: BLE001 - the failure is a result
        out, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out, time.perf_counter() - wall, time.process_time() - cpu, error


def run_flowdiff(oracle: GaussianMixture, x: Tensor, label: str, **kw: Any) -> dict:
    counter = CountingVelocity(oracle)
    field = fd.Field(counter, oracle.path, "velocity")
    holder: dict = {}

    def call() -> Tensor:
        res = log_likelihood(field, x, **kw)
        holder["res"] = res
        return res.log_prob

    lp, wall, cpu, error = timed(call)
    res = holder.get("res")
    return {
        "library": "flowdiff", "config": label, "log_prob": lp, "wall_s": wall, "cpu_s": cpu, "error": error,
        "calls": counter.calls, "evals_per_point": counter.points / x.shape[0], "t_range": (counter.t_lo, counter.t_hi),
        "refined": None if res is None or res.refined is None else int(res.refined.sum()),
        "std_error": None if res is None or res.std_error is None else float(res.std_error.mean()),
    }


def run_flow_matching(oracle: GaussianMixture, x: Tensor, label: str, **kw: Any) -> dict:
    counter = CountingVelocity(oracle)
    d = x.shape[1]

    def log_p0(z: Tensor) -> Tensor:
        return -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)

    lp, wall, cpu, error = timed(lambda: flow_matching_log_likelihood(counter, x, log_p0, **kw))
    return {
        "library": "flow_matching", "config": label, "log_prob": lp, "wall_s": wall, "cpu_s": cpu, "error": error,
        "calls": counter.calls, "evals_per_point": counter.points / x.shape[0], "t_range": (counter.t_lo, counter.t_hi),
        "refined": None, "std_error": None,
    }


def configurations(quick: bool) -> list[tuple[str, str, dict]]:
    fdc: list[tuple[str, str, dict]] = []
    for tol in ((1e-3, 3e-4) if quick else (1e-2, 1e-3, 3e-4, 1e-4, 3e-5)):  # 3e-4: the default since issue 12
        fdc.append(("flowdiff", f"adaptive atol={tol:g}" + (" (default)" if tol == 3e-4 else ""), {"solver": "adaptive", "atol": tol}))
    for n in ((24, 48) if quick else (16, 24, 32, 40, 48, 64, 96)):
        fdc.append(("flowdiff", f"adams nfe={n}", {"solver": "adams", "nfe": n}))
    for n in ((48,) if quick else (32, 48, 64)):
        fdc.append(("flowdiff", f"adams nfe={n} no-check", {"solver": "adams", "nfe": n, "refine_tol": None}))
    for n in ((48,) if quick else (48, 96, 192)):
        fdc.append(("flowdiff", f"rk4 nfe={n}", {"solver": "rk4", "nfe": n}))
    for tol in ((1e-5,) if quick else (1e-4, 1e-5, 1e-6, 1e-7)):
        fdc.append(("flowdiff", f"dopri5 per-sample tol={tol:g}", {"solver": "dopri5", "rtol": tol, "atol": tol}))
    fdc.append(("flowdiff", "adaptive atol=3e-4 hutchinson probes=8",
                {"solver": "adaptive", "divergence": "hutchinson", "probes": 8, "generator": torch.Generator().manual_seed(0)}))
    for p in ((8,) if quick else (1, 8, 32)):
        fdc.append((
            "flowdiff", f"adams nfe=48 hutchinson probes={p}",
            {"solver": "adams", "nfe": 48, "divergence": "hutchinson", "probes": p, "generator": torch.Generator().manual_seed(0)},
        ))
    fmc: list[tuple[str, str, dict]] = []
    for tol in ((1e-5,) if quick else (1e-4, 1e-5, 1e-6, 1e-7)):
        fmc.append(("flow_matching", f"dopri5 tol={tol:g} exact", {"method": "dopri5", "step_size": None, "atol": tol, "rtol": tol, "exact_divergence": True}))
    for steps in ((24,) if quick else (24, 48, 100, 200)):
        fmc.append(("flow_matching", f"midpoint {steps} steps exact", {"method": "midpoint", "step_size": 1.0 / steps, "exact_divergence": True}))
    if not quick:
        fmc.append(("flow_matching", "rk4 12 steps exact", {"method": "rk4", "step_size": 1.0 / 12, "exact_divergence": True}))
    fmc.append(("flow_matching", "dopri5 tol=1e-5 hutchinson (float64 input)", {"method": "dopri5", "step_size": None, "atol": 1e-5, "rtol": 1e-5}))
    fmc.append((
        "flow_matching", "dopri5 tol=1e-5 hutchinson (default dtype float64)",
        {"method": "dopri5", "step_size": None, "atol": 1e-5, "rtol": 1e-5, "default_dtype": torch.float64},
    ))
    return fdc + fmc


def summarise(row: dict, truth: Tensor) -> dict:
    out = {k: v for k, v in row.items() if k != "log_prob"}
    lp = row["log_prob"]
    if lp is None:
        out.update(mean_err=None, p99_err=None, max_err=None)
        return out
    err = (lp - truth).abs()
    out.update(
        mean_err=float(err.mean()), p99_err=float(torch.quantile(err, 0.99)), max_err=float(err.max()),
    )
    return out


def family(row: dict) -> str:
    """Plot series of a result row: library + method (+ "no check")."""
    config = row["config"]
    method = config.split()[0]
    if row["library"] == "flowdiff" and method == "dopri5":
        method = "dopri5 per-sample"
    suffix = " (no check)" if "no-check" in config else ""
    return f"{row['library']} {method}{suffix}"


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings, 64 points")
    parser.add_argument("--points", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.points or (64 if args.quick else 256)
    fm_version = package_version("flow_matching")
    started = time.time()
    results: dict[str, list[dict]] = {}
    for name, oracle in problems(args.quick).items():
        x = oracle.sample(n, torch.Generator().manual_seed(1))
        truth = oracle.log_prob(x)
        rows = []
        for library, label, kw in configurations(args.quick):
            if library == "flow_matching" and fm_version is None:
                continue
            kw = dict(kw)
            row = run_flowdiff(oracle, x, label, **kw) if library == "flowdiff" else run_flow_matching(oracle, x, label, **kw)
            rows.append(summarise(row, truth))
            r = rows[-1]
            print(f"{name:14s} {library:13s} {label:45s} mean {fmt(r['mean_err'])} max {fmt(r['max_err'])} "
                  f"calls {r['calls']} evals/pt {r['evals_per_point']:.1f} cpu {r['cpu_s']:.2f}s {r['error'] or ''}", flush=True)
        results[name] = rows
    elapsed = time.time() - started
    write(results, n, fm_version, elapsed, args.quick)


def write(results: dict[str, list[dict]], n: int, fm_version: str | None, elapsed: float, quick: bool) -> None:
    stem = "likelihood_quick" if quick else "likelihood"
    meta = run_metadata(points=n, flow_matching=fm_version, seconds=elapsed)
    lines = [
        "# Log-likelihood accuracy against closed form: flowdiff vs flow_matching",
        "",
        f"{n} points per problem, float64, exact oracle velocity on the CondOT path over [0, 1] with the exact "
        "N(0, I) base; error = |log p̂ − log p| in nats. `calls` = velocity-model calls, `evals/pt` = model "
        "evaluations per point (a call on k points counts k). `t range` = times the model was asked for. "
        f"flow_matching {fm_version or 'NOT INSTALLED'}, {elapsed:.0f} s in all, on {metadata_line(meta)} "
        "Generated by `benchmarks/likelihood.py`" + (" --quick" if quick else "") + ".",
        "",
    ]
    for name, rows in results.items():
        lines += [f"## {name}", "", "| library | configuration | mean err | p99 err | max err | calls | evals/pt | wall s | CPU s | t range | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = r["error"] or ""
            if r.get("refined"):
                note = f"{r['refined']} point(s) re-solved per-sample"
            if r.get("std_error") is not None:
                note = (note + "; " if note else "") + f"mean reported SE {r['std_error']:.3g}"
            lo, hi = r["t_range"]
            t_range = "—" if not math.isfinite(lo) else f"[{lo:.3g}, {hi:.3g}]"
            lines.append(
                f"| {r['library']} | {r['config']} | {fmt(r['mean_err'])} | {fmt(r['p99_err'])} | {fmt(r['max_err'])} | "
                f"{r['calls']} | {r['evals_per_point']:.1f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {t_range} | {note} |"
            )
        lines.append("")
    write_results(stem, lines, {"meta": meta, "results": results})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        families: dict[str, list[tuple[float, float]]] = {}
        for r in rows:  # configurations are listed in increasing cost within a family: keep that order
            if r["mean_err"] is None or "hutchinson" in r["config"]:
                continue
            families.setdefault(family(r), []).append((r["evals_per_point"], max(r["mean_err"], 1e-9)))
        for fam, pts in families.items():
            style = "-o" if fam.startswith("flowdiff") else "--s"
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, label=fam, ms=4)
        ax.axhline(1e-3, color="grey", lw=0.8, ls=":")
        ax.axvline(50, color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.set_xlabel("model evaluations per point")
        ax.set_ylabel("mean |error| (nats)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
