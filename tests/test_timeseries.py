"""TSDiff time series (issue 17): CRPS against the reference implementations, self-guidance against exact
Gaussian answers, shapes, dtypes, errors, the CLI. Small networks and few steps: quality is measured in
benchmarks/timeseries.py, not here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.timeseries import metrics as M

TS = fd.timeseries


# ----------------------------------------------------------------------------- metrics
def test_wql_matches_scoringrules_quantile_crps():
    scoringrules = pytest.importorskip("scoringrules")
    rng = np.random.default_rng(0)
    samples = rng.normal(3.0, 1.0, (4, 200, 6))
    target = rng.normal(3.0, 1.0, (4, 6))
    levels = np.array(M.QUANTILES)
    qhat = np.moveaxis(np.quantile(samples, levels, axis=1), 0, -1)  # (N, H, Q)
    reference = np.asarray(scoringrules.crps_quantile(target, qhat, levels))  # 2/|Q| sum_q pinball, per point
    ours = M.quantile_losses(samples, target).sum() / len(levels)
    assert ours == pytest.approx(reference.sum(), rel=1e-10)
    assert M.mean_weighted_quantile_loss(samples, target) == pytest.approx(reference.sum() / np.abs(target).sum(), rel=1e-10)


def test_sample_crps_matches_properscoring():
    properscoring = pytest.importorskip("properscoring")
    rng = np.random.default_rng(1)
    samples = rng.gamma(2.0, 1.0, (3, 57, 5))
    target = rng.gamma(2.0, 1.0, (3, 5))
    reference = properscoring.crps_ensemble(target, np.moveaxis(samples, 1, -1))
    np.testing.assert_allclose(M.sample_crps(samples, target), reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M.gaussian_crps(0.3, 1.7, np.array([-1.0, 0.2, 4.0])),
                               properscoring.crps_gaussian(np.array([-1.0, 0.2, 4.0]), 0.3, 1.7), rtol=1e-10)


def test_sample_crps_converges_to_gaussian_closed_form():
    rng = np.random.default_rng(2)
    samples = rng.normal(0.0, 1.0, (20000, 1))
    exact = float(M.gaussian_crps(0.0, 1.0, 0.5))
    assert float(M.sample_crps(samples, np.array([0.5]))[0]) == pytest.approx(exact, abs=0.01)
    # the 9-level wQL is a coarser Riemann sum: close to, and above, the exact value for an oracle
    wql = M.quantile_losses(samples, np.array([0.5])).mean()
    assert exact < wql < exact * 1.12


def test_mase_exact_value_and_errors():
    history = np.array([1.0, 2.0, 4.0, 7.0])  # lag-1 abs diffs 1, 2, 3: scale 2
    assert M.mase(np.array([8.0, 9.0]), np.array([9.0, 12.0]), history) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        M.mase(np.ones(2), np.ones(3), history)
    with pytest.raises(ValueError, match="non-finite"):
        M.mean_weighted_quantile_loss(np.full((3, 2), np.nan), np.ones(2))
    with pytest.raises(ValueError, match="quantiles"):
        M.quantile_losses(np.ones((3, 2)), np.ones(2), quantiles=[0.0, 0.5])


# ----------------------------------------------------------------------------- exact Gaussian oracle
class _GaussianNoiseNet(torch.nn.Module):
    r"""Exact ε-predictor of data ~ N(0, K) on windows: E[ε | x_t] = σ (α² K + σ² I)⁻¹ x."""

    def __init__(self, cov: torch.Tensor):
        super().__init__()
        self.register_buffer("cov", cov)

    def forward(self, x, t, features=None):
        path = fd.paths.Discrete(torch.linspace(1e-4, 0.1, 100, dtype=torch.float64))
        alpha, sigma = path.alpha(t[:1]).to(x), path.sigma(t[:1]).to(x)
        eye = torch.eye(self.cov.shape[0], dtype=x.dtype)
        precision = torch.linalg.inv(alpha**2 * self.cov.to(x) + sigma**2 * eye)
        return sigma * torch.einsum("ij,bcj->bci", precision, x)


def _oracle_model(length_context=6, horizon=3, kernel_scale=3.0):
    model = TS.TSDiff(length_context, horizon, 1, difference=0, hidden=4, blocks=1, time_features=False,
                      dtype=torch.float64)
    pos = torch.arange(model.length, dtype=torch.float64)
    cov = torch.exp(-0.5 * (pos[:, None] - pos[None]) ** 2 / kernel_scale**2) + 1e-4 * torch.eye(model.length)
    model.ema = _GaussianNoiseNet(cov)
    return model, cov


def test_guidance_gradient_matches_closed_form_on_identity_gaussian():
    # data ~ N(0, I): eps_hat = sigma x, so x_hat = alpha x and grad sum_M (alpha x - y)^2 = 2 alpha M (alpha x - y)
    model, _ = _oracle_model()
    model.ema = _GaussianNoiseNet(torch.eye(model.length, dtype=torch.float64))
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, model.length, generator=rng, dtype=torch.float64)
    target = torch.randn(5, 1, model.length, generator=rng, dtype=torch.float64)
    mask = torch.zeros_like(x)
    mask[..., :6] = 1
    k = 40
    ab = model._alpha_bar[k]
    t = torch.full((5,), 1 - (k + 1) / 100, dtype=torch.float64)
    alpha = ab.sqrt()
    eps, grad = model._guidance_gradient(x, t, ab, "mean-square", target, mask, torch.full((5,), 0.5, dtype=torch.float64))
    np.testing.assert_allclose(grad, 2 * alpha * mask * (alpha * x - target), rtol=1e-10, atol=1e-12)
    # quantile energy: d/dx rho_q(y - alpha x) = -alpha (q - 1{y < alpha x}) on the mask
    levels = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    _, grad_q = model._guidance_gradient(x, t, ab, "quantile", target, mask, levels)
    below = (target < alpha * x).to(torch.float64)
    np.testing.assert_allclose(grad_q, -alpha * mask * (levels[:, None, None] - below), rtol=1e-10, atol=1e-12)
    # the Tweedie estimate is the flowdiff Field's denoiser on the Discrete path at the same t
    np.testing.assert_allclose(model.field().denoise(x, t), alpha * x, rtol=1e-9)


def test_self_guidance_moves_samples_to_the_exact_gaussian_process_conditional():
    model, cov = _oracle_model()
    c = model.inner_context
    rng = torch.Generator().manual_seed(1)
    truth = torch.linalg.cholesky(cov) @ torch.randn(model.length, generator=rng, dtype=torch.float64) + 1.5
    exact_mean = cov[c:, :c] @ torch.linalg.solve(cov[:c, :c], truth[:c])
    target = torch.zeros(400, 1, model.length, dtype=torch.float64)
    target[..., :c] = truth[:c]
    mask = torch.zeros_like(target)
    mask[..., :c] = 1
    levels = torch.full((400,), 0.5, dtype=torch.float64)
    errors, spread = {}, {}
    for scale in (0.0, 8.0):
        x = model._sample(target, mask, levels, "mean-square", scale, torch.Generator().manual_seed(2))
        errors[scale] = float((x[:, 0, c:].mean(0) - exact_mean).norm() / exact_mean.norm())
        spread[scale] = x[:, 0, c:].std(0)
    # unguided samples are prior draws (mean 0, error 1); guidance brings the mean to the exact conditional
    # mean (measured 0.02) and shrinks the spread towards the conditional sd (the DPS-style approximation
    # leaves it wider than exact: measured 0.29/0.46/0.62 against 0.07/0.21/0.42)
    assert errors[0.0] > 0.8
    assert errors[8.0] < 0.08
    exact_sd = torch.sqrt(torch.diagonal(cov[c:, c:] - cov[c:, :c] @ torch.linalg.solve(cov[:c, :c], cov[:c, c:])))
    assert (spread[8.0] < 0.8 * spread[0.0]).all() and (spread[8.0] > exact_sd).all()


# ----------------------------------------------------------------------------- fit / forecast
@pytest.fixture(scope="module")
def tiny_model():
    t = np.arange(90)
    series = 10 + np.sin(2 * np.pi * t / 6) + 0.1 * np.random.default_rng(0).standard_normal(90)
    model = TS.TSDiff(12, 4, 6, hidden=8, blocks=2, train_steps=15, batch_size=8, diffusion_steps=10, base="auto",
                      profile="auto")
    return model.fit(series), series


def test_forecast_shapes_and_refine(tiny_model):
    model, series = tiny_model
    one = model.forecast(series, num_samples=5)
    assert one.shape == (5, 4) and one.dtype == np.float64 and np.isfinite(one).all()
    several = model.forecast([series[:40], series[:50]], num_samples=3, guidance="mean-square")
    assert several.shape == (2, 3, 4)
    assert model.forecast(series, 2, seed=3).tolist() == model.forecast(series, 2, seed=3).tolist()
    base = TS.probabilistic_seasonal_naive(series, 4, 6, num_samples=5)
    for method in ("lmc", "ml"):
        refined = model.refine(series, base, method=method, iterations=2)
        assert refined.shape == (5, 4) and np.isfinite(refined).all()
    assert len(model.history) == 15 and np.isfinite(model.history).all()
    # difference, scale and spread: chosen by the in-sample rolling-origin backtest
    from flowdiff.timeseries.model import SPREAD_LIMITS, SPREADS, widen
    # stage 1: both differences with mirrored windows; stage 2: the better one without
    stage1 = {k: v for k, v in model.selection.items() if k[1]}
    best = min(stage1, key=stage1.get)[0]
    # candidates (profile="auto"): no differencing, seasonal differences and the history's seasonal profile (not
    # Holt-Winters' path: the series is stationary); quantile guidance: the default scale (1) only
    expected = {(d, True, 1.0, f) for d in (0, 6, "profile") for f in SPREADS}
    assert set(model.selection) == expected | {(best, False, 1.0, f) for f in SPREADS}
    assert all(np.isfinite(v) for v in model.selection.values())
    # refined bases: scored with every trial model; the fit keeps whichever of the two families scores lower
    from flowdiff.timeseries.model import BASES, REFINE_ITERATIONS, REFINE_SPREADS
    trials = {k[:2] for k in model.selection}
    assert set(model.refine_selection) == {(d, r, b, k, f) for d, r in trials for b in BASES
                                           for k in REFINE_ITERATIONS for f in REFINE_SPREADS}
    guided = min(model.selection, key=model.selection.get)
    refined = min(model.refine_selection, key=model.refine_selection.get)
    if model.base is None:
        assert model.selection[guided] <= model.refine_selection[refined]
        assert (model.difference, model.reflect, model.guidance_scale, model.validated_spread) == (
            0 if guided[0] in ("profile", "ets") else guided[0], *guided[1:])
        assert (model.profile == "history") is (guided[0] == "profile")
        assert (model.profile == "ets") is (guided[0] == "ets")
        # the validated factor is rescaled by the trial/final width ratio at the forecast origin, so the final
        # model's default paths there are exactly as wide as the validated trial paths
        trial_width, final_width = model.spread_widths
        assert model.spread == pytest.approx(np.clip(guided[3] * trial_width / final_width, *SPREAD_LIMITS), rel=1e-12)
        own = model.forecast(series, 100, spread=1.0, seed=model.seed + model.PROBE_SEED, base=None)
        assert np.std(own, axis=0).mean() == pytest.approx(final_width, rel=1e-9)
        assert np.std(widen(own, model.spread), axis=0).mean() == pytest.approx(model.spread * final_width, rel=1e-9)
    else:
        assert model.refine_selection[refined] < model.selection[guided]
        assert (model.difference, model.reflect, model.base, model.refine_iterations, model.spread) == (
            0 if refined[0] == "profile" else refined[0], *refined[1:])
    assert model.config()["base"] == model.base
    assert model.config()["reflect"] is model.reflect
    assert model.config()["difference"] == model.difference and model.config()["spread"] == model.spread
    # the spread rescales each path's deviation from the per-step median, nothing else
    raw = model.forecast(series, 9, spread=1.0)
    wide = model.forecast(series, 9, spread=2.0)
    np.testing.assert_allclose(np.median(wide, 0), np.median(raw, 0), atol=1e-9)
    np.testing.assert_allclose(wide - np.median(wide, 0), 2.0 * (raw - np.median(raw, 0)), atol=1e-9)
    np.testing.assert_allclose(model.forecast(series, 9), widen(raw, model.spread), atol=1e-9)
    with pytest.raises(ValueError, match="spread"):
        model.forecast(series, 3, spread=0.0)


def test_float64_model_save_load_and_conditional(tmp_path):
    series = np.cos(np.arange(40) / 3.0) + 2
    model = TS.TSDiff(8, 3, 1, hidden=4, blocks=1, train_steps=3, batch_size=4, diffusion_steps=5,
                      dtype=torch.float64).fit(series)
    assert next(model.ema.parameters()).dtype == torch.float64
    path = model.save(tmp_path / "m.pt")
    again = TS.TSDiff.load(path)
    assert again.config() == model.config()
    with pytest.raises(ValueError, match="not a ConditionalTSDiff checkpoint"):
        TS.ConditionalTSDiff.load(path)
    lagged = TS.TSDiff(8, 3, 4, lags=(4, 8), hidden=4, blocks=1, train_steps=2, batch_size=4, diffusion_steps=5).fit(series)
    assert lagged.forecast(series, 2).shape == (2, 3)
    with pytest.raises(ValueError, match="at least 16"):  # context_length + the largest lag
        lagged.forecast(series[:12], 2)
    cond = TS.ConditionalTSDiff(8, 3, 1, hidden=4, blocks=1, train_steps=3, batch_size=4, diffusion_steps=5).fit(series)
    assert cond.forecast(series, 4).shape == (4, 3)


def test_missing_context_values_masked_or_refused(tiny_model):
    model, series = tiny_model
    holey = series.copy()
    holey[-5] = np.nan
    with pytest.raises(ValueError, match="missing"):
        model.forecast(holey, 2)
    out = model.forecast(holey, 2, missing="mask")
    assert np.isfinite(out).all()
    holey[-1] = np.nan  # a missing anchor of the differencing
    assert np.isfinite(model.forecast(holey, 2, missing="mask")).all()


def test_bad_input_errors(tiny_model):
    model, series = tiny_model
    with pytest.raises(ValueError, match="NaN"):
        TS.TSDiff(12, 4, 6).fit(np.r_[series, np.nan])
    with pytest.raises(ValueError, match="infinite"):
        TS.TSDiff(12, 4, 6).fit(np.r_[series, np.inf])
    with pytest.raises(ValueError, match="at least context_length"):
        TS.TSDiff(12, 4, 6).fit(series[:15])
    with pytest.raises(ValueError, match="at least 12"):
        model.forecast(series[:10], 2)
    with pytest.raises(ValueError, match="infinite"):
        model.forecast(np.r_[series, np.inf], 2)
    with pytest.raises(ValueError, match="guidance"):
        model.forecast(series, 2, guidance="bogus")
    with pytest.raises(TypeError, match="num_samples"):
        model.forecast(series, 2.5)
    with pytest.raises(ValueError, match="context_length"):
        TS.TSDiff(1, 4)
    with pytest.raises(RuntimeError, match="not fitted"):
        TS.TSDiff(12, 4).forecast(series, 2)
    with pytest.raises(ValueError, match="initial"):
        model.refine(series, np.ones((3, 5)))


def test_baselines_shapes_and_season_estimate():
    y, m = TS.load_series("air_passengers")
    assert m == 12 and y.shape == (144,)
    assert TS.data.estimate_season_length(y, 24) == 12
    assert TS.seasonal_naive(y, 14, 12, 2)[0, 12].item() == y[-12]
    p = TS.probabilistic_seasonal_naive(y, 5, 12, 7)
    assert p.shape == (7, 5)
    assert TS.holt_winters(y, 5, 12, 6).shape == (6, 5)
    assert TS.synthetic_panel(3, 50).shape == (3, 50)


# ----------------------------------------------------------------------------- CLI
def _cli(args):
    from flowdiff.cli import main

    try:
        main(args)
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def test_cli_train_and_forecast(tmp_path, capsys):
    t = np.arange(80)
    csv = tmp_path / "series.csv"
    np.savetxt(csv, np.c_[t, 5 + np.sin(t / 2)], delimiter=",", header="t,value", comments="")
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("network_kwargs: {hidden: 4, blocks: 1, diffusion_steps: 5, batch_size: 4}\n")
    assert _cli(["train", "--data", str(csv), "--task", "forecast", "--context", "12", "--horizon", "4",
                 "--steps", "3", "-o", str(run), "--config", str(config), "-q"]) == 0
    assert (run / "tsdiff.pt").is_file() and (run / "run.json").is_file()
    # --season is used as season_length when given
    seasoned = tmp_path / "seasoned"
    assert _cli(["train", "--data", str(csv), "--task", "forecast", "--context", "12", "--horizon", "4", "--season", "5",
                 "--steps", "2", "-o", str(seasoned), "--config", str(config), "-q"]) == 0
    assert json.loads((seasoned / "run.json").read_text())["season_length"] == 5
    assert _cli(["train", "--data", str(csv), "--task", "forecast", "--context", "12", "--horizon", "4", "--season", "0",
                 "-o", str(tmp_path / "r0")]) == 2
    out = tmp_path / "fc"
    assert _cli(["forecast", "-c", str(run), "-n", "6", "-o", str(out)]) == 0
    data = np.load(out / "forecast.npz")
    assert data["samples"].shape == (6, 4) and (out / "forecast.png").is_file() and (out / "quantiles.csv").is_file()
    # errors: an existing run, a short series, NaN in the data
    assert _cli(["train", "--data", str(csv), "--task", "forecast", "--context", "12", "--horizon", "4",
                 "-o", str(run)]) == 2
    short = tmp_path / "short.csv"
    np.savetxt(short, np.arange(10.0))
    assert _cli(["train", "--data", str(short), "--task", "forecast", "--context", "12", "--horizon", "4",
                 "-o", str(tmp_path / "r2")]) == 1
    assert "needs at least 16" in capsys.readouterr().err
    holey = tmp_path / "holey.csv"
    holey.write_text("value\n1\n2\nNaN\n4\n" + "\n".join(str(v) for v in range(30)))
    assert _cli(["train", "--data", str(holey), "--task", "forecast", "--context", "12", "--horizon", "4",
                 "--steps", "2", "-o", str(tmp_path / "r3")]) == 1
    assert "missing" in capsys.readouterr().err
    assert _cli(["forecast", "-c", str(run), "--context", str(short), "-o", str(out)]) == 1


@pytest.mark.parametrize("options", [{}, {"detrend": True}, {"profile": True}, {"difference": 1}])
def test_reflected_series_gives_the_negated_standardised_window(options):
    """reflect=True trains on -w for each standardised window w; that is exactly the window of the mirrored
    series 2·loc − y (same loc and scale), for plain, detrended and seasonal-profile standardisation and for
    uncentred first differences."""
    rng = np.random.default_rng(3)
    model = TS.TSDiff(12, 4, 3, dtype=torch.float64, **{"difference": 0, **options})
    y = torch.as_tensor(5 + np.cumsum(rng.standard_normal((6, 1, model.length)), -1))
    observed = torch.ones_like(y)
    w, loc, scale = model._normalise(y, observed)
    w2, loc2, scale2 = model._normalise(2 * loc - y, observed)
    torch.testing.assert_close(w2, -w, atol=1e-10, rtol=0)
    torch.testing.assert_close(loc2, loc, atol=1e-10, rtol=0)
    torch.testing.assert_close(scale2, scale, atol=1e-10, rtol=0)


def test_history_profile_is_the_exact_season_aligned_to_the_origin():
    """history_profile: on a level-shifted periodic series the phase means of the last seasons (each centred)
    are the periodic pattern itself, indexed from the origin, for every phase of the origin; only the last
    ``seasons`` whole seasons count; missing values are skipped."""
    from flowdiff.timeseries.model import history_profile

    rng = np.random.default_rng(11)
    m = 5
    pattern = rng.standard_normal(m)
    pattern -= pattern.mean()
    i = np.arange(80)
    for origin in range(60, 65):
        # a constant level for every block of m steps that ends at a multiple of m before the origin
        level = 7.0 + 3.0 * rng.standard_normal(80)[(i - origin) // m + 20]
        values = level + pattern[i % m]
        values[: origin - 8 * m] = 1e3 * rng.standard_normal(origin - 8 * m)  # beyond the last 8 seasons
        values[origin - 2] = np.nan
        got = history_profile(values, origin, m, 8)
        np.testing.assert_allclose(got, pattern[(origin + np.arange(m)) % m], atol=1e-12)
    assert np.allclose(history_profile(values, 3, m, 8), 0)  # no whole season yet


def test_history_profile_windows_are_exact_in_fit_and_forecast(tsdiff_training_windows):
    """profile='history': on a noiseless periodic series with a level that steps every season, every
    training window is standardised to exactly zero (so each window's profile is phase-aligned with its own
    origin), and forecast's loc over the horizon is the true continuation, from the whole series given."""
    m, context, horizon = 4, 8, 3
    rng = np.random.default_rng(12)
    pattern = np.array([2.0, -1.0, 0.5, -1.5])
    i = np.arange(70)
    series = 20 + pattern[i % m]
    seen = tsdiff_training_windows
    model = TS.TSDiff(context, horizon, m, difference=0, profile="history", hidden=4, blocks=1, train_steps=3,
                      batch_size=16, diffusion_steps=5, guidance_scale=1.0, spread=1.0, reflect=False,
                      dtype=torch.float64).fit(series)
    assert model.profile == "history" and model.config()["profile"] == "history"
    assert torch.cat(seen).abs().max() < 1e-9
    for origin in range(40, 44):
        values, observed, loc, scale, raw = model._prepare(series[:origin], "raise")
        np.testing.assert_allclose(loc[0, 0, context:].numpy(), series[origin: origin + horizon], atol=1e-9)
        assert values.abs().max() < 1e-9
        # the last context_length values alone: a profile from two seasons, still exact here
        _, _, short, _, _ = model._prepare(series[origin - context: origin], "raise")
        np.testing.assert_allclose(short[0, 0, context:].numpy(), series[origin: origin + horizon], atol=1e-9)
    # seasons before the context change the profile forecast uses: level (last season's deseasonalised mean)
    # plus the whole history's profile
    from flowdiff.timeseries.model import history_profile

    noisy = series[:41] + np.where(i[:41] < 41 - context, rng.standard_normal(41), 0.0)
    profile = history_profile(noisy, 41, m, model.PROFILE_SEASONS)
    level = np.mean(noisy[41 - m: 41] - profile[(np.arange(-m, 0)) % m])
    _, _, loc, _, _ = model._prepare(noisy, "raise")
    np.testing.assert_allclose(loc[0, 0].numpy(), level + profile[(np.arange(context + horizon) - context) % m], atol=1e-12)
    assert not np.allclose(profile, pattern[(41 + np.arange(m)) % m], atol=1e-3)
    with pytest.raises(ValueError, match="profile"):
        TS.TSDiff(8, 3, 4, profile="year")
    with pytest.raises(ValueError, match="lag"):
        TS.TSDiff(8, 3, 4, profile="history", lags=(4,))


