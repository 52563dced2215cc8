"""Exact reward-tilted mixtures (flowdiff.testing.tilted_mixture) against independent truth.

The identity checked first is the definition itself: log p̃(x) = log p(x) + r(x)/β − log Z at any
x, with p̃ the closed-form mixture and log Z from its own formula. Then a 2-D quadrature of
p·exp(r/β), Monte Carlo moments, the KL identity, and the errors.
"""

import math

import pytest
import torch

from flowdiff.testing import (
    Gaussian,
    GaussianMixture,
    gaussian_kl,
    mixture_kl,
    mode_frequencies,
    mode_weight_tv,
    random_mixture,
    sliced_w2_to_mixture,
    tilted_mixture,
    tilted_problem,
)


def _full_cov_mixture(dim: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    k = 3
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 2
    a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64) * 0.4
    covs = a @ a.transpose(-1, -2) + 0.2 * torch.eye(dim, dtype=torch.float64)
    return GaussianMixture(means, covs, weights=torch.rand(k, generator=g, dtype=torch.float64) + 0.3)


@pytest.mark.parametrize("dim,m,normalized,full", [(2, 1, False, False), (5, 2, True, True), (8, 3, False, True)])
@pytest.mark.parametrize("beta", [0.3, 1.0, 4.0])
def test_log_prob_is_prior_plus_reward_over_beta_minus_log_z(dim, m, normalized, full, beta):
    prior = _full_cov_mixture(dim, dim) if full else random_mixture(dim, 4, seed=dim)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(m, dim, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    if m > 1:
        c = torch.randn(m, m, generator=g, dtype=torch.float64)
        tilt = tilted_mixture(prior, A, b, cov=c @ c.T + 0.5 * torch.eye(m, dtype=torch.float64),
                              temperature=beta, normalized=normalized)
    else:
        tilt = tilted_mixture(prior, A, b, scale=0.7, temperature=beta, normalized=normalized)
    x = torch.randn(50, dim, generator=g, dtype=torch.float64) * 2
    lhs = tilt.log_prob(x)
    rhs = prior.log_prob(x) + tilt.reward(x) / beta - tilt.log_normalizer
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-9)
    assert abs(float(tilt.weights.sum()) - 1) < 1e-12


