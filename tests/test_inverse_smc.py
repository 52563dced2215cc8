"""SMC posterior samplers (flowdiff.inverse.smc) against exact posteriors."""

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.inverse import smc as smc_module
from flowdiff.inverse.operators import Inpaint, Matrix
from flowdiff.testing import Gaussian, gmm_inverse_problem, linear_gaussian_posterior, mode_weight_tv

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _field(prior, prediction="noise"):
    return fd.Field(prior.model(prediction), prior.path, prediction)


# ----- particle-system primitives --------------------------------------------------------------

def test_normalize_and_ess():
    lw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]], dtype=F64)
    w = smc_module.normalize_log_weights(lw)
    assert torch.allclose(w.sum(-1), torch.ones(2, dtype=F64))
    ess = smc_module.effective_sample_size(lw)
    assert torch.allclose(ess, torch.tensor([4.0, 1.0], dtype=F64))
    big = torch.tensor([[1000.0, 1000.0]], dtype=F64)  # no overflow
    assert torch.allclose(smc_module.normalize_log_weights(big), torch.full((1, 2), 0.5, dtype=F64))
    with pytest.raises(FloatingPointError):
        smc_module.normalize_log_weights(torch.full((1, 3), -math.inf, dtype=F64))
    with pytest.raises(FloatingPointError):
        smc_module.normalize_log_weights(torch.tensor([[0.0, math.nan]], dtype=F64))


@pytest.mark.parametrize("ordered", [False, True])
def test_systematic_resample_counts_and_unbiased(ordered):
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(3, 40, generator=g, dtype=F64)
    w = smc_module.normalize_log_weights(lw)
    order = torch.argsort(torch.randn(3, 40, generator=g), dim=1) if ordered else None
    total = torch.zeros(3, 40, dtype=F64)
    reps = 3000
    for _ in range(reps):
        idx = smc_module.systematic_resample(lw, 40, g, order)
        counts = torch.stack([torch.bincount(r, minlength=40) for r in idx]).to(F64)
        # each particle gets floor(n w) or ceil(n w) copies
        assert torch.all(counts >= torch.floor(40 * w) - 1e-9) and torch.all(counts <= torch.ceil(40 * w) + 1e-9)
        total += counts
    assert torch.allclose(total / reps / 40, w, atol=3e-3)


def test_systematic_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        smc_module.systematic_resample(torch.zeros(5, dtype=F64), 3)
    with pytest.raises(ValueError, match="num"):
        smc_module.systematic_resample(torch.zeros(1, 5, dtype=F64), 0)


def test_plan_respects_budget():
    for nfe in (10, 100, 1000, 5000):
        for extra in (0, 1):
            s, k = smc_module.plan(nfe, 0.1, extra=extra)
            assert s >= 1 and k >= 1 and s * k + extra <= nfe
    assert smc_module.plan(1000, 0.1, particles=10) == (99, 10)
    with pytest.raises(ValueError, match="exceeds"):
        smc_module.plan(100, 0.1, steps=50, particles=10)
    with pytest.raises(ValueError, match="too small"):
        smc_module.plan(1, 0.1)


# ----- exact posteriors ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bimodal():
    # d = 4, one measurement, 4 prior modes, the posterior has >= 2 modes of weight >= 0.2.
    return gmm_inverse_problem(4, 1, 0.1, num_modes=4, seed=3, multimodal=True, min_weight=0.2)


def test_smc_multimodal_gmm_default_budget(bimodal):
    pb = bimodal
    post = pb.posterior
    assert int((post.weights >= 0.2).sum()) >= 2
    field = _field(pb.prior)
    n = 400
    res = fd.inverse.sample_posterior(field, Matrix(pb.H), pb.y, sigma_y=pb.sigma_y, num_samples=n, nfe=1000,
                                      generator=torch.Generator().manual_seed(0))
    assert res.method == "smc" and res.x.shape == (n, 4) and res.nfe <= 1000 and res.vjp == 0
    assert mode_weight_tv(res.x, post) <= 0.05
    # mean and covariance within Monte Carlo error of n exact draws (generous: 5 standard errors)
    mean, cov = post.mean(), post.covariance()
    se = (cov.diagonal() / n).sqrt()
    assert torch.all((res.x.mean(0) - mean).abs() <= 5 * se + 0.05), (res.x.mean(0), mean)
    emp = torch.cov(res.x.T)
    assert torch.allclose(emp.diagonal(), cov.diagonal(), rtol=0.25, atol=0.1), (emp.diagonal(), cov.diagonal())


