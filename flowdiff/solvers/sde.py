r"""Stochastic samplers: Euler–Maruyama, DDPM/DDIM-η, SDE-DPM-Solver++, EDM churn, predictor–corrector.

Every sampler here integrates, forward in time ``t: t_start → t_end`` (noise → data), one member
of the family of SDEs that share the marginals :math:`p_t` of the path (DESIGN.md; Albergo,
Boffi & Vanden-Eijnden 2023, "Stochastic Interpolants: A Unifying Framework for Flows and
Diffusions"):

.. math::

    dX_t = \big[b(X_t, t) + \varepsilon(t)\,s(X_t, t)\big]\,dt + \sqrt{2\varepsilon(t)}\,dW_t,

with :math:`b` the probability-flow velocity, :math:`s = \nabla\log p_t` the score and
:math:`\varepsilon(t) \ge 0` free. On a Gaussian path :math:`x_t = \alpha x_1 + \sigma\varepsilon`
(half log-SNR :math:`\lambda = \log(\alpha/\sigma)`):

* :math:`b = \dot\alpha\hat x + \dot\sigma\hat\varepsilon = (\dot\alpha/\alpha)x + \sigma^2\dot\lambda\,s`,
  :math:`s = -\hat\varepsilon/\sigma`;
* the **reverse-diffusion** SDE (Anderson 1982; Song et al. 2021, "Score-Based Generative Modeling
  through Stochastic Differential Equations") is the member :math:`\varepsilon(t) = \sigma^2\dot\lambda`.
  Derivation: in diffusion time :math:`s = 1 - t` the forward SDE :math:`dx = f x\,ds + g\,dW` has
  :math:`f = d\log\alpha/ds` and :math:`g^2 = d\sigma^2/ds - 2f\sigma^2 = -2\sigma^2\,d\lambda/ds`;
  its reverse, written in ``t``, is :math:`dx = [(\dot\alpha/\alpha)x + g^2 s]dt + g\,dW` with
  :math:`g^2 = 2\sigma^2\dot\lambda`, i.e. :math:`b + \varepsilon s` with
  :math:`\varepsilon = g^2/2 = \sigma^2\dot\lambda`. For VP, :math:`\dot\lambda = \beta/(2\sigma^2)`
  so :math:`\varepsilon = \beta(1-t)/2`; for VE, :math:`\varepsilon = \sigma^2\log(\sigma_{max}/\sigma_{min})`.

The exponential samplers (DDPM, SDE-DPM-Solver++) integrate the linear part of the
reverse-diffusion SDE exactly in λ (step ``s → t``, :math:`h = \lambda_t - \lambda_s > 0`):

.. math::

    x_t = \frac{\sigma_t}{\sigma_s}e^{-h}x_s + \alpha_t(1 - e^{-2h})\,\hat x(x_s)
          + \sigma_t\sqrt{1 - e^{-2h}}\;z,

which is also the exact Gaussian posterior :math:`q(x_t \mid x_s, x_1 = \hat x)` of DDPM
(Ho et al. 2020). Algorithms, in the library's time convention:

========================  =====================================================  =================
name                      method                                                 evaluations/step
========================  =====================================================  =================
``euler-maruyama``        Euler–Maruyama, any ε(t); any field                    1
``ddpm``                  ancestral DDPM / DDIM-η posterior step                 1
``sde-dpm-solver++1``     SDE-DPM-Solver++(1) (= ``ddpm`` with η = 1)            1
``sde-dpm-solver++2``     SDE-DPM-Solver++(2M), multistep                        1
``edm``, ``heun-churn``   EDM stochastic Heun with churn (Karras et al. 2022)    2
``pc``                    reverse-diffusion predictor + Langevin corrector       1 + n_corrector
========================  =====================================================  =================

All noise is drawn with ``torch.randn(..., generator=generator)`` in the state's dtype and
device, so a seeded generator gives the same samples run after run. Each solver takes
exactly the evaluations its grid needs and checks them against ``max_evals`` before it
starts; the final denoising is done by :func:`~flowdiff.solvers.sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._utils import expand_like
from ..fields import InterpolantField
from ..paths import GaussianPath
from .base import (
    GaussianEvaluator,
    PathTable,
    register_solver,
    time_tensor,
    velocity_calls,
)

__all__ = [
    "EPS_OPTIONS",
    "Diffusion",
    "ddpm",
    "diffusion_schedule",
    "edm_heun_churn",
    "euler_maruyama",
    "predictor_corrector",
    "sde_dpm_solver_pp_1",
    "sde_dpm_solver_pp_2",
]

#: Named choices of ε(t) in the sampling equation.
EPS_OPTIONS = ("reverse-diffusion", "zero")

#: What a user may pass as ``eps``: a number ≥ 0, a callable of ``t``, or a name from EPS_OPTIONS.
Diffusion = float | int | str | Callable[[Tensor], Tensor]

Callback = Callable[[int, float, Tensor, Tensor | None], None]


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device (seed-stable with ``generator``)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _grid_list(grid: Tensor) -> list[float]:
    times = torch.as_tensor(grid, dtype=torch.float64).flatten().tolist()
    if len(times) < 2:
        raise ValueError(f"the time grid needs at least 2 points, got {len(times)}")
    return times


def _check_budget(solver: str, needed: int, max_evals: int | None) -> None:
    """The solver needs ``needed`` evaluations; refuse before spending any if that is over budget."""
    if max_evals is not None and needed > max_evals:
        raise ValueError(
            f"solver {solver!r} needs {needed} evaluations on this grid but max_evals={max_evals}; "
            "use a coarser grid or a larger nfe"
        )


def _check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
    """A finite real in ``[low, high]`` (``(low, high]`` with ``low_open``), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high:
        lo_br = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {lo_br}{low}, {high}], got {name}={value!r}")
    return float(value)


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    return value


