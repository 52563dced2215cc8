"""fd.inverse.sample_posterior: one clear error per bad input, evaluations counted per returned sample."""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.testing import gmm_inverse_problem


@pytest.fixture(scope="module")
def problem():
    p = gmm_inverse_problem(4, 1, 0.1, num_modes=4, seed=0)
    field = fd.Field(p.model("noise"), p.path, "noise")
    return p, field, fd.inverse.Matrix(p.H)


def test_every_listed_method_runs_and_counts(problem):
    p, field, op = problem
    for method in fd.inverse.available():
        sigma = 0.0 if fd.inverse.describe(method).noiseless_only else p.sigma_y
        res = fd.inverse.sample_posterior(field, op, p.y, sigma_y=sigma, method=method, num_samples=3, nfe=40,
                                          generator=torch.Generator().manual_seed(0))
        assert res.x.shape == (3, 4) and torch.isfinite(res.x).all(), method
        assert 0 < res.nfe <= 41, (method, res.nfe)


def test_bad_inputs_one_error_each(problem):
    p, field, op = problem
    run = fd.inverse.sample_posterior
    with pytest.raises(ValueError, match=r"y has shape \(2,\)"):
        run(field, op, torch.zeros(2, dtype=torch.float64), sigma_y=0.1)
    with pytest.raises(ValueError, match="sigma_y must be a finite number >= 0, got -0.1"):
        run(field, op, p.y, sigma_y=-0.1)
    with pytest.raises(ValueError, match="non-finite"):
        run(field, op, torch.full_like(p.y, float("nan")), sigma_y=0.1)
    with pytest.raises(ValueError, match="unknown posterior method 'magic'"):
        run(field, op, p.y, sigma_y=0.1, method="magic")
    nonlinear = fd.inverse.Nonlinear(lambda x: x[:, :1] ** 2, (4,), (1,))
    with pytest.raises(ValueError, match="needs a linear operator"):
        run(field, nonlinear, p.y, sigma_y=0.1, method="ddrm")
    wrong = fd.inverse.Matrix(torch.randn(1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"in_shape \(6,\)"):
        run(field, wrong, p.y, sigma_y=0.1, method="dps", nfe=4)
