"""LML (Wang et al. 2025): the correction against its closed form, kappa = 0 is the identity (float64),
the step hook's bookkeeping, the damping table and bad input."""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.solvers.lml import RELEASED_DAMPING, LMLCorrection, lml_damping, lml_direction, lml_sample
from flowdiff.testing import random_mixture

F64 = torch.float64


def _problem(batch: int = 32, dim: int = 6):
    path = fd.paths.VP()
    mixture = random_mixture(dim, 3, seed=0).with_path(path)
    x = path.prior_sample((batch, dim), torch.Generator().manual_seed(0), F64)
    return path, mixture, x


def test_direction_is_the_damped_low_rank_inverse():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 2, 5, dtype=F64, generator=g)
    d_prev = torch.randn(3, 2, 5, dtype=F64, generator=g)
    kappa, damping = 0.3, 0.7
    out = lml_direction(d, d_prev, kappa, damping)
    for b in range(3):
        e = (kappa * d_prev[b] + (1 - kappa) * d[b]).reshape(-1)
        v = d[b].reshape(-1)
        solved = damping * torch.linalg.solve(damping * torch.eye(10, dtype=F64) + torch.outer(e, e), v)
        solved = solved * v.norm() / solved.norm()
        assert torch.allclose(out[b].reshape(-1), solved, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.reshape(3, -1).norm(dim=1), d.reshape(3, -1).norm(dim=1))
    # a factor orthogonal to d leaves it alone; a zero increment stays zero
    e_orth = torch.tensor([[0.0, 1.0]], dtype=F64)
    dd = torch.tensor([[2.0, 0.0]], dtype=F64)
    assert torch.allclose(lml_direction(dd, e_orth, 1.0, 1e-3), dd)
    assert torch.equal(lml_direction(torch.zeros(2, 3), None, 0.5, 1e-3), torch.zeros(2, 3))
    assert lml_direction(d.float(), None, 0.5, 1e-3).dtype == torch.float32


@pytest.mark.parametrize("solver", ["dpm-solver++3m", "dpm-solver-3m", "ddim", "dpm-solver++2m"])
def test_kappa_zero_is_the_identity_in_float64(solver):
    """The released default: e = d gives d λ/(λ + |d|²), renormalised back to d. The formula's own
    cancellation leaves ~1e-16·|d|²/λ relative per step (7.6e-12 at most in noise form here, where
    |d| is large at the first steps), hence the tolerance."""
    path, mixture, x = _problem()
    prediction = "noise" if solver == "dpm-solver-3m" else "data"
    field = fd.Field(mixture.model(prediction), path, prediction)
    plain = fd.sample(field, x, solver=solver, nfe=8)
    res = lml_sample(field, x, solver=solver, nfe=8, kappa=0.0)
    assert torch.allclose(res.x, plain.x, rtol=1e-8, atol=1e-9)
    assert max(res.options["lml_deviation"]) < 1e-10
    assert res.options["lml_form"] == ("noise" if solver == "dpm-solver-3m" else "data")
    assert res.options["lml_damping"] == lml_damping(8) and res.nfe == plain.nfe


def test_positive_kappa_changes_the_steps_as_the_formula_says():
    """κ > 0: the hook's result equals a hand-written loop applying the formula to the solver's increments."""
    path, mixture, x = _problem(batch=8)
    field = fd.Field(mixture.model("noise"), path, "noise")
    kappa, damping = 0.2, 5.0
    res = lml_sample(field, x, solver="ddim", nfe=6, kappa=kappa, damping=damping, denoise_final=False)
    assert max(res.options["lml_deviation"]) > 1e-3
    times = res.grid.tolist()
    tab = path.table(times)
    y, d_prev = x, None
    for i in range(len(times) - 1):
        t = torch.full((8,), times[i], dtype=F64)
        x_hat = field.denoise(y, t)
        ratio = float(tab.sigma[i + 1] / tab.sigma[i])
        d = float(tab.alpha[i + 1]) * (1 - ratio * float(tab.alpha[i] / tab.alpha[i + 1])) * x_hat  # α_t(1 − e^{−h}) x̂
        y = ratio * y + lml_direction(d, d_prev, kappa, damping)
        d_prev = d
    assert torch.allclose(res.x, y, rtol=1e-9, atol=1e-10)


def test_hook_chains_another_step_hook_and_follows_resampling():
    path, mixture, x = _problem(batch=6)
    field = fd.Field(mixture.model("data"), path, "data")
    seen = []

    def resample(state):
        seen.append(state.i)
        return state.resample(torch.arange(6).flip(0)) if state.i == 1 else None

    res = lml_sample(field, x, solver="dpm-solver++2m", nfe=5, kappa=0.1, damping=1.0,
                     hooks=fd.solvers.Hooks(step=resample))
    assert seen == [0, 1, 2, 3] and torch.isfinite(res.x).all() and res.log_weights is not None


def test_damping_schedule_and_bad_input():
    assert lml_damping(5) == 8e-4 and lml_damping(6) == 8e-4 and lml_damping(8) == 1e-3 and lml_damping(10) == 8e-4
    assert lml_damping(15) == 1e-3 and lml_damping(20) == 5e-4 and lml_damping(1000) == 5e-5 and lml_damping(2) == 8e-4
    assert set(RELEASED_DAMPING) == {5, 7, 10, 12, 20, 30, 50, 100}
    path, mixture, x = _problem(batch=4)
    field = fd.Field(mixture.model("data"), path, "data")
    with pytest.raises(ValueError, match="kappa"):
        lml_sample(field, x, kappa=1.5)
    with pytest.raises(ValueError, match="damping"):
        lml_sample(field, x, kappa=0.1, damping=0.0)
    with pytest.raises(ValueError, match="deterministic exponential"):
        lml_sample(field, x, solver="sde-dpm-solver++2", kappa=0.1)
    with pytest.raises(ValueError, match="deterministic exponential"):
        lml_sample(field, x, solver="heun", kappa=0.1)
    with pytest.raises(ValueError, match="form"):
        LMLCorrection(path, x, 0.0, form="velocity")
    with pytest.raises(ValueError, match="nfe"):
        lml_damping(0)
