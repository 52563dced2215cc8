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

:func:`jump_grid` is a rule of another kind: its last node is *not* ``t_end``. It spends the
steps log-SNR-uniformly on the noise levels :math:`\tilde\sigma \in [\tilde\sigma_{lo},
\tilde\sigma_{hi}]` where a few-step solver has work to do, reaches :math:`\tilde\sigma_{hi}` from
the start in one step (above it the denoiser of data of unit scale hardly changes), and leaves
the rest, :math:`\tilde\sigma_{lo} \to 0`, to the final denoising call, which then jumps to the
data from a noise level where it still has something to correct (diffusers' and k-diffusion's
last step to σ = 0, Lu et al. 2022's ``denoise_to_zero``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..paths import GaussianPath, StochasticInterpolant

__all__ = ["GRID_KINDS", "jump_grid", "make_grid", "validate_grid"]

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


#: σ̃ = σ/α where :func:`jump_grid`'s log-SNR-uniform steps begin (data of about unit scale).
JUMP_SIGMA_MAX = 7.0
#: :func:`jump_grid`'s default last node: σ̃ = ``JUMP_SIGMA_MIN_SCALE / (steps + 1)``, lower with more steps.
JUMP_SIGMA_MIN_SCALE = 0.45


def jump_grid(path: GaussianPath, steps: int, t_start: float | None = None, t_end: float | None = None, *,
              sigma_max: float = JUMP_SIGMA_MAX, sigma_min: float | None = None) -> Tensor:
    r"""A grid for few-step sampling whose final denoise jumps to the data from :math:`\tilde\sigma_{lo}`.

    Nodes (``steps + 1``): ``t_start``, then ``steps`` times uniform in λ from
    :math:`\lambda_{hi} = -\log\tilde\sigma_{hi}` to :math:`\lambda_{lo} = -\log\tilde\sigma_{lo}`
    (:math:`\tilde\sigma = \sigma/\alpha`), clipped to the interval ``[t_start, t_end]`` (a start
    below :math:`\tilde\sigma_{hi}` gives the log-SNR grid from the start). The grid ends at
    :math:`t(\lambda_{lo})`, before ``t_end``: pass it as ``grid=`` to :func:`~flowdiff.sample`,
    whose final denoise is then made there, so that the whole budget is spent where the
    trajectory bends. The jump costs an error that shrinks with :math:`\tilde\sigma_{lo}`, the
    steps one that grows as they spread: the default :math:`\tilde\sigma_{lo} = 0.45/(N + 1)`
    balances the two (measured on d = 48 mixtures, seeds 0–3, 5–20 NFE: docs/solvers.md).

    Arguments:
        path: a Gaussian path.
        steps: solver steps N (the grid has ``steps + 1`` times; with ``denoise_final`` a
            one-evaluation-per-step solver spends ``steps + 1`` model calls).
        t_start, t_end: default the path's safe interval.
        sigma_max: :math:`\tilde\sigma_{hi}` (default :data:`JUMP_SIGMA_MAX`, for data of about unit scale).
        sigma_min: :math:`\tilde\sigma_{lo} < \tilde\sigma_{hi}`; default
            ``JUMP_SIGMA_MIN_SCALE / (steps + 1)`` (:data:`JUMP_SIGMA_MIN_SCALE`).

    Returns:
        float64 CPU tensor of shape ``(steps + 1,)``, strictly increasing, from ``t_start``.
    """
    if not isinstance(path, GaussianPath):
        raise TypeError(f"jump_grid needs a GaussianPath (it is defined through the log-SNR), got {type(path).__name__}")
    steps = check_int("steps", steps, 1)
    hi = check_float("sigma_max", sigma_max, 0.0, low_open=True)
    lo = check_float("sigma_min", JUMP_SIGMA_MIN_SCALE / (steps + 1) if sigma_min is None else sigma_min, 0.0,
                     low_open=True)
    if not lo < hi:
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={lo!r}, sigma_max={hi!r}")
    t0 = float(path.t_min if t_start is None else t_start)
    t1 = float(path.t_max if t_end is None else t_end)
    if not (0.0 <= t0 < t1 <= 1.0):
        raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t0!r}, t_end={t1!r}")
    lam0, lam1 = finite_log_snr(path, t0, t1, "jump_grid")
    lam_hi, lam_lo = -math.log(hi), -math.log(lo)
    lam_lo = min(lam_lo, lam1)
    lam_hi = max(lam_hi, lam0)
    if not lam_hi < lam_lo:  # the range is outside [t_start, t_end]: the plain log-SNR grid
        lam_hi, lam_lo = lam0, lam1
    if steps == 1:
        lam = torch.tensor([lam0, lam_lo], dtype=torch.float64)
    else:
        inner = lam_hi + torch.arange(steps, dtype=torch.float64) / (steps - 1) * (lam_lo - lam_hi)
        lam = torch.cat([torch.tensor([lam0], dtype=torch.float64), inner])
        if lam_hi <= lam0:  # the start is already below sigma_max: uniform from the start
            lam = lam0 + torch.arange(steps + 1, dtype=torch.float64) / steps * (lam_lo - lam0)
    g = path.t_of_log_snr(lam).to(torch.float64).clamp(t0, t1)
    g[0] = t0
    if (torch.diff(g) <= 0).any():
        raise ValueError(f"{steps} steps of a jump grid on [{t0!r}, {t1!r}] are not strictly increasing in float64")
    return g
