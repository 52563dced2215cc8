"""flowdiff.pde: problems, reference solvers, collocation, GICNet, RGNP pieces and the posterior sampler.

Everything here is small (tiny networks, a few steps); trained quality is measured in benchmarks/pde.py.
"""

import math

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.pde import reference as R
from flowdiff.pde.rgnp import _lowrank_log_density


def _poisson_parts():
    p = fd.pde.poisson()
    return dict(domain=p.domain, residual=p.residual_fn, lift=p.lift_fn, factor=p.factor_fn,
                sample_params=p.sample_params_fn)


@pytest.fixture(scope="module")
def tiny_model():
    p = fd.pde.poisson()
    return fd.pde.RGNP(p, steps=3, batch=4, points=8, width=16, depth=2, frequencies=4, calibration=0).fit(seed=0)


# -- Problem validation -----------------------------------------------------------------------------------------
def test_problem_rejects_bad_domain():
    parts = _poisson_parts()
    for bad in ([], [(1.0, -1.0)], [(0.0, 0.0)], [(0.0, float("inf"))]):
        parts["domain"] = bad
        with pytest.raises(ValueError, match="domain"):
            fd.pde.Problem(**parts)


def test_problem_rejects_wrong_residual_shape():
    parts = _poisson_parts()
    parts["residual"] = lambda u, x, z, w: u.sum(1)
    with pytest.raises(ValueError, match="residual must return shape"):
        fd.pde.Problem(**parts)


def test_problem_rejects_nan_in_any_row():
    parts = _poisson_parts()
    base = parts["sample_params"]

    def sample(n, g):
        z, w = base(n, g)
        if n > 100:
            z[100, 2] = float("nan")
        return z, w

    parts["sample_params"] = sample
    with pytest.raises(ValueError, match="row 100"):
        fd.pde.Problem(**parts)


def test_problem_rejects_non_callables_and_bad_lift():
    parts = _poisson_parts()
    parts["lift"] = 3
    with pytest.raises(TypeError, match="lift"):
        fd.pde.Problem(**parts)
    parts = _poisson_parts()
    parts["factor"] = lambda x: torch.ones(x.shape[0], x.shape[1] + 1)
    with pytest.raises(ValueError, match="factor"):
        fd.pde.Problem(**parts)


