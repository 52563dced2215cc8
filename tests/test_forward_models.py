"""Learning a prior from indirect observations (flowdiff.forward_models): EM with an MMPS E-step.

Truth: the closed-form linear-Gaussian posterior (the E-step sampler with an exact Gaussian prior),
the Gaussian EM fit against the data's moments, and sliced-W2 to clean data on a 2-D mixture.
"""

import math

import pytest
import torch

import flowdiff as fd
from flowdiff import forward_models as fm


def _gaussian_problem():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = L @ L.T + 0.3 * torch.eye(3, dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return mean, cov


def test_posterior_sampler_is_exact_for_a_gaussian_prior():
    mean, cov = _gaussian_problem()
    path = fd.paths.Linear()
    prior = fd.testing.Gaussian(mean, cov, path=path)
    field = fd.Field(prior.model("data"), path, "data")
    g = torch.Generator().manual_seed(1)
    H = torch.randn(2, 3, generator=g, dtype=torch.float64)
    y = H @ prior.sample(1, generator=g)[0] + 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
    n = 6000
    obs = fm.ProjectedObservations(y.expand(n, 2).clone(), H, sigma_y=0.1)
    xs = fm.sample_posteriors(field, obs, steps=32, cg_iterations=2, generator=torch.Generator().manual_seed(2))
    post = fd.testing.linear_gaussian_posterior(prior, H, y, 0.1)
    pm, pc = post.means[0], post.covariances()[0]
    assert (xs.mean(0) - pm).norm() < 0.02
    assert (torch.cov(xs.T) - pc).norm() / pc.norm() < 0.05
    # one CG iteration for two rows is not the exact solve: a clearly larger error (the test can fail)
    xs1 = fm.sample_posteriors(field, obs, steps=32, cg_iterations=1, generator=torch.Generator().manual_seed(2))
    assert (xs1.mean(0) - pm).norm() > 0.03


@pytest.mark.parametrize("kind", ["mask", "projection"])
def test_gaussian_em_recovers_the_data_moments(kind):
    mean, cov = _gaussian_problem()
    x = fd.testing.Gaussian(mean, cov).sample(20000, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    if kind == "mask":
        obs = fm.MaskedObservations.simulate(x, missing=0.4, sigma_y=0.05, generator=g)
    else:
        obs = fm.ProjectedObservations.simulate(x, rows=1, sigma_y=0.0, generator=g)
    m, c = fm.fit_gaussian(obs, iterations=200)
    assert (m - mean).norm() < 0.08
    assert (c - cov).norm() / cov.norm() < 0.04
    s = fm.sample_gaussian_posteriors(m, c, obs, generator=torch.Generator().manual_seed(5))
    idx = torch.arange(len(obs))
    assert float(obs.residual(s, idx).abs().max()) < (0.5 if kind == "mask" else 1e-6)
    assert (torch.cov(s.T) - cov).norm() / cov.norm() < 0.05


def test_em_prior_beats_naive_training_on_a_ring_from_1d_projections():
    torch.manual_seed(0)
    ang = torch.arange(8) * 2 * math.pi / 8
    gm = fd.testing.GaussianMixture(torch.stack([2 * torch.cos(ang), 2 * torch.sin(ang)], 1),
                                    scales=torch.full((8, 2), 0.25))
    x = gm.sample(1000, generator=torch.Generator().manual_seed(0)).float()
    obs = fm.ProjectedObservations.simulate(x, rows=1, sigma_y=0.05, generator=torch.Generator().manual_seed(1))
    path = fd.paths.Linear()
    loss = fd.losses.GaussianPathLoss(path, "data", weighting="edm", time_sampler="logit-normal", sigma_data=1.5)

    def make():
        torch.manual_seed(0)
        return fd.nn.Preconditioned(fd.nn.MLP(2, hidden=64, depth=2), path, "data", sigma_data=1.5)

    res = fm.train_from_observations(make(), loss, obs, rounds=4, steps_per_round=150, first_round_steps=400,
                                     posterior_steps=16, batch_size=256)
    naive = make()
    ema = __import__("copy").deepcopy(naive).requires_grad_(False)
    fm.train_denoiser(naive, loss, obs.naive(), 1000, ema=ema, generator=torch.Generator().manual_seed(2))
    ref = gm.sample(2000, generator=torch.Generator().manual_seed(5)).float()

    def distance(model):
        x0 = path.prior_sample((2000, 2), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            xs = fd.sample(fd.Field(model, path, "data"), x0, nfe=16).x
        return float(fd.metrics.sliced_wasserstein(xs.double(), ref.double(), num_projections=128,
                                                   generator=torch.Generator().manual_seed(0)))

    em, nv = distance(res.ema_model), distance(ema)
    assert em < 0.6 * nv, (em, nv)
    assert [r["round"] for r in res.history] == [0, 1, 2, 3, 4]


def test_bad_input_is_named():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="missing"):
        fm.MaskedObservations.simulate(x, missing=1.5)
    with pytest.raises(TypeError, match="boolean"):
        fm.MaskedObservations(x, torch.ones(10, 4))
    with pytest.raises(ValueError, match="sigma_y"):
        fm.ProjectedObservations(torch.randn(10, 1), torch.randn(10, 1, 4), sigma_y=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        fm.ProjectedObservations(torch.full((10, 1), float("nan")), torch.randn(1, 4))
    with pytest.raises(ValueError, match="observe nothing"):
        fm.MaskedObservations(x, torch.zeros(10, 4, dtype=torch.bool))
    obs = fm.ProjectedObservations.simulate(x, rows=2)
    with pytest.raises(TypeError, match="GaussianPathLoss"):
        fm.train_from_observations(torch.nn.Linear(4, 4), lambda *a, **k: 0, obs)
    with pytest.raises(ValueError, match="steps"):
        fm.sample_posteriors(fd.Field(lambda x, t: x, fd.paths.Linear(), "data"), obs, steps=0)
