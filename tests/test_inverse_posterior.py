"""Exact posteriors of linear-Gaussian inverse problems (flowdiff.testing), checked against closed forms and Monte Carlo."""

import math
import sys

import pytest
import torch

import flowdiff as fd
from flowdiff.testing import (
    Gaussian,
    GaussianMixture,
    gmm_inverse_problem,
    linear_gaussian_posterior,
    mode_weight_tv,
)

f64 = torch.float64


def _spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=f64)
    return a @ a.T / d + 0.3 * torch.eye(d, dtype=f64)


def _mixture(d=3, k=3, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(k, d, generator=g, dtype=f64)
    covs = torch.stack([_spd(d, g) for _ in range(k)])
    weights = torch.rand(k, generator=g, dtype=f64) + 0.3
    return GaussianMixture(means, covs, weights)


def _log_normal(y, mean, cov):
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(y)


def test_single_gaussian_matches_kalman_information_form():
    g = torch.Generator().manual_seed(1)
    d, m, sigma = 5, 2, 0.3
    mu, cov = torch.randn(d, generator=g, dtype=f64), _spd(d, g)
    H, y = torch.randn(m, d, generator=g, dtype=f64), torch.randn(m, generator=g, dtype=f64)
    post = linear_gaussian_posterior(Gaussian(mu, cov), H, y, sigma)
    # information form, written independently of the implementation's gain/Joseph form
    precision = torch.linalg.inv(cov) + H.T @ H / sigma**2
    c = torch.linalg.inv(precision)
    mean = c @ (torch.linalg.solve(cov, mu) + H.T @ y / sigma**2)
    torch.testing.assert_close(post.means[0], mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(post.covariances()[0], c, rtol=1e-9, atol=1e-10)
    assert post.weights.tolist() == [1.0]
    assert post.dim == d and post.num_components == 1


def test_mixture_weights_and_density_are_prior_times_likelihood():
    prior = _mixture(d=4, k=4, seed=2)
    g = torch.Generator().manual_seed(3)
    H, y, sigma = torch.randn(2, 4, generator=g, dtype=f64), torch.randn(2, generator=g, dtype=f64), 0.7
    post = linear_gaussian_posterior(prior, H, y, sigma)
    assert abs(float(post.weights.sum()) - 1) < 1e-12
    log_w = torch.stack([
        torch.log(prior.weights[k]) + _log_normal(y, H @ prior.means[k], H @ prior.covariances()[k] @ H.T + sigma**2 * torch.eye(2, dtype=f64))
        for k in range(4)
    ])
    torch.testing.assert_close(post.weights, torch.softmax(log_w, 0), rtol=1e-10, atol=1e-12)
    # log p(x | y) - log p(x) - log N(y; Hx, σ²I) = -log p(y): the same constant for every x
    x = prior.sample(50, generator=g)
    log_lik = _log_normal(y[None].expand(50, 2), x @ H.T, sigma**2 * torch.eye(2, dtype=f64))
    gap = post.log_prob(x) - prior.log_prob(x) - log_lik
    torch.testing.assert_close(gap, torch.full_like(gap, -float(torch.logsumexp(log_w, 0))), rtol=0, atol=1e-9)


def test_importance_weights_from_prior_samples_reproduce_posterior():
    prior = _mixture(d=3, k=3, seed=4, spread=2.0)
    g = torch.Generator().manual_seed(5)
    H = torch.randn(1, 3, generator=g, dtype=f64)
    x_true = prior.sample(1, generator=g)[0]
    sigma = 0.8
    y = H @ x_true + sigma * torch.randn(1, generator=g, dtype=f64)
    post = linear_gaussian_posterior(prior, H, y, sigma)
    n = 200_000
    comp = torch.multinomial(prior.weights, n, replacement=True, generator=g)
    z = torch.randn(n, 3, generator=g, dtype=f64)
    x = prior.means[comp] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(prior.covariances())[comp], z)
    log_iw = -0.5 * ((x @ H.T - y) ** 2).sum(-1) / sigma**2
    iw = torch.softmax(log_iw, 0)
    ess = 1 / float((iw**2).sum())
    assert ess > 10_000
    est = torch.stack([iw[comp == k].sum() for k in range(3)])
    # delta-method standard error of a self-normalised estimate: sqrt(sum iw² (1_k - est_k)²)
    se = torch.stack([torch.sqrt((iw**2 * ((comp == k).to(f64) - est[k]) ** 2).sum()) for k in range(3)])
    assert ((est - post.weights).abs() <= 5 * se + 1e-4).all(), (est, post.weights, se)
    mean_est = (iw[:, None] * x).sum(0)
    torch.testing.assert_close(mean_est, post.mean(), rtol=0, atol=0.03)
    # and exact posterior samples agree with the importance-weighted mean
    torch.testing.assert_close(post.sample(50_000, generator=g).mean(0), post.mean(), rtol=0, atol=0.03)


def test_noiseless_posterior_is_the_limit_and_lies_on_the_affine_set():
    prior = _mixture(d=4, k=3, seed=6)
    g = torch.Generator().manual_seed(7)
    H, y = torch.randn(2, 4, generator=g, dtype=f64), torch.randn(2, generator=g, dtype=f64)
    exact = linear_gaussian_posterior(prior, H, y, 0.0)
    near = linear_gaussian_posterior(prior, H, y, 1e-5)
    torch.testing.assert_close(exact.means, near.means, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.covariances(), near.covariances(), rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.weights, near.weights, rtol=1e-6, atol=1e-9)
    x = exact.sample(1000, generator=g)
    torch.testing.assert_close(x @ H.T, y.expand(1000, 2), rtol=0, atol=1e-9)
    assert torch.isfinite(exact.log_prob(x)).all()
    assert (exact.eigvals[:, :2] == 0).all() and (exact.eigvals[:, 2:] > 0).all()
    # its fields along the path are finite before the data end
    assert torch.isfinite(exact.noise(torch.randn(5, 4, dtype=f64, generator=g), 0.5)).all()
    assert mode_weight_tv(x, exact) < 0.1


def test_mode_weight_tv_zero_for_exact_samples_one_for_an_empty_mode():
    problem = gmm_inverse_problem(8, 1, 0.5, seed=0, multimodal=True)
    post = problem.posterior
    g = torch.Generator().manual_seed(8)
    n = 4000
    tv = mode_weight_tv(post.sample(n, generator=g), post)
    bound = float(torch.sqrt(post.weights * (1 - post.weights) / n).sum())  # ~ 2.5 standard deviations of the sum
    assert tv < bound, (tv, bound)
    empty = int(post.weights.argmin())
    assert float(post.weights[empty]) < 1e-6
    x = post.means[empty] + 0.1 * torch.randn(200, 8, generator=g, dtype=f64)
    assert mode_weight_tv(x, post) > 1 - 1e-6
    # a plain GaussianMixture works too (its own weights)
    prior = problem.prior
    assert mode_weight_tv(prior.sample(n, generator=g), prior) < float(torch.sqrt(prior.weights * (1 - prior.weights) / n).sum())
    # float32 samples are accepted
    assert mode_weight_tv(post.sample(500, generator=g, dtype=torch.float32), post) < 0.2


def test_gmm_inverse_problem_matches_the_spec():
    p = gmm_inverse_problem(8, 2, 0.05, seed=3)
    assert p.prior.num_components == 25 and p.dim == 8
    assert set(p.prior.means[:, 0].tolist()) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    torch.testing.assert_close(p.prior.means[:, 2:4], p.prior.means[:, 0:2])
    assert p.H.shape == (2, 8) and p.y.shape == (2,)
    torch.testing.assert_close(torch.linalg.svdvals(p.H), p.singular_values)
    assert math.isclose(p.sigma_y, 0.05 * float(p.singular_values.max()))
    assert gmm_inverse_problem(8, 2, 0.05, seed=3, relative_noise=False).sigma_y == 0.05
    q = gmm_inverse_problem(8, 2, 0.05, seed=3)
    assert torch.equal(p.y, q.y) and torch.equal(p.H, q.H)
    torch.testing.assert_close(p.posterior.weights, linear_gaussian_posterior(p.prior, p.H, p.y, p.sigma_y).weights)
    mm = gmm_inverse_problem(8, 2, 0.05, seed=3, multimodal=True)
    assert int((mm.posterior.weights >= 0.1).sum()) >= 2
    # the exact prior field: denoising a barely noisy point returns it
    field = fd.Field(p.model("noise"), p.path, "noise")
    x = p.prior.sample(4, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.999, dtype=f64)
    a, s = p.path.alpha(t)[:, None], p.path.sigma(t)[:, None]
    torch.testing.assert_close(field.denoise(a * x, t), x, rtol=0, atol=float(s.max()) * 0.5)


def test_bad_input_is_refused():
    prior = _mixture(d=3, k=2)
    H, y = torch.randn(2, 3, dtype=f64), torch.zeros(2, dtype=f64)
    with pytest.raises(ValueError, match="H must have shape"):
        linear_gaussian_posterior(prior, torch.randn(2, 4, dtype=f64), y, 0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        linear_gaussian_posterior(prior, H, torch.zeros(3, dtype=f64), 0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        linear_gaussian_posterior(prior, H, y, -0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        linear_gaussian_posterior(prior, H, y, float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        linear_gaussian_posterior(prior, H, torch.tensor([0.0, float("inf")], dtype=f64), 0.1)
    with pytest.raises(TypeError, match="prior"):
        linear_gaussian_posterior("prior", H, y, 0.1)
    with pytest.raises(ValueError, match="linearly independent"):
        linear_gaussian_posterior(prior, torch.ones(2, 3, dtype=f64), y, 0.0)
    post = linear_gaussian_posterior(prior, H, y, 0.1)
    with pytest.raises(ValueError, match="samples must have shape"):
        mode_weight_tv(torch.zeros(5, 4), post)
    with pytest.raises(ValueError, match="non-finite"):
        mode_weight_tv(torch.full((5, 3), float("nan")), post)
    with pytest.raises(ValueError, match="perfect square"):
        gmm_inverse_problem(8, 2, 0.1, num_modes=24)
    with pytest.raises(ValueError, match="num_measurements"):
        gmm_inverse_problem(8, 9, 0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        gmm_inverse_problem(8, 2, -1.0)
    with pytest.raises(ValueError, match="no measurement"):
        gmm_inverse_problem(8, 8, 0.001, multimodal=True, min_modes=3, min_weight=0.3, max_tries=5)


def test_benchmark_quick_path_runs_and_records_failures():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "inverse_gmm.py"
    spec = importlib.util.spec_from_file_location("inverse_gmm_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--no-write", "--methods", "exact"])
    (row,) = out["rows"]
    assert row["method"] == "exact" and row["nfe"] == 0.0
    assert row["tv"] < 0.3 and 0 < row["sw2"] < 3.0  # 100 exact samples: the sampling floor
    assert any("Mode-weight TV" in line for line in out["lines"])

    def broken(case, nfe, num_samples, seed):
        raise FloatingPointError("diverged")

    failed = bench.measure(out["cases"][0], "broken", broken, 10, 5)
    assert failed["error"] == "FloatingPointError: diverged" and "tv" not in failed
    assert "err" in "\n".join(bench.tables(out["cases"], [failed], [10]))
