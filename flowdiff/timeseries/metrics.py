r"""Forecast metrics: CRPS as the mean weighted quantile loss, the exact sample CRPS, MASE.

CRPS as reported by TSDiff (Kollovieh et al. 2023, "Predict, Refine, Synthesize: Self-Guiding
Diffusion Models for Probabilistic Time Series Forecasting") and gluonts' ``mean_wQuantileLoss``:
for the quantile levels :math:`Q = \{0.1, \dots, 0.9\}`, :math:`\hat q` the empirical quantile of
the samples (``numpy.quantile``, linear interpolation),

.. math::
    \mathrm{QL}_q = 2\sum_{i,t} \big|(\hat q_{i,t} - y_{i,t})(\mathbf 1\{y_{i,t} \le \hat q_{i,t}\} - q)\big|,
    \qquad \mathrm{CRPS} \approx \frac{1}{|Q|}\sum_{q\in Q} \frac{\mathrm{QL}_q}{\sum_{i,t}|y_{i,t}|},

sums over every series and time step of the test set (a Riemann approximation of the normalised
CRPS :math:`\sum \mathrm{CRPS}(F, y)/\sum|y|`; Gneiting & Raftery 2007, "Strictly Proper Scoring
Rules, Prediction, and Estimation"). :func:`sample_crps` is the exact CRPS of the empirical
distribution of the samples, :math:`E|X - y| - \tfrac12 E|X - X'|` (what ``properscoring.crps_ensemble``
computes). :func:`mase` is Hyndman & Koehler (2006), "Another look at measures of forecast accuracy".

Shapes: ``samples (S, H)`` with ``target (H,)``, or ``samples (N, S, H)`` with ``target (N, H)``.
Everything is numpy (float64); non-finite input raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "QUANTILES",
    "quantile_losses",
    "mean_weighted_quantile_loss",
    "sample_crps",
    "normalized_crps",
    "gaussian_crps",
    "mase",
]

#: The nine quantile levels of gluonts' mean_wQuantileLoss.
QUANTILES = tuple(round(0.1 * i, 1) for i in range(1, 10))


def _as_pairs(samples, target) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(samples, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if s.ndim == 2 and y.ndim == 1:
        s, y = s[None], y[None]
    if s.ndim != 3 or y.ndim != 2 or s.shape[0] != y.shape[0] or s.shape[2] != y.shape[1]:
        raise ValueError(f"samples must be (S, H) with target (H,), or (N, S, H) with target (N, H); "
                         f"got samples {s.shape} and target {y.shape}")
    if s.shape[1] < 1:
        raise ValueError("samples must hold at least one sample path (S >= 1)")
    if not np.isfinite(s).all():
        raise ValueError(f"samples hold {int((~np.isfinite(s)).sum())} non-finite values")
    if not np.isfinite(y).all():
        raise ValueError(f"target holds {int((~np.isfinite(y)).sum())} non-finite values")
    return s, y


def _check_quantiles(quantiles: Sequence[float] | None) -> np.ndarray:
    q = np.asarray(QUANTILES if quantiles is None else quantiles, dtype=np.float64).reshape(-1)
    if q.size == 0 or not np.isfinite(q).all() or (q <= 0).any() or (q >= 1).any():
        raise ValueError(f"quantiles must be levels in (0, 1), got {quantiles!r}")
    return q


def quantile_losses(samples, target, quantiles: Sequence[float] | None = None) -> np.ndarray:
    r"""Unnormalised quantile losses :math:`\mathrm{QL}_q = 2\sum|(\hat q - y)(\mathbf 1\{y\le\hat q\} - q)|`, one per level."""
    s, y = _as_pairs(samples, target)
    q = _check_quantiles(quantiles)
    qhat = np.quantile(s, q, axis=1)  # (Q, N, H)
    indicator = (y[None] <= qhat).astype(np.float64)
    return 2.0 * np.abs((qhat - y[None]) * (indicator - q[:, None, None])).sum(axis=(1, 2))


def mean_weighted_quantile_loss(samples, target, quantiles: Sequence[float] | None = None) -> float:
    """CRPS as gluonts' ``mean_wQuantileLoss``: mean over levels of ``QL_q / sum |y|`` (module docstring)."""
    s, y = _as_pairs(samples, target)
    denominator = np.abs(y).sum()
    if denominator == 0:
        raise ValueError("target is all zeros: the weighted quantile loss divides by sum |y|")
    return float(quantile_losses(s, y, quantiles).mean() / denominator)


def sample_crps(samples, target) -> np.ndarray:
    r"""Exact CRPS of the samples' empirical distribution per point, :math:`E|X-y| - \tfrac12 E|X-X'|`.

    Uses the sorted form :math:`E|X - X'| = \frac{2}{S^2}\sum_i (2i - S - 1) x_{(i)}` (O(S log S)).
    Returns an array of the shape of ``target``.
    """
    s, y = _as_pairs(samples, target)
    count = s.shape[1]
    first = np.abs(s - y[:, None, :]).mean(axis=1)
    ordered = np.sort(s, axis=1)
    weights = (2.0 * np.arange(1, count + 1) - count - 1.0)[None, :, None]
    spread = (weights * ordered).sum(axis=1) * 2.0 / count**2
    out = first - 0.5 * spread
    return out[0] if np.ndim(target) == 1 else out


def normalized_crps(samples, target) -> float:
    """Sum of :func:`sample_crps` over the test set divided by ``sum |y|``."""
    s, y = _as_pairs(samples, target)
    denominator = np.abs(y).sum()
    if denominator == 0:
        raise ValueError("target is all zeros: the normalised CRPS divides by sum |y|")
    return float(sample_crps(s, y).sum() / denominator)


def gaussian_crps(mean, std, target) -> np.ndarray:
    r"""Closed-form CRPS of :math:`N(\mu, \sigma^2)`: :math:`\sigma[z(2\Phi(z) - 1) + 2\varphi(z) - 1/\sqrt\pi]`, :math:`z = (y-\mu)/\sigma`."""
    mu, sd, y = (np.asarray(a, dtype=np.float64) for a in (mean, std, target))
    if (sd <= 0).any() or not np.isfinite(sd).all():
        raise ValueError("std must be positive and finite")
    z = (y - mu) / sd
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    return sd * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))


def mase(forecast, target, history, season_length: int = 1) -> float:
    r"""Mean absolute scaled error: :math:`\mathrm{mean}|\hat y - y| / \mathrm{mean}_t|x_t - x_{t-m}|` on ``history``.

    ``forecast`` is a point forecast of the shape of ``target`` (e.g. the samples' median);
    ``history`` the in-sample series the seasonal-naive scale is computed on (``m = season_length``;
    falls back to ``m = 1`` when the history is shorter than ``m + 1``).
    """
    f = np.asarray(forecast, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    x = np.asarray(history, dtype=np.float64).reshape(-1)
    if f.shape != y.shape:
        raise ValueError(f"forecast {f.shape} and target {y.shape} must have the same shape")
    if not (np.isfinite(f).all() and np.isfinite(y).all() and np.isfinite(x).all()):
        raise ValueError("forecast, target and history must be finite")
    m = int(season_length) if x.size > int(season_length) else 1
    if x.size < m + 1:
        raise ValueError(f"history needs at least {m + 1} values, got {x.size}")
    scale = np.abs(x[m:] - x[:-m]).mean()
    if scale == 0:
        raise ValueError("history is constant at lag season_length: MASE is undefined")
    return float(np.abs(f - y).mean() / scale)
