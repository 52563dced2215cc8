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

``dopri5`` is the adaptive Dormand–Prince 5(4) pair (Dormand & Prince 1980, "A family of
embedded Runge–Kutta formulae") with first-same-as-last, Hairer's initial step and the
standard controller; ``rtol``/``atol`` set the local error tolerance (mixed norm, RMS over all
entries of the batch), ``nfe`` caps the evaluations (a RuntimeError says so when the cap is
reached before ``t_end``). Its stages never leave ``[t_start, t_end]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..paths import GaussianPath
from .base import (
    GaussianEvaluator,
    register_solver,
    require_gaussian_path,
    time_tensor,
)

__all__ = ["SPACES", "dopri5", "euler", "heun", "midpoint", "rk4"]

#: Variables the ODE solvers can integrate in.
SPACES = ("t", "sigma")

Callback = Callable[[int, float, Tensor, "Tensor | None"], None]

Tableau = tuple[Sequence[float], Sequence[Sequence[float]], Sequence[float]]

# Butcher tableaux (c, A lower-triangular rows, b).
_EULER: Tableau = ((0.0,), ((),), (1.0,))
_MIDPOINT: Tableau = ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0))
_HEUN: Tableau = ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5))
_KUTTA3: Tableau = ((0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6))
_RK4: Tableau = ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6))


class _Problem:
    """The ODE ``dy/ds = f(y, s)`` in the chosen variable, with the maps to and from ``(x, t)``."""

    def __init__(self, field: Any, space: str, grid: Tensor, cond: dict, solver: str):
        if space not in SPACES:
            raise ValueError(f"unknown space {space!r} for solver {solver!r}; valid: {', '.join(SPACES)}")
        self.field, self.space, self.cond = field, space, cond
        self.t0, self.t1 = float(grid[0]), float(grid[-1])
        self.path: GaussianPath | None = None
        self._node_t: dict[float, float] = {}
        self._alpha_nodes: dict[float, float] = {}
        if space == "t":
            self.s_nodes = grid.tolist()
        else:
            path = require_gaussian_path(field, f"{solver} (space='sigma')")
            lam = path._log_snr(grid)
            if not torch.isfinite(lam).all():
                raise ValueError(
                    f"space='sigma' needs alpha > 0 and sigma > 0 on the grid; log-SNR at the ends is "
                    f"{float(lam[0])!r}, {float(lam[-1])!r}"
                )
            self.path = path
            self.evaluator = GaussianEvaluator(field, path, cond)
            self.s_nodes = torch.exp(-lam).tolist()  # sigma~ = sigma / alpha
            self._node_t = dict(zip(self.s_nodes, grid.tolist()))
            self._alpha_nodes = dict(zip(grid.tolist(), path._alpha(grid).tolist()))

    def t_of(self, s: float) -> float:
        """Time of the variable value ``s`` (exact at grid nodes, clamped inside [t0, t1])."""
        if self.space == "t":
            return min(max(s, self.t0), self.t1)
        t = self._node_t.get(s)
        if t is None and self.path is not None:
            t = float(self.path._t_of_log_snr(torch.tensor([-math.log(s)], dtype=torch.float64)))
        return min(max(float(t), self.t0), self.t1)  # type: ignore[arg-type]

    def alpha(self, t: float) -> float:
        a = self._alpha_nodes.get(t)
        if a is None and self.path is not None:
            a = float(self.path._alpha(torch.tensor([t], dtype=torch.float64)))
        return 1.0 if a is None else a

    def to_state(self, x: Tensor, t: float) -> Tensor:
        return x if self.space == "t" else x / self.alpha(t)

    def to_x(self, y: Tensor, t: float) -> Tensor:
        return y if self.space == "t" else y * self.alpha(t)

    def f(self, y: Tensor, s: float) -> Tensor:
        """One evaluation of the right-hand side (one field evaluation)."""
        t = self.t_of(s)
        if self.space == "t":
            return self.field.velocity(y, time_tensor(t, y), **self.cond)
        a = self.alpha(t)
        data, _ = self.evaluator(y * a, t)
        return (y - data) / s


