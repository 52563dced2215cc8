"""Holt–Winters paths as TSDiff's representation (profile="ets"): the filter against statsmodels' fitted
values and forecasts, missing values, exactness on noiseless trend + season, and the windows TSDiff trains
on and forecasts from."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.timeseries.ets import HoltWintersParams, fit_holt_winters, holt_winters_filter, holt_winters_paths

pytest.importorskip("statsmodels")
TS = fd.timeseries


def _series(n: int = 120, m: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 100 + 0.8 * t + 10 * np.sin(2 * np.pi * t / m) + np.cumsum(rng.standard_normal(n)) + 2 * rng.standard_normal(n)


def _statsmodels(x: np.ndarray, m: int, damped: bool, params: HoltWintersParams | None = None):
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    seasonal = "add" if m > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if params is None:
            return ExponentialSmoothing(x, trend="add", damped_trend=damped, seasonal=seasonal,
                                        seasonal_periods=m if m > 1 else None, initialization_method="estimated").fit()
        model = ExponentialSmoothing(x, trend="add", damped_trend=damped, seasonal=seasonal,
                                     seasonal_periods=m if m > 1 else None, initialization_method="known",
                                     initial_level=params.level, initial_trend=params.trend,
                                     initial_seasonal=params.seasons if m > 1 else None)
        return model.fit(smoothing_level=params.alpha, smoothing_trend=params.beta,
                         smoothing_seasonal=params.gamma if m > 1 else None,
                         damping_trend=params.phi if damped else None, optimized=False)


@pytest.mark.parametrize("m,damped", [(12, False), (12, True), (1, False), (1, True)])
def test_filter_and_paths_reproduce_statsmodels(m, damped):
    """One-step predictions and states equal statsmodels' fitted values, level, trend and season; the path
    from an inner origin equals statsmodels' forecast of the series cut there (same parameters), except at
    lead times that are whole seasons, where statsmodels 0.15 uses the seasonal state of a season earlier
    (statsmodels issue 9538): there the path is Hyndman's l + h b + s_t, the latest state."""
    x = _series(m=max(m, 12))
    params = fit_holt_winters(x, m, damped)
    ref = _statsmodels(x, m, damped)
    pred, level, trend, season = holt_winters_filter(x, params)
    np.testing.assert_allclose(pred, ref.fittedvalues, rtol=0, atol=1e-8)
    np.testing.assert_allclose(level, ref.level, atol=1e-8)
    np.testing.assert_allclose(trend, ref.trend, atol=1e-8)
    if m > 1:
        np.testing.assert_allclose(season[m:], ref.season, atol=1e-8)
    context, horizon = 24, 30
    for origin in (60, 97, x.size):
        path = holt_winters_paths(x, params, [origin], context, horizon)[0]
        np.testing.assert_allclose(path[:context], pred[origin - context: origin], atol=1e-12)
        cut = _statsmodels(x[:origin], m, damped, params).forecast(horizon)
        h = np.arange(1, horizon + 1)
        plain = (h % m != 0) if m > 1 else np.ones(horizon, bool)
        np.testing.assert_allclose(path[context:][plain], cut[plain], atol=1e-8)
        if m > 1:
            damp = np.cumsum(params.phi ** h)
            whole = ~plain  # lead m, 2m: the seasonal state just updated at the origin's phase
            np.testing.assert_allclose(path[context:][whole],
                                       level[origin - 1] + damp[whole] * trend[origin - 1] + season[m + origin - 1], atol=1e-8)


def test_missing_value_moves_the_states_by_their_own_prediction():
    """A NaN skips its update, which is the update with y_t equal to its one-step prediction (the error is 0)."""
    x = _series()
    params = fit_holt_winters(x, 12)
    gap = x.copy()
    gap[[40, 41, 77]] = np.nan
    pred, level, trend, season = holt_winters_filter(gap, params)
    filled = gap.copy()
    for t in (40, 41, 77):  # each prediction depends only on the values before it
        filled[t] = holt_winters_filter(filled[: t + 1], params)[0][t]
    ref = holt_winters_filter(filled, params)
    for a, b in zip((pred, level, trend, season), ref):
        np.testing.assert_allclose(a, b, atol=1e-10)
    assert np.isfinite(fit_holt_winters(gap, 12).alpha)


def test_paths_are_exact_on_noiseless_trend_and_season():
    """Linear trend plus a fixed season, fit by least squares: every one-step prediction and every forecast of
    every origin is the series itself."""
    t = np.arange(96)
    pattern = np.array([3.0, -1.0, 0.5, 2.0, -2.5, -2.0])
    x = 50 + 0.3 * t + pattern[t % 6]
    params = fit_holt_winters(x, 6)
    origins = np.arange(20, 80)
    paths = holt_winters_paths(x, params, origins, 12, 8)
    truth = np.stack([x[o - 12: o + 8] for o in origins])
    np.testing.assert_allclose(paths, truth, atol=1e-4 * np.abs(x).max())
    with pytest.raises(ValueError, match="origins"):
        holt_winters_paths(x, params, [5], 12, 8)