def test_backtest_scores_every_candidate_before_a_time_cut(monkeypatch):
    """With the backtest's sampling time used up at once (SELECTION_SHARE = 0), every trained trial is still
    scored at the first scale (breadth first over candidates), no further scale is, and the unmirrored stage-2
    trial is not trained (mirrored windows are kept). Mean-square guidance: its backtest scores four scales,
    its default (2) first."""
    from flowdiff.timeseries.model import SPREADS

    monkeypatch.setattr(TS.TSDiff, "SELECTION_SHARE", 0.0)
    t = np.arange(90)
    series = 10 + np.sin(2 * np.pi * t / 6) + 0.1 * np.random.default_rng(0).standard_normal(90)
    model = TS.TSDiff(12, 4, 6, hidden=8, blocks=2, train_steps=10, batch_size=8, diffusion_steps=5,
                      profile="auto", guidance="mean-square").fit(series)
    stage1 = {k: v for k, v in model.selection.items() if k[1]}
    # (a stationary series: the Dickey-Fuller test rejects a unit root, so no Holt-Winters candidate)
    assert set(stage1) == {(c, True, 2.0, f) for c in (0, 6, "profile") for f in SPREADS}  # the default scale first
    assert not {k for k in model.selection if not k[1]} and model.reflect is True
    # the default (profile=False): no history-profile candidate
    default = TS.TSDiff(12, 4, 6, hidden=8, blocks=2, train_steps=10, batch_size=8, diffusion_steps=5).fit(series)
    assert {k[0] for k in default.selection if k[1]} == {0, 6} and default.profile is False


