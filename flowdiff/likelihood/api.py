"""Log-likelihood and bits per dimension on the solvers' augmented ODE (:mod:`flowdiff.solvers.logp`), and
their result types; the formulas are in the docstring of :mod:`flowdiff.likelihood`."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..solvers.logp import (DEFAULT_ATOL_NATS, DEFAULT_LIKELIHOOD_NFE, DEFAULT_REFINE_TOL, Prior, check_data, check_solve, draw_probes, integrate_logp,
                            prior_log_prob, probe_std_error)

__all__ = ["BitsPerDimResult", "LikelihoodResult", "bits_per_dim", "log_likelihood"]

_UNSET: Any = object()  # refine_tol not given (then it is DEFAULT_REFINE_TOL, and selects "adams")


@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` returns (per-sample tensors ``(B,)``, log-densities in nats).

    Attributes:
        log_prob: :math:`\\log p(x)` at ``t_end`` (the data side); Hutchinson: the mean over probes.
        prior_term: :math:`\\log\\pi(x(t_{start}))`; ``delta_logdet = log_prob - prior_term`` (the
            integrated log-determinant, flow-coordinate scaling included).
        nfe: model calls really made (summed over ``batch_size`` chunks).
        std_error: Hutchinson only: standard error of ``log_prob`` over the probes (NaN with one).
        x_prior: the state at ``t_start`` (the latent code of ``x``).
        solver, divergence, probes, t_start, t_end: what was used (``probes`` = 0 for the exact divergence).
        grid: the fixed-step nodes, increasing (float64; the solve walks it backwards).
        steps: accepted steps per sample (``dopri5``).
        log_prob_probes: Hutchinson only: the ``(probes, B)`` per-probe estimates.
        refined: ``adams`` with ``refine_tol``: ``(B,)`` bool, the samples re-solved by ``dopri5``.
        error_estimate: ``adaptive``: ``(B,)`` the solver's estimate of each sample's error (nats): the
            sum of its steps' local error estimates (Milne), state errors weighted by the score.
        calls: ``adaptive``: ``(B,)`` model evaluations spent on each sample.
        evals_per_sample: model evaluations per sample, averaged over the batch (a call on k samples
            counts k): the fair cost of per-sample solves, whose later calls hold fewer samples.
    """

    log_prob: Tensor
    prior_term: Tensor
    delta_logdet: Tensor
    nfe: int
    std_error: Tensor | None
    x_prior: Tensor
    solver: str
    divergence: str
    probes: int
    t_start: float
    t_end: float
    grid: Tensor | None = None
    steps: Tensor | None = None
    log_prob_probes: Tensor | None = None
    refined: Tensor | None = None
    evals_per_sample: float = float("nan")
    error_estimate: Tensor | None = None
    calls: Tensor | None = None

    def __repr__(self) -> str:
        return (f"LikelihoodResult(B={len(self.log_prob)}, mean log_prob={float(self.log_prob.detach().double().mean()):.6g} "
                f"nats, nfe={self.nfe}, solver={self.solver!r}, divergence={self.divergence!r})")


@dataclass
class BitsPerDimResult:
    """What :func:`bits_per_dim` returns: ``bpd`` ``(B,)`` per datum (averaged over its dequantisation
    draws); ``mean`` over the batch and its ``std_error`` (std of ``bpd`` over √B, dequantisation and
    Hutchinson noise included); ``ci_low``, ``ci_high``: the normal-approximation interval at
    ``confidence``; ``log_prob`` ``(B, draws)`` of the dequantised points (nats); ``offset_bits``
    :math:`-\\log_2\\Delta`; ``nfe`` model calls; ``dims`` = D per datum."""

    bpd: Tensor
    mean: float
    std_error: float
    ci_low: float
    ci_high: float
    confidence: float
    log_prob: Tensor
    offset_bits: float
    nfe: int
    dims: int

    def __repr__(self) -> str:
        return (f"BitsPerDimResult(mean={self.mean:.4f} bpd, {100 * self.confidence:.0f}% CI [{self.ci_low:.4f}, "
                f"{self.ci_high:.4f}], B={len(self.bpd)}, nfe={self.nfe})")


