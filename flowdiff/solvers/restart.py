r"""Restart sampling: ODE steps plus repeated forward re-noising over one or more intervals.

Xu, Deng, Chen, Tian, Liu, Tegmark & Jaakkola, "Restart Sampling for Improving Generative Processes"
(NeurIPS 2023), Algorithm 1. The probability-flow ODE is integrated from noise to ``t_hi``; then, ``repeats``
times, the state is moved back to the noisier time ``t_lo`` with the path's exact forward kernel

.. math::  x_{lo} = \frac{\alpha_{lo}}{\alpha_{hi}}\,x_{hi}
           + \sqrt{\sigma_{lo}^2 - \frac{\alpha_{lo}^2}{\alpha_{hi}^2}\sigma_{hi}^2}\;\varepsilon,

and integrated forward to ``t_hi`` again with the ODE; finally the ODE runs from ``t_hi`` to the data end.
The added noise contracts the errors accumulated before ``t_hi`` (the paper's bound: the forward noise
shrinks the total-variation gap by a factor that falls with the number of restarts) while the ODE keeps the
discretisation error small. The kernel leaves the path's marginal at ``t_lo`` exact when the state at
``t_hi`` has the path's marginal, so with an exact field every restart preserves the law.

Conventions as everywhere in flowdiff: ``t = 0`` noise, ``t = 1`` data; the restart interval is given
by half log-SNRs ``λ = log α − log σ`` (``log_snr=(λ_lo, λ_hi)``), which are comparable between paths.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..paths import GaussianPath
from .base import SampleResult
from .loop import sample

__all__ = ["restart_sample", "renoise"]


def renoise(path: GaussianPath, x: Tensor, t_from: float, t_to: float, generator: torch.Generator | None = None) -> Tensor:
    """Move a state at ``t_from`` to the noisier time ``t_to`` (< ``t_from``) with the path's forward kernel."""
    if not t_to <= t_from:
        raise ValueError(f"renoise goes toward noise: need t_to <= t_from, got t_to={t_to}, t_from={t_from}")
    tt = torch.tensor([t_from, t_to], dtype=torch.float64)
    a, s = path.alpha(tt), path.sigma(tt)
    r = float(a[1] / a[0])
    var = float(s[1] ** 2 - r ** 2 * s[0] ** 2)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return r * x + math.sqrt(max(var, 0.0)) * noise


