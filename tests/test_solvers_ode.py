"""Runge–Kutta ODE solvers and the sample() framework: orders against closed-form flow maps,
interpolants, dopri5, NFE accounting for every registered solver, errors and non-finite states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.solvers import (
    NonFiniteStateError,
    SampleResult,
    available,
    get_solver,
    make_grid,
    register_solver,
    sample,
)

VP = fd.paths.VP()
MEAN = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
SCALES = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
GAUSS = fd.testing.GaussianMixture(MEAN[None], scales=SCALES[None], path=VP)
FIELD = fd.Field(GAUSS.model("noise"), VP, "noise")
X0 = VP.prior_sample((16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def flow_map(x: torch.Tensor, s: float, t: float, alpha, sigma, mean=MEAN, scales=SCALES) -> torch.Tensor:
    """Exact PF-ODE flow map of N(mean, diag(scales²)) for x_t = α x1 + σ ε."""
    a0, a1, s0, s1 = alpha(s), alpha(t), sigma(s), sigma(t)
    var0, var1 = a0**2 * scales**2 + s0**2, a1**2 * scales**2 + s1**2
    return a1 * mean + (var1 / var0).sqrt() * (x - a0 * mean)


def vp_flow(x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    return flow_map(x, s, t, lambda u: VP.alpha(torch.tensor(u, dtype=torch.float64)),
                    lambda u: VP.sigma(torch.tensor(u, dtype=torch.float64)))


def rms_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x - ref) ** 2).mean(1).sqrt().median())


# ----- orders --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,order,space",
    [("euler", 1, "t"), ("midpoint", 2, "t"), ("heun", 2, "t"), ("rk4", 4, "t"),
     ("euler", 1, "sigma"), ("heun", 2, "sigma"), ("rk4", 4, "sigma")],
)
def test_convergence_order(solver: str, order: int, space: str) -> None:
    steps = [8, 16, 32] if solver == "rk4" else [16, 32, 64]
    errors = []
    for n in steps:
        res = sample(FIELD, X0, solver=solver, grid=make_grid(VP, "logsnr", n), denoise_final=False, space=space)
        assert res.nfe == n * get_solver(solver).evals_per_step
        errors.append(rms_error(res.x, vp_flow(X0, res.t_start, res.t_end)))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3 or (order >= 2 and order - 0.3 < slope < order + 1.2), (errors, slope)


def test_euler_in_sigma_space_is_ddim() -> None:
    """Euler on dx̃/dσ̃ = (x̃ − x̂)/σ̃ is DDIM (Karras et al. 2022; Song et al. 2021)."""
    grid = make_grid(VP, "karras", 9)
    a = sample(FIELD, X0, solver="euler", grid=grid, space="sigma").x
    b = sample(FIELD, X0, solver="ddim", grid=grid).x
    assert torch.allclose(a, b, atol=1e-10)


# ----- stochastic interpolants --------------------------------------------------------------


def test_one_sided_linear_interpolant_flow_map() -> None:
    """x_t = (1 − t) x0 + t x1 with x0 ~ N(0, I), γ = 0: the flow map of a Gaussian target is
    x_t = tμ + (Σ_t/Σ_s)^{1/2}(x_s − sμ), Σ_t = (1 − t)² + t²c²."""
    si = fd.paths.StochasticInterpolant("one-sided-linear", "zero")
    target = fd.testing.GaussianMixture(MEAN[None], scales=SCALES[None])
    oracle = fd.testing.InterpolantOracle(si, None, target)
    field = fd.InterpolantField(oracle.model("velocity"), si, prediction="velocity")
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (1 - si.t_min)
    for solver, n, tol in (("rk4", 160, 1e-6), ("heun", 160, 5e-4), ("midpoint", 160, 1e-5)):
        res = sample(field, x, solver=solver, nfe=n, denoise_final=False)
        exact = flow_map(x, res.t_start, res.t_end, lambda u: torch.tensor(u, dtype=torch.float64),
                         lambda u: torch.tensor(1 - u, dtype=torch.float64))
        assert rms_error(res.x, exact) < tol, solver
        assert res.nfe == n


def test_two_sided_interpolant_reaches_the_target() -> None:
    """Linear interpolant with Brownian γ between two Gaussians: a converged PF-ODE solve maps
    exact base draws to the target (mean and covariance within sampling error)."""
    si = fd.paths.StochasticInterpolant("linear", "brownian")
    base = fd.testing.GaussianMixture(torch.tensor([[2.0, -1.0]]), scales=torch.tensor([[0.5, 1.0]]))
    target = fd.testing.GaussianMixture(torch.tensor([[-1.0, 1.5]]), scales=torch.tensor([[0.3, 0.8]]))
    oracle = fd.testing.InterpolantOracle(si, base, target)
    field = fd.InterpolantField(oracle.model("drift"), si)
    n = 4000
    g = torch.Generator().manual_seed(2)
    x0, x1 = base.sample(n, generator=g), target.sample(n, generator=g)
    x_init = si.sample(x0, x1, si.t_min, generator=g).x_t  # exact marginal at t_min
    out = sample(field, x_init, solver="rk4", nfe=41).x
    se = (target.covariance().diagonal().sqrt() / math.sqrt(n)).double()
    assert ((out.mean(0) - target.mean()).abs() < 5 * se + 2e-3).all()
    assert torch.allclose(torch.cov(out.T), target.covariance(), atol=0.06)


def test_velocity_prediction_with_score_counts_two_calls() -> None:
    """An InterpolantField predicting v needs its score model for b = v − γγ̇s: 2 calls/evaluation."""
    si = fd.paths.StochasticInterpolant("linear", "brownian")
    gm = fd.testing.GaussianMixture(torch.zeros(1, 2), scales=torch.ones(1, 2))
    oracle = fd.testing.InterpolantOracle(si, gm, gm)
    field = fd.InterpolantField(oracle.model("velocity"), si, "velocity", oracle.model("score"), "score")
    res = sample(field, torch.randn(8, 2, dtype=torch.float64), solver="heun", nfe=12)
    # (12 − 2 calls for the final step) / 2 calls = 5 evaluations: one Euler + two Heun steps
    assert res.nfe == 12 and res.steps == 3


# ----- dopri5 ---------------------------------------------------------------------------------


def test_dopri5_tolerance_cap_and_interval() -> None:
    seen: list[float] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.extend(t.tolist())
        return GAUSS.noise(x, t)

    field = fd.Field(model, VP, "noise")
    errs = []
    for tol in (1e-4, 1e-7):
        res = sample(field, X0, solver="dopri5", rtol=tol, atol=tol, t_start=0.1, t_end=0.95, denoise_final=False)
        errs.append(rms_error(res.x, vp_flow(X0, 0.1, 0.95)))
        assert res.grid[0] == 0.1 and res.grid[-1] == 0.95 and (torch.diff(res.grid) > 0).all()
    assert errs[1] < 1e-5 and errs[1] < errs[0] / 20
    assert min(seen) >= 0.1 - 1e-12 and max(seen) <= 0.95 + 1e-12  # never outside [t_start, t_end]
    res = sample(field, X0, solver="dopri5", nfe=60, rtol=1e-3, atol=1e-3)
    assert res.nfe <= 60
    with pytest.raises(RuntimeError, match="budget of 9"):
        sample(field, X0, solver="dopri5", nfe=10, rtol=1e-10, atol=1e-10)


# ----- sample(): budget, results, callbacks ---------------------------------------------------


@pytest.mark.parametrize("solver", available())
@pytest.mark.parametrize("nfe", [5, 8, 13])
def test_nfe_budget_respected_for_every_solver(solver: str, nfe: int) -> None:
    spec = get_solver(solver)
    if spec.required_options or solver == "dpm-solver-v3":
        pytest.skip(f"{solver} needs {spec.required_options or 'its statistics'}; tested in its own file")
    mix = fd.testing.random_mixture(3, 2, seed=3, path=VP)
    field = fd.Field(mix.model("noise"), VP, "noise")
    x = VP.prior_sample((6, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    if spec.adaptive:
        res = sample(field, x, solver=solver, nfe=200 + nfe, rtol=1e-2, atol=1e-2)
        assert res.nfe <= 200 + nfe
        return
    try:
        res = sample(field, x, solver=solver, nfe=nfe, generator=torch.Generator().manual_seed(5))
    except ValueError as err:  # a solver whose smallest run does not fit says so
        assert "too small" in str(err) and f"nfe={nfe}" in str(err)
        return
    assert isinstance(res, SampleResult) and torch.isfinite(res.x).all()
    if spec.kind == "sde":
        assert res.nfe <= nfe
    else:
        assert res.nfe == nfe, (solver, res.nfe)
    assert field.nfe == res.nfe


def test_result_trajectory_and_callback() -> None:
    calls = []
    res = sample(FIELD, X0, solver="unipc", nfe=8, return_trajectory=True,
                 callback=lambda i, t, x, d: calls.append((i, t)))
    assert res.steps == 7 and len(res.trajectory) == 8 and len(calls) == 7
    assert [c[0] for c in calls] == list(range(7))
    assert torch.allclose(torch.tensor([c[1] for c in calls], dtype=torch.float64), res.grid[1:])
    assert res.trajectory[0] is X0 and torch.equal(res.trajectory[-1], res.state)
    assert res.denoised is res.x and res.nfe_budget == 8
    nodenoise = sample(FIELD, X0, solver="unipc", nfe=8, denoise_final=False)
    assert nodenoise.denoised is None and nodenoise.steps == 8 and torch.equal(nodenoise.x, nodenoise.state)


def test_default_solver_on_gaussian_paths_and_interpolants() -> None:
    # UniPC at every budget on a Gaussian path (issue 12: measured on trained models, solvers_trained.md)
    assert sample(FIELD, X0, nfe=6).solver == "unipc"
    assert sample(FIELD, X0, nfe=16).solver == "unipc"
    si = fd.paths.StochasticInterpolant("linear", "brownian")
    gm = fd.testing.GaussianMixture(torch.zeros(1, 3), scales=torch.ones(1, 3))
    f = fd.InterpolantField(fd.testing.InterpolantOracle(si, gm, gm).model("drift"), si)
    assert sample(f, torch.randn(4, 3, dtype=torch.float64), nfe=9).solver == "heun"


def test_conditioning_is_forwarded() -> None:
    seen = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(y)
        return GAUSS.noise(x, t)

    sample(fd.Field(model, VP, "noise"), X0, solver="dpm-solver-2s", nfe=5, cond={"y": torch.ones(32)})
    assert len(seen) == 5 and all(s is not None for s in seen)


# ----- bad input and non-finite states --------------------------------------------------------


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="unknown solver 'rk45'.*ddim.*euler"):
        sample(FIELD, X0, solver="rk45", nfe=5)
    with pytest.raises(ValueError, match="nfe=0"):
        sample(FIELD, X0, solver="euler", nfe=0)
    with pytest.raises(ValueError, match="nfe=1 is too small"):
        sample(FIELD, X0, solver="euler", nfe=1)
    with pytest.raises(ValueError, match="t_start=0.6, t_end=0.4"):
        sample(FIELD, X0, solver="euler", nfe=5, t_start=0.6, t_end=0.4)
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(FIELD, X0, solver="euler", grid=[0.0, 0.5, 0.3, 0.999])
    with pytest.raises(ValueError, match="unknown grid 'log'"):
        sample(FIELD, X0, solver="euler", nfe=5, grid="log")
    with pytest.raises(ValueError, match="safe interval"):
        sample(fd.Field(GAUSS.model("noise"), fd.paths.Linear(), "noise"), X0, solver="euler", nfe=5, t_start=0.0)
    with pytest.raises(ValueError, match="more than nfe=4"):
        sample(FIELD, X0, solver="heun", grid=make_grid(VP, "karras", 5), nfe=4)
    with pytest.raises(ValueError, match=r"order must be an integer in \[1, 3\], got order=5"):
        sample(FIELD, X0, solver="unipc", nfe=5, order=5)
    with pytest.raises(ValueError, match="variant 'bh3'"):
        sample(FIELD, X0, solver="unipc", nfe=5, variant="bh3")
    with pytest.raises(ValueError, match="fixes order=2"):
        sample(FIELD, X0, solver="dpm-solver++2m", nfe=5, order=3)
    with pytest.raises(ValueError, match="space 'x'"):
        sample(FIELD, X0, solver="heun", nfe=5, space="x")
    with pytest.raises(TypeError, match="x_init must be a torch.Tensor"):
        sample(FIELD, [1.0, 2.0], solver="euler", nfe=5)
    with pytest.raises(ValueError, match="already registered"):
        register_solver("euler", lambda *a, **k: a[1], kind="ode")
    with pytest.raises(ValueError, match="unknown solver kind 'pde'"):
        register_solver("new-one", lambda *a, **k: a[1], kind="pde")


@pytest.mark.parametrize("solver", ["euler", "rk4", "ddim", "unipc", "dpm-solver-3s", "dpm-solver++3m", "deis"])
def test_non_finite_state_is_reported_with_step_and_time(solver: str) -> None:
    calls = {"n": 0}

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = GAUSS.noise(x, t)
        return out * math.inf if calls["n"] >= 4 else out

    with pytest.raises(NonFiniteStateError, match=r"step \d+ \(t=") as info:
        sample(fd.Field(model, VP, "noise"), X0, solver=solver, nfe=12)
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, ValueError)


def test_a_budget_short_of_one_full_runge_kutta_step_warns() -> None:
    """rk4 --nfe 3 is one step of a lower-order rule (the budget is spent exactly): a warning says so."""
    with pytest.warns(UserWarning, match="ONE step of the 2-stage rule"):
        res = sample(FIELD, X0, solver="rk4", nfe=3)  # 2 evaluations + the final denoise
    assert res.nfe == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sample(FIELD, X0, solver="rk4", nfe=5).nfe == 5  # one full 4-stage step: no warning