@pytest.mark.parametrize("reflect", [True, False])
def test_reflect_feeds_mirrored_windows_to_the_loss(reflect, tsdiff_training_windows):
    seen = tsdiff_training_windows
    model = TS.TSDiff(8, 2, 1, hidden=4, blocks=1, train_steps=6, batch_size=16, diffusion_steps=5,
                      reflect=reflect, guidance_scale=1.0, spread=1.0, difference=0)
    series = 3 + np.arange(40) / 10 + 0.1 * np.sin(np.arange(40))  # every window rises: no mirrored one exists
    model.fit(series)
    batch = torch.cat(seen)
    rising = batch[:, 0, -1] > batch[:, 0, 0]
    assert model.reflect is reflect and model.config()["reflect"] is reflect
    if reflect:
        assert 0.3 < rising.double().mean() < 0.7
    else:
        assert bool(rising.all())


def test_first_differences_are_scaled_not_centred():
    """difference=1: loc is 0 and scale the RMS of the context increments (centring would carry the
    context's mean increment over the horizon); other lags keep the context mean."""
    rng = np.random.default_rng(4)
    y = torch.as_tensor(rng.standard_normal((3, 1, 15)) + 2.0)
    observed = torch.ones_like(y)
    first = TS.TSDiff(12, 4, 1, difference=1, dtype=torch.float64)
    w, loc, scale = first._normalise(y, observed)
    ctx = y[:, 0, :11]
    torch.testing.assert_close(loc, torch.zeros_like(loc))
    torch.testing.assert_close(scale[:, 0, 0], ctx.pow(2).mean(1).sqrt())
    torch.testing.assert_close(w, y / scale)
    level = TS.TSDiff(12, 4, 1, difference=0, dtype=torch.float64)
    y16 = torch.as_tensor(rng.standard_normal((3, 1, 16)) + 2.0)
    _, loc0, _ = level._normalise(y16, torch.ones_like(y16))
    torch.testing.assert_close(loc0[:, 0, 0], y16[:, 0, :12].mean(1))