def _gaussian_path(field: Any, solver: str) -> GaussianPath | None:
    """The field's Gaussian path, ``None`` for an interpolant field."""
    path = getattr(field, "path", None)
    if isinstance(path, GaussianPath):
        return path
    if isinstance(field, InterpolantField):
        return None
    raise TypeError(f"solver {solver!r} needs a fd.Field or fd.InterpolantField, got {type(field).__name__}")


def _require_gaussian(field: Any, solver: str) -> GaussianPath:
    path = getattr(field, "path", None)
    if not isinstance(path, GaussianPath):
        raise TypeError(
            f"solver {solver!r} needs a Gaussian path (a fd.Field on alpha(t), sigma(t)), got "
            f"{type(field).__name__} on {type(path).__name__}; for stochastic interpolants use "
            "'euler-maruyama' or 'pc'"
        )
    return path


def _sde_calls(field: Any) -> int:
    """Model calls of one drift-plus-score evaluation: one for a Field (x̂ and ε̂ give b and s);
    for an InterpolantField the velocity's calls plus one of the score model."""
    if isinstance(field, InterpolantField):
        return velocity_calls(field) + 1
    return 1


# ---------------------------------------------------------------------------------------
# ε(t)
# ---------------------------------------------------------------------------------------


def diffusion_schedule(eps: Diffusion, path: Any = None) -> Callable[[Tensor], Tensor]:
    r"""Resolve a user's ε(t) into a callable ``t -> ε(t)`` (``t`` a tensor, result of its shape).

    Arguments:
        eps: a number ≥ 0 (constant ε), a callable of ``t`` returning values ≥ 0, or a name:
            ``"zero"`` (ε ≡ 0: the probability-flow ODE) or ``"reverse-diffusion"``
            (:math:`\varepsilon = \sigma^2\dot\lambda = g^2/2`, the reverse SDE of the score-SDE
            family; needs a Gaussian path: β(1 − t)/2 for VP).
        path: the field's path (needed for ``"reverse-diffusion"``).

    Returns:
        A callable mapping a tensor of times to ε at those times (same shape and dtype).
    """
    if isinstance(eps, str):
        if eps == "zero":
            return lambda t: torch.zeros_like(t)
        if eps == "reverse-diffusion":
            if not isinstance(path, GaussianPath):
                raise ValueError(
                    f"eps='reverse-diffusion' needs a Gaussian path (it is sigma^2 * dlambda/dt), got "
                    f"{type(path).__name__}; pass a number >= 0 or a callable of t instead"
                )

            def reverse_diffusion(t: Tensor) -> Tensor:
                # σ²λ̇ = σ²α̇/α − σσ̇: finite wherever the path's coefficients are.
                return path._sigma(t) ** 2 * path._d_log_snr(t)

            return reverse_diffusion
        raise ValueError(
            f"unknown eps {eps!r}; valid: a number >= 0, a callable of t, or one of {', '.join(EPS_OPTIONS)}"
        )
    if callable(eps):
        return eps
    value = _check_number("eps", eps)
    return lambda t: torch.full_like(t, value)


