r"""Explicit Runge–Kutta solvers of the probability-flow ODE, for every field.

The ODE is written in one of two variables (option ``space``):

* ``space="t"`` (default; every field, stochastic interpolants included): the velocity field
  :math:`\frac{dx}{dt} = b(x, t)` (``field.velocity``), integrated in time ``t``;
* ``space="sigma"`` (Gaussian paths): the scaled state :math:`\tilde x = x/\alpha` in the noise
  level :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}`, where the same ODE reads
  :math:`\frac{d\tilde x}{d\tilde\sigma} = \frac{\tilde x - \hat x(x, t)}{\tilde\sigma}`
  (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
  Eq. 4 with their scaling; k-diffusion's ``to_d``). It does not depend on the schedule, and
  trajectories are nearly straight in it; ``euler`` there is DDIM.

Fixed-step solvers (Butcher 2016, "Numerical Methods for Ordinary Differential Equations"):

==========  =======  ================  ===========================================
name        order    evals per step    tableau
==========  =======  ================  ===========================================
euler       1        1                 forward Euler
midpoint    2        2                 explicit midpoint
heun        2        2                 Heun's trapezoidal predictor–corrector (EDM Alg. 1)
rk4         4        4                 the classical Runge–Kutta method
==========  =======  ================  ===========================================

Budget: with ``B`` evaluations a solver of ``m`` evaluations per step takes ``⌈B/m⌉`` steps;
when ``m`` does not divide ``B`` the *first* step (at high noise, where trajectories are
nearly straight) uses a lower-order method with the ``B mod m`` evaluations left (Euler,
midpoint/Heun, Kutta's third-order rule), so the budget is spent exactly.

The tableaus, the Runge–Kutta step and the Dormand–Prince controller are the generic ones of
:mod:`flowdiff.solvers.integrators` (shared with the likelihood); this module only writes the
ODE in its variable.

``dopri5`` is the adaptive Dormand–Prince 5(4) pair (Dormand & Prince 1980, "A family of
embedded Runge–Kutta formulae") with first-same-as-last, Hairer's initial step and the
standard controller; ``rtol``/``atol`` set the local error tolerance (mixed norm, RMS over all
entries of the batch), ``nfe`` caps the evaluations (a RuntimeError says so when the cap is
reached before ``t_end``). Its stages never leave ``[t_start, t_end]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor

from .._utils import check_float
from .base import Solver, check_choice, register_solver
from .integrators import EULER, HEUN, LOWER_ORDER, MIDPOINT, RK4, Tableau, dopri5_global, rk_step
from .loop import Run

__all__ = ["SPACES", "Dopri5", "RungeKutta"]

#: Variables the ODE solvers can integrate in.
SPACES = ("t", "sigma")


class _Problem:
    """The ODE ``dy/ds = f(s, y)`` in the chosen variable, with the maps to and from ``(x, t)``."""

    def __init__(self, run: Run, space: str, times: list[float]):
        check_choice(run.name, "space", space, SPACES)
        self.run, self.space = run, space
        self.t0, self.t1 = times[0], times[-1]
        self._node_t: dict[float, float] = {}
        self._alpha_nodes: dict[float, float] = {}
        if space == "t":
            self.s_nodes = list(times)
            return
        if run.path is None:
            from .base import require_gaussian_path

            require_gaussian_path(run.field, f"{run.name} (space='sigma')")
        tab = run.path.table(times)  # type: ignore[union-attr]
        lam = tab.log_snr
        if not bool(lam.isfinite().all()):
            raise ValueError(f"space='sigma' needs alpha > 0 and sigma > 0 on the grid; log-SNR at the ends is "
                             f"{float(lam[0])!r}, {float(lam[-1])!r}")
        self.s_nodes = (-lam).exp().tolist()  # sigma~ = sigma / alpha
        self._node_t = dict(zip(self.s_nodes, times))
        self._alpha_nodes = dict(zip(times, tab.alpha.tolist()))

    def t_of(self, s: float) -> float:
        """Time of the variable value ``s`` (exact at grid nodes, clamped inside [t0, t1])."""
        if self.space == "t":
            return min(max(s, self.t0), self.t1)
        t = self._node_t.get(s)
        if t is None:
            t = self.run.t_of_log_snr(-math.log(s))
        return min(max(float(t), self.t0), self.t1)

    def alpha(self, t: float) -> float:
        a = self._alpha_nodes.get(t)
        return self.run.at(t)[0] if a is None else a

    def to_state(self, x: Tensor, t: float) -> Tensor:
        return x if self.space == "t" else x / self.alpha(t)

    def to_x(self, y: Tensor, t: float) -> Tensor:
        return y if self.space == "t" else y * self.alpha(t)

    def f(self, s: float, y: Tensor) -> Tensor:
        """One evaluation of the right-hand side (one field evaluation)."""
        t = self.t_of(s)
        if self.space == "t":
            return self.run.velocity(y, t)
        a = self.alpha(t)
        data, _ = self.run.evaluate_at(y * a, t)
        return (y - data) / s


class RungeKutta(Solver):
    """An explicit Runge–Kutta method of the subclass' ``tableau`` (module docstring), option
    ``space`` in {'t', 'sigma'}. Budget: ``⌈B/m⌉`` steps for ``B`` evaluations, the first with
    the ``B mod m`` left (a lower-order rule)."""

    options = {"space": "t"}
    tableau: Tableau = EULER

    @classmethod
    def evals_per_step(cls, options: dict) -> int:
        return cls.tableau.stages

    @classmethod
    def steps_for(cls, budget: int, options: dict) -> int:
        return -(-budget // cls.tableau.stages) if budget > 0 else 0

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.problem = _Problem(run, self.opts["space"], run.times)
        stages, steps = self.tableau.stages, run.steps
        budget = steps * stages if run.budget is None else run.budget
        if budget < steps:
            raise ValueError(f"{self.name}: {steps} steps need at least {steps} evaluations, got a budget of {budget}")
        # Evaluations short of `stages` on every step go to the first step (a lower-order rule).
        self.first = min(stages, budget - (steps - 1) * stages)
        if steps == 1 and self.first < stages:  # the whole solve is one lower-order step: say so
            warnings.warn(f"{self.name} with {budget} evaluation(s) takes ONE step of the {self.first}-stage rule "
                          f"(order {self.first}), not a {stages}-stage step; raise nfe to at least one full step",
                          stacklevel=2)
        self.last: Tensor | None = None

    def step(self, i: int, x: Tensor) -> tuple[Tensor, None]:
        p, times = self.problem, self.run.times
        y = self.memory["y"] if x is self.last else p.to_state(x, times[i])
        s, s_next = p.s_nodes[i], p.s_nodes[i + 1]
        rule = self.tableau if (i > 0 or self.first == self.tableau.stages) else LOWER_ORDER[self.first]
        y = rk_step(p.f, s, y, s_next - s, rule)[0]
        self.memory["y"], self.last = y, p.to_x(y, times[i + 1])
        return self.last, None


class Dopri5(Solver):
    r"""Adaptive Dormand–Prince 5(4) (module docstring) through
    :func:`~flowdiff.solvers.integrators.dopri5_global`; the initial step follows Hairer, Nørsett
    & Wanner (1993, "Solving ODEs I", II.4) and costs one evaluation. The loop's report
    (callback, hooks) runs at every accepted step; a step hook may watch the state and the
    weights but not change the state (the controller keeps its own).

    Arguments:
        rtol, atol: tolerances (> 0).
        first_step: initial step in the integration variable (skips the automatic choice).
        space: ``"t"`` or ``"sigma"`` (module docstring).
        safety: the controller's safety factor.
    """

    options = {"space": "t", "rtol": 1e-5, "atol": 1e-5, "first_step": None, "safety": 0.9}
    evals = 6

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        o = self.opts
        self.rtol = check_float("rtol", o["rtol"], 0.0, low_open=True)
        self.atol = check_float("atol", o["atol"], 0.0, low_open=True)
        if o["first_step"] is not None:
            check_float("first_step", o["first_step"], 0.0, low_open=True)
        self.problem = _Problem(run, o["space"], [run.times[0], run.times[-1]])

    def drive(self, x: Tensor, report: Any) -> Tensor:
        """Integrate from ``t_start`` to ``t_end``, reporting every accepted step."""
        p, cap = self.problem, self.run.budget
        evals = 0

        def f(s: float, y: Tensor) -> Tensor:
            nonlocal evals
            if cap is not None and evals >= cap:
                raise RuntimeError(f"dopri5 used its budget of {cap} evaluations before reaching t_end={p.t1!r} "
                                   f"(at t={p.t_of(s)!r}); raise nfe or loosen rtol/atol")
            evals += 1
            return p.f(s, y)

        def on_accept(step: int, s: float, y: Tensor) -> None:
            t = p.t_of(s)
            x_t = p.to_x(y, t)
            if report(step, t, x_t, None) is not x_t:
                raise ValueError("dopri5 (adaptive) lets a step hook read the state, not replace it")

        s0, s1 = p.s_nodes
        y = dopri5_global(f, s0, s1, p.to_state(x, p.t0), rtol=self.rtol, atol=self.atol,
                          first_step=self.opts["first_step"], safety=self.opts["safety"], on_accept=on_accept,
                          time_of=p.t_of)
        return p.to_x(y, p.t1)


# Default grids on a Gaussian path: the time-quadratic grid was the most accurate for every
# Runge–Kutta method in t on the DDPM-schedule benchmark (docs/solvers.md; Karras' grid is
# far worse there for Heun in t). Stochastic interpolants always use the uniform grid.
for _tab, _desc in ((EULER, "forward Euler in t (or sigma~), order 1"), (MIDPOINT, "explicit midpoint, order 2"),
                    (HEUN, "Heun / EDM Algorithm 1, order 2"), (RK4, "classical Runge-Kutta, order 4")):
    _cls = type(_tab.name.title(), (RungeKutta,), {"tableau": _tab, "__doc__": f"{_desc} ({_tab.stages} evaluations per step)."})
    register_solver(_tab.name, _cls, kind="ode", default_grid="quadratic", description=_desc)
register_solver("dopri5", Dopri5, kind="ode", adaptive=True, description="adaptive Dormand-Prince 5(4), rtol/atol, nfe as a cap")
