r"""Restart sampling: ODE steps plus repeated forward re-noising over one interval.

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
                   log_snr: tuple[float, float] = (1.0, 2.5), repeats: int = 5, restart_nfe: int = 10,
                   generator: torch.Generator | None = None, cond: dict | None = None, denoise_final: bool = True,
                   **options: Any) -> SampleResult:
    """Restart sampling (module docstring) with any deterministic solver of :func:`flowdiff.sample`.

    Arguments:
        field: a :class:`~flowdiff.Field` on a Gaussian path.
        x_init: noise at the path's ``t_min``.
        solver, nfe: the main ODE pass and its budget; it is split between ``[t_min, t_hi]`` and
            ``[t_hi, t_max]`` in proportion to the log-SNR each covers (at least 2 calls each).
        log_snr: ``(λ_lo, λ_hi)``, the restart interval in half log-SNR (``λ_lo < λ_hi``).
        repeats: how many restarts (0: the plain ODE, split at ``t_hi``).
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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"repeats must be an integer >= 0, got {repeats!r}")
    for name, v in (("nfe", nfe), ("restart_nfe", restart_nfe)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {v!r}")
    try:
        lam_lo, lam_hi = (float(v) for v in log_snr)
    except (TypeError, ValueError):
        raise ValueError(f"log_snr must be a pair (lambda_lo, lambda_hi), got {log_snr!r}") from None
    lam_min, lam_max = (float(path.log_snr(torch.tensor([t], dtype=torch.float64))[0]) for t in (path.t_min, path.t_max))
    if not (lam_min < lam_lo < lam_hi < lam_max):
        raise ValueError(f"log_snr must satisfy {lam_min:.3g} < lambda_lo < lambda_hi < {lam_max:.3g} (the path's range), "
                         f"got {log_snr!r}")
    t_lo, t_hi = (float(path.t_of_log_snr(torch.tensor([v], dtype=torch.float64))[0]) for v in (lam_lo, lam_hi))
    n1 = min(max(2, round(nfe * (lam_hi - lam_min) / (lam_max - lam_min))), nfe - 2)
    n2 = nfe - n1
    common = {"solver": solver, "cond": cond, "generator": generator, **options}
    res = sample(field, x_init, nfe=n1, t_end=t_hi, denoise_final=False, **common)
    x, total = res.state, res.nfe
    for _ in range(repeats):
        x = renoise(path, x, t_hi, t_lo, generator=generator)
        res = sample(field, x, nfe=restart_nfe, t_start=t_lo, t_end=t_hi, denoise_final=False, **common)
        x, total = res.state, total + res.nfe
    res = sample(field, x, nfe=n2, t_start=t_hi, denoise_final=denoise_final, **common)
    return replace(res, nfe=total + res.nfe, solver=f"restart({res.solver})",
                   nfe_budget=nfe + repeats * restart_nfe)