def _rk_step(problem: _Problem, y: Tensor, s: float, h: float, tableau: Tableau) -> Tensor:
    c, a, b = tableau
    ks: list[Tensor] = []
    for i, ci in enumerate(c):
        yi = y
        for j, aij in enumerate(a[i]):
            if aij != 0.0:
                yi = yi + (h * aij) * ks[j]
        ks.append(problem.f(yi, s + ci * h))
    out = y
    for bi, k in zip(b, ks):
        if bi != 0.0:
            out = out + (h * bi) * k
    return out


_LOWER: dict[int, Tableau] = {1: _EULER, 2: _MIDPOINT, 3: _KUTTA3}


def _fixed_step(
    tableau: Tableau,
    lower: Mapping[int, Tableau],
    name: str,
) -> Callable[..., Tensor]:
    stages = len(tableau[0])

    def solve(
        field: Any,
        x: Tensor,
        grid: Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        cond: dict | None = None,
        max_evals: int | None = None,
        space: str = "t",
    ) -> Tensor:
        problem = _Problem(field, space, grid, dict(cond or {}), name)
        steps = len(grid) - 1
        budget = steps * stages if max_evals is None else max_evals
        if budget < steps:
            raise ValueError(f"{name}: {steps} steps need at least {steps} evaluations, got max_evals={budget}")
        # Evaluations short of `stages` on every step go to the first step (a lower-order rule).
        first = min(stages, budget - (steps - 1) * stages)
        times = grid.tolist()
        y = problem.to_state(x, times[0])
        for i in range(steps):
            s, s_next = problem.s_nodes[i], problem.s_nodes[i + 1]
            rule = tableau if (i > 0 or first == stages) else lower[first]
            y = _rk_step(problem, y, s, s_next - s, rule)
            if callback is not None:
                callback(i, times[i + 1], problem.to_x(y, times[i + 1]), None)
        return problem.to_x(y, times[-1])

    solve.__name__ = name
    solve.__qualname__ = name
    return solve


euler = _fixed_step(_EULER, _LOWER, "euler")
midpoint = _fixed_step(_MIDPOINT, _LOWER, "midpoint")
heun = _fixed_step(_HEUN, {1: _EULER}, "heun")
rk4 = _fixed_step(_RK4, _LOWER, "rk4")

for _fn, _doc in (
    (euler, "Forward Euler, 1 evaluation per step, order 1."),
    (midpoint, "Explicit midpoint rule, 2 evaluations per step, order 2."),
    (heun, "Heun's method (EDM Algorithm 1 in space='sigma'), 2 evaluations per step, order 2."),
    (rk4, "Classical fourth-order Runge–Kutta, 4 evaluations per step, order 4."),
):
    _fn.__doc__ = (
        _doc
        + "\n\nSolver function (see :mod:`flowdiff.solvers.base`); option ``space`` in "
        + "{'t', 'sigma'} (module docstring). Use through ``fd.sample(..., solver=name)``."
    )


# ---------------------------------------------------------------------------------------
# Adaptive Dormand–Prince 5(4)
# ---------------------------------------------------------------------------------------

_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B, _DP_B4))


def _rms(x: Tensor) -> float:
    return float(torch.sqrt(torch.mean(x.to(torch.float64) ** 2)))


