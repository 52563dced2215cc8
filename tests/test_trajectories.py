"""GeoTDM trajectories: simulators, exact E(3) equivariance (float64), shapes, metrics, errors, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.trajectories import (EGTN, DeterministicEGTN, GeometricPrior, GeoTDM, ade_fde, canonical_frame,
                                   constant_velocity, last_frame, nbody_energy, pair_features, simulate_charged,
                                   simulate_springs)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _orthogonal(seed: int, reflect: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=D))
    if (torch.det(q) > 0) == reflect:
        q[:, 0] = -q[:, 0]
    return q


@pytest.fixture(scope="module")
def data():
    return simulate_charged(24, 8, seed=3)


@pytest.fixture(scope="module")
def tiny(data):
    """A tiny float64 model with perturbed weights, so that prior and denoiser are far from identity."""
    model = GeoTDM(hidden=8, layers=1, heads=2, prior_layers=1, steps=2, batch_size=4, nfe=4, dtype=D,
                   time_limit=None).fit(data, context_frames=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=D))
    return model


# ------------------------------------------------------------------ simulators
def test_simulators_seeded_shapes_and_physics():
    a = simulate_charged(12, 6, seed=7, return_all=True)
    b = simulate_charged(12, 6, generator=np.random.default_rng(7))
    assert a.positions.shape == (12, 6, 5, 3) and np.array_equal(a.positions, b)
    assert set(np.unique(a.charges)) <= {-1.0, 1.0}
    np.testing.assert_allclose(np.linalg.norm(a.velocities[:, 0], axis=-1), 0.5)
    # unit masses, equal and opposite forces: total momentum conserved where the force clip never acted
    p = a.velocities.sum(2)
    ok = ~a.clipped
    assert ok.sum() >= 4
    np.testing.assert_allclose(p[ok], np.repeat(p[ok, :1], 6, axis=1), atol=1e-12)
    e = nbody_energy(a)
    assert np.max(np.abs(e[ok] - e[ok, :1]) / np.abs(e[ok, :1]).clip(0.1)) < 1e-2  # velocity Verlet, dt = 1e-3
    s = simulate_springs(6, 6, seed=1, return_all=True)
    e = nbody_energy(s)
    np.testing.assert_allclose(e, np.repeat(e[:, :1], 6, axis=1), rtol=1e-6)
    momentum = s.velocities.sum(2)
    np.testing.assert_allclose(momentum, np.repeat(momentum[:, :1], 6, 1), atol=1e-12)
    # positions are the integral of the velocities (frame spacing 0.1): a finite-difference check
    mid = 0.5 * (a.velocities[:, 1:] + a.velocities[:, :-1]) * 0.1
    assert np.median(np.abs(np.diff(a.positions, axis=1) - mid)) < 1e-3


def test_simulator_errors():
    with pytest.raises(ValueError, match="particles"):
        simulate_charged(2, 5, particles=1)
    with pytest.raises(ValueError, match="seed or generator"):
        simulate_charged(2, 5, seed=1, generator=np.random.default_rng(1))
    with pytest.raises(ValueError, match="dt"):
        simulate_springs(2, 5, dt=0.0)


# ------------------------------------------------------------------ exact equivariance (float64)
@pytest.mark.parametrize("reflect", [False, True])
def test_egtn_is_e3_and_permutation_equivariant(reflect):
    torch.manual_seed(0)
    net = EGTN(3, hidden=16, layers=2, heads=4, edge_features=9).to(D)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # zero-initialised coordinate heads made non-trivial
    x, h, ctx = torch.randn(2, 6, 5, 3, dtype=D), torch.randn(2, 6, 5, 3, dtype=D), torch.randn(2, 3, 5, 3, dtype=D)
    q, b = _orthogonal(1, reflect), torch.randn(3, dtype=D)
    e = pair_features(ctx)
    torch.testing.assert_close(pair_features(ctx @ q.T + b), e, atol=1e-12, rtol=0)
    y, g = net(x, h, e)
    y2, g2 = net(x @ q.T + b, h, e)
    assert (y - x).abs().max() > 1e-2  # the positions really move
    torch.testing.assert_close(y2, y @ q.T + b, atol=1e-12, rtol=0)
    torch.testing.assert_close(g2, g, atol=1e-12, rtol=0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    y3, g3 = net(x[:, :, perm], h[:, :, perm], e[:, perm][:, :, perm])
    torch.testing.assert_close(y3, y[:, :, perm], atol=1e-12, rtol=0)


def test_prior_is_equivariant_affine_and_starts_at_constant_velocity():
    torch.manual_seed(1)
    prior = GeometricPrior(5, 7, hidden=16, layers=2, rank=3).to(D)
    ctx = torch.randn(3, 5, 4, 3, dtype=D)
    torch.testing.assert_close(prior(ctx), constant_velocity(ctx, 7))  # u = 0 at initialisation
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, b = _orthogonal(2, True), torch.randn(3, dtype=D)
    out = prior(ctx)
    assert (out - constant_velocity(ctx, 7)).abs().max() > 1e-2
    torch.testing.assert_close(prior(ctx @ q.T + b), out @ q.T + b, atol=1e-12, rtol=0)


def test_canonical_frame_co_rotates():
    ctx = torch.randn(4, 3, 5, 3, dtype=D)
    frame = canonical_frame(ctx)
    torch.testing.assert_close(frame.transpose(1, 2) @ frame, torch.eye(3, dtype=D).expand(4, 3, 3))
    for reflect in (False, True):
        q = _orthogonal(3, reflect)
        torch.testing.assert_close(canonical_frame(ctx @ q.T + 5.0), q @ frame, atol=1e-12, rtol=0)


@pytest.mark.parametrize("reflect", [False, True])
def test_forecast_samples_are_equivariant(tiny, data, reflect):
    ctx = torch.from_numpy(data[:3, :4])
    q, b = _orthogonal(4, reflect), torch.tensor([3.0, -2.0, 0.5], dtype=D)
    f1 = tiny.forecast(ctx, 4, seed=11, temperature=1.0)
    f2 = tiny.forecast(ctx @ q.T + b, 4, seed=11, temperature=1.0)
    assert f1.shape == (3, 4, 4, 5, 3) and f1.dtype == D
    assert f1.std(1).mean() > 1e-2  # samples differ: the check is per sample, not of a mean
    torch.testing.assert_close(f2, f1 @ q.T + b, atol=1e-10, rtol=0)
    torch.testing.assert_close(tiny.prior_mean(ctx @ q.T + b), tiny.prior_mean(ctx) @ q.T + b, atol=1e-10, rtol=0)


def test_noise_prediction_and_unconditional_generation_are_equivariant(data):
    model = GeoTDM(hidden=8, layers=1, heads=2, steps=2, batch_size=4, nfe=3, dtype=D, prediction="noise",
                   time_limit=None).fit(data, context_frames=0, future_frames=6)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=D))
    noise = torch.randn(3, 6, 5, 3, dtype=D, generator=g)
    q = _orthogonal(6, True)
    a = model.generate(3, noise=noise)
    b = model.generate(3, noise=noise @ q.T + 1.0)  # the translation is projected out
    assert a.shape == (3, 6, 5, 3)
    np.testing.assert_allclose(a.mean(axis=(1, 2)), 0.0, atol=1e-10 * np.abs(a).max())  # zero centre of mass
    np.testing.assert_allclose(b, a @ q.numpy().T, atol=1e-10)
    with pytest.raises(ValueError, match="unconditional"):
        model.forecast(data[:2, :4])


# ------------------------------------------------------------------ API, shapes, persistence
def test_numpy_in_numpy_out_reproducible_and_save_load(tiny, data, tmp_path):
    out = tiny.forecast(data[:2, :4], num_samples=3)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 4, 5, 3) and out.dtype == np.float64
    np.testing.assert_array_equal(out, tiny.forecast(data[:2, :4], num_samples=3))
    assert not np.array_equal(out, tiny.forecast(data[:2, :4], num_samples=3, seed=1))
    cold = tiny.forecast(data[:2, :4], num_samples=2, temperature=0.0)  # no noise: one probability-flow image
    np.testing.assert_array_equal(cold[:, 0], cold[:, 1])
    f32 = tiny.forecast(torch.from_numpy(data[:2, :4]).float(), 2)
    assert f32.dtype == torch.float32
    loaded = GeoTDM.load(tiny.save(tmp_path / "m.pt"))
    np.testing.assert_allclose(loaded.forecast(data[:2, :4], 3), out, atol=1e-12)


def test_deterministic_baseline_and_fit_improves_on_constant_velocity_prior(data):
    model = DeterministicEGTN(hidden=8, layers=1, heads=2, steps=30, batch_size=8, lr=3e-3,
                              time_limit=None).fit(data, context_frames=4)
    out = model.forecast(data[:2, :4], 3)
    assert out.shape == (2, 3, 4, 5, 3)
    np.testing.assert_array_equal(out[:, 0], out[:, 1])  # one deterministic forecast repeated
    assert np.isfinite(model.history).all() and len(model.history) == 30


def test_time_limit_plans_steps_and_auto_threads_are_restored(data, monkeypatch, request):
    # torch's thread count is faked (2), so the probe's switching is tested without real two-thread runs
    # (which on a loaded machine can take seconds per update, the reason for the probe)
    calls, current = [], [2]
    real_threads, real_set = torch.get_num_threads(), torch.set_num_threads
    real_set(1)
    request.addfinalizer(lambda: real_set(real_threads))
    monkeypatch.setattr(torch, "get_num_threads", lambda: current[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), current.__setitem__(0, n)))
    model = GeoTDM(hidden=8, layers=1, heads=2, prior_layers=1, steps=10_000, batch_size=4, nfe=2,
                   time_limit=2.0).fit(data, context_frames=4)
    assert calls[:2] == [1, 2] and current[0] == 2  # one thread, back to two, finally restored
    assert model.threads_used in (1, 2) and set(model.thread_timing) == {1, 2}
    assert 12 < model.steps_done < 10_000
    calls.clear()
    assert model.forecast(data[:1, :4], 2).shape == (1, 2, 4, 5, 3) and current[0] == 2
    assert calls == ([] if model.threads_used == 2 else [1, 2])
    with pytest.raises(ValueError, match="threads"):
        GeoTDM(threads=0)


def test_metrics_against_hand_computation():
    target = np.zeros((2, 3, 2, 3))
    samples = np.zeros((2, 2, 3, 2, 3))
    samples[0, 0, :, :, 0] = 1.0          # distance 1 everywhere
    samples[0, 1, -1, :, 1] = 4.0         # distance 4 at the last frame only: ADE 4/3, FDE 4
    samples[1, :, :, 0, 2] = 2.0          # particle 0 off by 2: ADE 1, FDE 1
    m = ade_fde(samples, target)
    assert m["min_ade"] == pytest.approx((1.0 + 1.0) / 2) and m["min_fde"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["mean_ade"] == pytest.approx((1 + 4 / 3 + 1 + 1) / 4) and m["mean_fde"] == pytest.approx((1 + 4 + 1 + 1) / 4)
    line = np.arange(6.0)[None, :, None, None] * np.array([1.0, 2.0, -1.0]) + np.ones((1, 1, 4, 3))
    np.testing.assert_allclose(constant_velocity(line[:, :3], 3), line[:, 3:])
    np.testing.assert_allclose(last_frame(line[:, :3], 2), np.repeat(line[:, 2:3], 2, 1))
    with pytest.raises(ValueError, match="samples must be"):
        ade_fde(samples[:, :, :2], target)
    with pytest.raises(ValueError, match="NaN"):
        ade_fde(samples * np.nan, target)


# ------------------------------------------------------------------ errors
def test_bad_input_errors(tiny, data):
    with pytest.raises(ValueError, match="inconsistent particle counts"):
        GeoTDM(steps=1).fit([data[0], data[1, :, :4]], context_frames=2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        bad = data.copy()
        bad[2, 3, 1, 0] = np.nan
        GeoTDM(steps=1).fit(bad, context_frames=2)
    with pytest.raises(ValueError, match=r"shape \(N, frames, particles, 3\)"):
        GeoTDM(steps=1).fit(data[..., :2], context_frames=2)
    with pytest.raises(ValueError, match="fewer than"):
        GeoTDM(steps=1).fit(data, context_frames=8)
    with pytest.raises(TypeError, match="numeric"):
        GeoTDM(steps=1).fit(np.array([["a"]]), context_frames=2)
    with pytest.raises(ValueError, match="context has 3 frames"):
        tiny.forecast(data[:2, :3])
    with pytest.raises(ValueError, match="context has 4 particles"):
        tiny.forecast(data[:2, :4, :4])
    with pytest.raises(ValueError, match="NaN/Inf"):
        tiny.forecast(np.full((1, 4, 5, 3), np.inf))
    with pytest.raises(ValueError, match="num_samples"):
        tiny.forecast(data[:2, :4], 0)
    with pytest.raises(RuntimeError, match="not fitted"):
        GeoTDM().forecast(data[:2, :4])
    with pytest.raises(ValueError, match="prediction"):
        GeoTDM(prediction="score")
    with pytest.raises(ValueError, match="conditions on 4 frames"):
        tiny.generate(2)


# ------------------------------------------------------------------ command line
def _cli(args):
    from flowdiff.cli import main

    try:
        main(args)
    except SystemExit as stop:
        return stop.code
    return 0


def test_cli_train_and_forecast(tmp_path, capsys, data):
    np.save(tmp_path / "traj.npy", simulate_charged(30, 7, seed=2))
    run = tmp_path / "run"
    code = _cli(["train", "--data", str(tmp_path / "traj.npy"), "--task", "trajectories", "--context", "3",
                 "--horizon", "4", "--steps", "3", "--batch", "4", "-o", str(run),
                 "--config", str(_config(tmp_path))])
    assert code in (0, None), capsys.readouterr().err
    info = json.loads((run / "trajectories.json").read_text())
    assert info["context"] == 3 and info["horizon"] == 4 and "heldout_geotdm_k5" in info
    out = tmp_path / "fc"
    assert _cli(["forecast", "-c", str(run), "-n", "2", "-o", str(out)]) in (0, None)
    samples = np.load(out / "samples.npy")
    assert samples.shape[1:] == (2, 4, 5, 3) and (out / "trajectories.png").stat().st_size > 1000
    assert "geotdm" in json.loads((out / "metrics.json").read_text())
    np.save(tmp_path / "ctx.npy", data[:2, :3, :4])
    assert _cli(["forecast", "-c", str(run), "--context", str(tmp_path / "ctx.npy"), "-o", str(out)]) == 1
    assert "4 particles" in capsys.readouterr().err
    assert _cli(["train", "--data", "nbody", "--path", "vp", "-o", str(tmp_path / "r2")]) == 2


def _config(tmp_path):
    file = tmp_path / "small.yaml"
    file.write_text("network_kwargs: {hidden: 8, layers: 1, heads: 2, prior_layers: 1, nfe: 3}\n")
    return file