def restart_sample(field: Any, x_init: Tensor, solver: str = "dpm-solver++2m", nfe: int = 100,
                   log_snr: Any = (1.0, 2.5), repeats: Any = 5, restart_nfe: int = 10,
                   generator: torch.Generator | None = None, cond: dict | None = None, denoise_final: bool = True,
                   **options: Any) -> SampleResult:
    """Restart sampling (module docstring) with any deterministic solver of :func:`flowdiff.sample`.

    Arguments:
        field: a :class:`~flowdiff.Field` on a Gaussian path.
        x_init: noise at the path's ``t_min``.
        solver, nfe: the main ODE pass and its budget; it is split at each interval's ``t_hi`` in proportion
            to the log-SNR each piece covers (at least 2 calls each).
        log_snr: ``(λ_lo, λ_hi)``, the restart interval in half log-SNR (``λ_lo < λ_hi``), or a sequence of
            such pairs with increasing ``λ_hi`` (several intervals, as in the paper's multi-interval settings:
            the main pass stops at each ``t_hi`` in turn and restarts there).
        repeats: how many restarts (0: the plain ODE, split at ``t_hi``); one number per interval, or one
            for all.
        restart_nfe: model calls per restart's ODE pass from ``t_lo`` back to ``t_hi``.
        generator: for the restart noise.
        cond, denoise_final, options: as for :func:`flowdiff.sample`.

    Returns:
        the final pass's :class:`SampleResult` with ``nfe`` the total number of model calls and ``solver``
        ``"restart(<solver>)"``.
    """
    path = field.path
    if not isinstance(path, GaussianPath):
        raise TypeError(f"restart sampling needs a field on a GaussianPath, got {type(path).__name__}")
    lam_min, lam_max = (float(path.log_snr(torch.tensor([t], dtype=torch.float64))[0]) for t in (path.t_min, path.t_max))
    intervals = _intervals(log_snr, lam_min, lam_max)
    counts = [repeats] * len(intervals) if not isinstance(repeats, (list, tuple)) else list(repeats)
    if len(counts) != len(intervals):
        raise ValueError(f"repeats must be one integer or one per interval ({len(intervals)}), got {repeats!r}")
    for r in counts:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"repeats must be an integer >= 0, got {repeats!r}")
    for name, v in (("nfe", nfe), ("restart_nfe", restart_nfe)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
    if nfe < 2 * (len(intervals) + 1):
        raise ValueError(f"nfe must be >= {2 * (len(intervals) + 1)} for {len(intervals)} restart interval(s), got {nfe}")
    # the main pass's calls per piece [λ_min, hi_1], [hi_1, hi_2], ..., [hi_m, λ_max]
    edges = [lam_min] + [hi for _, hi in intervals] + [lam_max]
    budget = [max(2, round(nfe * (b - a) / (lam_max - lam_min))) for a, b in zip(edges[:-1], edges[1:])]
    budget[-1] = nfe - sum(budget[:-1])
    while budget[-1] < 2:  # rounding took too much: give back from the largest piece
        i = max(range(len(budget) - 1), key=lambda j: budget[j])
        budget[i] -= 1
        budget[-1] += 1
    to_t = lambda lam: float(path.t_of_log_snr(torch.tensor([lam], dtype=torch.float64))[0])  # noqa: E731
    common = {"solver": solver, "cond": cond, "generator": generator, **options}
    x, total, t_cur = x_init, 0, None
    for (lam_lo, lam_hi), count, n_main in zip(intervals, counts, budget):
        t_lo, t_hi = to_t(lam_lo), to_t(lam_hi)
        start = {} if t_cur is None else {"t_start": t_cur}
        res = sample(field, x, nfe=n_main, t_end=t_hi, denoise_final=False, **start, **common)
        x, total = res.state, total + res.nfe
        for _ in range(count):
            x = renoise(path, x, t_hi, t_lo, generator=generator)
            res = sample(field, x, nfe=restart_nfe, t_start=t_lo, t_end=t_hi, denoise_final=False, **common)
            x, total = res.state, total + res.nfe
        t_cur = t_hi
    res = sample(field, x, nfe=budget[-1], t_start=t_cur, denoise_final=denoise_final, **common)
    return replace(res, nfe=total + res.nfe, solver=f"restart({res.solver})",
                   nfe_budget=nfe + sum(counts) * restart_nfe)


def _intervals(log_snr: Any, lam_min: float, lam_max: float) -> list[tuple[float, float]]:
    """``log_snr`` as a list of ``(λ_lo, λ_hi)`` pairs inside the path's range ``(lam_min, lam_max)``, with
    increasing ``λ_hi``."""
    pairs = log_snr
    if isinstance(log_snr, (list, tuple)) and len(log_snr) == 2 and all(isinstance(v, (int, float)) for v in log_snr):
        pairs = [log_snr]
    try:
        out = [(float(lo), float(hi)) for lo, hi in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"log_snr must be a pair (lambda_lo, lambda_hi) or a sequence of pairs, got {log_snr!r}") from None
    if not out:
        raise ValueError(f"log_snr must name at least one interval, got {log_snr!r}")
    for lo, hi in out:
        if not (lam_min < lo < hi < lam_max):
            raise ValueError(f"log_snr must satisfy {lam_min:.3g} < lambda_lo < lambda_hi < {lam_max:.3g} (the path's "
                             f"range), got {log_snr!r}")
    if any(b[1] <= a[1] for a, b in zip(out[:-1], out[1:])):
        raise ValueError(f"restart intervals must have increasing lambda_hi, got {log_snr!r}")
    return out
