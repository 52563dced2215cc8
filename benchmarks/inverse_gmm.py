r"""Posterior samplers against the exact posterior: the Gaussian-mixture benchmark (issue 14).

Problem (:func:`flowdiff.testing.gmm_inverse_problem`, the MCGdiff paper's benchmark: Cardoso,
Janati El Idrissi, Le Corff & Moulines 2024, "Monte Carlo guided Diffusion for Bayesian linear
inverse problems"): a 25-mode grid prior (unit covariances, spacing 8, random weights) in
``d = 8`` and ``32``; ``H = U diag(s) V_{1:m}`` with ``m = 1, 2, d/2`` random rows;
``sigma_y = 0.05`` and ``0.5`` times the largest singular value. The measurement is redrawn until
the posterior has at least two components of weight >= 0.1 (``multimodal=True``; where that
cannot be reached the plain draw is used and the ``modes`` column says so). Every posterior
is a Gaussian mixture in closed form (:func:`flowdiff.testing.linear_gaussian_posterior`).

Prior field: the exact noise prediction of the prior on the VP path, in float64
(``fd.Field(problem.model("noise"), VP(), "noise")``).

Methods: every name in ``fd.inverse.available()`` through ``fd.inverse.sample_posterior`` with
its defaults, at ``nfe`` model evaluations per returned sample; deepinv 0.5.0's ``DPS``, ``DDRM``
and ``DiffPIR`` (defaults; the exact denoiser of the same prior, the problem mapped affinely to
deepinv's [0, 1] image range) when deepinv can be imported; ``exact`` draws from the closed-form
posterior (the floor at the same number of samples).

Metrics: ``TV`` = :func:`flowdiff.testing.mode_weight_tv` (each sample to its most responsible
posterior component; half the L1 distance of the frequencies to the exact weights); ``SW2`` =
``fd.metrics.sliced_wasserstein`` (256 directions, p = 2) against 10 000 exact posterior
samples; ``nfe`` = evaluations per sample really spent; wall time per method and problem.
Samples per problem: 1000 at budget 100 and 100 at budget 1000 (``--samples``, ``--samples-big``;
fewer at the big budget to stay within 10 minutes on one core, so the floor is higher there: the
``exact`` row at the same sample count is the reference for each budget).
A method that fails is recorded with its error, not a crash.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inverse_gmm.py`` (<= 10 minutes on one
core; ``--quick``: one small problem, seconds). Writes ``benchmarks/results/inverse_gmm.{md,json}``
(``inverse_gmm_quick`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, package_version, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.inverse.operators import Matrix
from flowdiff.testing import GMMInverseProblem, GaussianMixture, gmm_inverse_problem, mode_weight_tv

F64 = torch.float64
REFERENCE_SAMPLES = 10_000
#: (d, m, sigma_y relative to the largest singular value) of the full run; --quick runs the first of QUICK_SPECS.
FULL_SPECS = [(d, m, s) for d in (8, 32) for m in (1, 2, d // 2) for s in (0.05, 0.5)]
QUICK_SPECS = [(8, 1, 0.5)]


@dataclass
class Case:
    """One benchmark problem and the exact-posterior reference it is scored against."""

    label: str
    problem: GMMInverseProblem
    reference: Tensor  # (REFERENCE_SAMPLES, d) exact posterior draws
    multimodal: bool


def make_case(dim: int, num_measurements: int, sigma_rel: float, seed: int = 0) -> Case:
    """The problem (multimodal where reachable) and its exact reference samples."""
    try:
        problem, multimodal = gmm_inverse_problem(dim, num_measurements, sigma_rel, seed=seed, multimodal=True), True
    except ValueError:
        problem, multimodal = gmm_inverse_problem(dim, num_measurements, sigma_rel, seed=seed), False
    reference = problem.posterior.sample(REFERENCE_SAMPLES, generator=torch.Generator().manual_seed(10_000 + seed))
    return Case(f"d{dim} m{num_measurements} σ{sigma_rel:g}", problem, reference, multimodal)


def scores(x: Tensor, case: Case) -> dict[str, float]:
    """TV of the mode weights and sliced W2 to the exact reference."""
    x = x.detach().to("cpu", F64).reshape(x.shape[0], -1)
    sw = fd.metrics.sliced_wasserstein(x, case.reference, num_projections=256, p=2,
                                       generator=torch.Generator().manual_seed(0))
    return {"tv": mode_weight_tv(x, case.problem.posterior), "sw2": float(sw)}


# ---------------------------------------------------------------------------------------
# Runners: each returns (samples (N, d), nfe per sample)
# ---------------------------------------------------------------------------------------


def run_flowdiff(method: str) -> Callable[[Case, int, int, int], tuple[Tensor, float]]:
    def run(case: Case, nfe: int, num_samples: int, seed: int) -> tuple[Tensor, float]:
        p = case.problem
        field = fd.Field(p.model("noise"), p.path, "noise")
        result = fd.inverse.sample_posterior(field, Matrix(p.H), p.y, sigma_y=p.sigma_y, method=method,
                                             num_samples=num_samples, nfe=nfe,
                                             generator=torch.Generator().manual_seed(seed))
        return result.x, result.nfe

    return run


def run_exact(case: Case, nfe: int, num_samples: int, seed: int) -> tuple[Tensor, float]:
    return case.problem.posterior.sample(num_samples, generator=torch.Generator().manual_seed(seed)), 0.0


def exact_ve_denoiser(prior: GaussianMixture, x: Tensor, s: Tensor) -> Tensor:
    r""":math:`E[x_0 \mid x_0 + s n = x]` of a diagonal mixture, ``x (B, d)``, ``s (B,)`` (float64)."""
    var = prior.eigvals[None] + (s * s)[:, None, None]  # (B, K, d)
    resid = x[:, None, :] - prior.means[None]
    log_n = -0.5 * (resid * resid / var).sum(-1) - 0.5 * torch.log(var).sum(-1)
    r = torch.softmax(torch.log(prior.weights)[None] + log_n, dim=-1)
    return (r[..., None] * (prior.means[None] + prior.eigvals[None] / var * resid)).sum(1)


_DEEPINV: Any = None


def import_deepinv() -> Any:
    """deepinv, or the reason it cannot be imported (a string).

    deepinv imports torchvision first thing; the only torchvision on the registry here is the
    CUDA build, whose C extension cannot load against the CPU torch, and torchvision 0.28 then
    fails registering fake kernels for its missing ``torchvision::`` operators. Those
    registrations are skipped during the import (deepinv's samplers use none of those
    operators; nothing else is changed).
    """
    global _DEEPINV
    if _DEEPINV is not None:
        return _DEEPINV
    if package_version("deepinv") is None:
        _DEEPINV = "deepinv is not installed"
        return _DEEPINV
    import torch.library

    original = torch.library.register_fake

    def tolerant(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            try:
                getattr(torch.ops.torchvision, op.split("::")[1].split(".")[0])
            except (AttributeError, RuntimeError):
                return args[0] if args else (lambda fn: fn)
        return original(op, *args, **kwargs)

    torch.library.register_fake = tolerant
    try:
        import deepinv

        _DEEPINV = deepinv
    except Exception as error:  # noqa: BLE001 - any import failure is reported in the table
        _DEEPINV = f"deepinv import failed: {type(error).__name__}: {error}"
    finally:
        torch.library.register_fake = original
    return _DEEPINV


def run_deepinv(name: str) -> Callable[[Case, int, int, int], tuple[Tensor, float]]:
    """deepinv 0.5.0's sampler ``name`` on the problem mapped to [0, 1]: x01 = (x - lo) / span.

    The map is affine, so the posterior maps with it: ``y01 = (y - H lo 1) / span`` and
    ``sigma_y01 = sigma_y / span``; the denoiser is the prior's exact one in those units. The
    operator is a ``DecomposablePhysics`` from the full SVD of ``H`` (DDRM needs it; the same
    object serves DPS and DiffPIR). Defaults of each sampler; its number of steps = ``nfe``.
    """

    def run(case: Case, nfe: int, num_samples: int, seed: int) -> tuple[Tensor, float]:
        dinv = import_deepinv()
        if isinstance(dinv, str):
            raise RuntimeError(dinv)
        p = case.problem
        d, m = p.dim, p.H.shape[0]
        radius = float(p.prior.means.abs().max()) + 4 * float(p.prior.eigvals.max().sqrt())
        lo, span = -radius, 2 * radius
        u, s, vh = torch.linalg.svd(p.H, full_matrices=True)
        mask = torch.zeros(1, 1, 1, d, dtype=torch.float32)
        mask[..., :m] = s.to(torch.float32)
        u32, vh32 = u.to(torch.float32), vh.to(torch.float32)
        calls = {"rows": 0}

        class ExactDenoiser(dinv.models.Denoiser):
            def forward(self, x: Tensor, sigma: Any, *args: Any, **kwargs: Any) -> Tensor:
                calls["rows"] += x.shape[0]
                flat = x.reshape(x.shape[0], -1).to(F64)
                sig = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(x.shape[0])
                out = exact_ve_denoiser(p.prior, lo + span * flat, span * sig)
                return ((out - lo) / span).to(x.dtype).reshape(x.shape)

        def pad(c: Tensor) -> Tensor:
            return torch.cat([c, c.new_zeros(*c.shape[:-1], d - m)], dim=-1)

        physics = dinv.physics.DecomposablePhysics(
            U=lambda c: (c[..., :m] @ u32.T.to(c.dtype)),
            U_adjoint=lambda z: pad(z @ u32.to(z.dtype)),
            V=lambda c: c @ vh32.to(c.dtype),
            V_adjoint=lambda x: x @ vh32.T.to(x.dtype),
            mask=mask,
            noise_model=dinv.physics.GaussianNoise(sigma=p.sigma_y / span),
        )
        y01 = ((p.y - p.H @ torch.full((d,), lo, dtype=F64)) / span).to(torch.float32)
        y01 = y01.reshape(1, 1, 1, m).expand(num_samples, 1, 1, m).contiguous()
        denoiser = ExactDenoiser()
        torch.manual_seed(seed)
        if name == "deepinv-dps":
            sampler = dinv.sampling.DPS(denoiser, num_steps=nfe, rng=torch.Generator().manual_seed(seed))
            x01 = sampler(y01, physics)
        elif name == "deepinv-ddrm":
            import numpy as np

            x01 = dinv.sampling.DDRM(denoiser, sigmas=np.linspace(1, 0, nfe))(y01, physics)
        elif name == "deepinv-diffpir":
            x01 = dinv.sampling.DiffPIR(denoiser, dinv.optim.data_fidelity.L2(), sigma=p.sigma_y / span,
                                        max_iter=nfe)(y01, physics)
        else:
            raise ValueError(f"unknown deepinv sampler {name!r}")
        x = lo + span * x01.reshape(num_samples, d).to(F64)
        return x, calls["rows"] / num_samples

    return run


DEEPINV_METHODS = ("deepinv-dps", "deepinv-ddrm", "deepinv-diffpir")


def load_methods() -> dict[str, str]:
    """Import every module of :mod:`flowdiff.inverse` so that its methods register; ``{module: error}`` of failures."""
    failed = {}
    for info in pkgutil.iter_modules(fd.inverse.__path__):
        try:
            importlib.import_module(f"flowdiff.inverse.{info.name}")
        except Exception as error:  # noqa: BLE001 - a broken module is reported, the others still run
            failed[info.name] = f"{type(error).__name__}: {error}"
    return failed


def runners(selected: list[str] | None) -> dict[str, Callable]:
    load_methods()
    out: dict[str, Callable] = {"exact": run_exact}
    out.update({name: run_flowdiff(name) for name in fd.inverse.available()})
    out.update({name: run_deepinv(name) for name in DEEPINV_METHODS})
    if selected:
        unknown = [name for name in selected if name not in out]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; available: {', '.join(out)}")
        out = {name: out[name] for name in selected}
    return out


def measure(case: Case, name: str, run: Callable, nfe: int, num_samples: int, seed: int = 0) -> dict[str, Any]:
    """One method on one problem; an exception becomes the row's ``error``."""
    row: dict[str, Any] = {"problem": case.label, "method": name, "budget": nfe, "samples": num_samples}
    start = time.perf_counter()
    try:
        x, spent = run(case, nfe, num_samples, seed)
        row.update(scores(x, case), nfe=float(spent))
    except Exception as error:  # noqa: BLE001 - the table records failures
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        row["traceback"] = traceback.format_exc(limit=4)
    row["seconds"] = time.perf_counter() - start
    return row


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "–"
    if "error" in row:
        return "n/a" if "noiseless measurements only" in row["error"] else "err"
    return f"{row[key]:.3f}" if key != "sw2" else f"{row[key]:.2f}"


