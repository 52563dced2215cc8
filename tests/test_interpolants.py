"""Stochastic interpolants: coefficients, γ family, sample moments and the exact oracle."""

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.paths import GAMMAS, Gamma, StochasticInterpolant
from flowdiff.testing import GaussianMixture, InterpolantOracle, random_mixture

KINDS = [
    ("linear", "brownian"),
    ("linear", "bsquared"),
    ("trig", "bsquared"),
    ("trig", "sinesquared"),
    ("encoder-decoder", "sinesquared"),
    ("one-sided-linear", "zero"),
    ("one-sided-trig", "zero"),
    ("mirror", "brownian"),
    ("linear", "sigmoid"),
]


def _autograd(fn, t):
    tt = t.clone().requires_grad_(True)
    y = fn(tt)
    if not y.requires_grad:
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), tt)[0]


@pytest.mark.parametrize("name", GAMMAS)
def test_gamma_derivatives(name):
    g = Gamma(name, a=0.7 if name == "brownian" else 0.5)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(g.d_gamma(t), _autograd(g.gamma, t))
    torch.testing.assert_close(g.gamma_d_gamma(t), g.gamma(t) * g.d_gamma(t))
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(g.gamma(ends), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.isfinite(g.gamma_d_gamma(ends)).all()  # no 0/0 at the ends


@pytest.mark.parametrize("kind,gamma", KINDS)
def test_interpolant_coefficients(kind, gamma):
    it = StochasticInterpolant(kind, gamma, a=0.5 if kind == "trig" else 1.0)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    t = t[(t - 0.5).abs() > 0.02]  # the encoder-decoder coefficients have a kink at 1/2
    a0, a1, d0, d1 = it.coefficients(t)
    torch.testing.assert_close(d0, _autograd(lambda s: it._coefficients(s)[0], t))
    torch.testing.assert_close(d1, _autograd(lambda s: it._coefficients(s)[1], t))
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    e0, e1, _, _ = it.coefficients(ends)
    if kind == "mirror":
        torch.testing.assert_close(e1, torch.ones(2, dtype=torch.float64))
    elif kind != "encoder-decoder":
        torch.testing.assert_close(e0, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(e1, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,gamma", [("linear", "brownian"), ("trig", "bsquared"), ("encoder-decoder", "sinesquared")])
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_sample_moments(kind, gamma, t):
    """x_t between two Gaussians has mean a0 m0 + a1 m1 and variance a0² v0 + a1² v1 + γ² per axis."""
    it = StochasticInterpolant(kind, gamma, a=0.5 if kind == "trig" else 1.0)
    n, d = 100_000, 2
    g = torch.Generator().manual_seed(11)
    m0, m1 = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([3.0, 0.5], dtype=torch.float64)
    s0, s1 = torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([1.5, 0.3], dtype=torch.float64)
    x0 = m0 + s0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x1 = m1 + s1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    xt = it.sample(x0, x1, t, generator=g).x_t
    a0, a1, _, _ = it.coefficients(torch.tensor(t, dtype=torch.float64))
    gam = it.gamma(torch.tensor(t, dtype=torch.float64))
    mean = a0 * m0 + a1 * m1
    var = a0**2 * s0**2 + a1**2 * s1**2 + gam**2
    # 5-sigma tolerances from the sampling distribution of the mean and the variance
    assert ((xt.mean(0) - mean).abs() < 5 * torch.sqrt(var / n)).all()
    assert ((xt.var(0) - var).abs() < 5 * var * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("kind,gamma", KINDS)
def test_oracle_fields_are_conditional_expectations(kind, gamma):
    """E[(target - field(x_t)) · h(x_t)] = 0 for test functions h: the defining property."""
    it = StochasticInterpolant(kind, gamma, a=0.5 if kind == "trig" else 1.0)
    base = random_mixture(2, 2, seed=1)
    target = random_mixture(2, 2, seed=2)
    needs_base = not (it.one_sided or it.is_mirror)
    oracle = InterpolantOracle(it, base if needs_base else None, target)
    n = 40_000
    g = torch.Generator().manual_seed(5)
    x1 = target.sample(n, generator=g)
    x0 = base.sample(n, generator=g) if needs_base else None
    s = it.sample(x0, x1, 0.35, generator=g)
    names = ["velocity"] + (["drift", "denoiser"] if gamma != "zero" else [])
    for name in names:
        resid = it.target(name, s) - getattr(oracle, name)(s.x_t, 0.35)
        for h in (torch.ones_like(s.x_t[:, :1]), s.x_t, torch.tanh(s.x_t)):
            prod = (resid[:, :, None] * h[:, None, :]).reshape(n, -1)
            tol = 5 * prod.std(0) / math.sqrt(n) + 1e-12
            assert (prod.mean(0).abs() < tol).all(), name


def test_oracle_log_density_and_score():
    it = StochasticInterpolant("linear", "brownian")
    base, target = random_mixture(3, 2, seed=3), random_mixture(3, 3, seed=4)
    oracle = InterpolantOracle(it, base, target)
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    t = torch.rand(12, dtype=torch.float64) * 0.8 + 0.1
    (grad,) = torch.autograd.grad(oracle.log_prob_t(x, t).sum(), x)
    torch.testing.assert_close(oracle.score(x.detach(), t), grad)
    # at the ends the marginal is the base and the target
    xd = x.detach()
    torch.testing.assert_close(oracle.log_prob_t(xd, 0.0), base.log_prob(xd))
    torch.testing.assert_close(oracle.log_prob_t(xd, 1.0), target.log_prob(xd))


def test_one_sided_interpolant_is_the_gaussian_path():
    """The one-sided linear interpolant and the Linear Gaussian path give the same drift."""
    target = random_mixture(3, 3, seed=9)
    it = StochasticInterpolant("one-sided-linear")
    oracle = InterpolantOracle(it, None, target)
    gm = target.with_path(fd.paths.Linear())
    x = torch.randn(10, 3, dtype=torch.float64)
    t = torch.rand(10, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(oracle.drift(x, t), gm.velocity(x, t))
    torch.testing.assert_close(oracle.score(x, t), gm.score(x, t))


def test_antithetic_and_targets():
    it = StochasticInterpolant("linear", "brownian")
    x0, x1 = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    s = it.sample(x0, x1, 0.3)
    torch.testing.assert_close(s.x_t + s.x_t_antithetic, 2 * it.interpolate(0.3, x0, x1))
    torch.testing.assert_close(it.target("score", s), -s.z / s.gamma[:, None])
    torch.testing.assert_close(it.target("denoiser", s, antithetic=True), -s.z)


def test_bad_interpolant_inputs():
    with pytest.raises(ValueError, match="interpolant"):
        StochasticInterpolant("spline")
    with pytest.raises(ValueError, match="gamma"):
        StochasticInterpolant("linear", "cubic")
    with pytest.raises(ValueError, match="a="):
        Gamma("brownian", a=-1.0)
    with pytest.raises(ValueError, match="gamma < 1"):
        StochasticInterpolant("trig", "brownian", a=8.0)
    with pytest.raises(ValueError, match="mirror"):
        StochasticInterpolant("mirror", "zero")
    it = StochasticInterpolant("linear")
    with pytest.raises(ValueError, match="x0"):
        it.sample(None, torch.randn(3, 2), 0.5)
    with pytest.raises(ValueError, match="shape"):
        it.sample(torch.randn(3, 3), torch.randn(3, 2), 0.5)
    with pytest.raises(ValueError, match="target"):
        it.target("flow", it.sample(torch.randn(3, 2), torch.randn(3, 2), 0.5))
    with pytest.raises(ValueError, match="base"):
        InterpolantOracle(it, None, random_mixture(2, 2))
    with pytest.raises(TypeError, match="StochasticInterpolant, got VP \\(use Field for Gaussian paths\\)"):
        fd.InterpolantField(lambda x, t: x, fd.paths.VP())
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="StochasticInterpolant"):
        fd.InterpolantField(fd.paths.VP(), lambda x, t: x)  # the deprecated order


def test_oracle_input_validation():
    with pytest.raises(ValueError, match="scales"):
        GaussianMixture(torch.zeros(2, 3), scales=torch.ones(2, 2))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMixture(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), scales=torch.ones(2, 2), weights=[1.0, -1.0])
    gm = random_mixture(3, 2)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        gm.score(torch.randn(4, 2, dtype=torch.float64), 0.5)
