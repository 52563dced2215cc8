"""Samplers: time grids, ODE solvers, exponential integrators and SDE solvers behind one :func:`sample`.

>>> res = fd.sample(field, x_init, solver="dpm-solver++", nfe=10)   # doctest: +SKIP
>>> fd.solvers.available()                                          # doctest: +SKIP

See :mod:`flowdiff.solvers.base` for the solver contract and the NFE accounting.
"""

from __future__ import annotations

from .base import (
    SOLVER_KINDS,
    GaussianEvaluator,
    NonFiniteStateError,
    PathTable,
    SampleResult,
    SolverSpec,
    available,
    get_solver,
    register_solver,
    sample,
)
from .grids import GRID_KINDS, make_grid, validate_grid

#: Solver sample() uses on a Gaussian path when none is named.
DEFAULT_SOLVER = "dpm-solver++3m"
#: Solver sample() uses on a stochastic interpolant when none is named.
DEFAULT_INTERPOLANT_SOLVER = "heun"


def _import_optional(name: str) -> None:
    """Import a solver module that registers itself, if its file exists (written by another layer)."""
    import importlib

    try:
        importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:  # only a missing module file is optional, not its own imports
        if err.name != f"{__name__}.{name}":
            raise


for _module in ("ode", "exponential", "sde", "dpm_v3"):
    _import_optional(_module)
del _module

__all__ = [
    "sample",
    "SampleResult",
    "SolverSpec",
    "NonFiniteStateError",
    "register_solver",
    "available",
    "get_solver",
    "make_grid",
    "validate_grid",
    "GRID_KINDS",
    "SOLVER_KINDS",
    "PathTable",
    "GaussianEvaluator",
    "DEFAULT_SOLVER",
    "DEFAULT_INTERPOLANT_SOLVER",
]
