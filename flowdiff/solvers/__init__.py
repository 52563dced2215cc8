"""Samplers: time grids, ODE solvers, exponential integrators and SDE solvers behind one :func:`sample`.

>>> res = fd.sample(field, x_init, solver="dpm-solver++", nfe=10)   # doctest: +SKIP
>>> fd.solvers.available()                                          # doctest: +SKIP

See :mod:`flowdiff.solvers.base` for the solver contract and the NFE accounting.
"""

from __future__ import annotations

from .base import (
    DEFAULT_INTERPOLANT_SOLVER,
    DEFAULT_SOLVER,
    LOW_NFE,
    LOW_NFE_SOLVER,
    SOLVER_KINDS,
    GaussianEvaluator,
    NonFiniteStateError,
    PathTable,
    SampleResult,
    SolverSpec,
    available,
    default_solver,
    get_solver,
    register_solver,
    sample,
)
from .grids import GRID_KINDS, make_grid, validate_grid


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

from .dpm_v3 import EMS, estimate_ems  # noqa: E402  (after the registrations above)
from .tuning import TunedGrid, load_grid, save_grid, tune_grid  # noqa: E402

__all__ = [
    "EMS",
    "TunedGrid",
    "estimate_ems",
    "load_grid",
    "save_grid",
    "tune_grid",
    "DEFAULT_INTERPOLANT_SOLVER",
    "DEFAULT_SOLVER",
    "GRID_KINDS",
    "LOW_NFE",
    "LOW_NFE_SOLVER",
    "SOLVER_KINDS",
    "GaussianEvaluator",
    "NonFiniteStateError",
    "PathTable",
    "SampleResult",
    "SolverSpec",
    "available",
    "default_solver",
    "get_solver",
    "make_grid",
    "register_solver",
    "sample",
    "validate_grid",
]