def dopri5(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    space: str = "t",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    safety: float = 0.9,
) -> Tensor:
    r"""Adaptive Dormand–Prince 5(4) with error control (Dormand & Prince 1980).

    Local error estimate :math:`e = h\sum_i (b_i - b^*_i) k_i`, accepted when
    :math:`\mathrm{RMS}\big(e / (\mathrm{atol} + \mathrm{rtol}\max(|y|, |y'|))\big) \le 1`;
    the next step is :math:`h\cdot\min(10, \max(0.2, 0.9\,\mathrm{err}^{-1/5}))`, and never
    passes ``t_end`` (so the model is never called outside the interval). The initial step
    follows Hairer, Nørsett & Wanner (1993, "Solving ODEs I", II.4) and costs one evaluation.

    Arguments:
        rtol, atol: tolerances (> 0).
        first_step: initial step in the integration variable (skips the automatic choice).
        space: ``"t"`` or ``"sigma"`` (module docstring).

    Only ``grid[0]`` and ``grid[-1]`` are used; ``callback`` is called at every accepted step.
    """
    for label, val in (("rtol", rtol), ("atol", atol)):
        if not isinstance(val, (int, float)) or isinstance(val, bool) or not (val > 0) or not math.isfinite(val):
            raise ValueError(f"dopri5: {label} must be a finite number > 0, got {label}={val!r}")
    ends = torch.tensor([float(grid[0]), float(grid[-1])], dtype=torch.float64)
    problem = _Problem(field, space, ends, dict(cond or {}), "dopri5")
    cap = math.inf if max_evals is None else max_evals
    s0, s_end = problem.s_nodes
    direction = 1.0 if s_end > s0 else -1.0
    span = abs(s_end - s0)
    y = problem.to_state(x, problem.t0)
    evals = 0

    def f(yy: Tensor, s: float) -> Tensor:
        nonlocal evals
        if evals >= cap:
            raise RuntimeError(
                f"dopri5 used its budget of {max_evals} evaluations before reaching t_end="
                f"{problem.t1!r} (at t={problem.t_of(s)!r}); raise nfe or loosen rtol/atol"
            )
        evals += 1
        return problem.f(yy, s)

    def scale(a: Tensor, b: Tensor) -> Tensor:
        return atol + rtol * torch.maximum(a.abs(), b.abs())

    k1 = f(y, s0)
    if first_step is None:
        d0 = _rms(y / scale(y, y))
        d1 = _rms(k1 / scale(y, y))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        k_probe = f(y + (direction * h0) * k1, s0 + direction * h0)
        d2 = _rms((k_probe - k1) / scale(y, y)) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1)
    else:
        if not isinstance(first_step, (int, float)) or not first_step > 0:
            raise ValueError(f"dopri5: first_step must be a number > 0, got first_step={first_step!r}")
        h = float(first_step)
    s = s0
    step = 0
    while direction * (s_end - s) > 0:
        h = min(h, span)
        last = direction * (s_end - (s + direction * h)) <= 1e-12 * span
        hs = (s_end - s) if last else direction * h
        ks = [k1]
        for i in range(1, 7):
            yi = y
            for j, aij in enumerate(_DP_A[i]):
                if aij != 0.0:
                    yi = yi + (hs * aij) * ks[j]
            s_i = s_end if (last and _DP_C[i] == 1.0) else s + _DP_C[i] * hs
            ks.append(f(yi, s_i))
            if i == 6:
                y_new = yi  # row 7 of A is b: FSAL
        err_vec = sum((hs * e) * k for e, k in zip(_DP_E, ks) if e != 0.0)
        err = _rms(err_vec / scale(y, y_new))
        if not math.isfinite(err):
            raise FloatingPointError(f"dopri5: non-finite error estimate at t={problem.t_of(s)!r}")
        if err <= 1.0:
            s = s_end if last else s + hs
            y, k1 = y_new, ks[6]
            t_now = problem.t_of(s)
            if callback is not None:
                callback(step, t_now, problem.to_x(y, t_now), None)
            step += 1
        factor = 10.0 if err == 0.0 else min(10.0, max(0.2, safety * err ** (-1 / 5)))
        h = abs(hs) * factor
    return problem.to_x(y, problem.t1)


# Default grids on a Gaussian path: the time-quadratic grid was the most accurate for every
# Runge–Kutta method in t on the DDPM-schedule benchmark (docs/solvers.md; Karras' grid is
# far worse there for Heun in t). Stochastic interpolants always use the uniform grid.


def _ceil_steps(stages: int) -> Callable[[int], int]:
    return lambda budget: -(-budget // stages) if budget > 0 else 0


register_solver("euler", euler, kind="ode", evals_per_step=1, default_grid="quadratic",
                description="forward Euler in t (or sigma~), order 1")
register_solver("midpoint", midpoint, kind="ode", evals_per_step=2, default_grid="quadratic",
                steps_for_budget=_ceil_steps(2), description="explicit midpoint, order 2")
register_solver("heun", heun, kind="ode", evals_per_step=2, default_grid="quadratic",
                steps_for_budget=_ceil_steps(2), description="Heun / EDM Algorithm 1, order 2")
register_solver("rk4", rk4, kind="ode", evals_per_step=4, default_grid="quadratic",
                steps_for_budget=_ceil_steps(4), description="classical Runge-Kutta, order 4")
register_solver("dopri5", dopri5, kind="ode", evals_per_step=6, adaptive=True, default_grid="uniform",
                description="adaptive Dormand-Prince 5(4), rtol/atol, nfe as a cap")