class _EpsOnGrid:
    """ε(t) at the grid points: named and constant choices are tabulated once in float64 (no
    per-step tensor work); a user callable is called at each step with ``t`` of shape ``(B,)``."""

    def __init__(self, eps: Diffusion, path: GaussianPath | None, times: list[float]):
        self.fn = diffusion_schedule(eps, path)
        self.table: list[float] | None = None
        if isinstance(eps, str) or not callable(eps):
            values = self.fn(torch.tensor(times, dtype=torch.float64)).tolist()
            for t, e in zip(times, values):
                if not math.isfinite(e) or e < 0:
                    raise ValueError(f"eps(t) must be finite and >= 0, got eps({t:.6g})={e!r}")
            self.table = values

    def __call__(self, i: int, t: float, x: Tensor) -> Tensor | float:
        if self.table is not None:
            return self.table[i]
        return _eps_value(self.fn, t, x)


def _eps_value(eps_fn: Callable[[Tensor], Tensor], t: float, x: Tensor) -> Tensor | float:
    """ε at ``t`` for every sample: a Python float when constant over the batch, else ``(B, 1, …)``."""
    tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    val = torch.as_tensor(eps_fn(tb), dtype=x.dtype, device=x.device)
    if val.ndim == 0 or val.numel() == 1:
        e = float(val.reshape(()))
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"eps(t) must be finite and >= 0, got eps({t:.6g})={e!r}")
        return e
    if val.shape != (x.shape[0],):
        raise ValueError(f"eps(t) must return a scalar or shape (B,) = ({x.shape[0]},), got {tuple(val.shape)}")
    if not bool(torch.isfinite(val).all()) or bool((val < 0).any()):
        raise ValueError(
            f"eps(t) must be finite and >= 0, got values in [{float(val.min())!r}, {float(val.max())!r}] at t={t:.6g}"
        )
    return expand_like(val, x)


def _is_zero(e: Tensor | float) -> bool:
    return (e == 0) if isinstance(e, float) else bool((e == 0).all())


class _DriftScore:
    """``(b + ε s)(x, t)`` and ``s(x, t)`` of any field, with the cheapest model calls.

    On a Gaussian path one raw model call gives x̂ and ε̂ (:class:`GaussianEvaluator`), hence
    :math:`b = \\dot\\alpha\\hat x + \\dot\\sigma\\hat\\varepsilon` and
    :math:`s = -\\hat\\varepsilon/\\sigma`. On an interpolant, ``field.velocity`` gives b and
    ``field.score`` gives s (the score model is skipped when ε = 0).
    """

    def __init__(self, field: Any, cond: dict | None, times: list[float]):
        self.field, self.cond = field, dict(cond or {})
        self.path = getattr(field, "path", None)
        self.evaluator: GaussianEvaluator | None = None
        self.table: PathTable | None = None
        if isinstance(self.path, GaussianPath):
            self.evaluator = GaussianEvaluator(field, self.path, self.cond)
            self.table = PathTable.build(self.path, times)

    def coefficients(self, i: int) -> tuple[float, float, float, float]:
        """(α, σ, α̇, σ̇) at grid point ``i`` (Gaussian paths only)."""
        tb = self.table
        if tb is None:  # pragma: no cover - guarded by the callers
            raise TypeError("path coefficients exist only on a Gaussian path")
        return tb.alpha[i], tb.sigma[i], tb.d_alpha[i], tb.d_sigma[i]

    def drift(self, x: Tensor, i: int, t: float, e: Tensor | float) -> tuple[Tensor, Tensor | None]:
        """``(b + ε s, x̂ or None)`` at grid point ``i`` (time ``t``)."""
        if self.evaluator is not None:
            a, s, da, ds = self.coefficients(i)
            data, noise = self.evaluator(x, t, (a, s, da, ds))
            # b + ε s = α̇ x̂ + (σ̇ − ε/σ) ε̂, accumulated in place into one new tensor
            if isinstance(e, float):
                return torch.mul(data, da).add_(noise, alpha=ds - e / s), data
            return torch.mul(data, da).add_(noise * (ds - e / s)), data
        tt = time_tensor(t, x)
        b = self.field.velocity(x, tt, **self.cond)
        if _is_zero(e):
            return b, None
        return b + e * self.field.score(x, tt, **self.cond), None

    def score(self, x: Tensor, i: int, t: float) -> Tensor:
        """:math:`\\nabla\\log p_t(x)` at grid point ``i`` (time ``t``; one evaluation)."""
        if self.evaluator is not None:
            a, s, da, ds = self.coefficients(i)
            return self.evaluator(x, t, (a, s, da, ds))[1] / (-s)
        return self.field.score(x, time_tensor(t, x), **self.cond)


