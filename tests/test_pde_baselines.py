"""Baselines of issue 21: PDDLVM (fixed grid), PINN-style deterministic model, flowdiff diffusion prior."""

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.pde import grad

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the diffusion prior ------------------------------------------------------------------------------
# -u'' = z w on [0, 1], u(0) = u(1) = 0: u = z w x(1-x)/2, so u/D is constant (mesh interpolation exact) and the
# readings are linear in z; with z ~ N(0, 1) the posterior of z is Gaussian in closed form.
def _linear_problem(with_reference=True):
    def residual(u, x, z, w):
        return -grad(grad(u, x)[..., 0], x)[..., 0] - z[:, :1] * w[:, :1]

    def reference(z, w, x):
        return z[:, :1] * w[:, :1] * x[..., 0] * (1 - x[..., 0]) / 2

    return fd.pde.Problem(domain=[(0.0, 1.0)], residual=residual, lift=lambda x, w: torch.zeros_like(x[..., 0]),
                          factor=lambda x: x[..., 0] * (1 - x[..., 0]),
                          sample_params=lambda n, g: (torch.randn(n, 1, generator=g), 1 + torch.rand(n, 1, generator=g)),
                          reference=reference if with_reference else None)


def _small(cls, steps, **kw):
    return cls(_linear_problem(), steps=steps, batch=16, points=16, width=32, depth=2, degree=6, calibration=0,
               inverse=False, **kw)


def _rel_err(model, p, n=24):
    z, w = p.sample_params(n, torch.Generator().manual_seed(7))
    x = torch.linspace(0, 1, 51)[1:-1].reshape(1, -1, 1).expand(n, -1, -1).contiguous()
    truth = p.reference(z, w, x).float()
    mean, std = model.predict(z, w, x)
    return float(((mean - truth).norm(dim=1) / truth.norm(dim=1)).median()), std


def test_pinn_beats_an_untrained_net_and_has_no_std_without_calibration():
    trained = _small(fd.pde.PINN, 300).fit(seed=0)
    untrained = _small(fd.pde.PINN, 0).fit(seed=0)
    err, std = _rel_err(trained, trained.problem)
    err0, _ = _rel_err(untrained, untrained.problem)
    assert trained.config["family"] == "deterministic"
    assert err < 0.1 * err0 and err < 0.05, (err, err0)
    assert float(std.abs().max()) == 0.0  # no uncertainty of its own


def test_pddlvm_trains_on_one_fixed_grid_and_refuses_random():
    m = _small(fd.pde.PDDLVM, 3).fit(seed=0)
    g0, g1 = m.history["grids"]
    assert torch.equal(g0, g1) and torch.equal(g0[0], g0[1])
    assert m.config["grid"] == "fixed" and g0.shape[1] == 16
    with pytest.raises(ValueError, match="fixed grid"):
        fd.pde.PDDLVM(fd.pde.poisson(nodes=101), grid="random")
    with pytest.raises(ValueError, match="deterministic"):
        fd.pde.PINN(fd.pde.poisson(nodes=101), family="diag")


def test_baselines_save_and_load(tmp_path):
    m = _small(fd.pde.PINN, 2).fit(seed=0)
    m.save(tmp_path / "m.pt")
    back = fd.pde.PINN.load(tmp_path / "m.pt", m.problem)
    z, w = m.problem.sample_params(3, torch.Generator().manual_seed(1))
    x = m.problem.uniform_points(3, 5, torch.Generator().manual_seed(2))
    assert isinstance(back, fd.pde.PINN)
    torch.testing.assert_close(back.predict(z, w, x)[0], m.predict(z, w, x)[0])


@pytest.fixture(scope="module")
def linear_prior():
    p = _linear_problem()
    return fd.pde.DiffusionPrior(p, pairs=2000, nodes=9, hidden=64, depth=2, steps=1500, batch=128, lr=2e-3).fit(seed=0)


