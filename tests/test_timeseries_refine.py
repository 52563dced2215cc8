"""TSDiff: refinement of a base forecaster as a backtest candidate (issue 17). Exact identities of the
representation round trip, the forecast path and the backtest's choice; tiny networks, seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.timeseries.model import BASES, REFINE_ITERATIONS, REFINE_SPREADS, SPREADS, widen

TS = fd.timeseries


def _series(n: int = 80, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return 20 + 0.05 * t + 3 * np.sin(2 * np.pi * t / 6) + noise * rng.standard_normal(n)


@pytest.mark.parametrize("difference", [0, 1, 6])
def test_refinement_with_zero_step_returns_the_base_samples(difference):
    """Zero step size: the Langevin/gradient updates vanish, so refine maps the base samples into the
    model's representation (differenced, standardised) and back: the identity to float64 round-off."""
    series = _series()
    model = TS.TSDiff(12, 4, 6, hidden=4, blocks=1, train_steps=2, batch_size=4, diffusion_steps=5,
                      difference=difference, guidance_scale=4.0, spread=1.0, reflect=True, base=None,
                      dtype=torch.float64).fit(series)
    base = TS.probabilistic_seasonal_naive(series, 4, 6, num_samples=7, seed=3)
    for method in ("lmc", "ml"):
        out = model.refine(series, base, method=method, iterations=3, step_size=0.0)
        np.testing.assert_allclose(out, base, rtol=0, atol=1e-10)
    moved = model.refine(series, base, method="ml", iterations=3, step_size=0.1)
    assert np.abs(moved - base).max() > 1e-6  # a positive step does move them
    # snapshots of one run are the runs of those lengths (same noise sequence)
    snaps = model.refine(series, base, iterations=5, snapshots=[1, 2, 5], seed=4)
    for k, snap in zip([1, 2, 5], snaps):
        np.testing.assert_array_equal(snap, model.refine(series, base, iterations=k, seed=4))
    with pytest.raises(ValueError, match="snapshots"):
        model.refine(series, base, iterations=2, snapshots=[3])


def test_forecast_with_a_base_is_the_refined_base_widened():
    series = _series()
    model = TS.TSDiff(12, 4, 6, hidden=4, blocks=1, train_steps=2, batch_size=4, diffusion_steps=5,
                      difference=0, guidance_scale=4.0, spread=1.5, reflect=True, base="seasonal_naive",
                      dtype=torch.float64).fit(series)
    assert model.base == "seasonal_naive"  # fixed base: the fit's backtest only picks the rest
    got = model.forecast(series, 6, seed=11)
    start = TS.probabilistic_seasonal_naive(series, 4, 6, num_samples=6, seed=11)
    np.testing.assert_allclose(got, widen(model.refine(series, start, seed=11, iterations=model.refine_iterations), 1.5), atol=1e-12)
    # several contexts: context i's base uses seed + i; the base sees the whole history given
    two = model.forecast([series, series[:60]], 6, seed=11, spread=1.0)
    start1 = TS.probabilistic_seasonal_naive(series[:60], 4, 6, num_samples=6, seed=12)
    np.testing.assert_allclose(two[1], model.refine(series[:60], start1, seed=11, iterations=model.refine_iterations), atol=1e-12)
    # explicit guidance arguments, or base=None, give self-guidance
    np.testing.assert_array_equal(model.forecast(series, 6, seed=11, guidance_scale=4.0),
                                  model.forecast(series, 6, seed=11, base=None))
    hw = model.forecast(series, 6, seed=11, base="holt_winters", spread=1.0)
    start_hw = TS.holt_winters(series, 4, 6, num_samples=6, seed=11)
    np.testing.assert_allclose(hw, model.refine(series, start_hw, seed=11, iterations=model.refine_iterations), atol=1e-12)
    with pytest.raises(ValueError, match="base must be"):
        model.forecast(series, 3, base="arima")
    with pytest.raises(ValueError, match="base must be"):
        TS.TSDiff(12, 4, 6, base="arima")
    # missing context values: self-guidance (the base forecasters need complete histories)
    holed = series.copy()
    holed[-3] = np.nan
    assert model.forecast(holed, 4, missing="mask").shape == (4, 4)


def test_backtest_keeps_the_refined_base_when_it_validates_better():
    """A near-exact seasonal series and a barely trained model: the refined seasonal naive is close to the
    truth, self-guidance of a 5-step model is not; the backtest must see that and keep the base, and the
    chosen forecast must be near the truth on a held-out stretch."""
    t = np.arange(120)
    series = 10 + 3 * np.sin(2 * np.pi * t / 6) + 0.01 * np.random.default_rng(1).standard_normal(120)
    model = TS.TSDiff(12, 6, 6, hidden=4, blocks=1, train_steps=5, batch_size=4, diffusion_steps=5,
                      guidance_scale=4.0, base="auto").fit(series[:108])
    trials = {k[:2] for k in model.selection}
    assert set(model.refine_selection) == {(d, r, b, k, f) for d, r in trials for b in BASES
                                           for k in REFINE_ITERATIONS for f in REFINE_SPREADS}
    best = min(model.refine_selection, key=model.refine_selection.get)
    assert model.refine_selection[best] < min(model.selection.values())
    assert (model.difference, model.reflect, model.base, model.refine_iterations, model.spread) == (
        0 if best[0] == "ets" else best[0], *best[1:])
    samples = model.forecast(series[:114], 20)
    truth = series[114:]
    guided = model.forecast(series[:114], 20, base=None)
    assert TS.mean_weighted_quantile_loss(samples, truth) < TS.mean_weighted_quantile_loss(guided, truth)
