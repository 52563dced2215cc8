"""Tests for flowdiff.fokker_planck: residuals against the exact marginals, the regulariser, the ODE–SDE gap."""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.fokker_planck import (
    FokkerPlanckRegularizer,
    fokker_planck_residual,
    ode_sde_gap,
)
from flowdiff.metrics import histogram_w2
from flowdiff.testing import GaussianMixture, random_mixture

PATHS = [fd.paths.VP(), fd.paths.Linear(), fd.paths.VE(sigma_min=0.02, sigma_max=20.0), fd.paths.Cosine()]


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _points(path, oracle, n: int = 16, seed: int = 0):
    x1 = oracle.sample(n, _gen(seed))
    t = 0.1 + 0.8 * torch.rand(n, generator=_gen(seed + 1), dtype=torch.float64)
    xt, _ = path.sample(x1, t, generator=_gen(seed + 2))
    return xt, t


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_residuals_vanish_for_the_exact_marginals(path):
    oracle = random_mixture(3, 3, seed=1, path=path)
    xt, t = _points(path, oracle)
    field = fd.Field(oracle.model("noise"), path, "noise")
    score_res = fokker_planck_residual(field, None, xt, t)
    assert score_res.shape == xt.shape and score_res.abs().max() < 1e-8
    # the same through a raw network of another prediction type
    raw = fokker_planck_residual(oracle.model("data"), path, xt, t, prediction="data")
    assert raw.abs().max() < 1e-8
    # the log-density form, with the exact log p_t
    logp_res = fokker_planck_residual(lambda x, s: oracle.log_prob_t(x, s), path, xt, t, kind="log_density")
    assert logp_res.shape == (16,) and logp_res.abs().max() < 1e-8


@pytest.mark.parametrize("path", PATHS[:2], ids=repr)
def test_residuals_detect_a_wrong_score(path):
    oracle = random_mixture(3, 3, seed=2, path=path)
    xt, t = _points(path, oracle, seed=3)
    for wrong in (
        lambda x, s: 1.05 * oracle.model("noise")(x, s),  # a scaled noise prediction
        lambda x, s: oracle.model("noise")(x, s) + 0.1 * torch.sin(x),  # a non-conservative error
    ):
        res = fokker_planck_residual(fd.Field(wrong, path, "noise"), None, xt, t)
        assert res.abs().max() > 1e-2
    # a wrong log-density: the exact one at a shifted time
    res = fokker_planck_residual(lambda x, s: oracle.log_prob_t(x, 0.9 * s), path, xt, t, kind="log_density")
    assert res.abs().max() > 1e-2


def test_gaussian_residual_matches_a_hand_computation():
    # Data N(0, c I) on the Linear path: s = -x / v(t), v = t^2 c + (1 - t)^2. With the score
    # s = -x / w for a wrong constant w, R = x (v'/v^2 terms) in closed form:
    # R = d/dt s + grad[c_t(div s + |s|^2) + f x.s] = -2 c_t x / w^2 * ... (derived below).
    path = fd.paths.Linear()
    w = 0.7
    x = torch.randn(8, 2, generator=_gen(4), dtype=torch.float64)
    t = torch.full((8,), 0.4, dtype=torch.float64)
    res = fokker_planck_residual(lambda z, s: -z / w, path, x, t, prediction="score")
    a, sig = 0.4, 0.6
    f = 1 / a  # alpha'/alpha
    c = sig**2 * (1 / a + 1 / sig)  # sigma^2 * lambda'
    # bracket = c(-D/w + |x|^2/w^2) - f |x|^2 / w ; gradient = 2x(c/w^2 - f/w); d/dt s = 0
    expected = 2 * x * (c / w**2 - f / w)
    torch.testing.assert_close(res, expected)


def test_hutchinson_residual_is_unbiased():
    path = fd.paths.VP()
    oracle = random_mixture(3, 2, seed=5, path=path)
    xt, t = _points(path, oracle, n=4, seed=6)
    wrong = fd.Field(lambda x, s: 1.1 * oracle.model("noise")(x, s), path, "noise")
    exact = fokker_planck_residual(wrong, None, xt, t)
    # 20 independent batches of 100 Rademacher probes: their mean must agree with the exact
    # residual within its Monte Carlo standard error.
    batches = torch.stack([
        fokker_planck_residual(wrong, None, xt, t, divergence="hutchinson", probes=100, generator=_gen(100 + k))
        for k in range(20)
    ])
    mean, se = batches.mean(0), batches.std(0) / math.sqrt(20)
    assert ((mean - exact).abs() <= 4 * se + 1e-9).all()
    assert (se < exact.abs().max()).all()
    single = fokker_planck_residual(wrong, None, xt, t, divergence="hutchinson", probes=1, generator=_gen(8))
    assert torch.isfinite(single).all()