def test_diffusion_prior_posterior_matches_the_exact_gaussian(linear_prior):
    p, dp = linear_prior.problem, linear_prior
    assert dp.solver_calls == 2000 and dp.history["solver_calls"] == 2000
    x = torch.tensor([[[0.3], [0.6]], [[0.5], [0.8]], [[0.2], [0.45]]])
    z = torch.tensor([[0.8], [-1.2], [0.3]])
    w = torch.tensor([[1.5], [1.2], [1.9]])
    sigma = 0.05
    y = p.reference(z, w, x) + sigma * torch.tensor([[0.5, -1.0], [1.2, 0.3], [-0.4, 0.8]])
    zs = dp.posterior(x, y, w, sigma, n=512, generator=torch.Generator().manual_seed(0), nfe=100)
    assert zs.shape == (512, 3, 1)
    a = w * x[..., 0] * (1 - x[..., 0]) / 2  # (B, M)
    prec = 1 + (a**2).sum(1) / sigma**2
    exact_mean, exact_std = (a * y).sum(1) / sigma**2 / prec, prec.rsqrt()
    m, s = zs.mean(0)[:, 0], zs.std(0)[:, 0]
    assert torch.all((m - exact_mean).abs() < 0.5 * exact_std + 0.05), (m, exact_mean, exact_std)
    assert torch.all((s / exact_std - 1).abs() < 0.35), (s, exact_std)


def test_diffusion_prior_forward_and_residual(linear_prior):
    p, dp = linear_prior.problem, linear_prior
    z, w = torch.tensor([[0.7], [-0.5]]), torch.tensor([[1.3], [1.8]])
    x = torch.linspace(0.05, 0.95, 11).reshape(1, -1, 1).expand(2, -1, -1)
    mean, std = dp.predict(z, w, x, n=128, generator=torch.Generator().manual_seed(1))
    truth = p.reference(z, w, x)
    assert mean.shape == std.shape == (2, 11)
    assert float(((mean - truth).norm(dim=1) / truth.norm(dim=1)).max()) < 0.1
    # the guidance residual: ~0 for the exact solution, not for a perturbed one
    u = p.reference(z, w, dp.mesh.unsqueeze(0).expand(2, -1, -1))
    v = (torch.cat([z, w, u], 1) - dp.mean) / dp.std
    r0 = dp.residual(v[:1], w[0]).detach()
    r1 = dp.residual(v[:1] + 0.3 * torch.randn(1, dp.dim, generator=torch.Generator().manual_seed(0)), w[0]).detach()
    assert float(r0.abs().max()) < 1e-3 * float(r1.abs().max()) + 1e-3


def test_diffusion_prior_dps_with_residual_guidance_runs(linear_prior):
    p, dp = linear_prior.problem, linear_prior
    x = torch.tensor([[[0.3], [0.6]]])
    w = torch.tensor([[1.5]])
    y = p.reference(torch.tensor([[0.5]]), w, x)
    for kw in ({"method": "dps"}, {"method": "dps", "pde_weight": 0.01}):
        zs = dp.posterior(x, y, w, 0.05, n=16, nfe=20, **kw)
        assert zs.shape == (16, 1, 1) and torch.isfinite(zs).all()
        assert dp.last_posterior["nfe_per_sample"] == 20


def test_diffusion_prior_rejects_bad_input(linear_prior):
    dp = linear_prior
    with pytest.raises(ValueError, match="reference"):
        fd.pde.DiffusionPrior(_linear_problem(with_reference=False))
    with pytest.raises(ValueError, match="one unknown field"):
        fd.pde.DiffusionPrior(fd.pde.cavity(n=8, nt=4))
    with pytest.raises(ValueError, match="pairs"):
        fd.pde.DiffusionPrior(_linear_problem(), pairs=0)
    with pytest.raises(ValueError, match="not fitted"):
        fd.pde.DiffusionPrior(_linear_problem()).posterior(torch.rand(1, 2, 1), torch.zeros(1, 2), torch.ones(1, 1), 0.1)
    x, y, w = torch.tensor([[[0.3], [0.6]]]), torch.zeros(1, 2), torch.ones(1, 1)
    with pytest.raises(ValueError, match="outside the domain"):
        dp.posterior(torch.tensor([[[0.3], [1.6]]]), y, w, 0.1)
    with pytest.raises(ValueError, match="noise"):
        dp.posterior(x, y, w, 0.0)
    with pytest.raises(ValueError, match="y_obs"):
        dp.posterior(x, torch.zeros(1, 3), w, 0.1)
    with pytest.raises(ValueError, match="w must"):
        dp.posterior(x, y, torch.ones(2, 1), 0.1)
    with pytest.raises(ValueError, match="dps"):
        dp.posterior(x, y, w, 0.1, pde_weight=1.0)
    assert math.isfinite(float(dp.posterior(x, y, w, 0.1, n=4, nfe=10).sum()))