def test_backtest_candidates_without_a_season_are_levels_and_first_differences():
    """Without a season the backtest compares no differencing and first differences (mirrored windows),
    then the better one without mirrored windows; the fit keeps the best (difference, reflect, scale, spread)."""
    from flowdiff.timeseries.model import SPREADS

    rng = np.random.default_rng(5)
    series = 50 + np.cumsum(rng.standard_normal(70))
    model = TS.TSDiff(10, 3, 1, hidden=8, blocks=2, train_steps=10, batch_size=8, diffusion_steps=5,
                      guidance_scale=2.0).fit(series)
    stage1 = {k: v for k, v in model.selection.items() if k[1]}
    assert {k[0] for k in stage1} == {0, 1}
    best = min(stage1, key=stage1.get)[0]
    assert {k for k in model.selection if not k[1]} == {(best, False, 2.0, f) for f in SPREADS}
    # the default base=None: self-guidance only, no refined candidates scored
    assert model.base is None and model.refine_selection == {}
    assert (model.difference, model.reflect, model.guidance_scale, model.validated_spread) == min(model.selection, key=model.selection.get)
    from flowdiff.timeseries.model import SPREAD_LIMITS
    assert model.spread == pytest.approx(np.clip(model.validated_spread * model.spread_ratio, *SPREAD_LIMITS))
    # the ratio is the trial's width over the final model's, measured at the forecast origin (end of the series)
    own = model.forecast(series, 100, spread=1.0, seed=model.seed + model.PROBE_SEED, base=None)
    assert np.std(own, axis=0).mean() == pytest.approx(model.spread_widths[1], rel=1e-9)
    assert model.spread_ratio == pytest.approx(model.spread_widths[0] / model.spread_widths[1], rel=1e-12)
    assert model.forecast(series, 4).shape == (4, 3)
    with pytest.raises(ValueError, match="reflect"):
        TS.TSDiff(10, 3, 1, reflect="yes")


