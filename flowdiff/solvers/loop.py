r"""The one sampling loop: grid, budget, callback, finite checks, trajectory, NFE — and its hooks.

:func:`sample` resolves the solver's options, plans the budget, builds the grid and runs

.. code-block:: python

    for i in range(steps):
        if i: x = solver.revise(i, x); x = report(i - 1, x)   # corrector, then callback and hooks
        x, denoised = solver.step(i, x)                        # node i -> node i + 1
    report(steps - 1, x); final denoise

**Budget.** ``nfe`` is the total number of model calls, *including* the final denoising
evaluation (``final_calls``: one on a Gaussian path, the velocity's calls on an interpolant).
The rest, divided by the model calls per evaluation, is the solver's evaluation budget, from
which the solver's ``steps_for`` rule (which sees its options: ``pc``'s correctors, a singlestep
method's order pattern, EDM's Euler last step, Runge–Kutta's lower-order first step) picks the
number of grid steps. An explicit grid must fit the budget. :attr:`SampleResult.nfe` is read
from the field's counter, so it is what was really spent.

**Hooks** (:class:`Hooks`, passed as ``fd.sample(..., hooks=Hooks(...))``) are the public
extension points of the loop:

* ``denoiser(x, t, denoised) -> denoised``: applied to the data prediction of *every* model
  evaluation of every Gaussian-path solver (the noise prediction follows,
  :math:`\hat\varepsilon = (x - \alpha\hat x)/\sigma`; the ODE solvers in ``t`` then use
  :math:`b = \dot\alpha\hat x + \dot\sigma\hat\varepsilon`) and to the final denoise. Guidance:
  adding :math:`(\sigma^2/\alpha)\nabla_x\log p(y\mid x_t)` to :math:`\hat x` turns the score into
  the posterior score (Tweedie; Chung et al. 2023, "Diffusion Posterior Sampling").
* ``step(state: LoopState) -> LoopState | None``: after every step, with the state, the time,
  the data prediction and per-sample log-weights; it may return a new state (new ``x``, new
  ``log_weights``) or :meth:`LoopState.resample` it (sequential Monte Carlo: the loop reindexes
  the solver's multistep history with the particles). Final log-weights:
  :attr:`SampleResult.log_weights`.
* ``transition(tr: Transition)``: every Gaussian transition
  :math:`x' = \mu + \sigma z` a stochastic solver draws (its mean and standard deviation, so that
  :meth:`Transition.log_prob` gives :math:`\log N(x'; \mu, \sigma^2)`: the policy log-density of
  RL fine-tuning, Black et al. 2024 "Training Diffusion Models with Reinforcement Learning");
  ``record_transitions=True`` keeps them in :attr:`SampleResult.transitions`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..paths import GaussianPath, StochasticInterpolant
from .base import (
    GaussianEvaluator, NonFiniteStateError, SampleResult, Solver, SolverSpec, default_solver, final_calls,
    get_solver, require_gaussian_path, time_tensor
)
from .grids import GRID_KINDS, make_grid, validate_grid

__all__ = ["Hooks", "LoopState", "Run", "Transition", "final_calls", "plan", "sample"]

#: nfe used when neither ``nfe`` nor an explicit grid is given to a fixed-step solver.
DEFAULT_NFE = 20
#: Model-call cap of adaptive solvers when ``nfe`` is not given.
DEFAULT_ADAPTIVE_CAP = 10_000


@dataclass
class Transition:
    r"""One Gaussian transition :math:`x_{\text{next}} = \mu + \sigma z` drawn in step ``i``.

    Attributes:
        i: the step; ``t``, ``t_next``: its times (a corrector or churn sub-step has ``t == t_next``
            or its own intermediate time).
        x: the state the transition starts from; ``mean``, ``std``: :math:`\mu` and :math:`\sigma`
            (a float, or a tensor broadcastable against ``x``); ``x_next``: the draw.
    """

    i: int
    t: float
    t_next: float
    x: Tensor
    mean: Tensor
    std: float | Tensor
    x_next: Tensor

    def log_prob(self, value: Tensor | None = None) -> Tensor:
        r""":math:`\log N(\text{value}; \mu, \sigma^2 I)` per sample, ``(B,)`` (default value: ``x_next``)."""
        v = self.x_next if value is None else value
        std = torch.as_tensor(self.std, dtype=v.dtype, device=v.device).expand_as(v)
        z = (v - self.mean) / std
        return -(0.5 * z * z + torch.log(std) + 0.5 * math.log(2 * math.pi)).reshape(v.shape[0], -1).sum(1)


@dataclass
class LoopState:
    """What a step hook sees after step ``i``: the state ``x`` at time ``t``, the data prediction
    ``denoised`` the step used (or ``None``), per-sample ``log_weights`` ``(B,)``; ``ancestors``
    is set when the particles were reindexed (by :meth:`resample`). The callback and the
    trajectory see the state before the hook acts on it."""

    i: int
    t: float
    x: Tensor
    denoised: Tensor | None
    log_weights: Tensor
    ancestors: Tensor | None = None

    def ess(self) -> float:
        """Effective sample size of the normalised weights."""
        w = torch.softmax(self.log_weights.double(), 0)
        return float(1.0 / (w * w).sum())

    def resample(self, ancestors: Tensor | None = None, generator: torch.Generator | None = None) -> LoopState:
        """The particles reindexed by ``ancestors`` (default: multinomial draws from the weights),
        with uniform log-weights; the loop reindexes the solver's history the same way."""
        if ancestors is None:
            w = torch.softmax(self.log_weights.double(), 0).cpu()
            ancestors = torch.multinomial(w, len(w), replacement=True, generator=generator)
        ancestors = ancestors.to(self.x.device)
        return replace(self, x=self.x[ancestors], denoised=None if self.denoised is None else self.denoised[ancestors],
                       log_weights=torch.zeros_like(self.log_weights), ancestors=ancestors)