def tables(cases: list[Case], rows: list[dict[str, Any]], budgets: list[int]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    index = {(r["problem"], r["method"], r["budget"]): r for r in rows}
    header = ["method", "nfe"] + [c.label for c in cases]
    lines: list[str] = []
    for key, title in (("tv", "Mode-weight TV (0 = exact weights; `exact` = the sampling floor)"),
                       ("sw2", "Sliced W2 to 10 000 exact posterior samples (`exact` = the floor)")):
        lines += ["", f"### {title}", ""]
        body = [[m, b] + [cell(index.get((c.label, m, b)), key) for c in cases] for b in budgets for m in methods]
        lines += markdown_table(header, body)
    lines += ["", "### Cost: evaluations per sample spent, wall seconds (sum over problems)", ""]
    body = []
    for b in budgets:
        for m in methods:
            got = [index.get((c.label, m, b)) for c in cases]
            ok = [r for r in got if r is not None and "error" not in r]
            skipped = [r for r in got if r is not None and "noiseless measurements only" in r.get("error", "")]
            spent = f"{max(r['nfe'] for r in ok):.0f}" if ok else "–"
            secs = sum(r["seconds"] for r in got if r is not None)
            body.append([m, b, got[0]["samples"] if got[0] else "–", spent, f"{secs:.1f}",
                         len(got) - len(ok) - len(skipped)])
    lines += markdown_table(["method", "budget", "samples", "max nfe/sample", "seconds", "failed"], body)
    errors = sorted({(r["method"], r["error"].split(", got")[0]) for r in rows if "error" in r})
    if errors:
        lines += ["", "### Errors", ""] + [f"- `{m}`: {e}" for m, e in errors]
    return lines


def problem_lines(cases: list[Case]) -> list[str]:
    body = []
    for c in cases:
        w = c.problem.posterior.weights
        top = ", ".join(f"{v:.2f}" for v in sorted(w.tolist(), reverse=True)[:3])
        body.append([c.label, f"{c.problem.sigma_y:.4f}", int((w >= 0.1).sum()), top,
                     "yes" if c.multimodal else "no (plain draw)", c.problem.tries])
    return markdown_table(["problem", "σ_y (absolute)", "modes ≥ 0.1", "top weights", "multimodal draw", "draws"], body)


def report(cases: list[Case], rows: list[dict[str, Any]], budgets: list[int], samples: dict[int, int],
           meta: dict[str, Any]) -> list[str]:
    lines = ["# Posterior samplers on exact-posterior Gaussian-mixture problems", "",
             metadata_line(meta), "",
             f"Samples per problem: {', '.join(f'{n} at budget {b}' for b, n in samples.items())}; "
             f"deepinv: {meta['deepinv']}. `n/a`: the method needs sigma_y = 0.", "", "### Problems", ""]
    return lines + problem_lines(cases) + tables(cases, rows, budgets)


def rerender(quick: bool) -> dict[str, Any]:
    """Rewrite the Markdown of a finished run from its JSON (the problems are rebuilt from their seeds)."""
    import json

    from _common import RESULTS

    stem = "inverse_gmm_quick" if quick else "inverse_gmm"
    payload = json.loads((RESULTS / f"{stem}.json").read_text())
    specs = payload["meta"].get("specs") or (QUICK_SPECS if quick else FULL_SPECS)
    cases = [make_case(*spec) for spec in specs]
    samples = {int(b): n for b, n in payload["meta"]["samples"].items()}
    lines = report(cases, payload["rows"], list(samples), samples, payload["meta"])
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": payload["rows"], "lines": lines, "cases": cases}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one d = 8 problem, budget 20, 100 samples")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per problem at budget 100")
    parser.add_argument("--samples-big", type=int, default=100, help="samples per problem at budget 1000")
    parser.add_argument("--budgets", nargs="*", type=int, default=[100, 1000], help="evaluation budgets (default 100 1000)")
    parser.add_argument("--stem", default="inverse_gmm", help="results file stem (a partial run: another stem)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--rerender", action="store_true",
                        help="rebuild the .md tables from the saved .json rows (no sampling)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rerender:
        return rerender(args.quick)
    if args.quick:
        specs, budgets, samples = QUICK_SPECS, [20], {20: 100}
    else:
        specs = FULL_SPECS
        budgets = args.budgets
        samples = {b: args.samples if b < 1000 else args.samples_big for b in budgets}
    cases = [make_case(*spec) for spec in specs]
    todo = runners(args.methods)
    rows = []
    for nfe in budgets:
        for case in cases:
            for name, run in todo.items():
                row = measure(case, name, run, nfe, samples[nfe])
                rows.append(row)
                state = row.get("error") or f"TV {row['tv']:.3f} SW2 {row['sw2']:.2f} nfe {row['nfe']:.0f}"
                print(f"{case.label:16s} {name:16s} {nfe:5d}  {state}  {row['seconds']:.1f}s", flush=True)
    dinv = import_deepinv()
    meta = run_metadata(deepinv=package_version("deepinv") if not isinstance(dinv, str) else dinv,
                        samples=samples, reference_samples=REFERENCE_SAMPLES, specs=specs)
    lines = report(cases, rows, budgets, samples, meta)
    print("\n".join(lines))
    payload = {"meta": meta, "rows": [{k: v for k, v in r.items() if k != "traceback"} for r in rows],
               "problems": [{"label": c.label, "sigma_y": c.problem.sigma_y,
                             "weights": c.problem.posterior.weights.tolist()} for c in cases]}
    if not args.no_write:
        write_results("inverse_gmm_quick" if args.quick else args.stem, lines, payload)
    return {"rows": rows, "lines": lines, "cases": cases}


if __name__ == "__main__":
    main()
