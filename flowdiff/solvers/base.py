r"""The solver contract: a solver is a *step*; the loop, the budget and the hooks live in :mod:`.loop`.

Every sampler integrates, forward in time from ``t_start`` (noise side) to ``t_end`` (data
side), the sampling equation shared by the library (DESIGN.md)

.. math::

    dX_t = \big[b(X_t, t) + \varepsilon(t)\,s(X_t, t)\big]\,dt + \sqrt{2\varepsilon(t)}\,dW_t,

where ``b`` is the probability-flow velocity and ``s`` the score; ``ε ≡ 0`` is the
probability-flow ODE (ODE solvers and exponential integrators), ``ε > 0`` one of the SDEs with
the same marginals (SDE solvers).

A solver is a subclass of :class:`Solver` (azula's one ``step``; k-diffusion's one signature):

.. code-block:: python

    class MySolver(Solver):
        options = {"order": 2}                 # the declared option vocabulary and defaults
        def step(self, i, x):                  # grid node i -> node i + 1
            data, noise = self.run.evaluate(x, i)  # one model call, x̂ and ε̂ (hooks applied)
            return x_next, data                # the new state and the data prediction (or None)

    register_solver("my-solver", MySolver, kind="exponential", requires_gaussian_path=True)

The instance lives for one run; ``self.run`` (a :class:`~flowdiff.solvers.loop.Run`) holds the
grid, α, σ, λ at the nodes in float64 (``run.alpha[i]`` …), the model evaluations and the
noise draws. Per-sample state carried between steps (multistep history) goes in
``self.memory`` so that the loop can reindex it when a hook resamples the particles. A
predictor–corrector solver also overrides :meth:`Solver.revise`, which the loop calls at node
``i`` before it reports step ``i − 1``: the model evaluation at the predicted state corrects
it (UniPC, DPM-Solver-v3). Budget rules are class methods that see the options
(:meth:`Solver.evals_per_step`, :meth:`Solver.steps_for`, :meth:`Solver.calls_per_eval`).

A registered *name* is a configuration of a solver class: some options fixed (passing them
again is an error), some defaults changed; ``DDIM``, ``DDPM``/``DDIM-η`` and
``SDE-DPM-Solver++(1)`` are three names of one η-parametrised step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import torch
from torch import Tensor

from ..fields import Field, InterpolantField, _convert
from ..paths import GaussianPath
from ..paths.gaussian import PathCoefficients

__all__ = [
    "DEFAULT_INTERPOLANT_SOLVER", "DEFAULT_SOLVER", "LOW_NFE", "LOW_NFE_SOLVER", "SOLVER_KINDS",
    "GaussianEvaluator", "GaussianPathRequiredError", "NonFiniteStateError", "SampleResult", "Solver", "SolverSpec",
    "available", "default_solver", "final_calls", "get_solver", "register_solver", "require_gaussian_path",
    "time_tensor", "velocity_calls"
]

#: The kinds a solver may be registered as.
SOLVER_KINDS = ("ode", "exponential", "sde")


class NonFiniteStateError(FloatingPointError, ValueError):
    """A sampler produced a NaN or infinite state; the message names the step and the time."""


class GaussianPathRequiredError(TypeError, ValueError):
    """A solver that works in log-SNR was given a field without a Gaussian path (a TypeError and a ValueError)."""


def require_gaussian_path(field: Any, solver: str) -> GaussianPath:
    """The field's Gaussian path, or a :class:`GaussianPathRequiredError` saying that ``solver`` needs one."""
    path = getattr(field, "path", None)
    if isinstance(path, GaussianPath):
        return path
    odes = ", ".join(n for n in available("ode"))
    raise GaussianPathRequiredError(
        f"solver {solver!r} needs a Gaussian path (a fd.Field on alpha(t), sigma(t)), got "
        f"{type(field).__name__} on {type(path).__name__}; for stochastic interpolants use an ODE solver "
        f"({odes}) or 'euler-maruyama' / 'pc'"
    )