def test_two_d_quadrature_of_weights_and_normaliser():
    prior = GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], scales=[[0.5, 0.6], [0.7, 0.4], [0.5, 0.5]],
                            weights=[0.6, 0.35, 0.05])
    tilt = tilted_mixture(prior, [1.0, -1.0], [2.5], scale=0.8, temperature=0.5)
    h = 0.02
    grid = torch.arange(-7, 7, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    dens = torch.exp(prior.log_prob(pts) + tilt.reward(pts) / 0.5)
    z = float(dens.sum()) * h * h
    assert abs(math.log(z) - tilt.log_normalizer) < 1e-6
    # tilted mass of each component: w_k N(x; μ_k, C_k) e^{r/β} / Z on the grid
    from flowdiff.testing import _mixture_log_joint
    comp = torch.exp(_mixture_log_joint(prior, pts) + (tilt.reward(pts) / 0.5)[:, None]).sum(0) * h * h / z
    torch.testing.assert_close(comp, tilt.weights, rtol=0, atol=1e-6)
    assert tilt.weights[2] > 5 * prior.weights[2]  # the reward favours the rare mode


def test_moments_and_kl_by_monte_carlo():
    prior = random_mixture(3, 3, seed=5)
    tilt = tilted_mixture(prior, [[1.0, 0.5, 0.0]], [1.0], scale=1.0, temperature=0.7, normalized=True)
    g = torch.Generator().manual_seed(0)
    x = tilt.sample(200_000, generator=g)
    assert abs(float(tilt.reward(x).mean()) - tilt.expected_reward()) < 0.01
    xp = prior.sample(200_000, generator=g)
    assert abs(float(tilt.reward(xp).mean()) - tilt.prior_expected_reward()) < 0.02
    kl, se = mixture_kl(tilt, prior, 100_000, generator=g)
    assert abs(kl - tilt.kl_to_prior()) < 4 * se + 1e-3
    assert abs(tilt.objective() - (tilt.expected_reward() - 0.7 * tilt.kl_to_prior())) < 1e-10
    # importance weights e^{r/β} on prior draws give the tilted mode weights
    w = torch.softmax(tilt.reward(xp) / 0.7, 0)
    from flowdiff.testing import _mixture_log_joint
    comp = _mixture_log_joint(prior, xp).argmax(-1)
    weighted = torch.zeros(3, dtype=torch.float64).index_add_(0, comp, w)
    assert float((weighted - tilt.weights).abs().max()) < 0.02


def test_normalized_changes_log_z_not_the_distribution():
    prior = random_mixture(2, 3, seed=2)
    a = tilted_mixture(prior, [1.0, 1.0], [0.5], scale=0.5, temperature=2.0)
    b = tilted_mixture(prior, [1.0, 1.0], [0.5], scale=0.5, temperature=2.0, normalized=True)
    torch.testing.assert_close(a.weights, b.weights)
    const = 0.5 * math.log(2 * math.pi * 0.25)
    assert abs((a.log_normalizer - b.log_normalizer) - const / 2.0) < 1e-12
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(a.reward(x) - b.reward(x), torch.full((4,), const, dtype=torch.float64))


def test_reward_follows_dtype_and_is_differentiable():
    tilt = tilted_problem(4, seed=1)
    x = torch.randn(6, 4, dtype=torch.float32, requires_grad=True)
    r = tilt.reward(x)
    assert r.dtype == torch.float32 and r.shape == (6,)
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all()
    assert tilt.with_path(tilt.path).reward(x.detach()).shape == (6,)


def test_tilted_problem_favours_the_rare_mode():
    for seed in range(4):
        tilt = tilted_problem(6, num_modes=4, seed=seed)
        assert float(tilt.prior.weights[0]) == pytest.approx(0.05)
        assert float(tilt.weights[0]) > 0.3, tilt.weights
        x = tilt.sample(4000, generator=torch.Generator().manual_seed(seed))
        assert mode_weight_tv(x, tilt) < 0.03
        torch.testing.assert_close(mode_frequencies(x, tilt).sum(), torch.tensor(1.0, dtype=torch.float64))
        prior_x = tilt.prior.sample(4000, generator=torch.Generator().manual_seed(seed))
        assert mode_weight_tv(prior_x, tilt) > 0.2


def test_gaussian_kl_closed_form_and_single_component_tilt():
    g = Gaussian([0.0, 1.0], [[1.0, 0.3], [0.3, 0.5]])
    tilt = tilted_mixture(g, [[1.0, 0.0]], [2.0], scale=1.0)
    exact = gaussian_kl(tilt.means[0], tilt.covariances()[0], g.means[0], g.covariances()[0])
    assert abs(exact - tilt.kl_to_prior()) < 1e-10
    assert gaussian_kl([0.0], [[1.0]], [0.0], [[1.0]]) == 0.0
    assert abs(gaussian_kl([0.0], [[1.0]], [1.0], [[4.0]]) - 0.5 * (0.25 + 0.25 - 1 + math.log(4))) < 1e-12


def test_sliced_w2_floor_and_far():
    tilt = tilted_problem(3, seed=0)
    exact = tilt.sample(2000, generator=torch.Generator().manual_seed(3))
    near = sliced_w2_to_mixture(exact, tilt)
    far = sliced_w2_to_mixture(tilt.prior.sample(2000, generator=torch.Generator().manual_seed(3)), tilt)
    assert near < 0.15 < far


def test_errors_name_the_bad_value():
    prior = random_mixture(2, 2)
    with pytest.raises(ValueError, match="temperature"):
        tilted_mixture(prior, [1.0, 0.0], [0.0], scale=1.0, temperature=0.0)
    with pytest.raises(ValueError, match="A must have shape"):
        tilted_mixture(prior, [1.0, 0.0, 0.0], [0.0], scale=1.0)
    with pytest.raises(ValueError, match="b must have shape"):
        tilted_mixture(prior, [1.0, 0.0], [0.0, 1.0], scale=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        tilted_mixture(prior, [1.0, 0.0], [0.0])
    with pytest.raises(ValueError, match="positive definite"):
        tilted_mixture(prior, [1.0, 0.0], [0.0], cov=[[-1.0]])
    with pytest.raises(ValueError, match="scale"):
        tilted_mixture(prior, [1.0, 0.0], [0.0], scale=-2.0)
    with pytest.raises(TypeError, match="prior"):
        tilted_mixture("p", [1.0, 0.0], [0.0], scale=1.0)
    tilt = tilted_mixture(prior, [1.0, 0.0], [0.0], scale=1.0)
    with pytest.raises(ValueError, match="shape"):
        tilt.reward(torch.zeros(3, 5))