def _em_step(x: Tensor, drift: Tensor, h: float, e: Tensor | float, generator: torch.Generator | None) -> Tensor:
    """One Euler–Maruyama step :math:`x + h\\,\\text{drift} + \\sqrt{2\\varepsilon h}\\,z` (a new tensor)."""
    x = torch.add(x, drift, alpha=h)
    if isinstance(e, float):
        if e > 0:
            x.add_(_randn(x, generator), alpha=math.sqrt(2 * e * h))
        return x
    return x.add_(torch.sqrt(2 * e * h) * _randn(x, generator))


def _default_eps(path: GaussianPath | None) -> Diffusion:
    # Reverse diffusion on a Gaussian path (the classical score-SDE sampler); on an interpolant
    # there is no distinguished choice, and ε = 1 is the SI papers' usual constant.
    return "reverse-diffusion" if path is not None else 1.0


# ---------------------------------------------------------------------------------------
# Euler–Maruyama
# ---------------------------------------------------------------------------------------


def euler_maruyama(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    eps: Diffusion | None = None,
) -> Tensor:
    r"""Euler–Maruyama on :math:`dX = [b + \varepsilon s]dt + \sqrt{2\varepsilon}\,dW` (Maruyama 1955).

    .. math::

        x_{i+1} = x_i + h_i\,[b(x_i, t_i) + \varepsilon(t_i)\,s(x_i, t_i)] + \sqrt{2\varepsilon(t_i)h_i}\;z_i,
        \qquad h_i = t_{i+1} - t_i,

    weak order 1. Any ε ≥ 0 leaves the marginals unchanged for an exact field; ``eps="zero"``
    is the deterministic Euler method on the probability-flow ODE.

    Arguments:
        field: a :class:`~flowdiff.Field` (one model call per step) or an
            :class:`~flowdiff.InterpolantField` with a score model (drift and score calls).
        x: the state at ``grid[0]``, shape ``(B, *)``.
        grid: increasing times (float64, 1-D).
        eps: ε(t): a number ≥ 0, a callable of ``t`` (shape ``(B,)``), ``"reverse-diffusion"``
            (Gaussian paths: :math:`\sigma^2\dot\lambda`) or ``"zero"``. Default:
            ``"reverse-diffusion"`` on a Gaussian path, ``1.0`` on an interpolant.

    Returns:
        The state at ``grid[-1]``.
    """
    path = _gaussian_path(field, "euler-maruyama")
    times = _grid_list(grid)
    eps_at = _EpsOnGrid(_default_eps(path) if eps is None else eps, path, times)
    _check_budget("euler-maruyama", len(times) - 1, max_evals)
    ds = _DriftScore(field, cond, times)
    for i in range(len(times) - 1):
        t, h = times[i], times[i + 1] - times[i]
        e = eps_at(i, t, x)
        drift, data = ds.drift(x, i, t, e)
        x = _em_step(x, drift, h, e, generator)
        if callback is not None:
            callback(i, times[i + 1], x, data)
    return x


# ---------------------------------------------------------------------------------------
# DDPM / DDIM-η and SDE-DPM-Solver++
# ---------------------------------------------------------------------------------------


def ddpm(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    eta: float = 1.0,
) -> Tensor:
    r"""Ancestral sampling with the DDPM posterior (Ho et al. 2020, "Denoising Diffusion Probabilistic
    Models"), generalised by DDIM's η (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

    From ``s`` to ``t > s`` with :math:`h = \lambda_t - \lambda_s` and one model call at
    :math:`(x_s, s)` giving :math:`\hat x, \hat\varepsilon`:

    .. math::

        c = \eta\,\sigma_t\sqrt{1 - e^{-2h}}, \qquad
        x_t = \alpha_t\hat x + \sqrt{\sigma_t^2 - c^2}\;\hat\varepsilon + c\,z.

    η = 1 is the exact posterior :math:`q(x_t\mid x_s, x_1=\hat x)` (DDPM; the same step as
    SDE-DPM-Solver++(1)); η = 0 is DDIM (deterministic). This is DDIM's
    :math:`\sigma_\eta = \eta\sqrt{(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)}\sqrt{1-\bar\alpha_t/\bar\alpha_{t-1}}`
    written in log-SNR terms, valid for every Gaussian path (VE included).

    Arguments:
        eta: in ``[0, 1]``.
    """
    path = _require_gaussian(field, "ddpm")
    eta = _check_number("eta", eta, 0.0, 1.0)
    times = _grid_list(grid)
    _check_budget("ddpm", len(times) - 1, max_evals)
    evaluator = GaussianEvaluator(field, path, cond)
    tab = PathTable.build(path, times)
    for i in range(len(times) - 1):
        a_s, s_s = tab.alpha[i], tab.sigma[i]
        a_t, s_t = tab.alpha[i + 1], tab.sigma[i + 1]
        h = tab.log_snr[i + 1] - tab.log_snr[i]
        data, noise = evaluator(x, times[i], (a_s, s_s, tab.d_alpha[i], tab.d_sigma[i]))
        one_minus = -math.expm1(-2 * h)  # 1 − e^{−2h}, accurate for small h
        c = eta * s_t * math.sqrt(one_minus)
        # σ_t² − c² = σ_t²(1 − η²(1 − e^{−2h})) ≥ 0 for η ≤ 1
        # in-place accumulation into one new tensor: fewer kernels and allocations per step
        x = torch.mul(data, a_t).add_(noise, alpha=s_t * math.sqrt(max(1.0 - eta * eta * one_minus, 0.0)))
        if c > 0:
            x.add_(_randn(x, generator), alpha=c)
        if callback is not None:
            callback(i, times[i + 1], x, data)
    return x


