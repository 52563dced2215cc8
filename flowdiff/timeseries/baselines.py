r"""Baseline forecasters that return sample paths ``(num_samples, horizon)`` like :meth:`TSDiff.forecast`.

* :func:`seasonal_naive` — the last season repeated (a point forecast as ``num_samples`` equal paths).
* :func:`probabilistic_seasonal_naive` — the same plus i.i.d. Gaussian noise whose standard deviation is
  that of the lag-season residuals :math:`y_t - y_{t-m}` of the history (a point forecast is too easy
  a baseline for CRPS).
* :func:`holt_winters` — Holt–Winters exponential smoothing (additive trend and season; Holt 1957,
  Winters 1960) fitted with statsmodels, intervals by simulating the state-space model's errors.
* :func:`statsforecast_model` — statsforecast's AutoETS / AutoARIMA (Hyndman & Khandakar 2008), samples
  drawn from their Gaussian predictive intervals; ``None`` where statsforecast is not installed.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["seasonal_naive", "probabilistic_seasonal_naive", "holt_winters", "statsforecast_model"]


def _history(history) -> np.ndarray:
    x = np.asarray(history, dtype=np.float64).reshape(-1)
    if x.size < 2 or not np.isfinite(x).all():
        raise ValueError(f"history must hold at least 2 finite values, got {x.size} values")
    return x


def seasonal_naive(history, horizon: int, season_length: int = 1, num_samples: int = 1) -> np.ndarray:
    """The last ``season_length`` values repeated over ``horizon``, as ``num_samples`` identical paths."""
    x = _history(history)
    m = season_length if x.size >= season_length else 1
    idx = x.size - m + (np.arange(horizon) % m)
    return np.repeat(x[idx][None], num_samples, axis=0)


def probabilistic_seasonal_naive(history, horizon: int, season_length: int = 1, num_samples: int = 100,
                                 seed: int = 0) -> np.ndarray:
    """Seasonal naive plus N(0, sd²), sd the standard deviation of ``y_t − y_{t−m}`` over ``history``."""
    x = _history(history)
    m = season_length if x.size > season_length else 1
    sd = float(np.std(x[m:] - x[:-m])) or 1e-12
    rng = np.random.default_rng(seed)
    return seasonal_naive(x, horizon, season_length, num_samples) + sd * rng.standard_normal((num_samples, horizon))


def holt_winters(history, horizon: int, season_length: int = 1, num_samples: int = 100, seed: int = 0,
                 damped: bool = False) -> np.ndarray:
    """Holt–Winters ETS (additive trend, additive season where ``season_length > 1`` and the history covers
    two seasons) fitted by statsmodels; samples by simulating the fitted model with additive errors."""
    fit = fit_statsmodels_holt_winters(_history(history), season_length, damped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sims = fit.simulate(horizon, repetitions=num_samples, error="add", anchor="end",
                            random_state=np.random.RandomState(seed))
    return np.asarray(sims, dtype=np.float64).reshape(horizon, num_samples).T


def fit_statsmodels_holt_winters(x: np.ndarray, season_length: int = 1, damped: bool = False):
    """statsmodels' ``ExponentialSmoothing`` fit to ``x``: additive trend (damped if asked), additive season of
    ``season_length`` where that exceeds 1 and ``x`` holds two seasons and two values, initial states estimated
    with the smoothing parameters. Shared by :func:`holt_winters` and :mod:`flowdiff.timeseries.ets`."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    seasonal = "add" if season_length > 1 and x.size >= 2 * season_length + 2 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and "no frequency" warnings
        return ExponentialSmoothing(x, trend="add", damped_trend=damped, seasonal=seasonal,
                                    seasonal_periods=season_length if seasonal else None,
                                    initialization_method="estimated").fit()


def statsforecast_model(name: str, history, horizon: int, season_length: int = 1, num_samples: int = 100,
                        seed: int = 0) -> np.ndarray | None:
    """statsforecast's ``"AutoETS"`` or ``"AutoARIMA"``: samples from its Gaussian predictive distribution
    (mean and the 80 % interval's implied sd per step); ``None`` when statsforecast is missing."""
    try:
        from statsforecast import models
    except ImportError:
        return None
    if name not in ("AutoETS", "AutoARIMA"):
        raise ValueError(f"name must be AutoETS or AutoARIMA, got {name!r}")
    x = _history(history)
    model = getattr(models, name)(season_length=season_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.forecast(y=x, h=horizon, level=[80])
    mean = np.asarray(out["mean"], dtype=np.float64)
    sd = (np.asarray(out["hi-80"], dtype=np.float64) - mean) / 1.2815515655446004
    rng = np.random.default_rng(seed)
    return mean[None] + np.maximum(sd, 0)[None] * rng.standard_normal((num_samples, horizon))