@pytest.mark.parametrize("m,schedule", [(2, "diffusion"), (3, "diffusion"), (3, "tempering")])
def test_smc_gaussian_prior_exact(m, schedule):
    g = torch.Generator().manual_seed(1)
    d = 5
    a = torch.randn(d, d, generator=g, dtype=F64)
    prior = Gaussian(torch.randn(d, generator=g, dtype=F64), a @ a.T / d + 0.3 * torch.eye(d, dtype=F64))
    H = torch.randn(m, d, generator=g, dtype=F64)
    y = torch.randn(m, generator=g, dtype=F64)
    post = linear_gaussian_posterior(prior, H, y, 0.2)
    n = 600
    res = fd.inverse.sample_posterior(_field(prior, "data"), Matrix(H), y, sigma_y=0.2, num_samples=n, nfe=600,
                                      generator=torch.Generator().manual_seed(2), schedule=schedule)
    assert res.info["schedule"] == schedule and res.nfe <= 600
    mean, cov = post.mean(), post.covariance()
    assert torch.all((res.x.mean(0) - mean).abs() <= 5 * (cov.diagonal() / n).sqrt())
    assert torch.allclose(torch.cov(res.x.T), cov, atol=0.15 * float(cov.diagonal().max()))


def test_smc_noiseless_hits_the_measurement(bimodal):
    pb = gmm_inverse_problem(4, 1, 0.0, num_modes=4, seed=3, multimodal=True, min_weight=0.2)
    res = fd.inverse.sample_posterior(_field(pb.prior), Matrix(pb.H), pb.y, sigma_y=0.0, num_samples=300, nfe=600,
                                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res.x @ pb.H.T, pb.y.expand(300, -1), atol=1e-8)
    assert mode_weight_tv(res.x, pb.posterior) <= 0.07


def test_smc_deterministic_with_generator_and_images():
    # image-shaped samples (1, 3, 3) through an inpainting operator's SVD
    prior = fd.testing.random_mixture(9, num_components=3, seed=4)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 0] = True
    op = Inpaint(mask)
    y = torch.randn(*op.out_shape, generator=torch.Generator().manual_seed(0), dtype=F64)

    def run(seed):
        return fd.inverse.sample_posterior(_field(prior), op, y, sigma_y=0.1, num_samples=6, nfe=60,
                                           generator=torch.Generator().manual_seed(seed)).x

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (6, 1, 3, 3) and a.dtype == F64
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_smc_float32_and_options(bimodal):
    pb = bimodal
    field = _field(pb.prior)
    y32 = pb.y.float()
    res = fd.inverse.sample_posterior(field, Matrix(pb.H.float()), y32, sigma_y=pb.sigma_y, num_samples=4, nfe=100,
                                      generator=torch.Generator().manual_seed(0), particles=5, groups=4)
    assert res.x.dtype == torch.float32 and res.info["particles"] == 5 and res.info["groups"] == 4
    assert res.nfe <= 100
    with pytest.raises(TypeError, match="unknown option"):
        fd.inverse.sample_posterior(field, Matrix(pb.H), pb.y, sigma_y=0.1, num_samples=2, nfe=50, bogus=1)
    with pytest.raises(ValueError, match="groups"):
        fd.inverse.sample_posterior(field, Matrix(pb.H), pb.y, sigma_y=0.1, num_samples=3, nfe=50, groups=2)
    with pytest.raises(ValueError, match="twist"):
        fd.inverse.sample_posterior(field, Matrix(pb.H), pb.y, sigma_y=0.1, num_samples=2, nfe=50, twist="x")


def test_tempered_smc_reaches_a_tail_posterior():
    # d = 8, two precise measurements, the posterior's modes lie far in the tails of two prior modes
    # (the case where the twisted diffusion schedule loses its particles): weights within 0.05.
    pb = gmm_inverse_problem(8, 2, 0.05, seed=0, multimodal=True)
    n = 300
    res = fd.inverse.sample_posterior(_field(pb.prior), Matrix(pb.H), pb.y, sigma_y=pb.sigma_y, num_samples=n,
                                      nfe=600, generator=torch.Generator().manual_seed(0), method="tempered-smc")
    assert res.info["schedule"] == "tempering" and res.nfe <= 600
    assert mode_weight_tv(res.x, pb.posterior) <= 0.06
    assert res.info["temperatures"] <= res.info["max_temps"] and min(res.info["accept"]) > 0.3