def _sde_dpmpp(
    name: str,
    order: int,
    field: Any,
    x: Tensor,
    grid: Tensor,
    generator: torch.Generator | None,
    callback: Callback | None,
    cond: dict | None,
    max_evals: int | None,
    solver_type: str,
    lower_order_final: bool,
) -> Tensor:
    path = _require_gaussian(field, name)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type {solver_type!r}; valid: midpoint, heun")
    if not isinstance(lower_order_final, bool):
        raise TypeError(f"lower_order_final must be a bool, got {lower_order_final!r}")
    times = _grid_list(grid)
    steps = len(times) - 1
    _check_budget(name, steps, max_evals)
    evaluator = GaussianEvaluator(field, path, cond)
    tab = PathTable.build(path, times)
    prev_data: Tensor | None = None
    prev_h = 0.0
    for i in range(steps):
        a_s, s_s = tab.alpha[i], tab.sigma[i]
        a_t, s_t = tab.alpha[i + 1], tab.sigma[i + 1]
        h = tab.log_snr[i + 1] - tab.log_snr[i]
        data, _ = evaluator(x, times[i], (a_s, s_s, tab.d_alpha[i], tab.d_sigma[i]))
        one_minus = -math.expm1(-2 * h)  # 1 − e^{−2h}
        # in-place accumulation into one new tensor: fewer kernels and allocations per step
        x_next = torch.mul(x, s_t / s_s * math.exp(-h)).add_(data, alpha=a_t * one_minus)
        # Second order from the previous data prediction (multistep), except on the first
        # step and, with lower_order_final, on the last one: that step ends at t_end, where the
        # grid's last λ-gap is large (on a uniform-t grid it is the largest), and the
        # extrapolated D1 there hurt at every NFE and grid we measured (benchmarks/sde_solvers.py).
        if order == 2 and prev_data is not None and not (lower_order_final and i == steps - 1):
            r = prev_h / h  # D1 = (m0 − m1)/r
            weight = 0.5 * one_minus if solver_type == "midpoint" else 1.0 - one_minus / (2 * h)
            x_next.add_(data - prev_data, alpha=a_t * weight / r)
        x = x_next.add_(_randn(x, generator), alpha=s_t * math.sqrt(one_minus))
        prev_data, prev_h = data, h
        if callback is not None:
            callback(i, times[i + 1], x, data)
    return x


def sde_dpm_solver_pp_1(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
) -> Tensor:
    r"""SDE-DPM-Solver++(1) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", §B; diffusers ``algorithm_type="sde-dpmsolver++"``, order 1).

    .. math::

        x_t = \frac{\sigma_t}{\sigma_s}e^{-h}x_s + \alpha_t(1 - e^{-2h})\,\hat x(x_s, s)
              + \sigma_t\sqrt{1 - e^{-2h}}\,z,

    the exact solution of the reverse-diffusion SDE's linear part with x̂ frozen over the step
    (identical to :func:`ddpm` with η = 1).
    """
    return _sde_dpmpp("sde-dpm-solver++1", 1, field, x, grid, generator, callback, cond, max_evals, "midpoint", False)