def test_backtest_validation_origins_cover_every_series_of_a_panel():
    """A panel is validated on all its series (the latest origins of each in turn), a single series on its last
    MAX_ORIGINS origins; every held-out target is the series' continuation of its history."""
    model = fd.timeseries.TSDiff(8, 4, 1)
    rng = np.random.default_rng(0)
    one = rng.standard_normal(200)
    train, held = model._validation_split([one])
    # 20 % of 200 values = 10 horizons held out; origins every 2 values: 19, of which the last 16 are kept
    assert len(train) == 1 and train[0].size == 160
    assert [h.size for h, _ in held] == [160 + 2 * j for j in range(3, 19)]
    panel = [rng.standard_normal(n) for n in (200, 60, 120)]
    train, held = model._validation_split(panel)
    sources = [next(i for i, a in enumerate(panel) if a.size >= h.size + 4 and np.array_equal(a[:h.size], h)) for h, _ in held]
    assert len(held) == 16 and set(sources) == {0, 1, 2}
    for (h, y), i in zip(held, sources):
        np.testing.assert_array_equal(y, panel[i][h.size:h.size + 4])
    many = [rng.standard_normal(60) for _ in range(40)]
    train, held = model._validation_split(many)
    sources = {next(i for i, a in enumerate(many) if np.array_equal(a[:h.size], h)) for h, _ in held}
    assert len(held) == 16 and len(sources) == 16 and min(sources) == 0 and max(sources) == 39