@dataclass
class Hooks:
    """The loop's extension points (module docstring): ``denoiser(x, t, denoised) -> denoised``,
    ``step(state) -> LoopState | None``, ``transition(tr) -> None``, ``record_transitions``."""

    denoiser: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    step: Callable[[LoopState], LoopState | None] | None = None
    transition: Callable[[Transition], None] | None = None
    record_transitions: bool = False

    def __post_init__(self) -> None:
        for label in ("denoiser", "step", "transition"):
            value = getattr(self, label)
            if value is not None and not callable(value):
                raise TypeError(f"Hooks.{label} must be callable or None, got {type(value).__name__}")


class Run:
    """One run: the grid, α, σ, α̇, σ̇, λ at its nodes (float64 Python floats, Gaussian paths),
    the model evaluations (with the denoiser hook) and the Gaussian draws (with the transition hook)."""

    def __init__(self, name: str, field: Any, times: list[float], budget: int | None, cond: dict,
                 generator: torch.Generator | None, hooks: Hooks, like: Tensor):
        self.name, self.field, self.times, self.budget, self.cond = name, field, times, budget, cond
        self.like = like  # x_init: the shape, dtype and device of the run
        self.steps = len(times) - 1
        self.generator, self.hooks = generator, hooks
        self.transitions: list[Transition] | None = [] if hooks.record_transitions else None
        self.path: GaussianPath | None = field.path if isinstance(field.path, GaussianPath) else None
        if self.path is not None:
            tab = self.path.table(times)
            self.alpha, self.sigma = tab.alpha.tolist(), tab.sigma.tolist()
            self.d_alpha, self.d_sigma, self.log_snr = tab.d_alpha.tolist(), tab.d_sigma.tolist(), tab.log_snr.tolist()
            self.evaluator = GaussianEvaluator(field, self.path, cond, hooks.denoiser)
        elif hooks.denoiser is not None:
            raise ValueError(f"a denoiser hook needs a Gaussian path (a data prediction); the field is on "
                             f"{type(field.path).__name__}")

    def coefficients(self, i: int) -> tuple[float, float, float, float]:
        """(α, σ, α̇, σ̇) at node ``i``."""
        return self.alpha[i], self.sigma[i], self.d_alpha[i], self.d_sigma[i]

    def at(self, t: float) -> tuple[float, float, float, float]:
        """(α, σ, α̇, σ̇) at any time ``t`` (float64)."""
        return self.evaluator.coefficients(t)

    def h(self, i: int) -> float:
        """Log-SNR step from node ``i`` to ``i + 1`` (``inf`` when it reaches σ = 0)."""
        return self.log_snr[i + 1] - self.log_snr[i]

    def t_of_log_snr(self, lam: float) -> float:
        return float(self.path.t_of_log_snr(torch.tensor(lam, dtype=torch.float64)))  # type: ignore[union-attr]

    def evaluate(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """(x̂, ε̂) at node ``i``: one model call."""
        return self.evaluator(x, self.times[i], self.coefficients(i))

    def evaluate_at(self, x: Tensor, t: float, coefficients: tuple[float, float, float, float] | None = None) -> tuple[Tensor, Tensor]:
        """(x̂, ε̂) at any time ``t`` (one model call)."""
        return self.evaluator(x, t, coefficients)

    def velocity(self, x: Tensor, t: float) -> Tensor:
        """The probability-flow velocity b(x, t): ``field.velocity``, or α̇x̂ + σ̇ε̂ when a
        denoiser hook changes x̂."""
        if self.hooks.denoiser is not None:
            a, s, da, ds = self.at(t)
            data, noise = self.evaluator(x, t, (a, s, da, ds))
            return da * data + ds * noise
        return self.field.velocity(x, time_tensor(t, x), **self.cond)

    def score(self, x: Tensor, t: float) -> Tensor:
        return self.field.score(x, time_tensor(t, x), **self.cond)

    def randn(self, x: Tensor) -> Tensor:
        """Standard normal noise of ``x``'s shape, dtype and device (seed-stable with ``generator``)."""
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)

    def gaussian(self, mean: Tensor, std: float | Tensor, i: int, t: float, t_next: float, x: Tensor,
                 z: Tensor | None = None) -> Tensor:
        """Draw :math:`\\mu + \\sigma z` (no draw when σ is the float 0; ``z`` if already drawn);
        ``mean`` may be consumed in place. The transition hook sees ``(i, t, t_next, x, mean, std, draw)``."""
        if isinstance(std, float) and std == 0.0:
            return mean
        z = self.randn(mean) if z is None else z
        keep = self.hooks.transition is not None or self.transitions is not None
        if isinstance(std, float):
            out = mean.add(z, alpha=std) if keep else mean.add_(z, alpha=std)
        else:
            out = mean + std * z if keep else mean.add_(std * z)
        if keep:
            tr = Transition(i, t, t_next, x, mean, std, out)
            if self.transitions is not None:
                self.transitions.append(tr)
            if self.hooks.transition is not None:
                self.hooks.transition(tr)
        return out


