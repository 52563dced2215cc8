r"""Physics-informed baselines of RGNP (issue 21): the fixed-grid PDDLVM and a PINN-style deterministic model.

Both are :class:`~flowdiff.pde.RGNP` with one setting changed, so they share its forward net, calibration, GICNet
inverse, surrogate posterior, save/load and CLI:

* :class:`PDDLVM` — Vadeboncoeur, Akyildiz, Kazlauskaite, Girolami & Cirak, *Fully probabilistic deep models for
  forward and inverse problems in parametric PDEs*, J. Comput. Phys. 491:112369 (2023): the same ELBO as RGNP, but
  on **one fixed** collocation grid (``points`` evenly spaced interior points, the same for every instance and
  step). Deviation: the inverse is the grid-invariant GICNet, not the paper's plain CNN on the fixed grid.
* :class:`PINN` — a physics-informed deterministic parametric model in the spirit of PI-DeepONet (Wang, Wang &
  Perdikaris, Sci. Adv. 2021) and physics-informed parametric Fourier-feature nets: the mean net trained by the
  mean-squared residual on random collocation points, no variance. ``predict``'s std comes from the calibration
  alone (``calibration=0`` gives std 0: no uncertainty at all).
"""

from __future__ import annotations

from .problem import Problem
from .rgnp import RGNP

__all__ = ["PDDLVM", "PINN"]


class PDDLVM(RGNP):
    """The fixed-grid baseline: :class:`RGNP` with ``grid="fixed"`` (``points`` evenly spaced points, default 30 as
    in the paper's Poisson runs). Other keyword arguments as :class:`RGNP`."""

    def __init__(self, problem: Problem, *, points: int = 30, **kwargs) -> None:
        if kwargs.pop("grid", "fixed") != "fixed":
            raise ValueError("PDDLVM trains on a fixed grid; use RGNP for random grids")
        super().__init__(problem, grid="fixed", points=points, **kwargs)


class PINN(RGNP):
    """The deterministic physics-informed baseline: :class:`RGNP` with ``family="deterministic"`` (mean-squared
    residual on fresh random points). Other keyword arguments as :class:`RGNP`."""

    def __init__(self, problem: Problem, **kwargs) -> None:
        if kwargs.pop("family", "deterministic") != "deterministic":
            raise ValueError("PINN is deterministic; use RGNP for the Gaussian families")
        kwargs.pop("rank", None)
        super().__init__(problem, family="deterministic", **kwargs)
