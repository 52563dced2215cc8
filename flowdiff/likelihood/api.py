r"""Log-likelihood and bits per dimension on the solvers' augmented ODE.

The integration (flow coordinates, divergence estimators, Adams/Runge–Kutta/dopri5 solves) is
:mod:`flowdiff.solvers.logp`; this module adds what a likelihood evaluation needs on top of it: the
prior term, batching and progress, Hutchinson standard errors, dequantisation and confidence
intervals (see :mod:`flowdiff.likelihood` for the formulas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..solvers.logp import (
    DEFAULT_LIKELIHOOD_NFE,
    Prior,
    apply_prior,
    check_data,
    check_field,
    check_interval,
    check_options,
    draw_probes,
    integrate_logp,
    prior_log_prob,
    probe_std_error,
)
from .results import BitsPerDimResult, LikelihoodResult

__all__ = ["bits_per_dim", "log_likelihood"]


def _progress_bar(enabled: bool, total: int, label: str):
    """A rich progress bar (``progress=True``), or a no-op."""
    if not enabled:
        return None, None
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich is an optional extra
        import warnings

        warnings.warn("progress=True needs the 'rich' package (pip install rich); continuing without a bar", stacklevel=3)
        return None, None
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    return bar, (lambda: bar.advance(task))


def log_likelihood(
    field: Any,
    x: Tensor,
    *,
    solver: str = "adams",
    nfe: int | None = None,
    grid: str | Sequence[float] | Tensor = "flow",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "exact",
    probes: int = 8,
    probe_dist: str = "rademacher",
    generator: torch.Generator | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    prior: Prior = "gaussian",
    cond: dict | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    differentiable: bool = False,
    progress: bool = False,
    check_finite: bool = True,
    refine_tol: float | None = 5e-3,
) -> LikelihoodResult:
    r"""Log-likelihood of ``x`` (nats) under a field's probability-flow ODE.

    Solves the augmented ODE :math:`\dot x = u`, :math:`\dot\ell = -\nabla\cdot u` backwards from
    ``x`` at ``t_end`` (default ``t_max``, the data side) to ``t_start`` (default ``t_min``, the
    noise side) and adds the prior log-density there:
    :math:`\log p(x) = \log\pi(x(t_{start})) - \int_{t_{start}}^{t_{end}} \nabla\cdot u\,dt`.
    Each sample's result depends only on that sample.

    Arguments:
        field: a :class:`~flowdiff.Field` or :class:`~flowdiff.InterpolantField`.
        x: data ``(B, *S)`` (any shape; images too), float32 or float64, finite.
        solver: ``"adams"`` (default; ``nfe`` model evaluations at ``nfe`` distinct times),
            ``"rk4"``, ``"heun"``, ``"midpoint"``, ``"euler"`` (fixed steps) or ``"dopri5"``
            (per-sample adaptive; ``nfe`` is then a cap).
        nfe: model evaluations (fixed-step; default 48) or the cap (``dopri5``; default 10 000).
            Per ``batch_size`` chunk.
        grid: ``"flow"`` (uniform in τ = α/(α+σ); default), ``"uniform"`` (in t), ``"logsnr"``,
            or an explicit increasing sequence of times from ``t_start`` to ``t_end`` (then ``nfe``
            may be omitted).
        rtol, atol: ``dopri5`` tolerances (relative/absolute, on the flow state and the log-det).
        divergence: ``"exact"`` or ``"hutchinson"``.
        probes: Hutchinson probes per sample (drawn once per solve; ≥ 2 for a standard error).
        probe_dist: ``"rademacher"`` or ``"gaussian"``.
        generator: for the probes.
        t_start, t_end: the prior-side and data-side times, ``t_start < t_end`` inside the path's
            ``[t_min, t_max]`` — the convention of :func:`flowdiff.sample` (before issue 10 this
            function took them the other way round). The model is only evaluated inside.
        prior: log-density at ``t_start``: ``"gaussian"`` (Gaussian path: N(0, σ(t_start)² I), the
            law of ``path.prior_sample``; one-sided/two-sided interpolant with a Gaussian x₀:
            N(0, (a₀² + γ²) I)), ``"standard"`` (N(0, I)) or a callable ``z -> (B,)``.
        cond: conditioning keyword arguments (batched tensors are split with the batch).
        batch_size: solve ``x`` in chunks of this many samples (memory); each chunk has its own
            probes, grid and steps.
        chunk_size: basis vectors per batched backward pass of the exact divergence.
        differentiable: keep the graph so that ``log_prob`` can be back-propagated to the model's
            parameters (maximum-likelihood training); memory grows with ``nfe``.
        progress: show a progress bar (needs ``rich``).
        check_finite: raise :class:`NonFiniteLikelihoodError` as soon as the state is not finite.
        refine_tol: ``adams`` only: samples whose Milne predictor–corrector indicator (the largest
            per-step gap, relative to ``1 + |y|``) exceeds this are solved again, each on its own
            steps, by ``dopri5`` with ``rtol``/``atol`` (``None``: never). Costs extra model
            calls on those samples only; ``result.refined`` says which.

    Returns:
        :class:`LikelihoodResult`.

    Example::

        res = fd.log_likelihood(field, x)                    # adams, 48 evaluations, exact divergence
        res = fd.log_likelihood(field, x, solver="dopri5", rtol=1e-6, atol=1e-6)
        res = fd.log_likelihood(field, images, divergence="hutchinson", probes=16, generator=g)
    """
    path = check_field(field)
    x = check_data(x)
    check_options(solver, divergence, probes, probe_dist, rtol, atol, nfe)
    if refine_tol is not None:
        check_float("refine_tol", refine_tol, 0.0, low_open=True)
    ts, te = check_interval(path, t_start, t_end, "the solve runs from the data at t_end back to the prior at t_start")
    prior_fn = prior_log_prob(prior, path, ts)
    batch = x.shape[0]
    size = batch if batch_size is None else check_int("batch_size", batch_size, 1)
    cond = dict(cond or {})
    chunks = list(range(0, batch, size))
    per_chunk = (nfe or DEFAULT_LIKELIHOOD_NFE) if solver != "dopri5" else None
    bar, tick = _progress_bar(progress and per_chunk is not None, len(chunks) * (per_chunk or 1), "log-likelihood")
    outs = []
    try:
        for start in chunks:
            sl = slice(start, start + size)
            xc = x[sl]
            cc = {k: (v[sl] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch else v) for k, v in cond.items()}
            z = draw_probes(xc, probes, probe_dist, generator) if divergence == "hutchinson" else None
            with torch.set_grad_enabled(differentiable):
                sol = integrate_logp(
                    field, xc, te, ts, solver=solver, nfe=nfe, grid=grid, rtol=rtol, atol=atol, method=divergence,
                    probes=z, chunk_size=chunk_size, cond=cc, create_graph=differentiable, check=check_finite,
                    progress=tick, refine_tol=refine_tol,
                )
            outs.append((sol, apply_prior(prior_fn, sol.state)))
    finally:
        if bar is not None:
            bar.stop()
    state = torch.cat([s.state for s, _ in outs])
    prior_term = torch.cat([p for _, p in outs]).to(x.dtype)
    change = torch.cat([s.change for s, _ in outs], dim=-1)
    per_probe = prior_term + change  # log p(x at t_end) = log p(x(t_start)) + Δ
    hutchinson = divergence == "hutchinson"
    log_prob, delta = (per_probe.mean(0), change.mean(0)) if hutchinson else (per_probe, change)
    keep = (lambda v: v) if differentiable else (lambda v: v.detach())
    steps = [s.steps for s, _ in outs if s.steps is not None]
    refined = [s.refined for s, _ in outs if s.refined is not None]
    return LikelihoodResult(
        log_prob=keep(log_prob), prior_term=keep(prior_term), delta_logdet=keep(delta), nfe=sum(s.nfe for s, _ in outs),
        std_error=probe_std_error(per_probe).detach() if hutchinson else None, x_prior=keep(state), solver=solver,
        divergence=divergence, probes=probes if hutchinson else 0, t_start=ts, t_end=te, grid=outs[0][0].grid,
        steps=torch.cat(steps) if len(steps) == len(outs) else None,
        log_prob_probes=per_probe.detach() if hutchinson else None,
        refined=torch.cat(refined) if len(refined) == len(outs) else None,
        evals_per_sample=sum(s.sample_evals for s, _ in outs) / batch,
    )


def bits_per_dim(
    field: Any,
    x: Tensor,
    *,
    levels: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    draws: int = 1,
    generator: torch.Generator | None = None,
    confidence: float = 0.95,
    lattice_tol: float = 1e-4,
    **likelihood_kwargs: Any,
) -> BitsPerDimResult:
    r"""Bits per dimension of quantised data with uniform dequantisation, and its confidence interval.

    ``x`` must lie on the lattice :math:`lo + k\Delta`, :math:`k = 0..levels-1`,
    :math:`\Delta = (hi - lo)/(levels - 1)` (8-bit images in [-1, 1]: ``levels=256``; the 8×8
    digits scaled by ``x/8 - 1``: ``levels=17``). Each datum is dequantised ``draws`` times,
    :math:`v = x + \Delta(U - \tfrac12)`, and

    .. math::

        \mathrm{bpd}(x) = -\frac{\overline{\log p(v)} + D\log\Delta}{D\ln 2}

    (module docstring of :mod:`flowdiff.likelihood`), an upper bound on the code length of the
    discretised model. The confidence interval is :math:`\overline{\mathrm{bpd}} \pm z\,s/\sqrt{B}`
    over the data.

    Arguments:
        field, x: as :func:`log_likelihood` (``x`` quantised, in ``data_range``).
        levels: number of quantisation levels (≥ 2).
        data_range: ``(lo, hi)`` of the lattice in model space.
        draws: dequantisation draws per datum (averaged).
        generator: for the dequantisation noise (and Hutchinson probes).
        confidence: level of the interval, in (0, 1).
        lattice_tol: how far (in units of Δ) ``x`` may sit from the lattice.
        **likelihood_kwargs: passed to :func:`log_likelihood` (``solver``, ``nfe``,
            ``divergence``, ``probes``, ``batch_size``, ``progress``, …).

    Returns:
        :class:`BitsPerDimResult`.
    """
    x = check_data(x)
    levels = check_int("levels", levels, 2)
    draws = check_int("draws", draws, 1)
    if not isinstance(confidence, float):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    check_float("confidence", confidence, 0.0, 1.0, low_open=True, high_open=True)
    if (
        not isinstance(data_range, (tuple, list))
        or len(data_range) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in data_range)
        or not data_range[0] < data_range[1]
    ):
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
    dims = x[0].numel()
    nfe = 0
    log_probs = []
    for _ in range(draws):
        device = generator.device if generator is not None else x.device
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=device)
        res = log_likelihood(field, lattice + (delta * (u - 0.5)).to(device=x.device, dtype=x.dtype), generator=generator,
                             **likelihood_kwargs)
        nfe += res.nfe
        log_probs.append(res.log_prob.double())
    lp = torch.stack(log_probs, dim=1)  # (B, draws)
    offset_bits = -math.log2(delta)
    bpd = -(lp.mean(1) / (dims * math.log(2.0))) + offset_bits
    mean = float(bpd.mean())
    se = float(bpd.std() / math.sqrt(bpd.shape[0])) if bpd.shape[0] > 1 else float("nan")
    z = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(confidence, dtype=torch.float64)))  # P(|Z| ≤ z) = confidence
    return BitsPerDimResult(
        bpd=bpd, mean=mean, std_error=se, ci_low=mean - z * se, ci_high=mean + z * se, confidence=confidence,
        log_prob=lp, offset_bits=offset_bits, nfe=nfe, dims=dims,
    )