def sde_dpm_solver_pp_2(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
) -> Tensor:
    r"""SDE-DPM-Solver++(2M), multistep (Lu et al. 2022, "DPM-Solver++"; the diffusers form,
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)``).

    With :math:`m_0 = \hat x(x_s)`, the previous prediction :math:`m_1` at :math:`\lambda_{s'}`,
    :math:`r = (\lambda_s - \lambda_{s'})/h` and :math:`D_1 = (m_0 - m_1)/r`:

    .. math::

        x_t = \frac{\sigma_t}{\sigma_s}e^{-h}x_s + \alpha_t(1 - e^{-2h})\,m_0
              + c\,\alpha_t D_1 + \sigma_t\sqrt{1 - e^{-2h}}\,z,

    :math:`c = \tfrac12(1 - e^{-2h})` (``solver_type="midpoint"``, diffusers' default) or
    :math:`c = 1 - (1 - e^{-2h})/(2h)` (``"heun"``, the Taylor-exact weight). The first step is
    first order; with ``lower_order_final`` (default) so is the last one, into ``t_end``.
    diffusers' final step to σ = 0 is always first order and plays the role of the framework's
    final denoise; its ``lower_order_final`` additionally lowers the step before it when there are
    fewer than 15 steps, which is ``lower_order_final=(steps < 15)`` here.
    """
    return _sde_dpmpp(
        "sde-dpm-solver++2", 2, field, x, grid, generator, callback, cond, max_evals, solver_type, lower_order_final
    )


# ---------------------------------------------------------------------------------------
# EDM stochastic Heun
# ---------------------------------------------------------------------------------------