def test_tempering_plan_and_schedule_option(bimodal):
    for nfe in (200, 300, 1000, 5000):
        cfg = smc_module.tempering_plan(nfe, 100)
        spent = (cfg["prior_particles"] * (cfg["prior_steps"] + cfg["init_moves"] + 1) + 1 + cfg["particles"]
                 + cfg["particles"] * cfg["moves"] * cfg["max_temps"] + 1)
        assert spent <= nfe and cfg["prior_particles"] >= cfg["particles"] >= 2
    with pytest.raises(ValueError, match="too small"):
        smc_module.tempering_plan(30, 10)
    field = _field(bimodal.prior)
    run = fd.inverse.sample_posterior
    small = run(field, Matrix(bimodal.H), bimodal.y, sigma_y=0.1, num_samples=4, nfe=100, method="tempered-smc")
    assert small.info["schedule"] == "diffusion"  # the plan does not fit: the diffusion schedule
    # smc keeps the diffusion schedule at any budget unless asked (tempering lost on a trained image prior)
    assert run(field, Matrix(bimodal.H), bimodal.y, sigma_y=0.1, num_samples=2, nfe=400).info["schedule"] == "diffusion"
    with pytest.raises(ValueError, match="schedule must be"):
        run(field, Matrix(bimodal.H), bimodal.y, sigma_y=0.1, num_samples=2, nfe=400, schedule="x")
    with pytest.raises(TypeError, match="unknown option"):
        run(field, Matrix(bimodal.H), bimodal.y, sigma_y=0.1, num_samples=2, nfe=400, schedule="tempering", twist="flat")


# ----- TDS ----------------------------------------------------------------------------------

def test_tds_gaussian_prior_and_refusals():
    g = torch.Generator().manual_seed(5)
    d = 3
    prior = Gaussian(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64) * 2.0)
    H = torch.randn(1, d, generator=g, dtype=F64)
    y = torch.tensor([1.5], dtype=F64)
    post = linear_gaussian_posterior(prior, H, y, 0.3)
    n = 300
    res = fd.inverse.sample_posterior(_field(prior), Matrix(H), y, sigma_y=0.3, method="tds", num_samples=n, nfe=200,
                                      generator=torch.Generator().manual_seed(0))
    assert res.vjp > 0 and res.nfe <= 200
    cov = post.covariance()
    assert torch.all((res.x.mean(0) - post.mean()).abs() <= 5 * (cov.diagonal() / n).sqrt() + 0.05)
    with pytest.raises(ValueError, match="sigma_y > 0"):
        fd.inverse.sample_posterior(_field(prior), Matrix(H), y, sigma_y=0.0, method="tds", num_samples=2, nfe=50)


# ----- AFDPS ---------------------------------------------------------------------------------

def test_afdps_gaussian_prior_converges_and_refuses_noiseless():
    from flowdiff.inverse import afdps  # noqa: F401  (registers "afdps")

    g = torch.Generator().manual_seed(5)
    d = 3
    prior = Gaussian(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64) * 2.0)
    H = torch.randn(1, d, generator=g, dtype=F64)
    y = torch.tensor([1.5], dtype=F64)
    post = linear_gaussian_posterior(prior, H, y, 0.3)
    n = 500
    res = fd.inverse.sample_posterior(_field(prior), Matrix(H), y, sigma_y=0.3, method="afdps", num_samples=n,
                                      nfe=2000, generator=torch.Generator().manual_seed(0))
    assert res.nfe <= 2000 and res.x.shape == (n, d)
    cov = post.covariance()
    assert torch.all((res.x.mean(0) - post.mean()).abs() <= 5 * (cov.diagonal() / n).sqrt())
    assert torch.allclose(torch.cov(res.x.T).diagonal(), cov.diagonal(), rtol=0.2)
    with pytest.raises(ValueError, match="sigma_y > 0"):
        fd.inverse.sample_posterior(_field(prior), Matrix(H), y, sigma_y=0.0, method="afdps", num_samples=2, nfe=50)
