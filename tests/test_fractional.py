"""MA-fBM (Daems et al., ICLR 2024): weights, covariances, exact simulators, ELBO and posterior against closed forms."""

import math

import pytest
import torch

import flowdiff as fd

F = fd.fractional
D64 = torch.float64


def test_incomplete_gamma_matches_scipy_and_is_differentiable():
    sp = pytest.importorskip("scipy.special")
    a = torch.tensor([0.55, 0.8, 1.2, 1.45, 2.3], dtype=D64)
    for z in [1e-3, 0.7, 5.0, 9.99, 10.0, 30.0, 120.0]:
        p = F.lower_gamma_regularized(a, torch.full_like(a, z))
        assert torch.allclose(p, torch.as_tensor(sp.gammainc(a.numpy(), z)), atol=1e-13)
    a = torch.tensor(0.8, dtype=D64, requires_grad=True)
    z = torch.tensor(3.0, dtype=D64)
    (g,) = torch.autograd.grad(F.lower_gamma_regularized(a, z), a)
    fdiff = (sp.gammainc(0.8 + 1e-6, 3.0) - sp.gammainc(0.8 - 1e-6, 3.0)) / 2e-6
    assert abs(float(g) - fdiff) < 1e-7


@pytest.mark.parametrize("hurst, expected", [(0.1, 0.216), (0.3, 0.018), (0.5, 0.073), (0.7, 0.273), (0.9, 0.713)])
def test_weights_reach_the_measured_approximation_error(hurst, expected):
    # modalities.md §4.1: type I, K = 5, gamma_max = 20, T = 6 (the paper's setting), measured independently.
    assert abs(F.MAfBM(hurst, 5, gamma_max=20.0, horizon=6.0).approximation_error() - expected) < 1.5e-3
    # the paper's speed grid
    assert torch.allclose(F.geometric_speeds(5, 20.0), torch.tensor([0.05, 0.2236, 1.0, 4.472, 20.0], dtype=D64), rtol=1e-3)


@pytest.mark.parametrize("kind", ["I", "II"])
@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.7])
def test_approximate_variance_follows_t_to_the_2h(kind, hurst):
    fbm = F.MAfBM(hurst, 10, gamma_max=1000.0, kind=kind, horizon=6.0)
    t = torch.tensor([0.5, 1.0, 2.0, 4.0, 6.0], dtype=D64)
    var = torch.diagonal(fbm.covariance(t))
    assert torch.allclose(var, t ** (2 * hurst), rtol=0.05)
    target = torch.diagonal(fbm.target_covariance(t))
    assert torch.allclose(target, t ** (2 * hurst), rtol=2e-3)  # both kinds normalised to Var = t^{2H}
    if kind == "I":  # and the whole covariance of standard fBM
        assert torch.allclose(fbm.covariance(t), F.fbm_covariance(t, t, hurst), atol=0.05 * 6 ** (2 * hurst))


def test_weight_normal_equations_against_quadrature():
    # A_ij = ∫_0^T E[Z_i Z_j] dt with Z = Y(t) - Y(0), from the OU covariances by the trapezoid rule.
    fbm = F.MAfBM(0.3, 5, horizon=6.0)
    A, b = fbm.gram()
    t = torch.linspace(0, 6.0, 6001, dtype=D64)
    zero = torch.zeros(1, dtype=D64)
    c0 = fbm.initial_covariance()  # stationary: Cov(Y(t), Y(t)) = Cov(Y(0), Y(0))
    cz = fbm.ou_covariance(t, zero)[:, 0]  # Cov(Y_i(t), Y_j(0))
    ez = 2 * c0 - cz - cz.transpose(-1, -2)
    assert torch.allclose(A, torch.trapezoid(ez, t, dim=0), rtol=1e-5)
    # b by quadrature: E[B^H(t) Z_k(t)] = c_H γ^{-a}(2 - e^{-γt} - e^{γt}Q(a, γt)) with Q from scipy
    sp = pytest.importorskip("scipy.special")
    a, g = 0.8, fbm.speeds
    tt = t[1:, None]
    q = torch.as_tensor(sp.gammaincc(a, (g * tt).numpy()))
    integrand = g ** (-a) * (2 - torch.exp(-g * tt) - torch.exp(g * tt) * q)
    c_h = math.sqrt(math.gamma(1.6) * math.sin(0.3 * math.pi))
    b_quad = c_h * torch.trapezoid(torch.cat([torch.zeros(1, 5, dtype=D64), integrand]), t, dim=0)
    assert torch.allclose(b, b_quad, rtol=1e-5)


