r"""Time grids for the samplers: where the model is evaluated between ``t_start`` and ``t_end``.

Every grid is a 1-D float64 CPU tensor of ``steps + 1`` strictly increasing times with
``grid[0] = t_start`` (noise side) and ``grid[-1] = t_end`` (data side), exactly.

=============  ===================================================================  ==========================
kind           node ``i = 0 … N``                                                    reference
=============  ===================================================================  ==========================
``uniform``    :math:`t_i = t_0 + \tfrac{i}{N}(t_1 - t_0)`                            DPM-Solver ``time_uniform``
``logsnr``     :math:`\lambda_i = \lambda_0 + \tfrac{i}{N}(\lambda_1-\lambda_0)`,      Lu et al. 2022 (DPM-Solver)
               :math:`t_i = t(\lambda_i)`
``quadratic``  :math:`\tau_i = \big(\sqrt{\tau_0} + \tfrac{i}{N}(\sqrt{\tau_1}-           DPM-Solver ``time_quadratic``
               \sqrt{\tau_0})\big)^2` in diffusion time :math:`\tau = 1 - t`
``karras``     :math:`\tilde\sigma_i = \big(\tilde\sigma_0^{1/\rho} + \tfrac{i}{N}       Karras et al. 2022 (EDM),
               (\tilde\sigma_1^{1/\rho} - \tilde\sigma_0^{1/\rho})\big)^\rho`,          ρ = 7
               :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}`
``shifted``    uniform in :math:`w`, then :math:`u = \frac{k w}{1 + (k-1) w}` with      Esser et al. 2024 (SD3)
               :math:`u = 1 - t`; the ends are kept (``shift`` = k, default 3)
=============  ===================================================================  ==========================

``logsnr`` and ``karras`` need a Gaussian path (they are defined through λ); ``uniform``,
``quadratic`` and ``shifted`` work for every path, stochastic interpolants included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..paths import GaussianPath, StochasticInterpolant

__all__ = ["GRID_KINDS", "make_grid", "validate_grid"]

#: Grid kinds :func:`make_grid` knows.
GRID_KINDS = ("uniform", "logsnr", "quadratic", "karras", "shifted")


def finite_log_snr(path: GaussianPath, t0: float, t1: float, what: str) -> tuple[float, float]:
    """``(λ(t0), λ(t1))``; a ValueError saying that ``what`` needs them finite otherwise."""
    lam0, lam1 = path.table([t0, t1]).log_snr.tolist()
    if not (math.isfinite(lam0) and math.isfinite(lam1)):
        raise ValueError(f"{what} needs a finite log-SNR at both ends, got lambda(t_start={t0!r})={lam0!r}, "
                         f"lambda(t_end={t1!r})={lam1!r}; start a little after alpha=0 or end before sigma=0")
    return lam0, lam1


def validate_grid(grid: Tensor | Sequence[float], t_start: float | None = None, t_end: float | None = None) -> Tensor:
    """Check an explicit grid and return it as a float64 CPU tensor.

    It must be 1-D with at least 2 finite, strictly increasing times inside ``[0, 1]``; when
    ``t_start``/``t_end`` are given, the grid must begin/end there (to 1e-9).
    """
    try:
        g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu().flatten().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"grid must be a grid kind ({', '.join(GRID_KINDS)}) or an array of times, got {grid!r}") from err
    if g.numel() < 2:
        raise ValueError(f"an explicit grid needs at least 2 times, got {g.tolist()}")
    if not torch.isfinite(g).all():
        raise ValueError(f"grid times must be finite, got {g.tolist()[:8]}")
    if float(g.min()) < 0.0 or float(g.max()) > 1.0:
        raise ValueError(f"grid times must lie in [0, 1], got min={float(g.min())!r}, max={float(g.max())!r}")
    d = torch.diff(g)
    if (d <= 0).any():
        k = int(torch.nonzero(d <= 0)[0])
        raise ValueError(f"grid must be strictly increasing (generation runs from noise t=0 to data t=1), "
                         f"got grid[{k}]={float(g[k])!r} >= grid[{k + 1}]={float(g[k + 1])!r}")
    if t_start is not None and abs(float(g[0]) - t_start) > 1e-9:
        raise ValueError(f"the grid starts at {float(g[0])!r}, not at t_start={t_start!r}")
    if t_end is not None and abs(float(g[-1]) - t_end) > 1e-9:
        raise ValueError(f"the grid ends at {float(g[-1])!r}, not at t_end={t_end!r}")
    return g


def make_grid(path: GaussianPath | StochasticInterpolant, kind: str = "logsnr", steps: int = 10,
              t_start: float | None = None, t_end: float | None = None, *, rho: float = 7.0,
              shift: float = 3.0) -> Tensor:
    """A time grid of ``steps`` intervals from ``t_start`` to ``t_end`` (see the module table).

    Arguments:
        path: the field's path (Gaussian path, or a stochastic interpolant for the t-based kinds).
        kind: one of :data:`GRID_KINDS`.
        steps: number of intervals (the grid has ``steps + 1`` times).
        t_start, t_end: default ``path.t_min`` and ``path.t_max``.
        rho: Karras exponent (``karras`` only; EDM's default 7).
        shift: time-shift factor ``k > 0`` (``shifted`` only; ``k > 1`` puts more steps at high noise).

    Returns:
        float64 CPU tensor of shape ``(steps + 1,)``.
    """
    if not isinstance(path, (GaussianPath, StochasticInterpolant)):
        raise TypeError(f"path must be a GaussianPath or StochasticInterpolant, got {type(path).__name__}")
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; valid: {', '.join(GRID_KINDS)}")
    steps = check_int("steps", steps, 1)
    t0 = float(path.t_min if t_start is None else t_start)
    t1 = float(path.t_max if t_end is None else t_end)
    if not (0.0 <= t0 < t1 <= 1.0):
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t0!r}, t_end={t1!r}")
    i = torch.arange(steps + 1, dtype=torch.float64) / steps

    if kind == "uniform":
        g = t0 + i * (t1 - t0)
    elif kind == "quadratic":
        tau0, tau1 = math.sqrt(1.0 - t0), math.sqrt(1.0 - t1)
        g = 1.0 - (tau0 + i * (tau1 - tau0)) ** 2
    elif kind == "shifted":
        k = check_float("shift", shift, 0.0, low_open=True)
        w0, w1 = ((1.0 - t) / (k - (k - 1.0) * (1.0 - t)) for t in (t0, t1))  # w of u = 1 - t
        w = w0 + i * (w1 - w0)
        g = 1.0 - k * w / (1.0 + (k - 1.0) * w)
    else:
        if not isinstance(path, GaussianPath):
            raise ValueError(f"grid kind {kind!r} is defined through the log-SNR of a Gaussian path; for "
                             f"{type(path).__name__} use 'uniform', 'quadratic' or 'shifted'")
        lam0, lam1 = finite_log_snr(path, t0, t1, f"grid kind {kind!r}")
        if kind == "logsnr":
            lam = lam0 + i * (lam1 - lam0)
        else:  # karras, in sigma~ = e^{-lambda}
            rho = check_float("rho", rho, 0.0, low_open=True)
            s0, s1 = math.exp(-lam0 / rho), math.exp(-lam1 / rho)  # sigma~^{1/rho}
            lam = -rho * torch.log(s0 + i * (s1 - s0))
        g = path.t_of_log_snr(lam)
    g = g.to(torch.float64)
    g[0], g[-1] = t0, t1  # exact ends, whatever the round-off of the inverse maps
    if (torch.diff(g) <= 0).any():
        raise ValueError(f"{steps} steps of a {kind!r} grid on [{t0!r}, {t1!r}] are not strictly increasing in float64 "
                         f"(too many steps for this interval)")
    return g