def test_tsdiff_ets_windows_are_the_holt_winters_errors(tsdiff_training_windows):
    """profile='ets': every training window is the series minus its origin's Holt–Winters path (one-step
    predictions over the context, the forecast over the horizon), over the sd of the context's errors; on
    noiseless trend + season the path is the truth, so forecast's loc over the horizon is the continuation.
    The model saves and loads with its representation; lags are refused."""
    m, context, horizon = 6, 12, 4
    t = np.arange(90)
    rng = np.random.default_rng(3)
    series = 20 + 0.2 * t + np.array([1.0, -2.0, 0.5, 1.5, -0.5, -0.5])[t % m] + 0.3 * rng.standard_normal(90)
    seen = tsdiff_training_windows
    model = TS.TSDiff(context, horizon, m, difference=0, profile="ets", hidden=4, blocks=1, train_steps=1,
                      batch_size=500, diffusion_steps=5, spread=1.0, reflect=False, dtype=torch.float64)
    generator = torch.Generator().manual_seed(model.seed)  # the batch rows fit draws first
    model.fit(series)
    rows = torch.randint(0, 90 - context - horizon + 1, (500,), generator=generator)
    params = fit_holt_winters(series, m)
    origins = np.arange(0, 90 - context - horizon + 1) + context
    paths = holt_winters_paths(series, params, origins, context, horizon)
    windows = np.stack([series[o - context: o + horizon] for o in origins]) - paths
    expected = windows / np.sqrt((windows[:, :context] ** 2).mean(1, keepdims=True))
    np.testing.assert_allclose(seen[0][:, 0].numpy(), expected[rows.numpy()], atol=1e-9)
    # forecast: loc is the path of the history given (Holt-Winters refit on it)
    history = series[:70]
    _, _, loc, _, _ = model._prepare(history, "raise")
    ref = holt_winters_paths(history, fit_holt_winters(history, m), [70], context, horizon)[0]
    np.testing.assert_allclose(loc[0, 0].numpy(), ref, atol=1e-9)
    assert model.forecast(history, 5).shape == (5, horizon)
    clean = 20 + 0.2 * t + np.array([1.0, -2.0, 0.5, 1.5, -0.5, -0.5])[t % m]
    _, _, loc, _, _ = model._prepare(clean[:70], "raise")
    np.testing.assert_allclose(loc[0, 0, context:].numpy(), clean[70:74], atol=1e-3)
    with pytest.raises(ValueError, match="lag"):
        TS.TSDiff(8, 3, 4, profile="ets", lags=(4,))


def test_tsdiff_ets_save_load_round_trip(tmp_path):
    series = _series(90, 6)
    model = TS.TSDiff(12, 4, 6, difference=0, profile="ets", hidden=4, blocks=1, train_steps=5, batch_size=8,
                      diffusion_steps=5, spread=1.0).fit(series)
    path = model.save(tmp_path / "m.pt")
    again = TS.TSDiff.load(path)
    assert again.profile == "ets"
    np.testing.assert_allclose(again.forecast(series, 4, seed=1), model.forecast(series, 4, seed=1))


def test_backtest_offers_holt_winters_paths_on_few_series(monkeypatch):
    """With profile='auto' fit's backtest scores profile='ets' as a candidate (key "ets") where the level does not
    mean-revert and, where it wins, forecasts around Holt-Winters' path; not on a panel of more than
    ETS_MAX_SERIES series, not on a stationary series, not by default (profile=False)."""
    t = np.arange(90)
    rng = np.random.default_rng(5)
    series = [30 + 0.3 * t + 3 * np.sin(2 * np.pi * t / 6) + rng.standard_normal(90) for _ in range(2)]
    kw = dict(hidden=8, blocks=2, train_steps=10, batch_size=8, diffusion_steps=5, reflect=True)
    model = TS.TSDiff(12, 4, 6, profile="auto", **kw).fit(series)
    assert "ets" in {k[0] for k in model.selection}
    best = min(model.selection, key=model.selection.get)
    assert (model.profile == "ets") is (best[0] == "ets") and model.forecast(series[0], 3).shape == (3, 4)
    stationary = 30 + 3 * np.sin(2 * np.pi * t / 6) + rng.standard_normal(90)
    assert "ets" not in {k[0] for k in TS.TSDiff(12, 4, 6, profile="auto", **kw).fit(stationary).selection}
    assert "ets" not in {k[0] for k in TS.TSDiff(12, 4, 6, **kw).fit(series[0]).selection}
    monkeypatch.setattr(TS.TSDiff, "ETS_MAX_SERIES", 1)
    assert "ets" not in {k[0] for k in TS.TSDiff(12, 4, 6, profile="auto", **kw).fit(series).selection}