@pytest.mark.parametrize("seconds_per_path", [1e-9, 50.0])
def test_backtest_sampling_is_planned_to_the_time_left(seconds_per_path, monkeypatch):
    """fit's backtest measures the seconds per sampled path and plans its sampling to fit SELECTION_SHARE of
    max_seconds: where paths are cheap nothing changes (16 origins x 25 paths, every scale, the unmirrored
    stage-2 trial); where they are dear (long windows) it scores MIN_ORIGINS origins x MIN_PATHS paths at the
    first scale only, skips the unmirrored trial and the width probes."""
    from flowdiff.timeseries.model import SPREADS

    monkeypatch.setattr(TS.TSDiff, "_path_seconds", lambda self, trial, context: seconds_per_path)
    scored = []
    forecast = TS.TSDiff.forecast

    def spy(self, context, num_samples=100, **kwargs):
        if isinstance(context, list) and kwargs.get("guidance_scale") is not None and kwargs.get("base", 1) == 1:
            scored.append((len(context), num_samples))
        return forecast(self, context, num_samples, **kwargs)

    monkeypatch.setattr(TS.TSDiff, "forecast", spy)
    series = np.random.default_rng(1).standard_normal(300).cumsum()
    model = TS.TSDiff(8, 4, 1, hidden=8, blocks=2, train_steps=6, batch_size=8, diffusion_steps=3, max_seconds=1000,
                      guidance="mean-square").fit(series)
    if seconds_per_path < 1:
        assert set(scored) == {(16, 25)} and len(scored) == 12  # 2 candidates x 4 scales + 4 scales unmirrored
        assert {k[1] for k in model.selection} == {True, False}
        assert model.spread_widths is not None  # the width probes ran (spread calibrated to the final model)
    else:
        assert set(scored) == {(TS.TSDiff.MIN_ORIGINS, TS.TSDiff.MIN_PATHS)} and len(scored) == 2
        assert set(model.selection) == {(c, True, 2.0, f) for c in (0, 1) for f in SPREADS} and model.reflect is True
        # the width probes (100 paths = 5000 s here) are skipped: the validated spread is kept
        assert model.spread_widths is None and model.spread == model.validated_spread


