"""GeoTDM's held-out temperature choice (temperature="auto"): the search, the held-out split, the score it
is chosen by, the explicit override, persistence and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowdiff.trajectories import GeoTDM, ade_fde, simulate_charged
from flowdiff.trajectories.model import _search_grid

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
TINY = dict(hidden=8, layers=1, heads=2, prior_layers=1, steps=30, batch_size=8, nfe=4, time_limit=None)


@pytest.fixture(scope="module")
def systems():
    return simulate_charged(120, 9, seed=5)


def _fit(data, monkeypatch=None, **kw):
    seen = []
    if monkeypatch is not None:  # record how many systems the training batches are drawn from
        original = GeoTDM._batch

        def spy(self, d, window, gen):
            seen.append(d.shape[0])
            return original(self, d, window, gen)
        monkeypatch.setattr(GeoTDM, "_batch", spy)
    model = GeoTDM(**{**TINY, **kw}).fit(data, context_frames=4)
    return model, set(seen)


@pytest.mark.parametrize("minimum", range(len(GRID)))
def test_search_finds_the_minimum_of_a_unimodal_score(minimum):
    calls = []

    def evaluate(tau):
        calls.append(tau)
        return (tau - GRID[minimum]) ** 2

    assert _search_grid(GRID, evaluate) == GRID[minimum]
    assert len(calls) == len(set(calls))  # each candidate scored once
    assert len(calls) <= abs(minimum - 4) + 3  # walks from 0.4 towards the minimum only


def test_search_stops_when_time_runs_out():
    assert _search_grid(GRID, lambda tau: None) is None  # nothing scored: the caller falls back
    budget = iter([3.0, 1.0])  # 0.4 scores 3, 0.3 scores 1, then no time: the best scored is returned
    assert _search_grid(GRID, lambda tau: next(budget, None)) == 0.3


def test_auto_temperature_is_chosen_from_the_heldout_score(systems, monkeypatch):
    model, seen = _fit(systems, monkeypatch, holdout=12, seed=2)
    # 12 of 120 systems held out (at most a tenth) and excluded from training
    assert len(model.heldout_index) == 12 == len(set(model.heldout_index))
    assert seen == {108} and model.temperature_source.startswith("12 held-out")
    scores = model.temperature_scores
    assert model.temperature_chosen in scores and len(scores) >= 3
    # the stored scores are the best-of-5 ADE/FDE of forecasts of the held-out windows (recomputed here)
    window = model.context_frames + model.future_frames
    held = np.stack([systems[i, s:s + window] for i, s in zip(model.heldout_index, model.heldout_start)])
    held = held - held.mean(axis=(1, 2), keepdims=True)  # fit centres each system
    ctx, fut = held[:, :4], held[:, 4:]
    for tau, (ade, fde) in scores.items():
        m = ade_fde(model.forecast(ctx, 1 if tau == 0 else 5, seed=model.seed, temperature=tau), fut)
        assert m["min_ade"] == pytest.approx(ade, rel=1e-4) and m["min_fde"] == pytest.approx(fde, rel=1e-4)
    # the chosen temperature has the lowest score among its grid neighbours (a local minimum of the search)
    ref = ade_fde(model.prior_mean(ctx), fut)
    score = {tau: a / ref["min_ade"] + f / ref["min_fde"] for tau, (a, f) in scores.items()}
    i = GRID.index(model.temperature_chosen)
    for j in (i - 1, i + 1):
        if 0 <= j < len(GRID):
            assert GRID[j] in score and score[GRID[j]] >= score[model.temperature_chosen]
    assert min(score, key=score.get) == model.temperature_chosen or len(score) < len(GRID)
    # forecast uses the choice by default
    assert model.forecast_temperature == model.temperature_chosen
    np.testing.assert_array_equal(model.forecast(ctx[:3], 2, seed=1),
                                  model.forecast(ctx[:3], 2, seed=1, temperature=model.temperature_chosen))
    # and it survives save/load
    other = GeoTDM.from_state(model.state_dict())
    assert other.forecast_temperature == model.temperature_chosen and other.temperature_scores == scores


def test_explicit_temperature_is_respected_and_all_systems_train(systems, monkeypatch):
    model, seen = _fit(systems, monkeypatch, temperature=0.25)
    assert seen == {120} and model.temperature_scores is None and model.heldout_index is None
    assert model.forecast_temperature == 0.25
    ctx = systems[:3, :4]
    a = model.forecast(ctx, 2, seed=1)
    np.testing.assert_array_equal(a, model.forecast(ctx, 2, seed=1, temperature=0.25))
    assert not np.allclose(a, model.forecast(ctx, 2, seed=1, temperature=0.5))


def test_small_data_sets_are_scored_on_training_systems(monkeypatch):
    data = simulate_charged(30, 9, seed=6)  # a tenth is 3 < 8 systems: nothing is held out
    model, seen = _fit(data, monkeypatch, holdout=12)
    assert seen == {30} and len(model.heldout_index) == 12
    assert "training systems" in model.temperature_source and model.temperature_chosen in GRID


@pytest.mark.parametrize("kw, match", [
    (dict(temperature="hot"), "temperature must be 'auto'"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature_grid=()), "temperature_grid"),
    (dict(temperature_grid=(0.2, float("nan"))), "temperature_grid"),
    (dict(temperature_grid=(0.2, -1.0)), "temperature_grid"),
    (dict(temperature_grid="abc"), "temperature_grid"),
    (dict(holdout=0), "holdout"),
])
def test_bad_temperature_options(kw, match):
    with pytest.raises(ValueError, match=match):
        GeoTDM(**kw)


def test_forecast_temperature_override_is_checked(systems):
    model = GeoTDM(**{**TINY, "steps": 2}, temperature=0.3).fit(systems[:20], context_frames=4)
    with pytest.raises(ValueError, match="temperature"):
        model.forecast(systems[:2, :4], 2, temperature=-1.0)
    assert torch.get_num_threads() >= 1


def test_time_limit_covers_training_and_the_choice(systems):
    model = GeoTDM(**{**TINY, "steps": 100_000, "time_limit": 4.0}, holdout=12).fit(systems, context_frames=4)
    assert 20 < model.steps_done < 100_000 and model.temperature_scores  # planned, stopped, then chosen
    assert model.fit_seconds < 6.0  # the plan reserved the held-out search (loose: a shared machine)


def test_time_plan_grows_again_after_a_slow_start(systems, monkeypatch):
    """The plan is renewed every 25 updates in both directions (at most ``steps``): with a fake clock at 1 s
    per update for the first 20 updates (the planning ones) and 0.1 s after, a 30-s limit plans 29 updates at
    update 20 and then extends the run to ~100; the fit stops within the limit."""
    import types

    import flowdiff.trajectories.model as module
    clock = [0.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def tick(step, loss):
        clock[0] += 1.0 if step <= 20 else 0.1

    model = GeoTDM(**{**TINY, "steps": 2000, "time_limit": 30.0}, temperature=0.3).fit(
        systems, context_frames=4, callback=tick)
    assert 60 < model.steps_done < 2000  # without growing again: at most 29 updates
    assert model.fit_seconds <= 30.0
