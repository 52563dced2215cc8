"""fd.sample(..., return_logp=True): the log-density of each sample, checked against closed form."""

import pytest
import torch

import flowdiff as fd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_return_logp_matches_the_exact_marginal():
    """With the oracle's exact p_{t_min} as prior, log p of the ODE end point is log p_{t_max} in closed form."""
    path = fd.paths.VP()
    oracle = fd.testing.random_mixture(3, 3, seed=2, path=path)
    field = fd.Field(oracle.model("noise"), path, "noise")
    g = torch.Generator().manual_seed(0)
    x0 = path.prior_sample((64, 3), generator=g, dtype=torch.float64)
    t0 = torch.tensor(path.t_min, dtype=torch.float64)
    prior = lambda z: oracle.log_prob_t(z, t0.expand(len(z)))  # noqa: E731
    res = fd.sample(field, x0, nfe=97, return_logp=True, prior=prior)
    assert res.nfe <= 97 and res.log_prob.shape == (64,) and res.logp is res.log_prob
    exact = oracle.log_prob_t(res.state, torch.full((64,), path.t_max, dtype=torch.float64))
    assert float((res.log_prob - exact).abs().mean()) < 1e-3
    assert torch.allclose(res.x, field.denoise(res.state, path.t_max))


def test_return_logp_rejects_solvers_without_a_density():
    path = fd.paths.Linear()
    field = fd.Field(fd.testing.random_mixture(2, 2, path=path).model("velocity"), path, "velocity")
    x0 = path.prior_sample((4, 2), dtype=torch.float64)
    with pytest.raises(ValueError, match="return_logp"):
        fd.sample(field, x0, solver="dpm-solver++", nfe=10, return_logp=True)


def test_return_logp_with_dopri5_and_an_option_typo():
    """dopri5 (per-sample steps) returns the interval as its grid; a misspelt option names the valid ones."""
    path = fd.paths.VP()
    oracle = fd.testing.random_mixture(2, 2, seed=3, path=path)
    field = fd.Field(oracle.model("noise"), path, "noise")
    x0 = path.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prior = lambda z: oracle.log_prob_t(z, torch.full((len(z),), path.t_min, dtype=torch.float64))  # noqa: E731
    res = fd.sample(field, x0, solver="dopri5", return_logp=True, prior=prior, rtol=1e-7, atol=1e-7)
    assert res.grid.tolist() == [path.t_min, path.t_max]
    exact = oracle.log_prob_t(res.state, torch.full((16,), path.t_max, dtype=torch.float64))
    assert float((res.log_prob - exact).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="probes"):
        fd.sample(field, x0, return_logp=True, probe=4)


def test_return_logp_with_the_adaptive_solver_and_atol_in_nats():
    """solver='adaptive' generates with per-sample steps; atol is the requested error in nats."""
    path = fd.paths.VP()
    oracle = fd.testing.random_mixture(3, 3, seed=4, path=path)
    field = fd.Field(oracle.model("noise"), path, "noise")
    x0 = path.prior_sample((32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0 = torch.tensor(path.t_min, dtype=torch.float64)
    prior = lambda z: oracle.log_prob_t(z, t0.expand(len(z)))  # noqa: E731
    errors = []
    for atol in (1e-2, 1e-4):
        res = fd.sample(field, x0, return_logp=True, solver="adaptive", atol=atol, prior=prior, denoise_final=False)
        exact = oracle.log_prob_t(res.state, torch.full((32,), path.t_max, dtype=torch.float64))
        errors.append(float((res.log_prob - exact).abs().mean()))
        assert errors[-1] < atol
    assert errors[1] < errors[0] / 10
