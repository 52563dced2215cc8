r"""Holt–Winters (additive ETS) as a representation for TSDiff: the window around a classical forecast.

With ``profile="ets"`` :class:`~flowdiff.timeseries.TSDiff` models each window **around the Holt–Winters path
of its forecast origin**: over the context the one-step-ahead predictions, over the horizon the multi-step
forecast from the states at the origin. The diffusion model then learns the distribution of Holt–Winters'
errors (their spread by lead time, their dependence on the context's one-step errors) instead of the level,
trend and season, which exponential smoothing extrapolates with a handful of parameters.

The additive Holt–Winters recursions (Holt 1957; Winters 1960; the state-space form of Hyndman, Koehler, Ord,
Snyder 2008, *Forecasting with Exponential Smoothing*, ch. 2, ETS(A,A(d),A)), with level :math:`\ell`, trend
:math:`b`, season :math:`s` of period :math:`m` and damping :math:`\phi` (1: undamped):

.. math::
    \hat y_{t|t-1} &= \ell_{t-1} + \phi b_{t-1} + s_{t-m}, \\
    \ell_t &= \alpha (y_t - s_{t-m}) + (1-\alpha)(\ell_{t-1} + \phi b_{t-1}), \\
    b_t &= \beta (\ell_t - \ell_{t-1}) + (1-\beta)\phi b_{t-1}, \\
    s_t &= \gamma (y_t - \ell_{t-1} - \phi b_{t-1}) + (1-\gamma) s_{t-m}, \\
    \hat y_{t+h|t} &= \ell_t + (\phi + \dots + \phi^h) b_t + s_{t+h-m\lceil h/m\rceil},

the parametrisation of statsmodels' ``ExponentialSmoothing``, which fits :math:`\alpha, \beta, \gamma, \phi`
and the initial states by least squares (the tests check this filter against its fitted values and
forecasts). A missing value (NaN) skips its update: the states move on by their own prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["HoltWintersParams", "fit_holt_winters", "holt_winters_filter", "holt_winters_paths"]


@dataclass(frozen=True)
class HoltWintersParams:
    """Smoothing parameters and initial states of an additive Holt–Winters model (``season_length`` 1: Holt's
    linear trend, no season)."""

    alpha: float
    beta: float
    gamma: float
    phi: float
    level: float
    trend: float
    seasons: np.ndarray  # (season_length,): s_{-m}, ..., s_{-1}
    season_length: int


def _fill(values: np.ndarray) -> np.ndarray:
    """NaN filled by linear interpolation (ends: the nearest observed value), for the least-squares fit."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    if ok.all():
        return x
    if not ok.any():
        raise ValueError("fit_holt_winters needs at least one observed value")
    idx = np.arange(x.size)
    return np.interp(idx, idx[ok], x[ok])


def fit_holt_winters(values: np.ndarray, season_length: int = 1, damped: bool = False) -> HoltWintersParams:
    """Fit additive Holt–Winters to ``values`` with statsmodels (additive trend; additive season where
    ``season_length > 1`` and the series holds two seasons and two values, as
    :func:`flowdiff.timeseries.holt_winters`). Missing values are interpolated for the fit."""
    from .baselines import fit_statsmodels_holt_winters

    x = _fill(values)
    if x.size < 4:
        raise ValueError(f"fit_holt_winters needs at least 4 values, got {x.size}")
    m = int(season_length)
    res = fit_statsmodels_holt_winters(x, m, damped)
    seasonal = res.model.has_seasonal
    p = res.params
    phi = float(p["damping_trend"]) if damped else 1.0
    seasons = np.asarray(p["initial_seasons"], dtype=np.float64) if seasonal else np.zeros(1)
    return HoltWintersParams(alpha=float(p["smoothing_level"]), beta=float(p["smoothing_trend"]),
                             gamma=float(p["smoothing_seasonal"]) if seasonal else 0.0, phi=phi,
                             level=float(p["initial_level"]), trend=float(p["initial_trend"]),
                             seasons=seasons, season_length=m if seasonal else 1)


def holt_winters_filter(values: np.ndarray, params: HoltWintersParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the recursions over ``values`` (length ``n``).

    Returns ``(predictions, level, trend, season)``: the one-step predictions :math:`\\hat y_{t|t-1}` ``(n,)``,
    the level and trend after each observation ``(n,)``, and the seasonal states ``(m + n,)`` where entry
    ``m + t`` is :math:`s_t` (the first ``m`` the initial ones, :math:`s_{-m} \\dots s_{-1}`)."""
    y = np.asarray(values, dtype=np.float64)
    n, m = y.size, params.season_length
    a, b_, g, phi = params.alpha, params.beta, params.gamma, params.phi
    pred, level, trend = np.empty(n), np.empty(n), np.empty(n)
    season = np.empty(m + n)
    season[:m] = params.seasons
    lv, tr = params.level, params.trend
    for t in range(n):
        s_old = season[t]  # s_{t-m}
        pred[t] = lv + phi * tr + s_old
        if np.isfinite(y[t]):
            new = a * (y[t] - s_old) + (1 - a) * (lv + phi * tr)
            season[m + t] = g * (y[t] - lv - phi * tr) + (1 - g) * s_old  # m = 1: gamma = s = 0, stays 0
            tr = b_ * (new - lv) + (1 - b_) * phi * tr
            lv = new
        else:  # missing: the states move on by their own prediction
            season[m + t] = s_old
            lv, tr = lv + phi * tr, phi * tr
        level[t], trend[t] = lv, tr
    return pred, level, trend, season


def holt_winters_paths(values: np.ndarray, params: HoltWintersParams, origins, context: int, horizon: int) -> np.ndarray:
    """``(len(origins), context + horizon)``: for each forecast origin ``o`` (the index of the first forecast
    value, ``context <= o <= n``) the one-step predictions of ``values[o - context: o]`` followed by the
    ``horizon``-step forecast from the states after ``values[o - 1]``."""
    origins = np.asarray(origins, dtype=np.int64).reshape(-1)
    n, m = len(values), params.season_length
    if origins.size and (origins.min() < max(context, 1) or origins.max() > n):
        raise ValueError(f"forecast origins must lie in [{max(context, 1)}, {n}], got {origins.min()}..{origins.max()}")
    pred, level, trend, season = holt_winters_filter(values, params)
    h = np.arange(1, horizon + 1)
    damp = np.cumsum(params.phi ** h)  # phi + ... + phi^h
    out = np.empty((origins.size, context + horizon))
    for i, o in enumerate(origins):
        out[i, :context] = pred[o - context: o]
        last = o - 1
        # the latest seasonal state of the phase of time last + h: time last + h - m * ceil(h / m)
        phase = m + last + h - m * np.ceil(h / m).astype(np.int64)
        out[i, context:] = level[last] + damp * trend[last] + season[phase]
    return out