@dataclass
class Plan:
    """The grid times (float64 CPU) and the solver's evaluation budget (``None``: unlimited)."""

    times: Tensor
    budget: int | None


def plan(spec: SolverSpec, options: dict, field: Any, nfe: int | None, grid: Any, t0: float, t1: float,
         denoise_final: bool, grid_options: dict | None = None) -> Plan:
    """Grid and evaluation budget of ``spec`` with ``nfe`` model calls (module docstring); a
    ValueError naming the numbers when the budget is too small or an explicit grid needs more."""
    cls, name = spec.cls, spec.name
    final = final_calls(field, denoise_final)
    calls = cls.calls_per_eval(field, options)
    explicit = None if grid is None or isinstance(grid, str) else validate_grid(grid, t0, t1)
    if spec.adaptive:
        budget = ((DEFAULT_ADAPTIVE_CAP if nfe is None else nfe) - final) // calls
        if budget < 1:
            raise ValueError(f"nfe={nfe} leaves no evaluation for solver {name!r} after the final denoise ({final} call(s))")
        return Plan(explicit if explicit is not None else torch.tensor([t0, t1], dtype=torch.float64), budget)
    if explicit is not None:
        steps = len(explicit) - 1
        needed = steps * cls.evals_per_step(options) * calls + final
        if nfe is not None and needed > nfe:
            raise ValueError(f"the explicit grid has {steps} steps, which solver {name!r} needs {needed} model calls for "
                             f"(final denoise included), more than nfe={nfe}")
        return Plan(explicit, steps * cls.evals_per_step(options) if nfe is None else (nfe - final) // calls)
    budget = max((DEFAULT_NFE if nfe is None else nfe) - final, 0) // calls
    steps = cls.steps_for(budget, options)
    if steps < 1:
        smallest = next((b * calls + final for b in range(1, 64) if cls.steps_for(b, options) >= 1), None)
        raise ValueError(
            f"nfe={nfe} is too small for solver {name!r} ({cls.evals_per_step(options)} evaluation(s) per step, "
            f"{final} for the final denoise); it needs nfe >= {smallest}"
        )
    kind = grid if isinstance(grid, str) else (spec.default_grid if isinstance(field.path, GaussianPath) else "uniform")
    if grid is None and kind in ("logsnr", "karras") and float(field.path.table(t0).alpha) == 0.0:
        kind = "quadratic"  # the default grid is defined through λ, which is −∞ at α(t_start) = 0
    return Plan(make_grid(field.path, kind, steps, t0, t1, **(grid_options or {})), budget)


def interval(field: Any, grid: Any, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    """``(t_start, t_end)``: given, from an explicit grid, or the path's safe interval; checked."""
    lo, hi = float(field.path.t_min), float(field.path.t_max)
    times = None if grid is None or isinstance(grid, str) else validate_grid(grid)
    t0 = (lo if times is None else float(times[0])) if t_start is None else t_start
    t1 = (hi if times is None else float(times[-1])) if t_end is None else t_end
    t0, t1 = check_float("t_start", t0), check_float("t_end", t1)
    if not t0 < t1:
        raise ValueError(f"need t_start < t_end (generation runs forward in t), got t_start={t0!r}, t_end={t1!r}")
    if t0 < lo - 1e-12 or t1 > hi + 1e-12:
        raise ValueError(
            f"[t_start, t_end] = [{t0!r}, {t1!r}] must lie inside the path's safe interval [t_min, t_max] = [{lo!r}, {hi!r}]"
        )
    return max(t0, lo), min(t1, hi)  # times within round-off of the interval, e.g. from path.t_of_log_snr


def final_denoise(run: Run, x: Tensor, t_end: float) -> Tensor:
    """The data prediction at ``t_end``: :math:`E[x_1|x_t]` on a Gaussian path (one call, with the
    denoiser hook); on an interpolant one Euler step of the probability-flow ODE to ``t = 1``,
    :math:`x + (1 - t)\\,b(x, t)` (exact for the one-sided linear interpolant)."""
    if run.path is not None:
        return run.evaluate_at(x, t_end)[0]
    return x + (1.0 - t_end) * run.velocity(x, t_end)


def sample(field: Any, x_init: Tensor, solver: str | None = None, nfe: int | None = None,
           grid: str | Tensor | Sequence[float] | None = None, t_start: float | None = None, t_end: float | None = None,
           denoise_final: bool = True, generator: torch.Generator | None = None, return_trajectory: bool = False,
           callback: Callable[[int, float, Tensor, Tensor | None], None] | None = None, cond: dict | None = None,
           grid_options: dict | None = None, check_finite: bool = True, return_logp: bool = False,
           hooks: Hooks | None = None, differentiable: bool = False, **options: Any) -> SampleResult:
    r"""Integrate a field's sampling ODE/SDE from ``t_start`` to ``t_end`` with a named solver.

    Arguments:
        field: a :class:`~flowdiff.Field` (Gaussian path) or :class:`~flowdiff.InterpolantField`.
        x_init: the state at ``t_start``, shape ``(B, *)``; the run follows its dtype and device.
        solver: a name from :func:`available`; default :func:`default_solver`.
        nfe: budget of model calls, final denoise included (module docstring); a cap for adaptive
            solvers (default 10 000); default 20 for fixed-step solvers without an explicit grid.
        grid: a kind from :data:`GRID_KINDS` (:func:`~flowdiff.solvers.make_grid`), an increasing
            array of times from ``t_start`` to ``t_end`` (then ``nfe`` may be omitted) or a
            :class:`~flowdiff.solvers.TunedGrid` (its solver, nfe and final denoise too). Default:
            the solver's ``default_grid`` (``"uniform"`` on interpolants).
        t_start, t_end: default the path's ``[t_min, t_max]``, which they must lie inside.
        denoise_final: return the data prediction at ``t_end`` (one call, counted in ``nfe``).
        generator: for stochastic solvers.
        return_trajectory: keep the state at every grid time.
        callback: ``callback(i, t, x, denoised)`` after each step ``i``.
        cond: conditioning keyword arguments passed to every model call.
        grid_options: extra keywords for :func:`~flowdiff.solvers.make_grid` (``rho``, ``shift``).
        check_finite: stop with :class:`NonFiniteStateError` naming the step and time where a
            state stops being finite.
        return_logp: also compute ``log_prob`` of ``state`` at no extra model evaluation
            (:mod:`flowdiff.solvers.logp`; ``options`` then take its keywords: ``divergence``,
            ``probes``, ``prior``, ``rtol``, …).
        hooks: :class:`Hooks` (module docstring).
        differentiable: keep the autograd graph through the solve (back-propagation through the
            sampler, e.g. reward fine-tuning). Default ``False``: the loop runs under
            :func:`torch.no_grad`, as diffusers' pipelines do, so a model with trainable parameters
            does not build a graph over every step; a hook that needs gradients (guidance) opens
            ``torch.enable_grad()`` itself.
        **options: solver options (see each solver); an unknown name is a ValueError listing
            the valid ones.

    Returns:
        :class:`SampleResult`.
    """
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a torch.Tensor, got {type(x_init).__name__}")
    if not x_init.is_floating_point():
        raise TypeError(f"x_init must be a floating-point tensor, got dtype {x_init.dtype}")
    if x_init.ndim < 1:
        raise ValueError("x_init must have a batch dimension, got a 0-d tensor")
    if not hasattr(field, "nfe") or not hasattr(field, "path"):
        raise TypeError(f"field must be a fd.Field or fd.InterpolantField (with .path and .nfe), got {type(field).__name__}")
    if not isinstance(field.path, (GaussianPath, StochasticInterpolant)):
        raise TypeError(f"field.path must be a GaussianPath or StochasticInterpolant, got {type(field.path).__name__}")
    if hasattr(grid, "sample_kwargs"):  # a TunedGrid: its solver, nfe, grid, final denoise and tuned options, checked
        tuned = grid.sample_kwargs(field, solver, nfe)
        solver, nfe, grid, denoise_final = tuned.pop("solver"), tuned.pop("nfe"), tuned.pop("grid"), tuned.pop("denoise_final")
        options = {**tuned, **options}  # tune_solver's coefficients; options given here win
    if return_logp:  # the log-density sampler of the solvers layer (no import of flowdiff.likelihood)
        from .logp import sample_returning_logp

        return sample_returning_logp(field, x_init, solver, nfe, grid, t_start, t_end, denoise_final, generator,
                                     cond, check_finite, options)
    hooks = Hooks() if hooks is None else hooks
    if not isinstance(hooks, Hooks):
        raise TypeError(f"hooks must be a fd.solvers.Hooks, got {type(hooks).__name__}")
    if nfe is not None:
        nfe = check_int("nfe", nfe, 1)
    name = default_solver(field, nfe) if solver is None else solver
    if solver is None and isinstance(field.path, GaussianPath) and name == "unipc" and "prediction" not in options:
        t_first = interval(field, grid if not hasattr(grid, "sample_kwargs") else None, t_start, t_end)[0]
        if float(field.path.table(t_first).alpha) == 0.0:  # pure noise at t_start: the data form starts there exactly
            options = {**options, "prediction": "data"}
    spec = get_solver(name)
    if spec.requires_gaussian_path:
        require_gaussian_path(field, name)
    opts = spec.resolve(options)
    if isinstance(grid, str) and grid not in GRID_KINDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRID_KINDS)} or an increasing array of times")
    t0, t1 = interval(field, grid, t_start, t_end)
    planned = plan(spec, opts, field, nfe, grid, t0, t1, denoise_final, grid_options)
    cond = dict(cond or {})
    run = Run(name, field, planned.times.tolist(), planned.budget, cond, generator, hooks, x_init)
    stepper: Solver = spec.cls(run, opts)

    start_nfe = field.nfe
    visited = [t0]
    trajectory: list[Tensor] | None = [x_init] if return_trajectory else None
    log_weights = torch.zeros(x_init.shape[0], dtype=x_init.dtype, device=x_init.device) if hooks.step else None

    def report(i: int, t: float, x: Tensor, denoised: Tensor | None) -> Tensor:
        nonlocal log_weights
        if check_finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteStateError(
                f"solver {name!r}: the state became non-finite ({int((~torch.isfinite(x)).sum())} entries NaN/inf) at "
                f"step {i} (t={float(t):.6g}, after {field.nfe - start_nfe} model calls)"
            )
        visited.append(float(t))
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(i, float(t), x, denoised)
        if hooks.step is not None:
            new = hooks.step(LoopState(i, float(t), x, denoised, log_weights))  # type: ignore[arg-type]
            if new is not None:
                if new.ancestors is not None:
                    stepper.reindex(new.ancestors, x.shape[0])
                x, log_weights = new.x, new.log_weights
        return x

    if check_finite and not bool(torch.isfinite(x_init).all()):
        raise NonFiniteStateError(f"x_init has non-finite entries ({int((~torch.isfinite(x_init)).sum())} NaN/inf)")
    by_solver = spec.final_denoise and denoise_final
    with contextlib.nullcontext() if differentiable else torch.no_grad():
        state = stepper.drive(x_init, report) if spec.adaptive else _loop(stepper, run, x_init, report, by_solver)
        final = stepper.final_denoised if by_solver and denoise_final else None
        if denoise_final and final is None:
            final = final_denoise(run, state, t1)
    if final is not None and check_finite and not bool(torch.isfinite(final).all()):
        raise NonFiniteStateError(f"solver {name!r}: the final denoised prediction at t={t1:.6g} is non-finite")
    used = field.nfe - start_nfe
    if nfe is not None and used > nfe:  # a solver bug: the plan says never
        raise RuntimeError(f"solver {name!r} made {used} model calls, more than nfe={nfe}")
    return SampleResult(
        x=state if final is None else final, nfe=used, grid=torch.tensor(visited, dtype=torch.float64), solver=name,
        state=state, denoised=final, trajectory=trajectory, nfe_budget=nfe, options=dict(options),
        log_weights=log_weights, transitions=run.transitions,
    )


def _loop(stepper: Solver, run: Run, x: Tensor, report: Callable[..., Tensor], final_by_solver: bool) -> Tensor:
    """The loop of every fixed-grid solver (module docstring); returns the state at ``t_end``."""
    denoised = None
    for i in range(run.steps):
        if i:
            x = report(i - 1, run.times[i], stepper.revise(i, x), denoised)
        x, denoised = stepper.step(i, x)
    if final_by_solver:  # the final denoise's evaluation also corrects the last step
        x = stepper.revise(run.steps, x)
    return report(run.steps - 1, run.times[-1], x, denoised)
