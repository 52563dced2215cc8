"""Approximate posterior samplers: projection, DPS, ΠGDM, DiffPIR, DDRM, RED-diff, DAPS.

Three kinds of checks:

* transcriptions — one literal loop of each paper's update in its own DDPM notation
  (x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, s from T down to 0; library t = 1 - s) with an
  exact Gaussian-mixture noise model, run on the same random numbers as the library's sampler
  on the VP path: agreement to 1e-10 in float64;
* truth — ΠGDM with the exact r_t^2 on a Gaussian prior gives the exact posterior (mean and
  covariance within Monte Carlo error); projection reproduces the observed entries exactly;
  every method's mean lands near the posterior mean of a unimodal problem on VP, linear-flow
  and EDM paths with noise, velocity and data predictions (a wrong sign lands a full
  prior-to-posterior distance away);
* errors and bookkeeping — operators each method refuses, complex measurements, budgets, VJPs.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
import flowdiff.inverse.ddrm  # noqa: F401  (registers "ddrm")
import flowdiff.inverse.guided  # noqa: F401  (registers "projection", "dps", "pgdm", "diffpir")
import flowdiff.inverse.variational  # noqa: F401  (registers "reddiff", "daps")
from flowdiff.inverse import available, describe, sample_posterior
from flowdiff.inverse.operators import Blur, Inpaint, Matrix, Nonlinear, Operator, SubsampledFourier
from flowdiff.testing import Gaussian, linear_gaussian_posterior, random_mixture

F64 = torch.float64
METHODS = ("projection", "dps", "pgdm", "diffpir", "ddrm", "reddiff", "daps")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_problem(d=8, m=4, v=0.7, sigma_y=0.1, seed=1, path=None):
    g = gen(seed)
    mu = torch.randn(d, generator=g, dtype=F64)
    prior = Gaussian(mu, v * torch.eye(d, dtype=F64), path=path or fd.paths.VP())
    H = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(d)
    x_true = prior.sample(1, generator=g)[0]
    y = H @ x_true + sigma_y * torch.randn(m, generator=g, dtype=F64)
    return prior, H, y, linear_gaussian_posterior(prior, H, y, sigma_y)


# ----------------------------------------------------------------------------------------------
# transcriptions in the papers' DDPM notation


S_NODES = torch.linspace(1.0, 0.02, 12, dtype=F64)  # DDPM times s_N = 1 > ... > s_1; s_0 = 0 is the data


def ddpm_setup(d=4, m=2, sigma_y=0.2, seed=3):
    path = fd.paths.VP()
    gmm = random_mixture(d, num_components=3, seed=seed, path=path)
    g = gen(seed)
    H = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(d)
    y = H @ gmm.sample(1, generator=g)[0] + sigma_y * torch.randn(m, generator=g, dtype=F64)
    t_lib = 1.0 - S_NODES  # library evaluation times, increasing
    # abar[i] for i = 0 .. N in DDPM indexing: abar[0] = 1 (data), abar[i] at s_i
    abar = [1.0] + (path.table(1.0 - S_NODES.flip(0)).alpha ** 2).tolist()
    field = fd.Field(gmm.model("noise"), path, "noise")
    return gmm, H, y, t_lib, abar, field


def eps_theta(gmm, x, i, abar):
    """The exact ε_θ(x, i) of the mixture at DDPM index i (library time 1 - s_i)."""
    s = float(S_NODES.flip(0)[i - 1])
    return gmm.noise(x, 1.0 - s)


def test_dps_matches_paper_algorithm_1():
    """Chung et al. 2023, Algorithm 1 (DDPM ancestral step + ζ_i ∇‖y − A x̂0‖², ζ_i = ζ'/‖y − A x̂0‖)."""
    gmm, H, y, t_lib, abar, field = ddpm_setup()
    zeta, B, N = 0.4, 3, len(abar) - 1
    res = sample_posterior(field, Matrix(H), y, sigma_y=0.2, method="dps", num_samples=B, nfe=N,
                           generator=gen(7), zeta=zeta, eta=1.0, grid=t_lib)
    g = gen(7)
    zeta_prime = zeta / 2
    x = torch.randn(B, 4, generator=g, dtype=F64)  # x_N ~ N(0, I)
    for i in range(N, 0, -1):
        x = x.detach().requires_grad_(True)
        s_hat = -eps_theta(gmm, x, i, abar) / math.sqrt(1 - abar[i])
        x0_hat = (x + (1 - abar[i]) * s_hat) / math.sqrt(abar[i])
        alpha_i = abar[i] / abar[i - 1]
        beta_i = 1 - alpha_i
        sigma_tilde = math.sqrt((1 - abar[i - 1]) / (1 - abar[i]) * beta_i)
        z = torch.randn(B, 4, generator=g, dtype=F64) if i > 1 else torch.zeros(B, 4, dtype=F64)
        x_prime = (math.sqrt(alpha_i) * (1 - abar[i - 1]) / (1 - abar[i]) * x
                   + math.sqrt(abar[i - 1]) * beta_i / (1 - abar[i]) * x0_hat + sigma_tilde * z)
        sq = ((y[None] - x0_hat @ H.T) ** 2).sum(-1)  # per sample
        grad, = torch.autograd.grad(sq.sum(), x)
        zeta_i = zeta_prime / sq.detach().sqrt()
        x = (x_prime - zeta_i[:, None] * grad).detach()
    assert res.nfe == N and res.vjp == N
    torch.testing.assert_close(res.x, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sigma_y", [0.2, 0.0])
def test_pgdm_matches_paper_score_and_ddim_step(sigma_y):
    """Song et al. 2023, Eqs. 7–8 (score of N(y; H x̂0, r_t² HHᵀ + σ_y² I), r_t² = σ_t²/(1+σ_t²) in VE
    units) in the DDIM(η) step of their Algorithm 1 (c1, c2), written with the guided score."""
    gmm, H, y, t_lib, abar, field = ddpm_setup(sigma_y=sigma_y)
    eta, B, N = 0.5, 3, len(abar) - 1
    res = sample_posterior(field, Matrix(H), y, sigma_y=sigma_y, method="pgdm", num_samples=B, nfe=N,
                           generator=gen(5), eta=eta, grid=t_lib)
    g = gen(5)
    x = torch.randn(B, 4, generator=g, dtype=F64)
    eye = torch.eye(H.shape[0], dtype=F64)
    for t in range(N, 0, -1):
        s = t - 1
        x = x.detach().requires_grad_(True)
        eps = eps_theta(gmm, x, t, abar)
        x0_hat = (x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
        sigma_ve2 = (1 - abar[t]) / abar[t]
        r2 = sigma_ve2 / (1 + sigma_ve2)
        resid = (y[None] - x0_hat @ H.T).detach()
        weighted = torch.linalg.solve(r2 * H @ H.T + sigma_y**2 * eye, resid.T).T @ H  # (y - Hx̂)ᵀ(...)⁻¹H
        g_t, = torch.autograd.grad(x0_hat, x, grad_outputs=weighted)
        score = -eps.detach() / math.sqrt(1 - abar[t]) + g_t
        x0_c = (x.detach() + (1 - abar[t]) * score) / math.sqrt(abar[t])
        eps_c = -math.sqrt(1 - abar[t]) * score
        c1 = eta * math.sqrt((1 - abar[t] / abar[s]) * (1 - abar[s]) / (1 - abar[t]))
        c2 = math.sqrt(1 - abar[s] - c1**2)
        z = torch.randn(B, 4, generator=g, dtype=F64) if c1 > 0 else torch.zeros(B, 4, dtype=F64)
        x = (math.sqrt(abar[s]) * x0_c + c1 * z + c2 * eps_c).detach()
    assert res.vjp == N
    torch.testing.assert_close(res.x, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sigma_y,eta,eta_b", [(0.2, 0.85, 1.0), (0.05, 0.3, 0.6), (0.0, 1.0, 1.0)])
def test_ddrm_matches_paper_update(sigma_y, eta, eta_b):
    """Kawar et al. 2022, Eqs. 7–8 in their VE notation x_t = x_0 + σ_t ε (σ_t² = (1 − ᾱ_t)/ᾱ_t), with the
    operator's SVD H = U Σ Vᵀ and the initialisation from p(x_T | y) (their App.)."""
    gmm, H, y, t_lib, abar, field = ddpm_setup(d=4, m=2, sigma_y=sigma_y)
    B, N, d = 3, len(abar) - 1, 4
    op = Matrix(H)
    res = sample_posterior(field, op, y, sigma_y=sigma_y, method="ddrm", num_samples=B, nfe=N,
                           generator=gen(9), eta=eta, eta_b=eta_b, grid=t_lib)
    dec = op.svd(dtype=F64)
    s = dec.s
    k = s.numel()
    Vt = dec.v(torch.eye(d, dtype=F64)).reshape(d, d)  # row j = (V e_j)ᵀ, i.e. the matrix Vᵀ
    V = Vt.T
    torch.testing.assert_close(dec.u(torch.diag(s)).T @ Vt[:k], H)  # H = U diag(s) V_kᵀ
    ybar = dec.ut(y[None])[0] / s
    tau = sigma_y / s
    sig = [0.0] + [math.sqrt((1 - a) / a) for a in abar[1:]]  # VE levels σ_i, σ_0 = 0
    g = gen(9)
    z = torch.randn(B, d, generator=g, dtype=F64)
    xbar = sig[N] * z.clone()
    for i in range(k):
        if sig[N] > tau[i]:
            xbar[:, i] = ybar[i] + math.sqrt(sig[N] ** 2 - tau[i] ** 2) * z[:, i]
    for t in range(N, 0, -1):
        x_ve = xbar @ V.T
        eps = eps_theta(gmm, math.sqrt(abar[t]) * x_ve, t, abar)
        x0 = x_ve - sig[t] * eps
        x0bar = x0 @ V
        eps_bar = (xbar - x0bar) / sig[t]
        s_next = sig[t - 1]
        z = torch.randn(B, d, generator=g, dtype=F64)
        new = torch.empty_like(xbar)
        for i in range(d):
            if i >= k:  # unobserved
                new[:, i] = x0bar[:, i] + math.sqrt(1 - eta**2) * s_next * eps_bar[:, i] + eta * s_next * z[:, i]
            elif s_next < tau[i]:  # the measurement is noisier than the next level
                new[:, i] = (x0bar[:, i] + math.sqrt(1 - eta**2) * s_next * (ybar[i] - x0bar[:, i]) / tau[i]
                             + eta * s_next * z[:, i])
            else:
                new[:, i] = ((1 - eta_b) * x0bar[:, i] + eta_b * ybar[i]
                             + math.sqrt(s_next**2 - eta_b**2 * tau[i] ** 2) * z[:, i])
        xbar = new
    x = xbar @ V.T  # sqrt(abar_0) = 1
    torch.testing.assert_close(res.x, x, rtol=0, atol=1e-10)
    if sigma_y == 0 and eta_b == 1:  # noise-free: the measurement holds exactly
        torch.testing.assert_close(res.x @ H.T, y.expand(B, -1), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# truth


@pytest.mark.parametrize("path_name,prediction,sigma_y", [("VP", "noise", 0.1), ("Linear", "velocity", 0.05)])
def test_pgdm_is_exact_for_a_gaussian_prior(path_name, prediction, sigma_y):
    """With p(x1) = N(μ, vI) and r_t² = Var[x1 | x_t] (data_variance=v) ΠGDM's guided score is exact."""
    path = {"VP": fd.paths.VP(), "Linear": fd.paths.Linear()}[path_name]
    v, n = 0.7, 4000
    prior, H, y, post = gaussian_problem(d=6, m=3, v=v, sigma_y=sigma_y, path=path)
    field = fd.Field(prior.model(prediction), path, prediction)
    res = sample_posterior(field, Matrix(H), y, sigma_y=sigma_y, method="pgdm", num_samples=n, nfe=200,
                           generator=gen(0), data_variance=v)
    mean, cov = post.mean(), post.covariance()
    diff = res.x.mean(0) - mean
    chi2 = float(n * diff @ torch.linalg.solve(cov, diff))  # ~ chi^2_6 for exact samples
    assert chi2 < 6 + 6 * math.sqrt(12), chi2
    rel = float((torch.cov(res.x.T) - cov).norm() / cov.norm())
    assert rel < 0.09, rel  # Monte Carlo ≈ 0.035 at n = 4000; 50 steps give 0.18
    # the threshold discriminates: the prior's covariance is far from the posterior's
    assert float((prior.covariance() - cov).norm() / cov.norm()) > 5 * 0.09


def test_projection_keeps_the_observed_entries_exactly():
    d_img = (1, 4, 4)
    gmm = random_mixture(16, num_components=3, seed=2, path=fd.paths.VP())
    field = fd.Field(gmm.model("noise"), gmm.path, "noise")
    mask = torch.rand(d_img, generator=gen(1)) > 0.5
    op = Inpaint(mask)
    x_true = gmm.sample(1, generator=gen(3)).reshape(1, *d_img)
    y = op(x_true)[0]
    for corrector_steps in (0, 1):
        res = sample_posterior(field, op, y, sigma_y=0.0, method="projection", num_samples=5, nfe=40,
                               generator=gen(0), corrector_steps=corrector_steps)
        assert res.x.shape == (5, *d_img) and res.nfe <= 40
        assert torch.equal(op(res.x), y.expand(5, -1))
        assert float((res.x - x_true).abs().max()) > 0  # the unobserved entries are sampled, not copied


def test_projection_with_complex_fourier_measurements_is_consistent():
    mask = torch.rand(6, 6, generator=gen(4)) > 0.6
    op = SubsampledFourier(mask, (1, 6, 6))
    gmm = random_mixture(36, num_components=2, seed=5, path=fd.paths.VP())
    field = fd.Field(gmm.model("noise"), gmm.path, "noise")
    y = op(gmm.sample(1, generator=gen(6)).reshape(1, 1, 6, 6))[0]
    assert y.is_complex()
    res = sample_posterior(field, op, y, sigma_y=0.0, method="projection", num_samples=3, nfe=20, generator=gen(0))
    torch.testing.assert_close(op(res.x), y.expand(3, *y.shape), rtol=0, atol=1e-10)


CASES = [("VP", "noise"), ("Linear", "velocity"), ("EDM", "data")]
OPTIONS = {"pgdm": {"data_variance": 0.7}, "dps": {}, "diffpir": {}, "ddrm": {}, "reddiff": {}, "daps": {}}


@pytest.mark.parametrize("path_name,prediction", CASES)
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_mean_is_near_the_posterior_mean(method, path_name, prediction):
    """Loose: within 0.2 of the prior-to-posterior distance (1.31 here; measured 0.02-0.16 at 100 NFE)."""
    path = {"VP": fd.paths.VP(), "Linear": fd.paths.Linear(), "EDM": fd.paths.EDM()}[path_name]
    prior, H, y, post = gaussian_problem(path=path)
    field = fd.Field(prior.model(prediction), path, prediction)
    res = sample_posterior(field, Matrix(H), y, sigma_y=0.1, method=method, num_samples=400, nfe=100,
                           generator=gen(0), **OPTIONS[method])
    distance = float((post.mean() - prior.mean()).norm())
    err = float((res.x.mean(0) - post.mean()).norm())
    assert err < 0.2 * distance, (err, distance)
    assert res.nfe <= 100 and torch.isfinite(res.x).all()


def test_projection_mean_on_a_noise_free_mask():
    prior, _, _, _ = gaussian_problem(d=8, m=1)
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    op = Inpaint(mask)
    y = op(prior.sample(1, generator=gen(2)))[0]
    post = linear_gaussian_posterior(prior, op.to_matrix(), y, 0.0)
    res = sample_posterior(field, op, y, sigma_y=0.0, method="projection", num_samples=400, nfe=100, generator=gen(0))
    # isotropic prior: the unobserved entries are independent of the observed ones, so projection is exact here
    assert float((res.x.mean(0) - post.mean()).norm()) < 0.25


def test_gradient_methods_with_complex_noisy_measurements():
    """Fourier measurements with complex noise: every method that takes a noisy linear operator runs and fits y."""
    prior = Gaussian(torch.zeros(16, dtype=F64), torch.eye(16, dtype=F64))
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    mask = torch.rand(4, 4, generator=gen(8)) > 0.4
    op = SubsampledFourier(mask, (1, 4, 4))
    x_true = prior.sample(1, generator=gen(9)).reshape(1, 1, 4, 4)
    sigma_y = 0.05
    y0 = op(x_true)[0]
    y = y0 + sigma_y * torch.complex(torch.randn(y0.shape, generator=gen(1), dtype=F64),
                                     torch.randn(y0.shape, generator=gen(2), dtype=F64))
    def residual(x):
        return float(torch.sqrt((op(x) - y).abs().pow(2).reshape(x.shape[0], -1).sum(-1)).mean())

    prior_residual = residual(prior.sample(50, generator=gen(3)).reshape(50, 1, 4, 4))
    for method in ("dps", "pgdm", "diffpir", "ddrm", "reddiff", "daps"):
        res = sample_posterior(field, op, y, sigma_y=sigma_y, method=method, num_samples=8, nfe=60, generator=gen(0))
        assert residual(res.x) < 0.5 * prior_residual, (method, residual(res.x), prior_residual)


def test_nonlinear_operator_dps_reddiff_daps():
    prior, H, _, _ = gaussian_problem(d=6, m=3)
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    Hf = H.clone()
    op = Nonlinear(lambda x: torch.tanh(x @ Hf.T), (6,), (3,))
    y = op(prior.sample(1, generator=gen(1)))[0] + 0.05 * torch.randn(3, generator=gen(2), dtype=F64)
    base = float(((op(prior.sample(200, generator=gen(3))) - y) ** 2).sum(-1).sqrt().mean())
    for method, opts in (("dps", {}), ("reddiff", {}), ("daps", {"langevin_steps": 20})):
        res = sample_posterior(field, op, y, sigma_y=0.05, method=method, num_samples=16, nfe=50, generator=gen(0),
                               **opts)
        residual = float(((op(res.x) - y) ** 2).sum(-1).sqrt().mean())
        assert residual < 0.5 * base, (method, residual, base)
        if method == "daps":
            assert res.info["posterior_step"] == "langevin"


# ----------------------------------------------------------------------------------------------
# errors, registration, bookkeeping


class NoSVD(Operator):
    """A linear operator without an SVD (forward/adjoint only)."""

    def __init__(self, H):
        super().__init__((H.shape[1],), (H.shape[0],), linear=True)
        self.H = H

    def _forward(self, x):
        return x @ self.H.T.to(x.dtype)

    def _adjoint(self, y):
        return y @ self.H.to(y.dtype)


def test_registration_flags():
    assert set(METHODS) <= set(available())
    assert describe("ddrm").needs_svd and describe("ddrm").linear_only
    assert describe("projection").noiseless_only and describe("projection").needs_svd
    assert describe("pgdm").linear_only and not describe("pgdm").needs_svd
    for name in ("dps", "reddiff", "daps"):
        assert not describe(name).linear_only


def test_operators_each_method_refuses():
    prior, H, y, _ = gaussian_problem(d=8, m=4)
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    with pytest.raises(ValueError, match="ddrm.*SVD"):
        sample_posterior(field, NoSVD(H), y, sigma_y=0.1, method="ddrm", nfe=10)
    with pytest.raises(ValueError, match="projection.*SVD"):
        sample_posterior(field, NoSVD(H), y, sigma_y=0.0, method="projection", nfe=10)
    with pytest.raises(ValueError, match="mask or an orthonormal transform.*condition number"):
        sample_posterior(field, Matrix(H), y, sigma_y=0.0, method="projection", nfe=10)
    blur = Blur(torch.tensor([[0.1, 0.2, 0.1], [0.2, 1.0, 0.2], [0.1, 0.2, 0.1]], dtype=F64), (1, 4, 4))
    gmm = random_mixture(16, num_components=2, seed=0)
    field16 = fd.Field(gmm.model("noise"), gmm.path, "noise")
    yb = blur(gmm.sample(1, generator=gen(0)).reshape(1, 1, 4, 4))[0]
    with pytest.raises(ValueError, match="mask or an orthonormal transform"):
        sample_posterior(field16, blur, yb, sigma_y=0.0, method="projection", nfe=10)
    with pytest.raises(ValueError, match="sigma_y = 0"):
        sample_posterior(field, Inpaint(torch.ones(8, dtype=torch.bool)), y.new_zeros(8), sigma_y=0.1,
                         method="projection", nfe=10)
    nonlinear = Nonlinear(lambda x: torch.sin(x @ H.T), (8,), (4,))
    for method in ("pgdm", "ddrm", "diffpir", "projection"):
        with pytest.raises(ValueError, match="linear"):
            sample_posterior(field, nonlinear, y, sigma_y=0.1 if method != "projection" else 0.0, method=method, nfe=10)
    with pytest.raises(ValueError, match="tau > 0"):
        sample_posterior(field, nonlinear, y, sigma_y=0.0, method="daps", nfe=10)
    with pytest.raises(ValueError, match="needs a linear operator"):
        sample_posterior(field, nonlinear, y, sigma_y=0.1, method="daps", nfe=10, posterior_step="exact")


def test_option_errors():
    prior, H, y, _ = gaussian_problem()
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    op = Matrix(H)
    bad = [("dps", {"zeta": -1.0}, "zeta"), ("pgdm", {"eta": 2.0}, "eta"), ("pgdm", {"data_variance": 0.0}, "data_variance"),
           ("ddrm", {"eta_b": 1.5}, "eta_b"), ("dps", {"grid": "nonsense"}, "grid"), ("reddiff", {"init": "x"}, "init"),
           ("daps", {"posterior_step": "x"}, "posterior_step"), ("dps", {"grid": [0.1, 0.2, 0.3]}, "more than the budget")]
    for method, opts, word in bad:
        with pytest.raises(ValueError, match=word):
            sample_posterior(field, op, y, sigma_y=0.1, method=method, nfe=2, **opts)


@pytest.mark.parametrize("method", METHODS)
def test_images_float32_budget_and_vjp_counts(method):
    """(B, C, H, W) images in float32 on a trained-network-like field; budgets are respected."""
    gmm = random_mixture(16, num_components=2, seed=1)
    field = fd.Field(gmm.model("v"), gmm.path, "v")
    mask = torch.rand(1, 4, 4, generator=gen(0)) > 0.5
    op = Inpaint(mask)
    y = op(gmm.sample(1, generator=gen(1), dtype=torch.float32).reshape(1, 1, 4, 4))[0]
    sigma_y = 0.0 if method == "projection" else 0.05
    res = sample_posterior(field, op, y, sigma_y=sigma_y, method=method, num_samples=3, nfe=30, generator=gen(0))
    assert res.x.dtype == torch.float32 and res.x.shape == (3, 1, 4, 4)
    assert res.nfe <= 30
    assert res.vjp == (res.nfe if method in ("dps", "pgdm") else 0.0)


def test_daps_budget_split():
    prior, H, y, _ = gaussian_problem()
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    for nfe, levels, ode_steps in ((200, 40, 5), (60, 20, 3), (10, 10, 1)):
        res = sample_posterior(field, Matrix(H), y, sigma_y=0.1, method="daps", num_samples=2, nfe=nfe, generator=gen(0))
        assert (res.info["levels"], res.info["ode_steps"]) == (levels, ode_steps)
        assert res.nfe == (levels - 1) * ode_steps + 1  # the last level is the path's cleanest time: one evaluation


@pytest.mark.parametrize("method", ["dps", "pgdm"])
def test_samples_do_not_depend_on_the_rest_of_the_batch(method):
    """Per-sample norms (DPS issue #12): with η = 0 the only randomness is the start, whose first rows
    are the same for any batch size, so the first samples of a batch of 5 equal a batch of 2."""
    prior, H, y, _ = gaussian_problem()
    field = fd.Field(prior.model("noise"), prior.path, "noise")
    runs = [sample_posterior(field, Matrix(H), y, sigma_y=0.1, method=method, num_samples=n, nfe=20, generator=gen(0),
                             eta=0.0).x for n in (2, 5)]
    torch.testing.assert_close(runs[0], runs[1][:2], rtol=0, atol=1e-12)
