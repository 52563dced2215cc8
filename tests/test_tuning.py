"""Model-tuned time grids: valid grids, lower error than the default grid on a held-out batch
(against an independent fine reference), the evaluation budget, storage and the checks that
reject a grid tuned for another path, solver or NFE."""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.solvers import sample
from flowdiff.solvers.dpm_v3 import EMS
from flowdiff.solvers.tuning import (
    TunedGrid,
    grid_steps,
    load_grid,
    save_grid,
    tune_grid,
)

PATH = fd.paths.Discrete.linear()
MIX = fd.testing.random_mixture(8, 4, seed=7, anisotropic=True, path=PATH)


pytestmark = pytest.mark.usefixtures("one_thread")


def field() -> fd.Field:
    return fd.Field(MIX.model("noise"), PATH, "noise")


def noise(n: int, seed: int) -> torch.Tensor:
    return PATH.prior_sample((n, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def median_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x - ref) ** 2).mean(1).sqrt().median())


@pytest.fixture(scope="module")
def tuned() -> TunedGrid:
    return tune_grid(field(), "dpm-solver++2m", 6, noise(128, 0), max_evals=120, reference_nfe=128)


def test_tuned_grid_is_valid_and_beats_the_default_grid_on_held_out_noise(tuned):
    f = field()
    g = tuned.grid
    assert g.dtype == torch.float64 and g.ndim == 1
    assert len(g) == grid_steps(f, "dpm-solver++2m", 6) + 1 == 6
    assert (torch.diff(g) > 0).all()
    assert float(g[0]) == PATH.t_min and float(g[-1]) <= PATH.t_max
    # held-out starting points, an independent reference (exact ODE to 1e-7 by a 3rd-order solver, 600 calls)
    x_hold = noise(128, 99)
    ref = sample(f, x_hold, solver="dpm-solver++3m", nfe=600, grid="logsnr", solver_type="taylor").x
    res = sample(f, x_hold, **tuned.sample_kwargs(f))
    default = sample(f, x_hold, solver="dpm-solver++2m", nfe=6)
    assert res.nfe == default.nfe == 6
    assert median_rms(res.x, ref) < median_rms(default.x, ref)
    errors = tuned.errors
    assert errors["tuned"]["tune"] <= errors["initial"]["tune"]
    assert {"tune", "holdout"} <= errors["tuned"].keys()


def test_a_tuned_grid_is_a_grid_for_sample(tuned):
    """``fd.sample(grid=tuned)`` takes what ``tune_grid`` hands out: the same draws as its sample_kwargs."""
    f, x = field(), noise(16, 5)
    via_kwargs = sample(f, x, **tuned.sample_kwargs(f))
    direct = fd.sample(f, x, grid=tuned)
    assert direct.nfe == 6 and torch.equal(direct.x, via_kwargs.x)
    with pytest.raises(ValueError, match="tuned for solver"):
        fd.sample(f, x, solver="unipc", grid=tuned)
    with pytest.raises(ValueError, match="tuned for nfe=6"):
        fd.sample(f, x, nfe=8, grid=tuned)


def test_evaluation_budget_is_respected():
    tg = tune_grid(field(), "ddim", 5, noise(32, 1), max_evals=15, reference_nfe=64)
    assert tg.cost["objective_evals"] <= 15
    assert tg.cost["model_calls"] > 0
    assert len(tg.grid) == 5  # 4 steps + the final denoise


def test_save_load_and_the_checks(tuned, tmp_path):
    f = field()
    file = save_grid(tuned, tmp_path / "g" / "grid.safetensors")
    back = load_grid(file, f, "dpm-solver++2m", 6)
    assert torch.equal(back.grid, tuned.grid) and back.settings == tuned.settings
    with pytest.raises(ValueError, match="tuned for nfe=6"):
        load_grid(file, f, "dpm-solver++2m", 8)
    with pytest.raises(ValueError, match="tuned for solver"):
        back.sample_kwargs(f, solver="unipc")
    other = fd.Field(MIX.with_path(fd.paths.VP()).model("noise"), fd.paths.VP(), "noise")
    with pytest.raises(ValueError, match="tuned on the path"):
        back.sample_kwargs(other)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        load_grid(tmp_path / "junk.safetensors")
    # an EMS file is not a grid file
    ems_file = EMS.degenerate(PATH, (8,)).save(tmp_path / "ems.safetensors")
    with pytest.raises(ValueError, match="not a flowdiff tuned-grid file"):
        load_grid(ems_file)


def test_other_solvers_and_fields():
    f = field()
    # a two-evaluation Runge-Kutta solver, the grid end pinned
    tg = tune_grid(f, "heun", 9, noise(16, 2), max_evals=20, reference_nfe=64, free_end=False)
    assert len(tg.grid) == grid_steps(f, "heun", 9) + 1 and float(tg.grid[-1]) == PATH.t_max
    assert sample(f, noise(4, 3), **tg.sample_kwargs(f)).nfe <= 9
    # DPM-Solver-v3 with its statistics passed through options
    ems = EMS.degenerate(PATH, (8,))
    tg = tune_grid(f, "dpm-solver-v3", 6, noise(16, 4), options={"ems": ems}, max_evals=20, reference_nfe=64)
    assert tg.settings["options"]["ems"]["knots"] == 2
    assert sample(f, noise(4, 5), **tg.sample_kwargs(f), ems=ems).nfe == 6
    # a stochastic interpolant: the grid is parametrised in t
    target = fd.testing.random_mixture(2, 2, seed=0, path=fd.paths.VP())
    interp = fd.paths.StochasticInterpolant("one-sided-linear", gamma="zero")
    oracle = fd.testing.InterpolantOracle(interp, None, target)
    ifield = fd.InterpolantField(oracle.model("velocity"), interp, prediction="velocity")
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tg = tune_grid(ifield, "euler", 6, x0, max_evals=20, reference_nfe=64)
    g = tg.grid
    assert (torch.diff(g) > 0).all() and float(g[0]) == interp.t_min and float(g[-1]) == interp.t_max