def velocity_calls(field: Any) -> int:
    """Model calls one ``field.velocity`` costs: 2 for an InterpolantField that predicts the
    velocity ``v`` of a two-sided interpolant (``b = v − γγ̇ s`` needs the score model), else 1."""
    two_sided_velocity = (
        isinstance(field, InterpolantField)
        and field.prediction == "velocity"
        and field.interpolant.gamma_fn.name != "zero"
    )
    return 2 if two_sided_velocity else 1


def final_calls(field: Any, denoise_final: bool) -> int:
    """Model calls of the final denoise (the one place the budget counts it): one data prediction
    on a Gaussian path, one velocity (an Euler step to t = 1) on an interpolant; 0 without it."""
    if not denoise_final:
        return 0
    return 1 if isinstance(field.path, GaussianPath) else velocity_calls(field)


def time_tensor(t: float, like: Tensor) -> Tensor:
    """A 0-d tensor holding ``t`` in the dtype/device of ``like`` (what a model call receives)."""
    return torch.tensor(t, dtype=like.dtype, device=like.device)


def check_choice(solver: str, label: str, value: Any, allowed: Sequence) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming both."""
    if value not in allowed:
        raise ValueError(f"{solver}: unknown {label} {value!r}; valid: {', '.join(map(str, allowed))}")
    return value


def check_flag(solver: str, label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{solver}: {label} must be True or False, got {label}={value!r}")
    return value


class GaussianEvaluator:
    r"""One model call at ``(x, t)`` → the data prediction x̂ and the noise prediction ε̂.

    For a :class:`~flowdiff.Field` the raw output (``field.predict``) is converted with
    α, σ, α̇, σ̇ computed in float64 at ``t`` (the conversions of :mod:`flowdiff.fields`): one
    model call per evaluation whatever the prediction type. Any other object with a Gaussian
    ``path`` and a ``denoise(x, t, **cond)`` method (a guidance wrapper, say) is used through
    ``denoise``, and ε̂ = (x − αx̂)/σ. ``denoiser_hook(x, t, x̂) -> x̂'`` (``t`` of shape
    ``(B,)``) replaces x̂ after every call, and ε̂ follows: (x − αx̂')/σ.
    """

    def __init__(self, field: Any, path: GaussianPath, cond: dict | None = None,
                 denoiser_hook: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None):
        self.field, self.path, self.cond = field, path, dict(cond or {})
        self.hook = denoiser_hook
        self._raw = isinstance(field, Field)

    def coefficients(self, t: float) -> tuple[float, float, float, float]:
        """(α, σ, α̇, σ̇) at ``t`` as float64 Python floats."""
        return self.path.table([t]).floats(0)

    def __call__(self, x: Tensor, t: float, coefficients: tuple[float, float, float, float] | None = None) -> tuple[Tensor, Tensor]:
        """``(x̂, ε̂)`` at ``(x, t)`` from one model call; ``coefficients`` = (α, σ, α̇, σ̇) if known."""
        c = PathCoefficients(*(coefficients if coefficients is not None else self.coefficients(t)))
        tt = time_tensor(t, x)
        if self._raw:
            out = self.field.predict(x, tt, **self.cond)
            source = self.field.prediction
            data, noise = _convert(out, x, c, source, "data"), _convert(out, x, c, source, "noise")
        else:
            data, noise = self.field.denoise(x, tt, **self.cond), None
        if self.hook is not None:
            data, noise = self.hook(x, tt.expand(x.shape[0]), data), None
        return data, _convert(data, x, c, "data", "noise") if noise is None else noise


def _reindex(value: Any, index: Tensor, batch: int) -> Any:
    """``value`` with every per-sample tensor (leading dimension ``batch``) reindexed by ``index``."""
    if isinstance(value, Tensor):
        return value[index] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, list):
        return [_reindex(v, index, batch) for v in value]
    if isinstance(value, tuple):
        return tuple(_reindex(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: _reindex(v, index, batch) for k, v in value.items()}
    return value


class Solver:
    """One step of a sampler (see the module docstring). Subclasses set the class attributes,
    validate their options in ``__init__`` (after ``super().__init__``) and implement :meth:`step`."""

    #: Declared options and their defaults (what :func:`~flowdiff.sample` accepts for it).
    options: dict[str, Any] = {}
    #: Field evaluations per grid step (class default; :meth:`evals_per_step` may read the options).
    evals: int = 1
    #: Whether the step can revise the state it was given with the next evaluation (UniPC, v3).
    corrects: bool = False

    def __init__(self, run: Any, options: Mapping[str, Any]):
        self.run = run
        self.name = run.name
        self.opts = {**self.options, **options}
        self.memory: dict[str, Any] = {}

    @property
    def final_denoised(self) -> Tensor | None:
        """With ``final_denoise``: the data prediction the solver made at ``t_end`` itself (in
        ``memory``, so that it follows the particles when the last step's hook resamples them)."""
        return self.memory.get("final_denoised")

    @classmethod
    def evals_per_step(cls, options: Mapping[str, Any]) -> int:
        return cls.evals

    @classmethod
    def steps_for(cls, budget: int, options: Mapping[str, Any]) -> int:
        """Grid steps to take with ``budget`` evaluations (0: too small)."""
        return budget // cls.evals_per_step(options)

    @classmethod
    def calls_per_eval(cls, field: Any, options: Mapping[str, Any]) -> int:
        """Model calls one evaluation costs on ``field``."""
        return velocity_calls(field)

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The state at node ``i + 1`` from the state ``x`` at node ``i``, and the data
        prediction the step used (``None`` if it has none)."""
        raise NotImplementedError

    def revise(self, i: int, x: Tensor) -> Tensor:
        """The state at node ``i`` revised by an evaluation there (default: unchanged).

        Called by the loop before step ``i − 1`` is reported; with ``final_denoise`` also at
        ``i = steps``, where the solver sets :attr:`final_denoised`."""
        return x

    def reindex(self, index: Tensor, batch: int) -> None:
        """Reorder the per-sample memory after the particles were resampled with ``index``."""
        self.memory = _reindex(self.memory, index, batch)


@dataclass(frozen=True)
class SolverSpec:
    """What the registry knows about one registered name (the :func:`register_solver` keywords).

    Attributes:
        name, cls: the registered name and its :class:`Solver` subclass; ``alias_of``: the
            canonical name when this entry is an alias.
        kind: ``"ode"``, ``"exponential"`` or ``"sde"``; ``stochastic``: draws noise;
            ``adaptive``: chooses its own steps (``nfe`` is a cap).
        requires_gaussian_path: needs a :class:`~flowdiff.Field` on a Gaussian path (α, σ, λ).
        default_grid: the grid kind for ``grid=None`` on a Gaussian path (interpolants: uniform).
        fixed, defaults: options this name fixes (passing them is an error) or re-defaults;
            ``required_options``: options without a default (DPM-Solver-v3's ``ems``).
        description: one line for listings.
        final_denoise: the solver makes the final denoising evaluation itself
            (:meth:`Solver.revise` at ``t_end``) so that it can also correct its last step.
    """

    name: str
    cls: type
    kind: str
    requires_gaussian_path: bool = False
    stochastic: bool = False
    adaptive: bool = False
    default_grid: str = "uniform"
    fixed: Mapping[str, Any] = dataclass_field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclass_field(default_factory=dict)
    required_options: tuple[str, ...] = ()
    description: str = ""
    alias_of: str | None = None
    final_denoise: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The options this name accepts, with their defaults."""
        return {k: v for k, v in {**self.cls.options, **self.defaults}.items() if k not in self.fixed}

    def steps(self, budget: int, options: Mapping[str, Any] | None = None) -> int:
        """Number of grid steps this solver takes with ``budget`` evaluations (its ``steps_for`` rule)."""
        return int(self.cls.steps_for(budget, self.resolve(options or {})))

    @property
    def evals_per_step(self) -> int:
        return self.cls.evals_per_step({**self.cls.options, **self.defaults, **self.fixed})

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The full option set of a run: declared defaults, this name's defaults and fixed
        values, and the caller's ``options`` (unknown or fixed names are a ValueError)."""
        valid = self.options
        for key in options:
            if key in self.fixed:
                raise ValueError(f"solver {self.name!r} fixes {key}={self.fixed[key]!r}; use another solver name to change it")
            if key not in valid:
                raise ValueError(f"unknown option {key!r} for solver {self.name!r}; valid: {', '.join(valid) or '(none)'}")
        missing = [o for o in self.required_options if o not in options]
        if missing:
            raise ValueError(f"solver {self.name!r} needs the option(s) {', '.join(missing)}; see its docstring")
        return {**self.cls.options, **self.defaults, **options, **self.fixed}


_REGISTRY: dict[str, SolverSpec] = {}


def register_solver(name: str, cls: type, *, aliases: Sequence[str] = (), overwrite: bool = False, **spec: Any) -> SolverSpec:
    """Add a :class:`Solver` subclass to the registry behind :func:`sample` under ``name`` (and ``aliases``).

    Arguments: ``spec`` are the fields of :class:`SolverSpec` (``kind``, ``requires_gaussian_path``,
    ``stochastic``, ``adaptive``, ``default_grid``, ``fixed``, ``defaults``, ``required_options``,
    ``description``, ``final_denoise``). ``overwrite=False`` refuses to replace an existing name.

    Returns:
        The :class:`SolverSpec` stored under ``name``.
    """
    from .grids import GRID_KINDS

    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")
    check_choice(name, "solver kind", spec.setdefault("kind", "ode"), SOLVER_KINDS)
    check_choice(name, "default_grid", spec.get("default_grid", "uniform"), GRID_KINDS)
    for n in (name, *aliases):
        if n in _REGISTRY and not overwrite:
            raise ValueError(f"a solver named {n!r} is already registered (pass overwrite=True to replace it)")
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise TypeError(f"a solver must be a subclass of fd.solvers.Solver, got {cls!r}")
    spec["required_options"] = tuple(spec.get("required_options", ()))
    _REGISTRY[name] = entry = SolverSpec(name=name, cls=cls, **spec)
    for alias in aliases:
        _REGISTRY[alias] = SolverSpec(**{**entry.__dict__, "name": alias, "alias_of": name})
    return entry


def available(kind: str | None = None, *, stochastic: bool | None = None) -> list[str]:
    """Names :func:`sample` accepts (aliases included), sorted; optionally only one ``kind``
    (``"ode"``, ``"exponential"``, ``"sde"``) and/or only (non-)stochastic ones."""
    if kind is not None:
        check_choice("available", "solver kind", kind, SOLVER_KINDS)
    return sorted(
        n for n, s in _REGISTRY.items()
        if (kind is None or s.kind == kind) and (stochastic is None or s.stochastic == stochastic)
    )


def get_solver(name: str) -> SolverSpec:
    """The :class:`SolverSpec` registered under ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(available())}")
    return _REGISTRY[name]


#: Default solver on a Gaussian path: UniPC with its budget-dependent defaults (data prediction and
#: bh2 below 12 steps; from there the model's own form), time-quadratic grid, at every budget.
#: Measured (benchmarks/results/solvers_trained.md, docs/solvers.md): on four trained digits models
#: (UNet and MLPs, data/velocity/noise predictions) it has 0.53-0.98x the error of DPM-Solver++(2M)
#: on the same grid at 4-10 NFE and 0.33-0.70x at 15-20; on the exact d = 32 mixture 0.92-0.93x at
#: 5-6 NFE but 1.04x / 1.26x at 8 / 10 NFE, the one place where 2M (the default up to 10 NFE before
#: issue 12) was better.
DEFAULT_SOLVER = "unipc"
#: Kept for compatibility: the default below ``LOW_NFE`` evaluations is now the same as above it.
LOW_NFE_SOLVER = DEFAULT_SOLVER
LOW_NFE = 10
#: Default solver on a stochastic interpolant (no log-SNR, so a Runge–Kutta method in t).
DEFAULT_INTERPOLANT_SOLVER = "heun"


def default_solver(field: Any, nfe: int | None = None) -> str:
    """The solver :func:`sample` uses when none is named: ``DEFAULT_SOLVER`` (UniPC with its
    budget-dependent defaults, time-quadratic grid) on a Gaussian path, ``DEFAULT_INTERPOLANT_SOLVER``
    on a stochastic interpolant. ``nfe`` is accepted for callers that chose by budget."""
    if not isinstance(getattr(field, "path", None), GaussianPath):
        return DEFAULT_INTERPOLANT_SOLVER
    return DEFAULT_SOLVER


@dataclass
class SampleResult:
    """What :func:`sample` returns.

    Attributes:
        x: the result: the data prediction at ``t_end`` when ``denoise_final``, else the state
            at ``t_end``. Shape and dtype of ``x_init``.
        nfe: model evaluations really made (the field's counter difference).
        grid: the times the solver actually stepped through, ``grid[0] = t_start``,
            ``grid[-1] = t_end`` (for adaptive solvers, the accepted steps), float64 on CPU.
        solver: the solver's name.
        state: the state at ``t_end`` before the final denoising.
        denoised: the data prediction at ``t_end`` (``None`` without ``denoise_final``).
        trajectory: the states at every time of ``grid`` (``x_init`` first, ``state`` last)
            when ``return_trajectory``, else ``None``.
        nfe_budget: the ``nfe`` the caller allowed (``None`` if unlimited).
        options: the solver options used.
        log_prob, log_prob_std_error: with ``return_logp=True``, the log-density of ``state``
            per sample and its Monte Carlo standard error (``logp``/``logp_std_error`` are
            read-only aliases).
        log_weights: with a step hook, the per-sample log-weights it left (``(B,)``), else ``None``.
        transitions: with ``Hooks(record_transitions=True)``, every Gaussian transition of the
            run (:class:`~flowdiff.solvers.Transition`), else ``None``.
    """

    x: Tensor
    nfe: int
    grid: Tensor
    solver: str
    state: Tensor
    denoised: Tensor | None = None
    trajectory: list[Tensor] | None = None
    nfe_budget: int | None = None
    options: dict = dataclass_field(default_factory=dict)
    log_prob: Tensor | None = None
    log_prob_std_error: Tensor | None = None
    log_weights: Tensor | None = None
    transitions: list | None = None

    @property
    def logp(self) -> Tensor | None:
        """Deprecated alias of :attr:`log_prob` (read-only)."""
        return self.log_prob

    @property
    def logp_std_error(self) -> Tensor | None:
        """Deprecated alias of :attr:`log_prob_std_error` (read-only)."""
        return self.log_prob_std_error

    @property
    def t_start(self) -> float:
        return float(self.grid[0])

    @property
    def t_end(self) -> float:
        return float(self.grid[-1])

    @property
    def steps(self) -> int:
        """Number of solver steps taken (``len(grid) - 1``)."""
        return len(self.grid) - 1

    def __repr__(self) -> str:
        return (
            f"SampleResult(solver={self.solver!r}, nfe={self.nfe}, steps={self.steps}, "
            f"t=[{self.t_start:.4g}, {self.t_end:.4g}], x={tuple(self.x.shape)} {self.x.dtype})"
        )


def lower_order_final(policy: Any, steps: int, i: int, order: int, solver: str) -> int:
    """Order allowed on step ``i`` of ``steps`` by a lower-order-final policy: ``True`` (always
    lower the last steps to ``steps − i``), ``False`` (never) or an int ``n`` (only below n steps)."""
    if isinstance(policy, bool):
        active = policy
    elif isinstance(policy, int) and policy >= 0:
        active = steps < policy
    else:
        raise ValueError(
            f"{solver}: lower_order_final must be True, False or an int >= 0 (apply below that many steps), got {policy!r}"
        )
    return min(order, steps - i) if active else order