def test_season_estimate_finds_the_generators_period_not_a_neighbour():
    """On the notes' hourly generator (period 24 plus a weekly cycle) the autocorrelation peak is flat: the
    plain highest peak gave 23 or 25 on 4 of these 60 series (22-25 with the CLI's max_lag); the comb over
    the first multiples must give the generator's period on all of them; monthly real series keep 12."""
    est = TS.data.estimate_season_length
    for seed in range(60):
        y = TS.synthetic_panel(1, seed=seed)[0]
        assert (est(y[:-24], max_lag=84), est(y[:216], max_lag=24), est(y[:504])) == (24, 24, 24), seed
    for name in ("air_passengers", "co2", "elec_equip"):
        values, season = TS.load_series(name)
        assert est(values, 18) == season == 12
    assert est(np.random.default_rng(0).standard_normal(300)) == 1


def test_synthetic_panel_mean_is_the_generators_noiseless_cycle():
    """synthetic_panel = clip(mean + 0.1 · level · N(0, 1), 0) with synthetic_panel_mean's (mean, level): the
    standardised residuals of the unclipped values have mean 0 and sd 0.1 (87 k draws: se 3e-4)."""
    y = TS.synthetic_panel(64, seed=3)
    mean, level = TS.data.synthetic_panel_mean(64, seed=3)
    r = ((y - mean) / level)[y > 0]
    assert abs(r.mean()) < 2e-3 and abs(r.std() - 0.1) < 2e-3