@contextlib.contextmanager
def _progress_bar(total: int):
    """The tick of a rich progress bar (``None`` without rich, with a warning)."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich is an optional extra
        warnings.warn("progress=True needs the 'rich' package (pip install rich); continuing without a bar", stacklevel=4)
        yield None
        return
    with Progress(TextColumn("log-likelihood"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("log-likelihood", total=total)
        yield lambda: bar.advance(task)


def log_likelihood(
    field: Any, x: Tensor, *, solver: str | None = None, nfe: int | None = None, grid: str | Sequence[float] | Tensor = "flow",
    rtol: float = 1e-5, atol: float | None = None, divergence: str = "exact", probes: int = 8, probe_dist: str = "rademacher",
    generator: torch.Generator | None = None, t_start: float | None = None, t_end: float | None = None,
    prior: Prior = "gaussian", cond: dict | None = None, batch_size: int | None = None, chunk_size: int | None = None,
    differentiable: bool = False, progress: bool = False, check_finite: bool = True, refine_tol: Any = _UNSET,
) -> LikelihoodResult:
    r"""Log-likelihood of ``x`` (nats) under a field's probability-flow ODE (formulas: :mod:`flowdiff.likelihood`).

    Solves the augmented ODE backwards from ``x`` at ``t_end`` to ``t_start`` and adds the prior
    log-density there. Each sample's result depends only on that sample.

    Arguments:
        field: a :class:`~flowdiff.Field` or :class:`~flowdiff.InterpolantField`.
        x: data ``(B, *S)`` (any shape; images too), float32 or float64, finite.
        solver: ``"adaptive"`` (the default since issue 12, unless ``nfe``, an explicit ``grid`` or
            ``refine_tol`` asks for a fixed budget, which selects ``"adams"`` as before: per-sample
            variable-step Adams in the log-SNR time ρ = −log(1 − τ), in the Gaussian frame read off the
            Jacobian at the data end (exact divergence, D ≤ 1024), its error controlled in nats by
            ``atol``; the budget follows the requested accuracy and each sample's difficulty), ``"adams"`` (``nfe`` model evaluations at
            ``nfe`` distinct times on a grid uniform in τ, with the Milne re-solve of ``refine_tol``),
            ``"rk4"``, ``"heun"``, ``"midpoint"``, ``"euler"`` (fixed steps) or ``"dopri5"`` (per-sample
            adaptive Dormand–Prince in τ).
        nfe: model evaluations per ``batch_size`` chunk (default 48) for the fixed-step solvers; for
            ``adaptive`` (per sample) and ``dopri5`` a cap (default 10 000).
        grid: fixed-step solvers: ``"flow"`` (uniform in τ = α/(α+σ); default), ``"uniform"`` (in t),
            ``"logsnr"``, or an increasing sequence of times from ``t_start`` to ``t_end`` (then ``nfe``
            may be omitted).
        rtol, atol: ``adaptive``: ``atol`` is the requested mean error per sample in nats (default
            3e-4; measured mean error 0.6–0.75 × atol, the largest ≈ 2.5 × atol, on mixtures with
            component scales over two and three decades), ``rtol`` is not used.
            ``dopri5`` (and the ``adams`` re-solve): relative/absolute tolerances on the flow state and
            the log-det (default 1e-5 both).
        divergence: ``"exact"`` or ``"hutchinson"`` with ``probes`` per sample (drawn once per solve
            from ``generator``; ≥ 2 for a standard error) of ``probe_dist`` ``"rademacher"`` or ``"gaussian"``.
        t_start, t_end: the prior-side and data-side times (default ``t_min``, ``t_max``), ``t_start <
            t_end`` as in :func:`flowdiff.sample` (before issue 10 the other way round). The model is
            only evaluated inside.
        prior: log-density at ``t_start``: ``"gaussian"`` (Gaussian path: N(0, σ(t_start)² I), the law
            of ``path.prior_sample``; interpolant with a Gaussian x₀: N(0, (a₀² + γ²) I)),
            ``"standard"`` (N(0, I)) or a callable ``z -> (B,)``.
        cond: conditioning keyword arguments (batched tensors are split with the batch).
        batch_size: solve ``x`` in chunks of this many samples (memory); each chunk has its own probes,
            grid and steps. chunk_size: basis vectors per batched backward pass of the exact divergence.
        differentiable: keep the graph so that ``log_prob`` can be back-propagated to the model's
            parameters (maximum-likelihood training); memory grows with ``nfe``.
        progress: show a progress bar (needs ``rich``).
        check_finite: raise :class:`NonFiniteLikelihoodError` as soon as the state is not finite.
        refine_tol: ``adams`` only (default 3e-4; giving it selects ``adams``): samples whose Milne indicator (the largest predictor–corrector gap,
            relative to ``1 + |y|``) exceeds this are solved again, each on its own steps, by
            ``dopri5`` with ``rtol``/``atol`` (``None``: never); ``result.refined`` says which.

    Example::

        res = fd.log_likelihood(field, x)                    # adaptive, atol=3e-4 nats, exact divergence
        res = fd.log_likelihood(field, x, atol=1e-4)         # ~7e-5 nats, ~44 evaluations per sample (stiff mixtures)
        res.error_estimate, res.calls                        # per sample: estimated error (nats), evaluations
        res = fd.log_likelihood(field, x, solver="dopri5", rtol=1e-6, atol=1e-6)
        res = fd.log_likelihood(field, images, divergence="hutchinson", probes=16, generator=g)
    """
    x = check_data(x)
    if solver is None:  # a fixed budget asked for: the fixed-grid solver, as before issue 12
        fixed = nfe is not None or not (isinstance(grid, str) and grid == "flow") or refine_tol is not _UNSET
        solver = "adams" if fixed else "adaptive"
    refine_tol = DEFAULT_REFINE_TOL if refine_tol is _UNSET else refine_tol
    atol = (DEFAULT_ATOL_NATS if solver == "adaptive" else 1e-5) if atol is None else atol
    path, ts, te = check_solve(field, t_start, t_end, "the solve runs from the data at t_end back to the prior at t_start",
                               solver, divergence, probes, probe_dist, rtol, atol, nfe, refine_tol)
    prior_fn = prior_log_prob(prior, path, ts)
    batch = x.shape[0]
    size = batch if batch_size is None else check_int("batch_size", batch_size, 1)
    cond, hutchinson = dict(cond or {}), divergence == "hutchinson"
    if getattr(getattr(field, "model", None), "unlabeled_default", None) == "mixture" and "y" not in cond:
        raise ValueError(
            "this class-conditional field samples its class mixture when called without labels, which is not one "
            "density: pass cond={'y': labels} for log p(x | y), or load the field with "
            "load_field(..., unlabeled='null') for the null-label (unconditional) network's log p(x)")
    chunks = list(range(0, batch, size))
    sols = []
    bar = _progress_bar(len(chunks) * (nfe or DEFAULT_LIKELIHOOD_NFE)) if progress and solver not in ("dopri5", "adaptive") else contextlib.nullcontext()
    with bar as tick:
        for start in chunks:
            sl = slice(start, start + size)
            cc = {k: (v[sl] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch else v) for k, v in cond.items()}
            with torch.set_grad_enabled(differentiable):
                sols.append(integrate_logp(
                    field, x[sl], te, ts, solver=solver, nfe=nfe, grid=grid, rtol=rtol, atol=atol, method=divergence,
                    probes=draw_probes(x[sl], probes, probe_dist, generator) if hutchinson else None, chunk_size=chunk_size,
                    cond=cc, create_graph=differentiable, check=check_finite, progress=tick, refine_tol=refine_tol,
                ))
    state = torch.cat([s.state for s in sols])
    prior_term = torch.cat([prior_fn(s.state) for s in sols]).to(x.dtype)
    change = torch.cat([s.change for s in sols], dim=-1)
    per_probe = prior_term + change  # log p(x at t_end) = log p(x(t_start)) + Δ
    keep = (lambda v: v) if differentiable else (lambda v: v.detach())  # noqa: E731
    mean = (lambda v: v.mean(0)) if hutchinson else (lambda v: v)  # noqa: E731
    steps, refined = [s.steps for s in sols if s.steps is not None], [s.refined for s in sols if s.refined is not None]
    return LikelihoodResult(
        log_prob=keep(mean(per_probe)), prior_term=keep(prior_term), delta_logdet=keep(mean(change)),
        nfe=sum(s.nfe for s in sols), std_error=probe_std_error(per_probe).detach() if hutchinson else None,
        x_prior=keep(state), solver=solver, divergence=divergence, probes=probes if hutchinson else 0, t_start=ts, t_end=te,
        grid=sols[0].grid, steps=torch.cat(steps) if len(steps) == len(sols) else None,
        log_prob_probes=per_probe.detach() if hutchinson else None,
        refined=torch.cat(refined) if len(refined) == len(sols) else None,
        evals_per_sample=sum(s.sample_evals for s in sols) / batch,
        error_estimate=torch.cat([s.error_estimate for s in sols]) if all(s.error_estimate is not None for s in sols) else None,
        calls=torch.cat([s.calls for s in sols]) if all(s.calls is not None for s in sols) else None,
    )


def bits_per_dim(
    field: Any, x: Tensor, *, levels: int = 256, data_range: tuple[float, float] = (-1.0, 1.0), draws: int = 1,
    generator: torch.Generator | None = None, confidence: float = 0.95, lattice_tol: float = 1e-4, **likelihood_kwargs: Any,
) -> BitsPerDimResult:
    r"""Bits per dimension of quantised data with uniform dequantisation (formula and bound: :mod:`flowdiff.likelihood`)
    and its normal confidence interval :math:`\overline{\mathrm{bpd}} \pm z\,s/\sqrt{B}` over the data.

    Arguments:
        field, x: as :func:`log_likelihood`; ``x`` on the lattice :math:`lo + k\Delta`, :math:`k = 0..levels-1`,
            :math:`\Delta = (hi - lo)/(levels - 1)` (8-bit images in [-1, 1]: ``levels=256``; digits
            ``x/8 - 1``: ``levels=17``), ``(lo, hi) = data_range``, up to ``lattice_tol`` (units of Δ).
        levels: number of quantisation levels (≥ 2). draws: dequantisation draws per datum (averaged).
        generator: for the dequantisation noise (and Hutchinson probes).
        confidence: level of the interval, in (0, 1).
        **likelihood_kwargs: passed to :func:`log_likelihood` (``solver``, ``nfe``, ``divergence``, …).
    """
    x = check_data(x)
    levels, draws = check_int("levels", levels, 2), check_int("draws", draws, 1)
    check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    if not (isinstance(data_range, (tuple, list)) and len(data_range) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in data_range) and data_range[0] < data_range[1]):
        raise ValueError(f"data_range must be (lo, hi) with finite lo < hi, got {data_range!r}")
    lo, hi = float(data_range[0]), float(data_range[1])
    delta = (hi - lo) / (levels - 1)
    k = (x.double() - lo) / delta
    off = (k - k.round()).abs().max()
    if float(off) > lattice_tol or float(k.min()) < -lattice_tol or float(k.max()) > levels - 1 + lattice_tol:
        raise ValueError(
            f"x is not quantised on {levels} levels in [{lo:g}, {hi:g}] (spacing {delta:.6g}): it is up to "
            f"{float(off):.3g} bins off the lattice and spans levels [{float(k.min()):.3g}, {float(k.max()):.3g}]; "
            "pass the right levels/data_range"
        )
    lattice = (lo + k.round() * delta).to(x.dtype)
    nfe, log_probs = 0, []
    for _ in range(draws):
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device if generator is None else generator.device)
        res = log_likelihood(field, lattice + (delta * (u - 0.5)).to(device=x.device, dtype=x.dtype), generator=generator,
                             **likelihood_kwargs)
        nfe += res.nfe
        log_probs.append(res.log_prob.double())
    lp, dims = torch.stack(log_probs, dim=1), x[0].numel()  # (B, draws)
    bpd = -(lp.mean(1) / (dims * math.log(2.0))) - math.log2(delta)
    mean = float(bpd.mean())
    se = float(bpd.std() / math.sqrt(bpd.shape[0])) if bpd.shape[0] > 1 else float("nan")
    z = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(confidence, dtype=torch.float64)))  # P(|Z| ≤ z) = confidence
    return BitsPerDimResult(bpd=bpd, mean=mean, std_error=se, ci_low=mean - z * se, ci_high=mean + z * se, confidence=confidence,
                            log_prob=lp, offset_bits=-math.log2(delta), nfe=nfe, dims=dims)
