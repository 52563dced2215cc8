"""Samplers: time grids, one sampling loop with hooks, and ODE, exponential and SDE steps behind :func:`sample`.

>>> res = fd.sample(field, x_init, solver="dpm-solver++", nfe=10)   # doctest: +SKIP
>>> fd.solvers.available()                                          # doctest: +SKIP
>>> hooks = fd.solvers.Hooks(denoiser=guide)                        # doctest: +SKIP

See :mod:`flowdiff.solvers.base` for the solver contract (a solver is a step) and
:mod:`flowdiff.solvers.loop` for the loop, the budget and the hooks.
"""

from __future__ import annotations

from ..paths import PathTable
from .base import (
    DEFAULT_INTERPOLANT_SOLVER, DEFAULT_SOLVER, LOW_NFE, LOW_NFE_SOLVER, SOLVER_KINDS, GaussianEvaluator,
    NonFiniteStateError, SampleResult, Solver, SolverSpec, available, default_solver, get_solver, register_solver
)
from .grids import GRID_KINDS, jump_grid, make_grid, validate_grid
from .loop import Hooks, LoopState, Transition, sample

from . import ode, exponential, sde, dpm_v3  # noqa: E402, F401, I001  (they register their solvers)
from .ems import EMS, estimate_ems  # noqa: E402
from .tuning import TunedGrid, load_grid, save_grid, tune_grid, tune_solver  # noqa: E402
from . import lml  # noqa: E402  (LML's Levenberg-Marquardt step correction, a step hook; issue 18)
from .restart import renoise, restart_sample  # noqa: E402  (Restart sampling, Xu et al. 2023)

__all__ = [
    "lml", "renoise", "restart_sample", "EMS", "TunedGrid", "estimate_ems", "jump_grid", "load_grid", "save_grid", "tune_grid", "tune_solver", "DEFAULT_INTERPOLANT_SOLVER",
    "DEFAULT_SOLVER", "GRID_KINDS", "LOW_NFE", "LOW_NFE_SOLVER", "SOLVER_KINDS", "GaussianEvaluator", "Hooks",
    "LoopState", "NonFiniteStateError", "PathTable", "SampleResult", "Solver", "SolverSpec", "Transition",
    "available", "default_solver", "get_solver", "make_grid", "register_solver", "sample", "validate_grid"
]
