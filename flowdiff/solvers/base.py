r"""The sampling framework: one :func:`sample` in front of a registry of solvers.

Every sampler integrates, forward in time from ``t_start`` (noise side) to ``t_end`` (data
side), the sampling equation shared by the library (DESIGN.md)

.. math::

    dX_t = \big[b(X_t, t) + \varepsilon(t)\,s(X_t, t)\big]\,dt + \sqrt{2\varepsilon(t)}\,dW_t,

where ``b`` is the probability-flow velocity and ``s`` the score; ``ε ≡ 0`` is the
probability-flow ODE (ODE solvers and exponential integrators), ``ε > 0`` one of the SDEs with
the same marginals (SDE solvers).

A *solver* is one function with the common signature

.. code-block:: python

    fn(field, x, grid, *, generator=None, callback=None, cond=None, max_evals=None, **options) -> Tensor

* ``field``: a :class:`~flowdiff.Field` (Gaussian path) or :class:`~flowdiff.InterpolantField`;
* ``x``: the state at ``grid[0]`` (shape ``(B, *)``, any float dtype/device);
* ``grid``: the time grid, a 1-D float64 CPU tensor, increasing, ``grid[0] = t_start``,
  ``grid[-1] = t_end`` (adaptive solvers only use its two ends);
* ``callback(i, t, x, denoised)``: must be called after every step ``i = 0, 1, …`` with the
  time reached ``t`` (a float), the new state and, when the solver has it, the data prediction
  it used (else ``None``). :func:`sample` wraps it to check for non-finite states, record
  the trajectory and the times actually visited, and forward to the user's callback;
* ``cond``: conditioning keyword arguments for the model (``model(x, t, **cond)``);
* ``max_evals``: the number of *evaluations* (field calls such as ``field.velocity`` or one
  ``predict``) the solver may make; it must never make more.

It returns the state at ``grid[-1]``. A solver is made available by :func:`register_solver`.

A solver registered with ``final_denoise=True`` is also passed ``denoise_final`` and, when it
is true, makes the final data-prediction evaluation itself and returns ``(state, denoised)``
— so that the evaluation can also correct its last step (DPM-Solver-v3 does); it still counts
as the final denoise in the budget below.

**Budget accounting.** ``nfe`` passed to :func:`sample` is the total number of model calls,
*including* the final denoising evaluation. With ``denoise_final`` one evaluation is reserved
for it; the rest, ``nfe − 1``, is the solver's budget, from which the solver's
``steps_for_budget`` rule picks the number of grid steps (``budget // evals_per_step`` unless
the solver says otherwise). :attr:`SampleResult.nfe` is read from the field's own counter, so
it is what was really spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..fields import Field, InterpolantField
from ..paths import PREDICTIONS, GaussianPath, StochasticInterpolant

__all__ = [
    "DEFAULT_INTERPOLANT_SOLVER",
    "DEFAULT_SOLVER",
    "LOW_NFE",
    "LOW_NFE_SOLVER",
    "SOLVER_KINDS",
    "GaussianEvaluator",
    "NonFiniteStateError",
    "PathTable",
    "SampleResult",
    "SolverFn",
    "SolverSpec",
    "available",
    "default_solver",
    "get_solver",
    "register_solver",
    "require_gaussian_path",
    "GaussianPathRequiredError",
    "sample",
    "time_tensor",
]

#: The kinds a solver may be registered as.
SOLVER_KINDS = ("ode", "exponential", "sde")

#: nfe used when neither ``nfe`` nor an explicit grid is given to a fixed-step solver.
DEFAULT_NFE = 20
#: Model-call cap of adaptive solvers when ``nfe`` is not given.
DEFAULT_ADAPTIVE_CAP = 10_000


class SolverFn(Protocol):
    """The common signature of every registered solver (see the module docstring)."""

    def __call__(
        self,
        field: Any,
        x: Tensor,
        grid: Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: Callable[[int, float, Tensor, Tensor | None], None] | None = None,
        cond: dict | None = None,
        max_evals: int | None = None,
        **options: Any,
    ) -> Tensor: ...


class NonFiniteStateError(FloatingPointError, ValueError):
    """A sampler produced a NaN or infinite state; the message names the step and the time."""


@dataclass(frozen=True)
class SolverSpec:
    """What the registry knows about one solver.

    Attributes:
        name: registered name (what :func:`sample` accepts).
        fn: the solver function (common signature, see :mod:`flowdiff.solvers.base`).
        kind: ``"ode"``, ``"exponential"`` or ``"sde"``.
        evals_per_step: field evaluations per grid step (1 for multistep methods, 2 for Heun, …).
        requires_gaussian_path: needs a :class:`~flowdiff.Field` on a Gaussian path (α, σ, λ).
        stochastic: draws noise (uses ``generator``).
        adaptive: chooses its own steps; ``nfe`` is a cap, not a target.
        default_grid: grid kind used when :func:`sample` gets ``grid=None`` (on a Gaussian path;
            stochastic interpolants always fall back to ``"uniform"``).
        steps_for_budget: ``budget -> steps``, the number of grid steps to take with ``budget``
            evaluations (default ``budget // evals_per_step``); 0 means the budget is too small.
        calls_per_eval: ``field -> int``, model calls per evaluation (default: 2 for an
            :class:`~flowdiff.InterpolantField` whose velocity needs its score model, else 1).
        description: one line for listings.
        required_options: options without a default that :func:`sample` must be given
            (e.g. DPM-Solver-v3's ``ems``); a missing one is a ValueError naming it.
        alias_of: the canonical name when this entry is an alias.
        final_denoise: the solver makes the final denoising evaluation itself (it is passed
            ``denoise_final`` and then returns ``(state, denoised)``; see the module docstring).
    """

    name: str
    fn: Callable[..., Tensor]
    kind: str
    evals_per_step: int
    requires_gaussian_path: bool = False
    stochastic: bool = False
    adaptive: bool = False
    default_grid: str = "uniform"
    steps_for_budget: Callable[[int], int] | None = None
    calls_per_eval: Callable[[Any], int] | None = None
    description: str = ""
    required_options: tuple[str, ...] = ()
    alias_of: str | None = None
    final_denoise: bool = False

    def steps(self, budget: int) -> int:
        """Number of grid steps this solver takes with ``budget`` evaluations."""
        if self.steps_for_budget is not None:
            return int(self.steps_for_budget(budget))
        return budget // self.evals_per_step

    def model_calls_per_eval(self, field: Any) -> int:
        """Model calls one evaluation costs on ``field``."""
        if self.calls_per_eval is not None:
            return int(self.calls_per_eval(field))
        return velocity_calls(field)


_REGISTRY: dict[str, SolverSpec] = {}


def register_solver(
    name: str,
    fn: Callable[..., Tensor],
    *,
    kind: str = "ode",
    evals_per_step: int = 1,
    requires_gaussian_path: bool = False,
    stochastic: bool = False,
    adaptive: bool = False,
    default_grid: str = "uniform",
    steps_for_budget: Callable[[int], int] | None = None,
    calls_per_eval: Callable[[Any], int] | None = None,
    description: str = "",
    aliases: Sequence[str] = (),
    required_options: Sequence[str] = (),
    overwrite: bool = False,
    final_denoise: bool = False,
) -> SolverSpec:
    """Add a solver to the registry behind :func:`sample` (and its ``aliases``).

    Arguments: see :class:`SolverSpec`. ``overwrite=False`` refuses to replace an existing name.

    Returns:
        The :class:`SolverSpec` stored under ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"solver fn must be callable, got {type(fn).__name__}")
    if kind not in SOLVER_KINDS:
        raise ValueError(f"unknown solver kind {kind!r}; valid: {', '.join(SOLVER_KINDS)}")
    if not isinstance(evals_per_step, int) or isinstance(evals_per_step, bool) or evals_per_step < 1:
        raise ValueError(f"evals_per_step must be an int >= 1, got {evals_per_step!r}")
    from .grids import GRID_KINDS

    if default_grid not in GRID_KINDS:
        raise ValueError(f"unknown default_grid {default_grid!r}; valid: {', '.join(GRID_KINDS)}")
    names = [name, *aliases]
    for n in names:
        if n in _REGISTRY and not overwrite:
            raise ValueError(f"a solver named {n!r} is already registered (pass overwrite=True to replace it)")
    spec = SolverSpec(
        name=name,
        fn=fn,
        kind=kind,
        evals_per_step=evals_per_step,
        requires_gaussian_path=requires_gaussian_path,
        stochastic=stochastic,
        adaptive=adaptive,
        default_grid=default_grid,
        steps_for_budget=steps_for_budget,
        calls_per_eval=calls_per_eval,
        description=description,
        required_options=tuple(required_options),
        final_denoise=bool(final_denoise),
    )
    _REGISTRY[name] = spec
    for alias in aliases:
        _REGISTRY[alias] = SolverSpec(**{**spec.__dict__, "name": alias, "alias_of": name})
    return spec


def available(kind: str | None = None, *, stochastic: bool | None = None) -> list[str]:
    """Names :func:`sample` accepts (aliases included), sorted; optionally only one ``kind``
    (``"ode"``, ``"exponential"``, ``"sde"``) and/or only (non-)stochastic ones."""
    if kind is not None and kind not in SOLVER_KINDS:
        raise ValueError(f"unknown solver kind {kind!r}; valid: {', '.join(SOLVER_KINDS)}")
    return sorted(
        n
        for n, s in _REGISTRY.items()
        if (kind is None or s.kind == kind) and (stochastic is None or s.stochastic == stochastic)
    )


def get_solver(name: str) -> SolverSpec:
    """The :class:`SolverSpec` registered under ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(available())}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------
# Helpers shared by the solver modules
# ---------------------------------------------------------------------------------------


def velocity_calls(field: Any) -> int:
    """Model calls one ``field.velocity`` costs: 2 for an InterpolantField that predicts the
    velocity ``v`` of a two-sided interpolant (``b = v − γγ̇ s`` needs the score model), else 1."""
    two_sided_velocity = (
        isinstance(field, InterpolantField)
        and field.prediction == "velocity"
        and field.interpolant.gamma_fn.name != "zero"
    )
    return 2 if two_sided_velocity else 1


class GaussianPathRequiredError(TypeError, ValueError):
    """A solver that works in log-SNR was given a field without a Gaussian path.

    Both a ``TypeError`` (the field's kind is wrong) and a ``ValueError`` (the solver name is not
    allowed for this field), so either ``except`` clause catches it.
    """


def require_gaussian_path(field: Any, solver: str) -> GaussianPath:
    """The field's Gaussian path, or a :class:`GaussianPathRequiredError` saying that ``solver`` needs one."""
    path = getattr(field, "path", None)
    if isinstance(path, GaussianPath):
        return path
    odes = ", ".join(n for n in available("ode"))
    raise GaussianPathRequiredError(
        f"solver {solver!r} needs a Gaussian path (a fd.Field on alpha(t), sigma(t)), got "
        f"{type(field).__name__} on {type(path).__name__}; for stochastic interpolants use an ODE solver "
        f"({odes}) or an SDE solver"
    )


def time_tensor(t: float, like: Tensor) -> Tensor:
    """A 0-d tensor holding ``t`` in the dtype/device of ``like`` (what a model call receives)."""
    return torch.tensor(t, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class PathTable:
    r"""α, σ, their derivatives and λ = log(α/σ) of a Gaussian path at given times, in float64.

    Exponential integrators need these as exact as possible (EDM and DPM-Solver do their
    coefficient arithmetic in float64); they are kept as Python floats so that multiplying a
    float32 state by them costs no host–device transfer.
    """

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    d_alpha: list[float]
    d_sigma: list[float]
    log_snr: list[float]

    @classmethod
    def build(cls, path: GaussianPath, times: Tensor | Sequence[float]) -> PathTable:
        t = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
        return cls(
            t=t.tolist(),
            alpha=path._alpha(t).tolist(),
            sigma=path._sigma(t).tolist(),
            d_alpha=path._d_alpha(t).tolist(),
            d_sigma=path._d_sigma(t).tolist(),
            log_snr=path._log_snr(t).tolist(),
        )

    def __len__(self) -> int:
        return len(self.t)


def _to_data_noise(
    out: Tensor, x: Tensor, source: str, a: float, s: float, da: float, ds: float
) -> tuple[Tensor, Tensor]:
    """(x̂, ε̂) from a prediction of type ``source`` (formulas of :mod:`flowdiff.fields`)."""
    if source == "noise":
        return (x - s * out) / a, out
    if source == "data":
        return out, (x - a * out) / s
    if source == "score":
        return (x + (s * s) * out) / a, (-s) * out
    if source == "v":
        n = a * a + s * s
        return (a * x - s * out) / n, (s * x + a * out) / n
    if source == "velocity":
        det = da * s - ds * a  # = α σ λ̇ > 0
        return (s * out - ds * x) / det, (da * x - a * out) / det
    raise ValueError(f"unknown prediction {source!r}; valid: {', '.join(PREDICTIONS)}")


class GaussianEvaluator:
    r"""One model call at ``(x, t)`` → the data prediction x̂ and the noise prediction ε̂.

    For a :class:`~flowdiff.Field` the raw output (``field.predict``) is converted with
    α, σ, α̇, σ̇ computed in float64 at ``t``: one model call per evaluation whatever the
    prediction type, and the field's own prediction is passed through untouched. Any other
    object with a Gaussian ``path`` and a ``denoise(x, t, **cond)`` method (a guidance
    wrapper, say) is used through ``denoise``, and ε̂ = (x − αx̂)/σ.
    """

    def __init__(self, field: Any, path: GaussianPath, cond: dict | None = None):
        self.field, self.path, self.cond = field, path, dict(cond or {})
        self._raw = isinstance(field, Field)

    def coefficients(self, t: float) -> tuple[float, float, float, float]:
        """(α, σ, α̇, σ̇) at ``t`` as float64 Python floats."""
        tt = torch.tensor([t], dtype=torch.float64)
        p = self.path
        return float(p._alpha(tt)), float(p._sigma(tt)), float(p._d_alpha(tt)), float(p._d_sigma(tt))

    def __call__(self, x: Tensor, t: float, coefficients: tuple[float, float, float, float] | None = None) -> tuple[Tensor, Tensor]:
        """``(x̂, ε̂)`` at ``(x, t)`` from one model call; ``coefficients`` = (α, σ, α̇, σ̇) if known."""
        a, s, da, ds = coefficients if coefficients is not None else self.coefficients(t)
        tt = time_tensor(t, x)
        if self._raw:
            out = self.field.predict(x, tt, **self.cond)
            return _to_data_noise(out, x, self.field.prediction, a, s, da, ds)
        data = self.field.denoise(x, tt, **self.cond)
        return data, (x - a * data) / s


# ---------------------------------------------------------------------------------------
# The result and sample()
# ---------------------------------------------------------------------------------------


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


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    return value


#: Default solver on a Gaussian path up to LOW_NFE evaluations (docs/solvers.md: best at 5–10 NFE).
LOW_NFE_SOLVER = "dpm-solver++2m"
#: Default solver on a Gaussian path above LOW_NFE (UniPC with its budget-dependent defaults: robust on
#: trained models; docs/solvers.md).
DEFAULT_SOLVER = "unipc"
LOW_NFE = 10
#: Default solver on a stochastic interpolant (no log-SNR, so a Runge–Kutta method in t).
DEFAULT_INTERPOLANT_SOLVER = "heun"


def default_solver(field: Any, nfe: int | None) -> str:
    """The solver :func:`sample` uses when none is named: on a Gaussian path ``LOW_NFE_SOLVER``
    (DPM-Solver++(2M), time-quadratic grid) for ``nfe <= LOW_NFE`` and ``DEFAULT_SOLVER``
    (UniPC with its budget-dependent defaults, time-quadratic grid) above; ``DEFAULT_INTERPOLANT_SOLVER``
    on a stochastic interpolant."""
    if not isinstance(getattr(field, "path", None), GaussianPath):
        return DEFAULT_INTERPOLANT_SOLVER
    return LOW_NFE_SOLVER if nfe is not None and nfe <= LOW_NFE else DEFAULT_SOLVER


def _final_denoise(field: Any, x: Tensor, t_end: float, cond: dict) -> Tensor:
    """The data prediction at ``t_end``.

    Gaussian path: :math:`\\hat x = E[x_1 | x_{t}]` (one model call). Stochastic interpolant:
    there is no data prediction, so one Euler step of the probability-flow ODE to ``t = 1``,
    :math:`x + (1 - t)\\,b(x, t)` (exact for the one-sided linear interpolant, where it equals
    :math:`E[x_1|x_t]`).
    """
    path = getattr(field, "path", None)
    tt = time_tensor(t_end, x)
    if isinstance(path, GaussianPath):
        return GaussianEvaluator(field, path, cond)(x, t_end)[0]
    return x + (1.0 - t_end) * field.velocity(x, tt, **cond)


def _sample_with_logp(
    field: Any, x_init: Tensor, solver: str | None, nfe: int | None, grid: Any, t_start: float | None,
    t_end: float | None, denoise_final: bool, generator: torch.Generator | None, cond: dict | None,
    check_finite: bool, options: dict,
) -> SampleResult:
    # The likelihood layer sits above the solvers; it is imported here, only when asked for.
    from ..likelihood import LIKELIHOOD_SOLVERS, sample_with_logp

    name = solver or "adams"
    if name not in LIKELIHOOD_SOLVERS:
        raise ValueError(f"return_logp=True needs a solver from {', '.join(LIKELIHOOD_SOLVERS)}, got solver={name!r}")
    final_calls = (1 if isinstance(field.path, GaussianPath) else velocity_calls(field)) if denoise_final else 0
    if nfe is not None:
        nfe = _check_int("nfe", nfe, 1)
        if nfe - final_calls < 1:
            raise ValueError(f"nfe={nfe} leaves no evaluation for sampling after the final denoise")
    start_nfe = field.nfe
    kwargs = dict(options)
    if grid is not None:
        kwargs["grid"] = grid
    out = sample_with_logp(field, x_init, solver=name, nfe=None if nfe is None else nfe - final_calls,
                           t_start=t_start, t_end=t_end, cond=cond, generator=generator,
                           check_finite=check_finite, **kwargs)
    state, denoised = out.x, None
    t1 = float(field.path.t_max if t_end is None else t_end)
    if denoise_final:
        denoised = _final_denoise(field, state, t1, dict(cond or {}))
    return SampleResult(
        x=state if denoised is None else denoised, nfe=field.nfe - start_nfe,
        grid=torch.as_tensor(out.grid, dtype=torch.float64), solver=name, state=state, denoised=denoised,
        nfe_budget=nfe, options=kwargs, log_prob=out.log_prob, log_prob_std_error=out.std_error,
    )


def sample(
    field: Any,
    x_init: Tensor,
    solver: str | None = None,
    nfe: int | None = None,
    grid: str | Tensor | Sequence[float] | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    denoise_final: bool = True,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: Callable[[int, float, Tensor, Tensor | None], None] | None = None,
    cond: dict | None = None,
    grid_options: dict | None = None,
    check_finite: bool = True,
    return_logp: bool = False,
    **options: Any,
) -> SampleResult:
    r"""Integrate a field's sampling ODE/SDE from ``t_start`` to ``t_end`` with a named solver.

    Arguments:
        field: a :class:`~flowdiff.Field` (Gaussian path) or :class:`~flowdiff.InterpolantField`.
        x_init: the state at ``t_start``, shape ``(B, *)`` (e.g. ``path.prior_sample``); the
            whole run follows its dtype and device.
        solver: a name from :func:`available`; default :func:`default_solver` (DPM-Solver++(2M)
            up to 10 NFE and UniPC above on a Gaussian path, Heun on an interpolant).
        nfe: budget of model calls, *including* the final denoising call; fixed-step solvers
            spend it exactly (up to the remainder that no whole step fits), adaptive solvers
            treat it as a cap (default: unlimited up to 10 000). Default for fixed-step solvers
            without an explicit grid: 20.
        grid: a grid kind (``"uniform"``, ``"logsnr"``, ``"quadratic"``, ``"karras"``,
            ``"shifted"``; see :func:`~flowdiff.solvers.make_grid`) or an explicit increasing
            array of times from ``t_start`` to ``t_end`` (then ``nfe`` may be omitted).
            Default: the solver's ``default_grid`` (``"uniform"`` on interpolants).
        t_start, t_end: integration interval, default the path's ``[t_min, t_max]``; must lie
            inside it with ``t_start < t_end``. The model is never called outside it.
        denoise_final: return the data prediction at ``t_end`` (one model call, counted in
            ``nfe``) instead of the state.
        generator: for stochastic solvers.
        return_trajectory: keep the state at every grid time.
        callback: ``callback(i, t, x, denoised)`` after each step ``i``.
        cond: conditioning keyword arguments passed to every model call.
        grid_options: extra keywords for :func:`~flowdiff.solvers.make_grid` (``rho``, ``shift``).
        check_finite: stop with :class:`NonFiniteStateError` (a ``FloatingPointError`` and a
            ``ValueError``) naming the step and time where a state stops being finite.
        return_logp: also compute the log-density of every sample while sampling, at no extra
            model evaluation (the divergence comes from backward passes:
            :func:`flowdiff.likelihood.sample_with_logp`). The solver must then be one of
            :data:`flowdiff.likelihood.LIKELIHOOD_SOLVERS` (default ``"adams"``); ``options`` take
            that function's keywords (``divergence``, ``probes``, ``prior``, ``rtol``, …).
            ``SampleResult.log_prob`` is the density of ``state`` (the ODE's end point at ``t_end``);
            the final denoised prediction has no density of its own.
        **options: solver options (``order``, ``variant``, ``rtol``, …; see each solver).

    Returns:
        :class:`SampleResult`.
    """
    from .grids import GRID_KINDS, make_grid, validate_grid

    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a torch.Tensor, got {type(x_init).__name__}")
    if not x_init.is_floating_point():
        raise TypeError(f"x_init must be a floating-point tensor, got dtype {x_init.dtype}")
    if x_init.ndim < 1:
        raise ValueError("x_init must have a batch dimension, got a 0-d tensor")
    if not hasattr(field, "nfe") or not hasattr(field, "path"):
        raise TypeError(
            f"field must be a fd.Field or fd.InterpolantField (with .path and .nfe), got {type(field).__name__}"
        )
    path = field.path
    if not isinstance(path, (GaussianPath, StochasticInterpolant)):
        raise TypeError(f"field.path must be a GaussianPath or StochasticInterpolant, got {type(path).__name__}")
    if return_logp:
        try:  # the solvers layer's own log-density sampler (flowdiff/solvers/logp.py), once it exists
            from .logp import sample_returning_logp
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.logp":
                raise
            sample_returning_logp = _sample_with_logp
        return sample_returning_logp(field, x_init, solver, nfe, grid, t_start, t_end, denoise_final, generator,
                                 cond, check_finite, options)
    name = default_solver(field, nfe if isinstance(nfe, int) else None) if solver is None else solver
    spec = get_solver(name)
    if spec.requires_gaussian_path:
        require_gaussian_path(field, name)
    missing = [o for o in spec.required_options if o not in options]
    if missing:
        raise ValueError(f"solver {name!r} needs the option(s) {', '.join(missing)}; see its docstring")
    cond = dict(cond or {})

    # ----- interval ---------------------------------------------------------------------
    lo, hi = float(path.t_min), float(path.t_max)
    explicit_grid = None if grid is None or isinstance(grid, str) else grid
    explicit_times = validate_grid(explicit_grid) if explicit_grid is not None else None
    t0 = (lo if explicit_times is None else float(explicit_times[0])) if t_start is None else t_start
    t1 = (hi if explicit_times is None else float(explicit_times[-1])) if t_end is None else t_end
    for label, val in (("t_start", t0), ("t_end", t1)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise ValueError(f"{label} must be a finite number, got {label}={val!r}")
    t0, t1 = float(t0), float(t1)
    if not t0 < t1:
        raise ValueError(f"need t_start < t_end (generation runs forward in t), got t_start={t0!r}, t_end={t1!r}")
    if t0 < lo - 1e-12 or t1 > hi + 1e-12:
        raise ValueError(
            f"[t_start, t_end] = [{t0!r}, {t1!r}] must lie inside the path's safe interval [t_min, t_max] = [{lo!r}, {hi!r}]"
        )

    # ----- budget and grid ----------------------------------------------------------------
    if nfe is not None:
        nfe = _check_int("nfe", nfe, 1)
    final_calls = (1 if isinstance(path, GaussianPath) else velocity_calls(field)) if denoise_final else 0
    calls_per_eval = spec.model_calls_per_eval(field)
    grid_options = dict(grid_options or {})
    if isinstance(grid, str) and grid not in GRID_KINDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRID_KINDS)} or an increasing array of times")

    if spec.adaptive:
        cap = DEFAULT_ADAPTIVE_CAP if nfe is None else nfe - final_calls
        max_evals = cap // calls_per_eval
        if max_evals < 1:
            raise ValueError(
                f"nfe={nfe} leaves no evaluation for solver {name!r} after the final denoise ({final_calls} call(s))"
            )
        times = (
            validate_grid(explicit_grid, t0, t1) if explicit_grid is not None
            else torch.tensor([t0, t1], dtype=torch.float64)
        )
    elif explicit_grid is not None:
        times = validate_grid(explicit_grid, t0, t1)
        steps = len(times) - 1
        needed = steps * spec.evals_per_step * calls_per_eval + final_calls
        max_evals = steps * spec.evals_per_step
        if nfe is not None:
            if needed > nfe:
                raise ValueError(
                    f"the explicit grid has {steps} steps, which solver {name!r} needs {needed} model calls for "
                    f"(final denoise included), more than nfe={nfe}"
                )
            max_evals = (nfe - final_calls) // calls_per_eval
    else:
        budget_calls = (DEFAULT_NFE if nfe is None else nfe) - final_calls
        max_evals = max(budget_calls, 0) // calls_per_eval
        steps = spec.steps(max_evals)
        if steps < 1:
            smallest = next(
                (b * calls_per_eval + final_calls for b in range(1, 64) if spec.steps(b) >= 1), None
            )
            raise ValueError(
                f"nfe={nfe} is too small for solver {name!r} ({spec.evals_per_step} evaluation(s) per step, "
                f"{final_calls} for the final denoise); it needs nfe >= {smallest}"
            )
        kind = grid if isinstance(grid, str) else (spec.default_grid if isinstance(path, GaussianPath) else "uniform")
        times = make_grid(path, kind, steps, t0, t1, **grid_options)

    # ----- run ------------------------------------------------------------------------------
    visited = [t0]
    trajectory: list[Tensor] | None = [x_init] if return_trajectory else None
    start_nfe = field.nfe

    def hook(i: int, t: float, x: Tensor, denoised: Tensor | None = None) -> None:
        if check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteStateError(
                f"solver {name!r}: the state became non-finite ({bad} entries NaN/inf) at step {i} "
                f"(t={float(t):.6g}, after {field.nfe - start_nfe} model calls)"
            )
        visited.append(float(t))
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(i, float(t), x, denoised)

    if check_finite and not bool(torch.isfinite(x_init).all()):
        raise NonFiniteStateError(f"x_init has non-finite entries ({int((~torch.isfinite(x_init)).sum())} NaN/inf)")
    fn_options = {**options, "denoise_final": denoise_final} if spec.final_denoise else options
    state = spec.fn(
        field, x_init, times, generator=generator, callback=hook, cond=cond, max_evals=max_evals, **fn_options
    )
    denoised = None
    if spec.final_denoise and denoise_final:
        state, denoised = state
    out = state
    if denoise_final:
        if denoised is None:
            denoised = _final_denoise(field, state, t1, cond)
        if check_finite and not bool(torch.isfinite(denoised).all()):
            raise NonFiniteStateError(f"solver {name!r}: the final denoised prediction at t={t1:.6g} is non-finite")
        out = denoised
    used = field.nfe - start_nfe
    if nfe is not None and used > nfe:  # a solver bug: the contract says never
        raise RuntimeError(f"solver {name!r} made {used} model calls, more than nfe={nfe}")
    return SampleResult(
        x=out,
        nfe=used,
        grid=torch.tensor(visited, dtype=torch.float64),
        solver=name,
        state=state,
        denoised=denoised,
        trajectory=trajectory,
        nfe_budget=nfe,
        options=dict(options),
    )