def test_bad_input_is_rejected():
    f = field()
    x = noise(8, 0)
    with pytest.raises(ValueError, match="stochastic"):
        tune_grid(f, "euler-maruyama", 6, x)
    with pytest.raises(ValueError, match="adaptive"):
        tune_grid(f, "dopri5", 6, x)
    with pytest.raises(ValueError, match="unknown solver"):
        tune_grid(f, "no-such-solver", 6, x)
    with pytest.raises(ValueError, match="source"):
        tune_grid(f, "ddim", 6, x, source="prior")
    with pytest.raises(ValueError, match="metric"):
        tune_grid(f, "ddim", 6, x, metric="max")
    with pytest.raises(ValueError, match="nfe"):
        tune_grid(f, "ddim", 0, x)
    with pytest.raises(TypeError, match="data_or_noise"):
        tune_grid(f, "ddim", 6, [1.0, 2.0])


# ---------------------------------------------------------------------------------------
# tune_solver: tuned-multistep coefficients and steps
# ---------------------------------------------------------------------------------------


def test_untuned_multistep_is_dpm_solver_pp_2m_taylor():
    f = field()
    x = noise(16, 3)
    for nfe in (3, 6):
        a = sample(f, x, solver="tuned-multistep", nfe=nfe, grid="logsnr", coefficients=None)
        b = sample(f, x, solver="dpm-solver++2m", nfe=nfe, grid="logsnr", solver_type="taylor", lower_order_final=False)
        assert a.nfe == b.nfe == nfe
        torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-12)


def test_tuned_multistep_final_weights_use_the_history():
    f = field()
    x = noise(8, 4)
    plain = sample(f, x, solver="tuned-multistep", nfe=4, grid="logsnr", coefficients=None)
    # 3 steps, history 3: 0 + 1 + 2 step coefficients, 3 final weights; w_1 = 1 doubles the last difference
    res = sample(f, x, solver="tuned-multistep", nfe=4, grid="logsnr", coefficients=None, final_weights=[1.0, 0.0, 0.0])
    assert res.nfe == 4
    assert not torch.allclose(res.x, plain.x)
    with pytest.raises(ValueError, match="needs 3 final_weights"):
        sample(f, x, solver="tuned-multistep", nfe=4, grid="logsnr", coefficients=None, final_weights=[1.0])
    with pytest.raises(ValueError, match="needs 3 coefficients"):
        sample(f, x, solver="tuned-multistep", nfe=4, grid="logsnr", coefficients=[0.0])
    with pytest.raises(ValueError, match="finite"):
        sample(f, x, solver="tuned-multistep", nfe=4, grid="logsnr", coefficients=None, final_weights=[float("nan"), 0.0, 0.0])
    with pytest.raises(TypeError, match="sequence"):
        sample(f, x, solver="tuned-multistep", nfe=4, grid="logsnr", coefficients=None, final_weights=3.0)


@pytest.fixture(scope="module")
def tuned_solver() -> TunedGrid:
    from flowdiff.solvers.tuning import tune_solver

    return tune_solver(field(), 4, noise(64, 5), max_evals=150, reference_nfe=128, time_budget=60)


def test_tune_solver_beats_the_default_solvers_on_held_out_noise(tuned_solver, tmp_path):
    f = field()
    x_hold = noise(128, 98)
    ref = sample(f, x_hold, solver="dpm-solver++3m", nfe=600, grid="logsnr", solver_type="taylor").x
    kwargs = tuned_solver.sample_kwargs(f)
    assert kwargs["solver"] == "tuned-multistep" and len(kwargs["final_weights"]) == 3
    res = sample(f, x_hold, **kwargs)
    assert res.nfe == 4
    ours = median_rms(res.x, ref)
    for solver in ("dpm-solver++2m", "unipc"):
        assert ours < 0.7 * median_rms(sample(f, x_hold, solver=solver, nfe=4).x, ref)
    assert tuned_solver.cost["model_calls"] > 0 and tuned_solver.settings["chosen"] == "tuned"
    # stored and reloaded with its coefficients
    back = load_grid(save_grid(tuned_solver, tmp_path / "solver.safetensors"), f, "tuned-multistep", 4)
    torch.testing.assert_close(sample(f, x_hold, **back.sample_kwargs(f)).x, res.x)
    # grid=tuned alone carries the tuned coefficients too (not a silently untuned solver)
    torch.testing.assert_close(sample(f, x_hold, grid=back).x, res.x)


def test_tune_solver_rejects_bad_input():
    from flowdiff.solvers.tuning import tune_solver

    with pytest.raises(ValueError, match="nfe"):
        tune_solver(field(), 1, noise(8, 0))
    with pytest.raises(TypeError, match="floating-point"):
        tune_solver(field(), 4, torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="metric"):
        tune_solver(field(), 4, noise(8, 0), metric="max")