def test_weights_are_differentiable_in_hurst():
    h = torch.tensor(0.35, dtype=D64, requires_grad=True)
    w = F.MAfBM(h, 6, gamma_max=50.0).weights
    (g,) = torch.autograd.grad(w.sum(), h)
    fd_ = (F.MAfBM(0.35 + 1e-6, 6, gamma_max=50.0).weights.sum() - F.MAfBM(0.35 - 1e-6, 6, gamma_max=50.0).weights.sum()) / 2e-6
    assert abs(float(g) - float(fd_)) < 1e-5 * max(1.0, abs(float(fd_)))


def test_markov_samples_have_the_closed_form_covariance():
    gen = torch.Generator().manual_seed(0)
    fbm = F.MAfBM(0.3, 5)
    t = torch.tensor([0.25, 1.0, 2.5], dtype=D64)
    x = fbm.sample(t, 20000, generator=gen)
    emp = torch.cov(x.T)
    assert torch.allclose(emp, fbm.covariance(t), atol=0.05 * float(fbm.covariance(t).max()))


@pytest.mark.parametrize("method", ["davies-harte", "cholesky"])
def test_fbm_simulator_is_exact(method):
    gen = torch.Generator().manual_seed(1)
    t, x = F.simulate_fbm(4000, 64, 2.0, 0.3, method=method, generator=gen)
    idx = torch.tensor([8, 32, 64])
    emp = torch.cov(x[:, idx].T)
    ref = F.fbm_covariance(t[idx], t[idx], 0.3)
    assert torch.allclose(emp, ref, rtol=0.1, atol=0.03)
    inc = x.diff(dim=1) / (2.0 / 64) ** 0.3  # unit fGn
    lag1 = float((inc[:, 1:] * inc[:, :-1]).mean())
    assert abs(lag1 - float(F.fgn_autocovariance(2, 0.3)[1])) < 0.02  # 2^{2H-1} - 1 = -0.242
    assert abs(F.estimate_hurst(x, max_lag=8) - 0.3) < 0.03


def test_fou_simulator_matches_ou_at_h_one_half():
    gen = torch.Generator().manual_seed(2)
    t, x = F.simulate_fou(4000, 20, 2.0, 0.5, theta=1.5, sigma=0.7, mean=0.3, x0=1.0, generator=gen)
    var = 0.49 * (1 - torch.exp(-3.0 * t[-1])) / 3.0
    mean = 0.3 + 0.7 * math.exp(-3.0)
    assert abs(float(x[:, -1].var()) / float(var) - 1) < 0.08
    assert abs(float(x[:, -1].mean()) - mean) < 0.03


def _bridge(hurst, samples=3000, refine=0.0):
    sde = F.FractionalSDE(hurst).double()
    post = F.VariationalPosterior(sde, control=None, guide=True)
    times, obs = torch.tensor([2.0], dtype=D64), torch.zeros(1, 1, dtype=D64)
    gen = torch.Generator().manual_seed(3)
    res = F.elbo(sde, post, times, obs, 0.1, num_samples=samples, dt=0.02, refine=refine, return_paths=True, generator=gen)
    return sde, post, times, obs, res


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_guided_posterior_matches_the_analytic_gp_posterior(hurst):
    sde, _, times, obs, res = _bridge(hurst)
    q = torch.tensor([0.5, 1.0, 1.5], dtype=D64)
    idx = [int((res.times - v).abs().argmin()) for v in q]
    emp = res.paths[:, 0, idx, 0].std(0)
    _, std = F.gp_posterior(sde.fbm().covariance, times, q, 0.1)
    assert torch.allclose(emp, std, rtol=0.05)
    # the exact marginal likelihood of the single observation, and the ELBO below it
    var = float(sde.fbm().covariance(times)[0, 0]) + 0.01
    ll = F.log_likelihood(sde, times, obs, 0.1, dt=0.02)
    assert abs(float(ll) + 0.5 * math.log(2 * math.pi * var)) < 1e-9
    assert float(res.elbo) < float(ll) + 0.02


def test_graded_grid_tightens_the_elbo():
    sde, post, times, obs, coarse = _bridge(0.3, samples=1500)
    _, _, _, _, fine = _bridge(0.3, samples=1500, refine=0.05)
    ll = float(F.log_likelihood(sde, times, obs, 0.1, dt=0.02))
    gap_coarse, gap_fine = ll - float(coarse.elbo), ll - float(fine.elbo)
    assert gap_fine < 0.1 and gap_coarse > 3 * gap_fine and gap_fine > -0.02
    # without a control the posterior is the prior and the ELBO is far lower
    prior_post = F.VariationalPosterior(sde, control=None, initial="prior")
    prior = F.elbo(sde, prior_post, times, obs, 0.1, num_samples=1500, dt=0.02)
    assert float(prior.elbo) < ll - 1.0 and float(prior.kl) == 0.0