def _rejections(test) -> tuple[int, int]:
    """How often ``test(series, 7)`` says yes on 20 random walks and on 40 stationary series (20 AR(1) with phi
    0.5, 20 white noise), each of 160 values under a weekly cycle."""
    t = np.arange(160)
    season = 4 * np.sin(2 * np.pi * t / 7)
    walks = stationary = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        e = rng.standard_normal(160)
        walks += test(50 + season + np.cumsum(e), 7)
        ar = np.zeros(160)
        for i in range(1, 160):
            ar[i] = 0.5 * ar[i - 1] + e[i]
        stationary += test(50 + season + ar, 7) + test(50 + season + e, 7)
    return walks, stationary


def test_level_nonstationary_is_the_kpss_test_on_the_deseasonalised_series():
    """KPSS (statsmodels) after STL's season is removed: a random walk under a weekly cycle (160 values) is
    rejected as level-stationary on most draws (measured: 14 of 20; the auto bandwidth costs power), an AR(1)
    (phi 0.5) or white noise under the same cycle on few (4 of 40; the test's level is 5 %); too short or
    constant series give None."""
    from flowdiff.timeseries.model import level_nonstationary

    walks, stationary = _rejections(level_nonstationary)
    assert walks >= 12 and stationary <= 6, (walks, stationary)
    assert level_nonstationary(np.arange(8.0), 1) is None and level_nonstationary(np.ones(50), 1) is None


def test_level_mean_reverting_is_the_dickey_fuller_test_on_the_deseasonalised_series():
    """ADF (statsmodels) after STL's season is removed: an AR(1) (phi 0.5) or white noise under a weekly cycle
    (160 values) rejects a unit root on most draws (measured: 38 of 40), a random walk under the cycle on few (1
    of 20; the test's level is 5 %); too short or constant series give None."""
    from flowdiff.timeseries.model import level_mean_reverting

    walks, stationary = _rejections(level_mean_reverting)
    assert walks <= 4 and stationary >= 36, (walks, stationary)
    assert level_mean_reverting(np.arange(8.0), 1) is None and level_mean_reverting(np.ones(50), 1) is None


def test_backtest_offers_first_differences_only_where_the_level_wanders():
    """On a seasonal series the backtest's candidates are no and seasonal differencing, plus first differences
    where the KPSS test rejects level stationarity (a random walk under the season), not on a stationary one."""
    rng = np.random.default_rng(1)
    t = np.arange(96)
    cycle = 3 * np.sin(2 * np.pi * t / 6)
    kw = dict(hidden=8, blocks=2, train_steps=10, batch_size=8, diffusion_steps=5, reflect=True)
    walk = TS.TSDiff(12, 4, 6, **kw).fit(40 + cycle + 2 * np.cumsum(rng.standard_normal(96)))
    assert {k[0] for k in walk.selection} == {0, 6, 1}
    assert walk.forecast(40 + cycle[:30], 3).shape == (3, 4)
    flat = TS.TSDiff(12, 4, 6, **kw).fit(40 + cycle + 0.5 * rng.standard_normal(96))
    assert {k[0] for k in flat.selection} == {0, 6}


def test_conditional_model_sees_the_context_only_through_its_condition_channels():
    """ConditionalTSDiff (the task-specific baseline): the noisy input's context positions are zero both in
    training and in sampling, so sampling never feeds the network's (untrained) context outputs back in; the
    condition channels carry the observed context; the returned windows hold the observed context exactly."""
    series = np.cos(np.arange(40) / 3.0) + 2
    cond = TS.ConditionalTSDiff(8, 3, 1, difference=0, hidden=4, blocks=1, train_steps=3, batch_size=4,
                                diffusion_steps=5, dtype=torch.float64)
    inputs = []

    def record(module, args):
        inputs.append(args[0].detach().clone())

    cond.fit(series)
    for net in (cond.net, cond.ema):
        net.register_forward_pre_hook(record)
    x0 = torch.randn(6, 1, 11, dtype=torch.float64)
    cond._loss(x0, torch.randn_like(x0), torch.full((6,), 0.5, dtype=torch.float64), torch.randn_like(x0), None)
    samples, windows = cond.forecast(series, 4, return_windows=True)
    assert len(inputs) == 1 + cond.diffusion_steps
    for x in inputs:
        assert torch.all(x[:, :, :8] == 0) and torch.all(x[:, :, 8:] != 0)
    np.testing.assert_allclose(windows[:, 0, :8], np.repeat(series[None, -8:], 4, 0), rtol=1e-12)
    assert samples.shape == (4, 3) and np.isfinite(samples).all()