def edm_heun_churn(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    S_churn: float = 40.0,
    S_tmin: float = 0.05,
    S_tmax: float = 50.0,
    S_noise: float = 1.0,
) -> Tensor:
    r"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2), for any Gaussian path.

    It works on :math:`\tilde x = x/\alpha` with noise level :math:`\tilde\sigma = \sigma/\alpha =
    e^{-\lambda}`, where the PF-ODE is :math:`d\tilde x/d\tilde\sigma = (\tilde x - D)/\tilde\sigma`,
    :math:`D(\tilde x, \tilde\sigma) = \hat x(\alpha\tilde x, t)`. Step ``i`` (noise levels
    :math:`\tilde\sigma_i > \tilde\sigma_{i+1}` of the grid times):

    1. churn: :math:`\gamma_i = \min(S_{churn}/N, \sqrt2 - 1)` if
       :math:`S_{tmin} \le \tilde\sigma_i \le S_{tmax}` else 0;
       :math:`\hat\sigma = \tilde\sigma_i(1 + \gamma_i)`,
       :math:`\hat x = \tilde x_i + S_{noise}\sqrt{\hat\sigma^2 - \tilde\sigma_i^2}\,z`;
    2. Heun from :math:`\hat\sigma` to :math:`\tilde\sigma_{i+1}`:
       :math:`d = (\hat x - D(\hat x, \hat\sigma))/\hat\sigma`,
       :math:`x' = \hat x + (\tilde\sigma_{i+1} - \hat\sigma)d`,
       :math:`\tilde x_{i+1} = \hat x + (\tilde\sigma_{i+1} - \hat\sigma)\tfrac12(d + d'(x'))`.

    ``t_end`` has σ > 0 (the framework denoises at the end), so every step is a Heun step
    (2 evaluations), except that an odd budget (``max_evals = 2N − 1``) makes the last step an
    Euler step. :math:`\hat\sigma` is capped at the noise level of the path's ``t_min``
    (the model is never called outside the safe interval).

    :func:`~flowdiff.solvers.sample` uses the time-quadratic grid by default (measured better
    than EDM's ρ = 7 grid at 10–20 NFE on the d = 32 mixture benchmark); ``grid="karras"`` gives
    EDM's own schedule.

    Arguments:
        S_churn: total churn ≥ 0 (0 gives EDM's deterministic Heun, Algorithm 1). Default 40
            (EDM's ImageNet-64 setting is 40–80).
        S_tmin, S_tmax: the σ̃ range where churn is applied (EDM's ImageNet values 0.05, 50).
        S_noise: noise inflation ≥ 0; 1 keeps the exact marginals (EDM used 1.003 to offset
            the over-smoothing of trained denoisers).
    """
    path = _require_gaussian(field, "edm")
    S_churn = _check_number("S_churn", S_churn)
    S_tmin = _check_number("S_tmin", S_tmin)
    S_tmax = _check_number("S_tmax", S_tmax, 0.0, math.inf) if S_tmax != math.inf else math.inf
    if S_tmin > S_tmax:
        raise ValueError(f"need S_tmin <= S_tmax, got S_tmin={S_tmin!r}, S_tmax={S_tmax!r}")
    S_noise = _check_number("S_noise", S_noise)
    times = _grid_list(grid)
    steps = len(times) - 1
    # An odd budget pays for an Euler last step (as EDM's Algorithm 1 does on its step to σ = 0)
    # rather than leaving one evaluation unused.
    heun_last = max_evals is None or max_evals >= 2 * steps
    _check_budget("edm", 2 * steps - (0 if heun_last else 1), max_evals)
    evaluator = GaussianEvaluator(field, path, cond)
    tab = PathTable.build(path, times)
    noise_level = [math.exp(-lam) for lam in tab.log_snr]  # σ̃ = σ/α
    t_floor = float(path.t_min)
    sigma_cap = math.exp(-float(path._log_snr(torch.tensor(t_floor, dtype=torch.float64))))
    gamma_max = min(S_churn / steps, math.sqrt(2.0) - 1.0)

    def denoise(x_tilde: Tensor, t: float, i: int | None) -> Tensor:
        # grid point i: tabulated coefficients; a churned time: computed once here
        a, s, da, ds = (
            (tab.alpha[i], tab.sigma[i], tab.d_alpha[i], tab.d_sigma[i]) if i is not None else evaluator.coefficients(t)
        )
        return evaluator(a * x_tilde, t, (a, s, da, ds))[0]

    x_tilde = x / tab.alpha[0]
    for i in range(steps):
        sig, sig_next = noise_level[i], noise_level[i + 1]
        t_hat, sig_hat = times[i], sig
        gamma = gamma_max if S_tmin <= sig <= S_tmax else 0.0
        if gamma > 0:
            sig_hat = min(sig * (1.0 + gamma), sigma_cap)
            if sig_hat > sig:
                t_hat = float(path._t_of_log_snr(torch.tensor(-math.log(sig_hat), dtype=torch.float64)))
                t_hat = max(t_hat, t_floor)
                # The exact σ̃ at the time the model will see (t_of_log_snr is exact up to round-off).
                sig_hat = math.exp(-float(path._log_snr(torch.tensor(t_hat, dtype=torch.float64))))
                x_tilde = x_tilde + (S_noise * math.sqrt(max(sig_hat**2 - sig**2, 0.0))) * _randn(x_tilde, generator)
            else:
                sig_hat = sig
        data = denoise(x_tilde, t_hat, i if t_hat == times[i] else None)
        d = (x_tilde - data) / sig_hat
        x_pred = x_tilde + (sig_next - sig_hat) * d
        if i == steps - 1 and not heun_last:
            x_tilde = x_pred
        else:
            data = denoise(x_pred, times[i + 1], i + 1)
            d_next = (x_pred - data) / sig_next
            x_tilde = x_tilde + (sig_next - sig_hat) * 0.5 * (d + d_next)
        if callback is not None:
            callback(i, times[i + 1], tab.alpha[i + 1] * x_tilde, data)
    return tab.alpha[-1] * x_tilde


# ---------------------------------------------------------------------------------------
# Predictor–corrector
# ---------------------------------------------------------------------------------------


def _thin_grid(times: list[float], steps: int) -> list[float]:
    """``steps + 1`` points of a grid, interpolated linearly in the grid's index (keeps its ends
    and, approximately, its spacing law)."""
    old = torch.tensor(times, dtype=torch.float64)
    pos = torch.linspace(0, len(times) - 1, steps + 1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=len(times) - 2)
    frac = pos - lo
    new = old[lo] + frac * (old[lo + 1] - old[lo])
    new[0], new[-1] = old[0], old[-1]
    return new.tolist()


def predictor_corrector(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    snr: float = 0.16,
    n_corrector: int = 1,
    eps: Diffusion | None = None,
) -> Tensor:
    r"""Predictor–corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
    Stochastic Differential Equations", Algorithms 2–3).

    Each step is a reverse-diffusion predictor (Euler–Maruyama on the sampling SDE, ε =
    :math:`\sigma^2\dot\lambda` on a Gaussian path) from :math:`t_i` to :math:`t_{i+1}`, then
    ``n_corrector`` Langevin MCMC steps at :math:`t_{i+1}` that target :math:`p_{t_{i+1}}`:

    .. math::

        \delta = 2\,\Big(r\,\frac{\lVert z\rVert}{\lVert s(x)\rVert}\Big)^2, \qquad
        x \leftarrow x + \delta\,s(x) + \sqrt{2\delta}\,z,

    with the signal-to-noise ratio ``r = snr`` and the norms averaged over the batch (as in
    score_sde's ``LangevinCorrector``: per-sample norms, as the paper's algorithm reads, give
    huge steps where a sample's score vanishes). Each corrector step costs one evaluation.

    Budget: with ``max_evals`` smaller than ``(1 + n_corrector)`` per step of ``grid`` (a grid
    made for the default ``n_corrector=1``), the grid is thinned to
    ``max_evals // (1 + n_corrector)`` steps, interpolated in its index, so that the sampler
    stays within budget.

    Arguments:
        snr: ``r > 0`` (0.16 is Song et al.'s CIFAR-10 VE value; diffusers uses 0.15).
        n_corrector: Langevin steps per time step, ≥ 0 (0 gives Euler–Maruyama).
        eps: the predictor's ε(t), as in :func:`euler_maruyama`.
    """
    path = _gaussian_path(field, "pc")
    snr = _check_number("snr", snr, 0.0, math.inf, low_open=True)
    n_corrector = _check_count("n_corrector", n_corrector, 0)
    times = _grid_list(grid)
    per_step = 1 + n_corrector
    if max_evals is not None and (len(times) - 1) * per_step > max_evals:
        steps = max_evals // per_step
        if steps < 1:
            raise ValueError(
                f"solver 'pc' with n_corrector={n_corrector} needs {per_step} evaluations per step, "
                f"but max_evals={max_evals}"
            )
        times = _thin_grid(times, steps)
    eps_at = _EpsOnGrid(_default_eps(path) if eps is None else eps, path, times)
    ds = _DriftScore(field, cond, times)
    for i in range(len(times) - 1):
        t, t_next, h = times[i], times[i + 1], times[i + 1] - times[i]
        e = eps_at(i, t, x)
        drift, data = ds.drift(x, i, t, e)
        x = _em_step(x, drift, h, e, generator)
        for _ in range(n_corrector):
            score = ds.score(x, i + 1, t_next)
            z = _randn(x, generator)
            flat = x.shape[0], -1
            # Batch-averaged norms, as in score_sde's LangevinCorrector: a per-sample ratio
            # explodes where the score vanishes (a mode's centre), which low dimensions hit.
            noise_norm = float(z.reshape(flat).norm(dim=1).mean())
            score_norm = float(score.reshape(flat).norm(dim=1).mean())
            if score_norm == 0.0:
                # A field with zero score everywhere (e.g. an untrained network) gives no
                # direction and an infinite step: skip the move (the evaluation is spent).
                continue
            delta = 2 * (snr * noise_norm / score_norm) ** 2
            x = x + delta * score + math.sqrt(2 * delta) * z
        if callback is not None:
            callback(i, t_next, x, data)
    return x


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def _register() -> None:
    register_solver(
        "euler-maruyama",
        euler_maruyama,
        evals_per_step=1,
        calls_per_eval=_sde_calls,
        description="Euler–Maruyama on dX = [b + eps(t) s]dt + sqrt(2 eps(t))dW; eps a number, callable, 'reverse-diffusion' or 'zero'",
        kind="sde",
        stochastic=True,
    )
    register_solver(
        "ddpm",
        ddpm,
        evals_per_step=1,
        requires_gaussian_path=True,
        description="ancestral DDPM posterior step; eta in [0, 1] gives DDIM-eta (Ho et al. 2020; Song et al. 2021)",
        kind="sde",
        stochastic=True,
    )
    register_solver(
        "sde-dpm-solver++1",
        sde_dpm_solver_pp_1,
        evals_per_step=1,
        requires_gaussian_path=True,
        default_grid="quadratic",  # best measured at 10-20 NFE (benchmarks/results/sde_solvers.md)
        description="SDE-DPM-Solver++(1): exact linear part of the reverse SDE in log-SNR (Lu et al. 2022)",
        kind="sde",
        stochastic=True,
    )
    register_solver(
        "sde-dpm-solver++2",
        sde_dpm_solver_pp_2,
        evals_per_step=1,
        requires_gaussian_path=True,
        default_grid="quadratic",  # best measured at 10-20 NFE (benchmarks/results/sde_solvers.md)
        description="SDE-DPM-Solver++(2M) multistep, midpoint or heun weight (Lu et al. 2022; diffusers sde-dpmsolver++)",
        aliases=("sde-dpm-solver++",),
        kind="sde",
        stochastic=True,
    )
    register_solver(
        "edm",
        edm_heun_churn,
        evals_per_step=2,
        requires_gaussian_path=True,
        # measured better than EDM's own Karras grid at 10-20 NFE (benchmarks/results/sde_solvers.md)
        default_grid="quadratic",
        steps_for_budget=lambda budget: (budget + 1) // 2,  # odd budgets end with an Euler step
        description="EDM stochastic Heun with churn in sigma/alpha (Karras et al. 2022, Alg. 2)",
        aliases=("heun-churn",),
        kind="sde",
        stochastic=True,
    )
    register_solver(
        "pc",
        predictor_corrector,
        evals_per_step=2,
        calls_per_eval=_sde_calls,
        description="reverse-diffusion predictor + Langevin corrector, SNR step rule (Song et al. 2021); 1 + n_corrector evals/step",
        kind="sde",
        stochastic=True,
    )


_register()