def test_regularizer_penalty_zero_for_exact_positive_and_differentiable_otherwise():
    path = fd.paths.VP()
    oracle = random_mixture(2, 3, seed=9, path=path)
    xt, t = _points(path, oracle, n=32, seed=10)
    reg = FokkerPlanckRegularizer(path, weight=2.0, prediction="noise")
    assert reg(oracle.model("noise"), xt, t).abs().max() < 1e-20
    net = fd.nn.MLP(2, hidden=16, depth=1).double()
    torch.nn.init.normal_(net.output_layer.weight, std=0.1)
    penalty = reg(net, xt, t)
    assert penalty.shape == (32,) and (penalty > 0).all()
    penalty.mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # linear in the weight; zero weight costs nothing
    half = FokkerPlanckRegularizer(path, weight=1.0, prediction="noise")(net, xt, t)
    torch.testing.assert_close(half * 2.0, penalty.detach(), rtol=1e-10, atol=0)
    assert (FokkerPlanckRegularizer(path, weight=0.0)(net, xt, t) == 0).all()
    # the log-density form on a scalar-potential network
    potential = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Softplus(), torch.nn.Linear(16, 1)).double()
    model = lambda x, s: potential(torch.cat([x, s[:, None]], 1))[:, 0]
    pen = FokkerPlanckRegularizer(path, 1.0, kind="log_density")(model, xt, t)
    assert pen.shape == (32,) and torch.isfinite(pen).all()
    pen.mean().backward()


def test_histogram_w2_of_shifted_point_masses():
    # bins of width 0.125 on [-4, 4]: centres at -4 + 0.0625 + k/8
    c = -4 + 0.0625 + 32 * 0.125
    x = torch.full((10, 2), c, dtype=torch.float64)
    y = x + torch.tensor([0.125 * 3, -0.125 * 2], dtype=torch.float64)
    value, out_x, out_y = histogram_w2(x, y)
    assert value == pytest.approx(0.125**2 * 13)
    assert out_x == 0 and out_y == 0
    far = torch.full((4, 2), 9.0, dtype=torch.float64)
    assert histogram_w2(torch.cat([x, far]), y)[1] == pytest.approx(4 / 14)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        histogram_w2(torch.zeros(5, 3), y)


def test_ode_sde_gap_small_for_the_exact_field_and_large_for_a_wrong_one():
    path = fd.paths.VP()
    oracle = GaussianMixture(
        torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
        scales=torch.tensor([[0.3, 0.5], [0.4, 0.3], [0.5, 0.4]]),
        path=path,
    )
    data = oracle.sample(3000, _gen(11))
    exact = ode_sde_gap(fd.Field(oracle.model("noise"), path, "noise"), 3000, data=data, steps=100, generator=_gen(12), dtype=torch.float64)
    wrong_field = fd.Field(lambda x, s: 0.8 * oracle.model("noise")(x, s), path, "noise")
    wrong = ode_sde_gap(wrong_field, 3000, data=data, steps=100, generator=_gen(12), dtype=torch.float64)
    assert exact.method == "histogram" and exact.nfe_ode == 200 and exact.nfe_sde == 100
    # exact field: both samplers have the data's law (finite-sample floor only)
    assert exact.ode_sde < 0.03 and exact.ode_data < 0.03 and exact.sde_data < 0.03
    assert wrong.ode_sde > 5 * exact.ode_sde
    exact_samples = ode_sde_gap(
        fd.Field(oracle.model("noise"), path, "noise"), 500, data=data[:500], steps=50, method="samples", generator=_gen(13),
        dtype=torch.float64,
    )
    assert exact_samples.ode_sde < 0.1 and exact_samples.outside is None


def test_bad_input():
    path = fd.paths.VP()
    oracle = random_mixture(2, 2, seed=12, path=path)
    field = fd.Field(oracle.model("noise"), path, "noise")
    x = oracle.sample(4, _gen(14))
    interp = fd.StochasticInterpolant("linear")
    with pytest.raises(TypeError, match="Gaussian path"):
        fokker_planck_residual(field, interp, x, 0.5)
    with pytest.raises(TypeError, match="Gaussian path"):
        FokkerPlanckRegularizer(interp)
    with pytest.raises(ValueError, match="unknown kind"):
        fokker_planck_residual(field, None, x, 0.5, kind="density")
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        fokker_planck_residual(field, None, bad, 0.5)
    with pytest.raises(ValueError, match="weight"):
        FokkerPlanckRegularizer(path, weight=-1.0)
    with pytest.raises(ValueError, match="t"):
        fokker_planck_residual(field, None, x, 1.5)
    with pytest.raises(ValueError, match="eps"):
        ode_sde_gap(field, 10, data=x, eps=-1.0)
    with pytest.raises(ValueError, match="method"):
        ode_sde_gap(field, 10, data=x, method="kl")