# -- reference solvers: mesh convergence ---------------------------------------------------------------------------
def test_poisson_reference_second_order_and_residual():
    z = np.array([[1.0, -1.0, 0.1, 0.0, 0.0], [-0.5, 0.3, 0.8, -0.9, 0.2]])
    w = np.array([1.5, 2.0])
    errs = []
    _, fine = R.poisson_solve(z, w, nodes=1601)
    for nodes in (101, 201, 401):
        _, u = R.poisson_solve(z, w, nodes=nodes)
        errs.append(np.abs(u - fine[:, :: (1600 // (nodes - 1))]).max())
    orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(orders > 1.8), orders


def test_burgers_reference_converges():
    # second order in time (fixed mesh) and in space (fixed step) at t = 1
    z = np.array([[0.05, 0.8]])
    w = np.array([1.3])
    r = [R.burgers_solve(z, w, nx=41, nt=nt)[2][:, -1] for nt in (10, 20, 80)]
    assert np.abs(r[0] - r[2]).max() / np.abs(r[1] - r[2]).max() > 3.5
    r = [R.burgers_solve(z, w, nx=nx, nt=20)[2][:, -1, :: (nx - 1) // 10] for nx in (21, 41, 161)]
    assert np.abs(r[0] - r[2]).max() / np.abs(r[1] - r[2]).max() > 3.5


def test_cavity_reference_converges_and_is_divergence_free_in_the_limit():
    z = np.array([[0.9, 0.5]])
    w = np.array([1.0])
    _, _, a = R.cavity_solve(z, w, n=8, nt=20)
    _, _, b = R.cavity_solve(z, w, n=16, nt=40)
    _, _, c = R.cavity_solve(z, w, n=32, nt=80)
    # compare the horizontal velocity at t = 1 on the coarse cell centres via the interpolant of the finer grids
    xc8, xc16, xc32 = [(np.arange(n) + 0.5) / n for n in (8, 16, 32)]
    pts = np.stack(np.meshgrid(xc8, xc8, indexing="ij"), -1).reshape(1, -1, 2)
    u16 = R.interp_grid((xc16, xc16), b[:, -1, :, :, 0], pts)
    u32 = R.interp_grid((xc32, xc32), c[:, -1, :, :, 0], pts)
    e_coarse = np.abs(a[:, -1, :, :, 0].reshape(1, -1) - u32).max()
    e_mid = np.abs(u16 - u32).max()
    assert e_mid < e_coarse and np.isfinite(c).all() and np.abs(c[..., 0]).max() < 1.5


def test_builtin_problems_reference_through_problem():
    for name in ("poisson", "burgers"):
        p = fd.pde.get(name)
        z, w = p.sample_params(2, torch.Generator().manual_seed(0))
        x = p.uniform_points(2, 5, torch.Generator().manual_seed(1))
        assert p.reference(z, w, x).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown problem"):
        fd.pde.get("heat")


def test_collocation_matches_finite_differences():
    p = fd.pde.poisson()
    z, w = p.sample_params(3, torch.Generator().manual_seed(3))
    sol = fd.pde.collocation_solve(p, z, w, degree=32)
    mesh, u = R.poisson_solve(z.numpy(), w.numpy(), nodes=1601)
    x = torch.tensor(mesh[1:-1]).reshape(1, -1, 1).expand(3, -1, 1)
    assert sol.converged.all()
    assert np.abs(sol(x).numpy() - u[:, 1:-1]).max() < 2e-3


# -- RGNP building blocks ------------------------------------------------------------------------------------------
def test_lowrank_log_density_matches_torch():
    g = torch.Generator().manual_seed(0)
    v, d, c = torch.randn(3, 7, generator=g), torch.rand(3, 7, generator=g) + 0.1, torch.randn(3, 7, 2, generator=g)
    ref = torch.distributions.LowRankMultivariateNormal(torch.zeros(3, 7), c, d).log_prob(v)
    ours = _lowrank_log_density(v, d, c) - 0.5 * 7 * math.log(2 * math.pi)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_random_grid_changes_every_step_and_instance(tiny_model):
    g0, g1 = tiny_model.history["grids"]
    assert not torch.allclose(g0, g1)  # a fresh grid at every step
    assert not torch.allclose(g0[0], g0[1])  # and for every instance
    lo, hi = tiny_model.problem.domain[0]
    assert g0.min() > lo and g0.max() < hi


def test_fixed_grid_baseline_keeps_its_grid():
    p = fd.pde.poisson()
    m = fd.pde.RGNP(p, grid="fixed", steps=2, batch=2, points=8, width=8, depth=1, frequencies=2, calibration=0,
                    inverse=False).fit()
    g0, g1 = m.history["grids"]
    assert torch.equal(g0, g1) and torch.equal(g0[0], g0[1])


def test_predict_shapes_and_sampling_matches_closed_form(tiny_model):
    p = tiny_model.problem
    z, w = p.sample_params(2, torch.Generator().manual_seed(5))
    x = p.uniform_points(2, 6, torch.Generator().manual_seed(6))
    mean, std = tiny_model.predict(z, w, x)
    assert mean.shape == std.shape == (2, 6) and (std > 0).all()
    s = tiny_model.sample(z, w, x, 4000, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s.mean(0), mean, atol=4 * std.max().item() / math.sqrt(4000) + 1e-6, rtol=0)
    torch.testing.assert_close(s.std(0), std, rtol=0.1, atol=1e-7)
    m64, _ = tiny_model.predict(z.double(), w.double(), x.double())
    assert m64.dtype == torch.float64


def test_lowrank_family_predictive_includes_factor():
    p = fd.pde.poisson()
    m = fd.pde.RGNP(p, family="lowrank", rank=2, steps=2, batch=2, points=8, width=8, depth=1, frequencies=2,
                    calibration=0, inverse=False).fit()
    z, w = p.sample_params(1, torch.Generator().manual_seed(5))
    x = p.uniform_points(1, 3, torch.Generator().manual_seed(6))
    s = m.sample(z, w, x, 20000, generator=torch.Generator().manual_seed(1))
    _, std = m.predict(z, w, x)
    torch.testing.assert_close(s.std(0), std, rtol=0.05, atol=1e-7)


def test_predict_and_posterior_reject_bad_input(tiny_model):
    p = tiny_model.problem
    z, w = p.sample_params(2, torch.Generator().manual_seed(5))
    x = p.uniform_points(2, 4, torch.Generator().manual_seed(6))
    y = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="outside the domain"):
        tiny_model.posterior(x * 3, y, w, noise=0.05, n=4)
    with pytest.raises(ValueError, match="noise"):
        tiny_model.posterior(x, y, w, noise=0.0, n=4)
    with pytest.raises(ValueError, match="y_obs must have shape"):
        tiny_model.posterior(x, torch.zeros(2, 5), w, noise=0.05, n=4)
    with pytest.raises(ValueError, match="w must have shape"):
        tiny_model.posterior(x, y, w[:1], noise=0.05, n=4)
    with pytest.raises(ValueError, match="z must have shape"):
        tiny_model.predict(z[:, :3], w, x)
    with pytest.raises(ValueError, match="not fitted"):
        fd.pde.RGNP(p).predict(z, w, x)


def test_posterior_runs_and_invert_on_other_grids(tiny_model):
    p = tiny_model.problem
    z, w = p.sample_params(2, torch.Generator().manual_seed(5))
    x = p.uniform_points(2, 5, torch.Generator().manual_seed(6), margin=0.05)
    y = p.reference(z, w, x).float()
    zs = tiny_model.posterior(x, y, w, noise=0.05, n=8, generator=torch.Generator().manual_seed(0), chains=4,
                              burn_in=5, thin=1, prior_draws=64)
    assert zs.shape == (8, 2, 5) and zs.abs().max() <= 1.0 + 1e-3  # the box prior is respected
    for n in (13, 40):
        xs = p.uniform_points(2, n, torch.Generator().manual_seed(n))
        mean, std = tiny_model.invert(xs, p.reference(z, w, xs).float(), w)
        assert mean.shape == std.shape == (2, 5) and torch.isfinite(mean).all()


# -- GICNet --------------------------------------------------------------------------------------------------------
def test_gicnet_is_invariant_to_order_and_duplication():
    torch.manual_seed(0)
    net = fd.pde.GICNet(1, 1, 3, 1, channels=4, grid=8, conv_channels=4, conv_layers=2, hidden=16,
                        min_bandwidth=0.05)
    x = torch.rand(2, 11, 1) * 2 - 1
    v = torch.sin(3 * x)
    w = torch.rand(2, 1)
    m, var = net(x, v, w)
    perm = torch.randperm(11)
    m2, _ = net(x[:, perm], v[:, perm], w)
    m3, _ = net(torch.cat([x, x], 1), torch.cat([v, v], 1), w)
    torch.testing.assert_close(m, m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, m3, rtol=1e-4, atol=1e-5)
    mask = torch.ones(2, 22)
    mask[:, 11:] = 0
    m4, _ = net(torch.cat([x, torch.zeros_like(x)], 1), torch.cat([v, 100 + v], 1), w, mask)
    torch.testing.assert_close(m, m4, rtol=1e-5, atol=1e-6)
    assert (var > 0).all()


# -- posterior sampler against a closed form -----------------------------------------------------------------------
def test_sample_posterior_matches_conjugate_gaussian():
    # prior N(0, 1) (given as log_prior), y = A z + noise: exact Gaussian posterior
    p = fd.pde.Problem(**_poisson_parts(), log_prior=lambda z: -0.5 * (z**2).sum(-1))
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(4096, 5, generator=g, dtype=torch.float64)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    truth = torch.randn(2, 5, generator=g, dtype=torch.float64)
    sigma = 0.5
    y = truth @ a.T + sigma * torch.randn(2, 3, generator=g, dtype=torch.float64)

    def log_lik(z):
        return -0.5 * (((z @ a.T) - y[:, None]) ** 2).sum(-1) / sigma**2

    prior = fd.pde.PriorModel(p, draws)
    samples, info = fd.pde.sample_posterior(log_lik, prior, draws, 2000, chains=40, burn_in=300, thin=5,
                                            generator=g, cases=2)
    precision = torch.eye(5, dtype=torch.float64) + a.T @ a / sigma**2
    cov = torch.linalg.inv(precision)
    mean = (cov @ (a.T @ y.T / sigma**2)).T
    torch.testing.assert_close(samples.mean(0), mean, atol=0.12, rtol=0)
    torch.testing.assert_close(samples.std(0), cov.diagonal().sqrt().expand(2, 5), atol=0.12, rtol=0)
    assert 0.1 < info["acceptance"] < 0.6


def test_prior_model_detects_a_box_and_falls_back_to_kde():
    p = fd.pde.Problem(**_poisson_parts())
    g = torch.Generator().manual_seed(0)
    box = fd.pde.PriorModel(p, torch.rand(8000, 2, generator=g, dtype=torch.float64) * 2 - 1)
    assert box.kind == "box" and box(torch.tensor([[2.0, 0.0]], dtype=torch.float64)).item() == -math.inf
    kde = fd.pde.PriorModel(p, torch.randn(8000, 2, generator=g, dtype=torch.float64))
    assert kde.kind == "kde"
    lp = kde(torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    assert abs(float(lp[0] - lp[1]) - 2.0) < 0.4  # log N(0)/N(2) = 2 (KDE bandwidth widens it a little)


def test_sensors_helper():
    p = fd.pde.poisson()
    z, w = p.sample_params(3, torch.Generator().manual_seed(0))
    x, y = fd.pde.sensors(p, 16, 3, generator=torch.Generator().manual_seed(1), u=lambda x: p.reference(z, w, x),
                          noise=0.02)
    assert x.shape == (3, 16, 1) and y.shape == (3, 16) and x.abs().max() <= 0.95 + 1e-6
    with pytest.raises(ValueError, match="outside the domain"):
        fd.pde.sensors(p, 4, x=torch.full((1, 4, 1), 2.0))


@pytest.mark.parametrize("name", ["burgers", "cavity"])
def test_rgnp_runs_on_multi_dimensional_problems(name):
    p = fd.pde.get(name)
    m = fd.pde.RGNP(p, steps=2, batch=2, points=8, width=8, depth=1, degree=3, calibration=0).fit()
    z, w = p.sample_params(2, torch.Generator().manual_seed(0))
    x = p.uniform_points(2, 5, torch.Generator().manual_seed(1))
    mean, std = m.predict(z, w, x)
    shape = (2, 5) if name == "burgers" else (2, 5, 3)
    assert mean.shape == std.shape == shape and torch.isfinite(mean).all()
    zm, zsd = m.invert(x, mean, w)
    assert zm.shape == (2, 2)


def test_data_term_marginal_likelihood_is_exact_and_fit_uses_it():
    # the closed-form (Woodbury) marginal likelihood against a dense Gaussian, then a fit with data lowers its NLL
    p = fd.pde.poisson()
    m = fd.pde.RGNP(p, family="lowrank", rank=2, steps=1, batch=4, points=8, width=16, depth=1, degree=6,
                    calibration=0, inverse=False).fit(seed=0)
    z, w = p.sample_params(3, torch.Generator().manual_seed(2))
    x = p.uniform_points(3, 7, torch.Generator().manual_seed(3))
    y = torch.randn(3, 7, generator=torch.Generator().manual_seed(4)) * 0.1
    with torch.no_grad():
        ll = m.data_log_likelihood(z, w, x, y, 0.05)
        mean, var, factor = m._outputs(z, w, x)
        fac = p.factor(x)
        cov = fac[..., None] * (torch.diag_embed(var[..., 0]) + factor[..., 0, :] @ factor[..., 0, :].transpose(1, 2)) \
            * fac[:, None, :] + 0.05**2 * torch.eye(7)
        dense = torch.distributions.MultivariateNormal(fac * mean[..., 0], covariance_matrix=cov.double()).log_prob(y.double())
    torch.testing.assert_close(ll.double(), dense, rtol=1e-4, atol=1e-4)
    # fit with data only from the reference (16 instances at 12 points) lowers the data NLL
    zd, wd = p.sample_params(16, torch.Generator().manual_seed(5))
    xd = p.uniform_points(16, 12, torch.Generator().manual_seed(6), margin=0.05)
    yd = p.reference(zd, wd, xd).float()
    fit = fd.pde.RGNP(p, steps=60, batch=8, points=8, width=16, depth=1, degree=6, lr=2e-2, calibration=0, inverse=False)
    fit.fit(seed=0, data=(zd, wd, xd, yd), data_noise=0.003)
    nll = fit.history["data_nll"]
    plain = fd.pde.RGNP(p, steps=60, batch=8, points=8, width=16, depth=1, degree=6, lr=2e-2, calibration=0, inverse=False)
    plain.fit(seed=0)
    with torch.no_grad():
        after = -fit.data_log_likelihood(zd, wd, xd, yd, 0.02).mean()
        without = -plain.data_log_likelihood(zd, wd, xd, yd, 0.02).mean()
    assert len(nll) == 60 and after < 0.7 * without
    with pytest.raises(ValueError, match="data_noise"):
        fd.pde.RGNP(p, steps=1, calibration=0).fit(data=(zd, wd, xd, yd), data_noise=0.0)
    with pytest.raises(ValueError, match="data y"):
        fd.pde.RGNP(p, steps=1, calibration=0).fit(data=(zd, wd, xd, yd[:, :5]), data_noise=0.1)


def test_learned_noise_fourier_net_and_progress_callback():
    # the paper's Fourier-feature forward net with the learned virtual-observation noise (its Burgers setting), and
    # the progress callback the CLI's bar uses
    p = fd.pde.poisson()
    calls = []
    m = fd.pde.RGNP(p, net="fourier", noise="learned", steps=4, batch=2, points=8, width=8, depth=1, frequencies=2,
                    calibration=0, inverse=False)
    m.fit(seed=0, progress=lambda i, n, info: calls.append((i, n, info["residual_ms"])))
    assert [c[:2] for c in calls] == [(i, 4) for i in range(1, 5)] and all(math.isfinite(c[2]) for c in calls)
    assert float(m.log_noise.detach()) != 0.0  # the learned log ε_r moved from its initial value 0
    fixed = fd.pde.RGNP(p, noise=0.05, steps=2, batch=2, points=8, width=8, depth=1, degree=4, calibration=0,
                        inverse=False).fit(seed=0)
    assert float(fixed.log_noise.detach()) == 0.0 and fixed.noise_value == 0.05