def test_fit_moves_the_hurst_index_and_keeps_dtype():
    gen = torch.Generator().manual_seed(4)
    t, x = F.simulate_fou(8, 10, 2.0, 0.3, theta=1.0, generator=gen)
    obs = (x[:, 1:] + 0.1 * torch.randn(8, 10, dtype=D64, generator=gen))[..., None]
    sde = F.FractionalSDE(0.6, theta=1.0, horizon=2.0, learn_hurst=True, learn_sigma=True).double()
    post = F.VariationalPosterior(sde, guide=True)  # network residual on top of the guided control
    hist = F.fit(sde, post, t[1:], obs, 0.1, steps=4, lr=0.05, num_samples=4, dt=0.1, refine=0.2, generator=gen)
    assert len(hist.hurst) == 4 and hist.hurst[-1] < 0.57 and all(math.isfinite(v) for v in hist.elbo)
    # a plain control network (no guide), learned initial law, float32 observations
    sde32 = F.FractionalSDE(0.5, horizon=2.0)
    post32 = F.VariationalPosterior(sde32, hidden=8)
    res = F.elbo(sde32, post32, t[1:].float(), obs[0].float(), 0.1, num_samples=2, dt=0.2)
    assert res.elbo.dtype == torch.float32 and res.elbo.shape == (1,)
    F.fit(sde32, post32, t[1:], obs[0].float(), 0.1, steps=2, lr=1e-3, num_samples=2, dt=0.2)


def test_bad_input_is_refused():
    for bad in [0.0, 1.0, 1.2, -0.1, float("nan")]:
        with pytest.raises(ValueError, match="hurst"):
            F.MAfBM(bad)
        with pytest.raises(ValueError, match="hurst"):
            F.FractionalSDE(bad)
    with pytest.raises(ValueError, match="num_processes"):
        F.MAfBM(0.3, 0)
    with pytest.raises(ValueError, match="num_processes"):
        F.FractionalSDE(0.3, num_processes=0)
    with pytest.raises(ValueError, match="kind"):
        F.MAfBM(0.3, kind="III")
    with pytest.raises(ValueError, match="hurst"):
        F.simulate_fbm(2, 8, hurst=1.5)
    sde = F.FractionalSDE(0.4, dim=2).double()
    post = F.VariationalPosterior(sde, control=None, guide=True)
    times = torch.tensor([1.0], dtype=D64)
    with pytest.raises(ValueError, match="observations"):
        F.elbo(sde, post, times, torch.zeros(1, 3, dtype=D64), 0.1)
    with pytest.raises(ValueError, match="obs_std"):
        F.elbo(sde, post, times, torch.zeros(1, 2, dtype=D64), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        F.elbo(sde, post, times, torch.full((1, 2), float("nan"), dtype=D64), 0.1)
    with pytest.raises(ValueError, match="linear"):
        F.VariationalPosterior(F.FractionalSDE(0.4, drift=lambda x, t: x), guide=True)


def test_fit_hurst_entry_point_recovers_h_and_checks_input():
    """The documented entry point (exact likelihood): H = 0.3 recovered within 0.05 from 16 noisy fOU paths
    (docs/fractional.md: 0.313 / 0.499 / 0.697 for H = 0.3 / 0.5 / 0.7)."""
    gen = torch.Generator().manual_seed(0)
    grid, x = F.simulate_fou(16, 20, 4.0, 0.3, theta=1.0, sigma=1.0, generator=gen)
    obs = x[:, 1:] + 0.1 * torch.randn(16, 20, dtype=torch.float64, generator=gen)
    fit = F.fit_hurst(grid[1:], obs, 0.1)  # the defaults (150 steps, K = 8, ~8 CPU s)
    assert fit.method == "likelihood" and len(fit.history) == 150
    assert abs(fit.hurst - 0.3) < 0.05, fit.hurst
    with pytest.raises(ValueError, match="hurst"):
        F.fit_hurst(grid[1:], obs, 0.1, hurst_init=1.2)
    with pytest.raises(ValueError, match="unknown method"):
        F.fit_hurst(grid[1:], obs, 0.1, method="variogram")
    with pytest.raises(ValueError, match="len\\(times\\)"):
        F.fit_hurst(grid[1:], obs[:, :5], 0.1)
