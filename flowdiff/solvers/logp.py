r"""The probability-flow ODE augmented with its log-density: what ``return_logp`` and the likelihood integrate.

**The formula.** A field's probability-flow velocity :math:`u(x, t)` (``field.velocity``) moves a
density along :math:`\dot x = u(x, t)` and, by the instantaneous change of variables (Chen, Rubanova,
Bettencourt & Duvenaud 2018, "Neural Ordinary Differential Equations"; Grathwohl et al. 2019,
"FFJORD"; Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", §4.3),

.. math::

    \frac{d}{dt}\log p_t(x_t) = -\nabla\!\cdot u(x_t, t), \qquad
    \log p_{t_1}(x(t_1)) = \log p_{t_0}(x(t_0)) - \int_{t_0}^{t_1} \nabla\!\cdot u\,dt .

**Flow coordinates.** Every Gaussian path :math:`x_t = \alpha x_1 + \sigma\varepsilon` is, after
the change of variables

.. math::

    \tau = \frac{\alpha}{\alpha + \sigma}, \qquad y = \frac{x}{\alpha + \sigma}
    \quad\Longrightarrow\quad y_\tau = \tau\,x_1 + (1-\tau)\,\varepsilon,

the rectified-flow path (Liu et al. 2023), whatever α and σ were: the geometry of the marginals
depends on the path only through the signal-to-noise ratio (Kingma, Salimans, Poole & Ho 2021,
"Variational Diffusion Models"). The ODE is integrated in :math:`(y, \tau)`:

.. math::

    \frac{dy}{d\tau} = \frac{dt/d\tau}{S}\Big(u - \frac{\dot S}{S}x\Big), \qquad
    \nabla_y\!\cdot\frac{dy}{d\tau} = \frac{dt}{d\tau}\Big(\nabla_x\!\cdot u - D\frac{\dot S}{S}\Big),
    \qquad S = \alpha + \sigma,\; \frac{d\tau}{dt} = \frac{\dot\alpha\sigma - \alpha\dot\sigma}{S^2},

and :math:`\log p_X(x) = \log p_Y(y) - D\log S`. The velocity is smooth and bounded in τ on every
path (VP's exponential ends and VE's σ up to 80 become the same straight-line problem), so one
grid works for all of them; for a stochastic interpolant τ = t and S = 1.

**Solvers** (:data:`LIKELIHOOD_SOLVERS`, on :mod:`flowdiff.solvers.integrators`): ``"adaptive"`` (the
default of ``log_likelihood`` since issue 12): per-sample variable-step Adams–Bashforth/Adams–Moulton
PEC of order 5 (:func:`~flowdiff.solvers.integrators.adams_per_sample`) in the log-SNR time
:class:`LogSnrTime` ρ = −log(1 − τ), in which the stiffness of t near the data end is gone; with the
exact divergence the state is the coordinate v of :class:`_GaussianFrame`, constant for the Gaussian
that the Jacobian at the data end describes (Gaussian case of exponential integrators, Hochbruck &
Ostermann 2010, "Exponential integrators"); every step's local error (Milne) is converted to nats —
the log-determinant's directly, the state's through the score −ε̂/(1 − τ) — and held below a fraction
of ``atol``. ``"adams"`` (the default before issue 12 and of ``sample_with_logp``; one model evaluation per node) on a grid uniform in τ with two start-up nodes at 1/4 and 1/2 of the
first step: ``nfe`` distinct times resolve the sharp, sample-specific bump of :math:`\nabla\cdot u`
where a trajectory decides between mixture components far better than a 4-stage Runge–Kutta method
with the same budget; Milne's device (the largest predictor–corrector gap, relative to ``1 + |y|``)
flags samples crossing a short stiff stretch, and with ``refine_tol`` those are solved again, alone,
by per-sample ``"dopri5"``. ``"rk4"``, ``"heun"``, ``"midpoint"``, ``"euler"``: fixed steps on the
same grid. The model is never called outside the interval: stage times are clamped in its dtype.

**Divergence**: ``"exact"`` — the trace of the Jacobian from one forward pass and batched
vector–Jacobian products against the basis vectors (``is_grads_batched``, chunked; any input shape);
``"hutchinson"`` (Hutchinson 1989; Grathwohl et al. 2019) — :math:`z^\top (\partial u/\partial x) z`
with ``probes`` Rademacher or Gaussian probes drawn ONCE per solve, each probe's log-determinant
integrated separately (hence a per-sample standard error); the trajectory does not depend on them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..paths import GaussianPath, StochasticInterpolant
from . import integrators as ig
from .base import GaussianEvaluator, SampleResult, time_tensor
from .base import final_calls as base_final_calls
from .grids import make_grid, validate_grid

__all__ = ["DEFAULT_ADAPTIVE_CAP", "DEFAULT_ATOL_NATS", "DEFAULT_LIKELIHOOD_NFE", "DEFAULT_REFINE_TOL", "DIVERGENCES", "LIKELIHOOD_GRIDS", "LIKELIHOOD_SOLVERS",
           "PROBE_DISTRIBUTIONS", "FlowCoordinates", "LogpSolve", "NonFiniteLikelihoodError", "SampleLogpResult",
           "augmented_velocity", "divergence", "draw_probes", "integrate_logp", "sample_returning_logp", "sample_with_logp"]

#: Solvers of the augmented ODE (``log_likelihood``, ``sample_with_logp``, ``sample(return_logp=True)``).
LIKELIHOOD_SOLVERS = ("adaptive", "adams", "rk4", "heun", "midpoint", "euler", "dopri5")
DIVERGENCES = ("exact", "hutchinson")
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")
#: Built-in grids: uniform in flow time τ = α/(α+σ), uniform in t, uniform in log-SNR.
LIKELIHOOD_GRIDS = ("flow", "uniform", "logsnr")
#: Model evaluations of the fixed-step solvers when ``nfe`` is not given (``solver="adams", nfe=48``
#: reaches ≤ 1e-3 nats mean error on the d = 16 mixture benchmark).
DEFAULT_LIKELIHOOD_NFE = 48
#: Default ``refine_tol`` of ``log_likelihood``: the Milne indicator above which an ``"adams"`` sample
#: is re-solved by ``"dopri5"`` (``sample_with_logp`` keeps 5e-3: a sampler's cost stays fixed). 3e-4 keeps the d = 16 mixtures of benchmarks/likelihood.py at 48-60 evaluations per
#: point and flags 121-128 of 128 points of the stiff mixtures of benchmarks/likelihood_stiff.py
#: (5e-3 flagged 0-6 and left errors of 0.19-1.0 nats; measured in docs/likelihood.md).
DEFAULT_REFINE_TOL = 3e-4
#: Default ``atol`` of ``solver="adaptive"`` (the default solver of ``log_likelihood``): the requested mean
#: error per sample, in nats (measured: 1.8e-4 to 2.2e-4 nats with 36-43 evaluations per sample on the stiff
#: mixtures of benchmarks/likelihood_stiff.py and the mixture of benchmarks/likelihood.py).
DEFAULT_ATOL_NATS = 3e-4
#: ``"adaptive"``: Milne's factor of the AB5/AM5 pair (corrector error ≈ 0.04 × |corrected − predicted|).
_MILNE = 0.04
#: ``"adaptive"``: each step's estimated error is held below this fraction of ``atol`` (error per step;
#: measured on the mixtures of benchmarks/likelihood_stiff.py and likelihood.py: mean error 0.6-0.75 × atol).
_STEP_FRACTION = 0.1
#: ``"adaptive"``: the Gaussian frame (full Jacobian at the data end, D × D per sample) up to this many dimensions.
_LINEARIZE_MAX_DIM = 1024
#: ``"adaptive"``: the frame is read off at u = α/σ ≤ this (SNR 10⁶); from a data end beyond (t = 1 on the
#: linear path) the solver first runs to it in flow coordinates.
_FRAME_U = 1e3
#: ``"adaptive"``: a sample gets the frame only if the Jacobian of its denoiser at the data end is symmetric and
#: positive semi-definite (a covariance, as for every probability-flow field) to this relative tolerance.
_FRAME_ASYMMETRY = 0.05
#: ``"adaptive"``: the first step, as a fraction of the ρ-interval.
_FIRST_STEP = 1 / 16
#: ``"adaptive"``: ρ = log(1 + u) − log(1 + b u), u = α/σ; b > 0 only when σ(t_end) = 0 (t = 1).
_RHO_B_INF = 1e-4
#: Cap on model calls of ``"dopri5"`` when ``nfe`` is not given.
DEFAULT_ADAPTIVE_CAP = 10_000
_VJP_ELEMENTS = 1 << 24  # elements (chunk × batch × dim) one batched vector–Jacobian product may allocate

Prior = str | Callable[[Tensor], Tensor]


class NonFiniteLikelihoodError(FloatingPointError, ValueError):
    """The augmented ODE produced a NaN/inf state; the message names the time and the solver."""


def _choice(label: str, value: Any, allowed: tuple[str, ...], more: str = "") -> None:
    if value not in allowed:
        raise ValueError(f"unknown {label} {value!r}; valid: {', '.join(allowed)}{more}")


def draw_probes(x: Tensor, probes: int, probe_dist: str = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson probes ``(probes, *x.shape)`` in ``x``'s dtype and device: Rademacher ±1 (variance-minimal
    for a fixed Jacobian; Hutchinson 1989) or Gaussian N(0, 1), drawn on the generator's device."""
    shape = (check_int("probes", probes, 1), *x.shape)
    _choice("probe_dist", probe_dist, PROBE_DISTRIBUTIONS)
    device = generator.device if generator is not None else x.device
    if probe_dist == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    # integers first, so the dtype never depends on torch's default (flow_matching's float64 bug)
    return (torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) * 2 - 1).to(x.device)


def _batched_vjp(out: Tensor, inp: Tensor, vectors: Tensor, create_graph: bool) -> Tensor:
    """``vectors[k]ᵀ ∂out/∂inp`` for every k: one batched backward pass, or a loop (same numbers) for
    models whose backward has no batching rule."""

    def vjp(v: Tensor, batched: bool) -> Tensor:
        return torch.autograd.grad(out, inp, v, retain_graph=True, create_graph=create_graph, is_grads_batched=batched)[0]

    try:
        return vjp(vectors, True)
    except RuntimeError:
        return torch.stack([vjp(v, False) for v in vectors])


def divergence(out: Tensor, inp: Tensor, *, method: str = "exact", probes: Tensor | None = None,
               chunk_size: int | None = None, create_graph: bool = False) -> Tensor:
    """Per-sample divergence :math:`\\sum_i \\partial\\,\\mathrm{out}_i / \\partial\\,\\mathrm{inp}_i` of a batched map.

    ``out = f(inp)``, both ``(B, *S)``, computed with ``inp`` requiring grad; sample b of ``out``
    depends only on sample b of ``inp``. ``method="exact"``: D vector–Jacobian products against the
    basis, ``chunk_size`` basis vectors per batched backward pass (default: as many as fit in ~16M
    elements); returns ``(B,)``. ``"hutchinson"``: ``probes`` ``(P, B, *S)`` (:func:`draw_probes`);
    returns ``(P, B)``. ``create_graph``: keep the graph (for training through the divergence).
    """
    _choice("divergence", method, DIVERGENCES)
    if out.shape != inp.shape:
        raise ValueError(f"divergence needs out.shape == inp.shape, got {tuple(out.shape)} and {tuple(inp.shape)}")
    batch, dims = inp.shape[0], math.prod(inp.shape[1:])
    if method == "hutchinson":
        if probes is None or probes.shape[1:] != inp.shape:
            got = None if probes is None else tuple(probes.shape)
            raise ValueError(f"hutchinson needs probes of shape (P, *{tuple(inp.shape)}), got {got}")
        g = _batched_vjp(out, inp, probes.to(out.dtype), create_graph)
        return (g * probes).reshape(probes.shape[0], batch, -1).sum(-1)
    if chunk_size is None:
        chunk_size = max(1, min(dims, _VJP_ELEMENTS // max(1, batch * dims)))
    chunk_size = check_int("chunk_size", chunk_size, 1)
    total = out.new_zeros(batch)
    for start in range(0, dims, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, dims), device=inp.device)
        k = torch.arange(len(idx), device=inp.device)
        basis = torch.zeros(len(idx), batch, dims, dtype=out.dtype, device=out.device)
        basis[k, :, idx] = 1
        g = _batched_vjp(out, inp, basis.reshape(len(idx), *inp.shape), create_graph).reshape(len(idx), batch, dims)
        total = total + g[k, :, idx].sum(0)
    return total


_compute_divergence = divergence  # the parameter of augmented_velocity shadows the function's name


def augmented_velocity(field: Any, x: Tensor, t: float | Tensor, *, divergence: str = "exact", probes: Tensor | None = None,
                       chunk_size: int | None = None, cond: dict | None = None, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """The probability-flow velocity and its divergence from ONE model evaluation: ``(u, ∇·u)`` at ``(x, t)``.

    ``u = field.velocity(x, t, **cond)`` (one model call; two for an :class:`~flowdiff.InterpolantField`
    whose drift needs its score model) and its divergence by :func:`divergence` (same keywords;
    backward passes only): the right-hand side of the augmented ODE. ``x``: ``(B, *S)``; ``t``: a
    float, 0-d or ``(B,)`` tensor. ``u`` comes back detached unless ``create_graph``; ``div`` is
    ``(B,)`` (exact) or ``(P, B)`` (Hutchinson).
    """
    with torch.enable_grad():
        inp = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        u = field.velocity(inp, t, **dict(cond or {}))
        if not isinstance(u, Tensor) or u.shape != x.shape:
            raise ValueError(f"field.velocity must return a tensor of shape {tuple(x.shape)}, got {getattr(u, 'shape', u)}")
        if u.requires_grad:
            div = _compute_divergence(u, inp, method=divergence, probes=probes, chunk_size=chunk_size, create_graph=create_graph)
        else:  # a velocity that does not depend on x has zero divergence
            div = x.new_zeros(x.shape[:1] if divergence == "exact" else (0 if probes is None else probes.shape[0], x.shape[0]))
    return (u, div) if create_graph else (u.detach(), div.detach())


def _velocity_jacobian(field: Any, x: Tensor, t: Tensor, cond: dict, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """``(u, ∂u/∂x)`` from ONE model call: the velocity ``(B, *S)`` and its Jacobian ``(B, D, D)`` (rows:
    vector–Jacobian products against the basis, chunked as in :func:`divergence`)."""
    batch, dims = x.shape[0], x[0].numel()
    with torch.enable_grad():
        inp = x.detach().requires_grad_(True)
        u = field.velocity(inp, t, **cond)
        if not isinstance(u, Tensor) or u.shape != x.shape:
            raise ValueError(f"field.velocity must return a tensor of shape {tuple(x.shape)}, got {getattr(u, 'shape', u)}")
        if not u.requires_grad:
            return u.detach(), x.new_zeros(batch, dims, dims)
        chunk = check_int("chunk_size", chunk_size, 1) if chunk_size is not None else max(1, min(dims, _VJP_ELEMENTS // max(1, batch * dims)))
        rows = []
        for start in range(0, dims, chunk):
            idx = torch.arange(start, min(start + chunk, dims), device=x.device)
            basis = torch.zeros(len(idx), batch, dims, dtype=u.dtype, device=u.device)
            basis[torch.arange(len(idx), device=x.device), :, idx] = 1
            rows.append(_batched_vjp(u, inp, basis.reshape(len(idx), *x.shape), False).reshape(len(idx), batch, dims))
    return u.detach(), torch.cat(rows).movedim(0, 1).detach()  # (B, D rows ∂u_i, D columns ∂x_j)


class FlowCoordinates:
    """The change of variables of the module docstring, in float64 (identity for interpolants)."""

    def __init__(self, path: Any):
        self.path, self.gaussian = path, isinstance(path, GaussianPath)

    def tau(self, t: Tensor) -> Tensor:
        if not self.gaussian:
            return t
        tab = self.path.table(t)
        return tab.alpha / (tab.alpha + tab.sigma)

    def t_of_tau(self, tau: Tensor) -> Tensor:
        return self.path.t_of_log_snr(torch.logit(tau.clamp(0.0, 1.0))) if self.gaussian else tau

    def factors(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(S, dt/dτ, d log S/dt)`` at ``t`` (float64 tensors of t's shape)."""
        if not self.gaussian:
            return torch.ones_like(t), torch.ones_like(t), torch.zeros_like(t)
        tab = self.path.table(t)
        a, s, da, ds = tab.alpha, tab.sigma, tab.d_alpha, tab.d_sigma
        scale = a + s
        return scale, 1.0 / ((da * s - a * ds) / scale**2), (da + ds) / scale


class LogSnrTime:
    r"""The time of ``solver="adaptive"``: :math:`\rho = \log(1 + u) - \log(1 + b u)`, :math:`u = \alpha/\sigma = e^\lambda`.

    In the half log-SNR λ a Gaussian component of variance :math:`s^2` moves at rate
    :math:`\mathrm{sigmoid}(2\lambda + 2\log s) \in [0, 1]`: the stiffness of :math:`t` near the data
    end (eigenvalues up to :math:`1/s`) is gone, whatever the decades of s. With ``b = 0`` (σ(t_end) > 0)
    ρ is :math:`-\log(1 - \tau)` in flow time :math:`\tau = u/(1+u)`: ρ ≈ λ towards the data end and
    ρ ≈ u at the noise end (u → 0, where nothing happens, is not stretched out to λ = −∞). When
    σ(t_end) = 0 (t = 1, u = ∞), ``b`` > 0 keeps that end finite too. For an interpolant u = τ/(1 − τ)
    is used the same way.
    """

    def __init__(self, coords: FlowCoordinates, t_a: float, t_b: float):
        self.coords, self.t_a, self.t_b = coords, t_a, t_b
        tau = coords.tau(torch.tensor([t_a, t_b], dtype=torch.float64))
        self.a = 1.0
        self.b = _RHO_B_INF if float(tau.max()) >= 1.0 else 0.0
        self.rho_a, self.rho_b = (self.rho_of_tau(float(v)) for v in tau)

    def rho_of_tau(self, tau: float) -> float:
        if tau >= 1.0:
            return -math.log(self.b)
        u = tau / (1.0 - tau)
        return math.log(u + self.a) - math.log1p(self.b * u)

    def tau(self, rho: Tensor) -> Tensor:
        e = torch.exp(rho)
        return ((e - self.a) / ((1 - self.b * e) + e - self.a)).clamp(0.0, 1.0)

    def dtau(self, rho: Tensor) -> Tensor:
        """dτ/dρ (finite at both ends)."""
        e = torch.exp(rho)
        return e * (1 - self.a * self.b) / ((1 - self.b * e) + e - self.a) ** 2

    def t(self, rho: Tensor) -> Tensor:
        """Model time of ρ; the two ends exactly."""
        t = self.coords.t_of_tau(self.tau(rho))
        t = torch.where(rho == self.rho_b, torch.full_like(t, self.t_b), t)
        return torch.where(rho == self.rho_a, torch.full_like(t, self.t_a), t)


def _index_cond(cond: dict, index: Tensor | None) -> dict:
    """Conditioning restricted to the samples ``index`` (batched tensors only)."""
    if index is None:
        return cond
    return {k: (v[index] if isinstance(v, Tensor) and v.ndim >= 1 else v) for k, v in cond.items()}


class _Evaluator:
    """The augmented right-hand side ``(dy/dτ, ∇_y·dy/dτ)`` at times in t, with the interval guard."""

    def __init__(self, field: Any, coords: FlowCoordinates, t_lo: float, t_hi: float, probes: Tensor | None,
                 cond: dict, options: dict, progress: Callable[[], None] | None = None):
        self.field, self.coords, self.t_lo, self.t_hi = field, coords, t_lo, t_hi
        self.probes, self.cond, self.options, self.progress = probes, cond, options, progress
        self.sample_evals = 0  # Σ over model calls of the number of samples evaluated

    def __call__(self, y: Tensor, t64: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """At flow state ``y`` and float64 times ``t64`` (0-d or per-sample); the divergence term batch first."""
        scale, dt_dtau, dlogs = self.coords.factors(t64.clamp(self.t_lo, self.t_hi))
        shape = (-1,) + (1,) * (y.ndim - 1)
        cast = lambda v: (v.reshape(shape) if t64.ndim == 1 else v).to(dtype=y.dtype, device=y.device)  # noqa: E731
        x, tm = cast(scale) * y, self._model_time(t64, y)
        probes = self.probes if self.probes is None or index is None else self.probes[:, index]
        u, div = self._guard(lambda: augmented_velocity(self.field, x, tm, probes=probes, cond=_index_cond(self.cond, index),
                                                        **self.options), x, tm)
        self.sample_evals += y.shape[0]
        if self.progress is not None:
            self.progress()
        gdiv = dt_dtau.to(dtype=div.dtype, device=div.device) * (div - y[0].numel() * dlogs.to(dtype=div.dtype, device=div.device))
        return cast(dt_dtau / scale) * (u - cast(dlogs) * x), gdiv.movedim(0, -1)  # batch first for the integrators

    def _model_time(self, t64: Tensor, y: Tensor) -> Tensor:
        """``t64`` clamped to the interval in the model's dtype: float32 rounding cannot leave it."""
        tm = t64.clamp(self.t_lo, self.t_hi).to(y.dtype)
        if tm.dtype != torch.float64:
            tm = torch.where(tm.double() > self.t_hi, torch.nextafter(tm, torch.tensor(-math.inf, dtype=tm.dtype)), tm)
            tm = torch.where(tm.double() < self.t_lo, torch.nextafter(tm, torch.tensor(math.inf, dtype=tm.dtype)), tm)
        return tm.to(y.device)

    def _guard(self, call: Callable[[], Any], x: Tensor, tm: Tensor) -> Any:
        """The model call, with the first failure explained (shape, dtype, time)."""
        try:
            return call()
        except (ValueError, RuntimeError, TypeError) as error:
            if self.sample_evals:
                raise
            raise ValueError(f"the field's model failed on the first evaluation with x of shape {tuple(x.shape)} "
                             f"(dtype {x.dtype}) at t={float(tm.flatten()[0]):.6g}: {error}") from error

    def jacobian(self, y: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(dy/dτ, ∇_y·dy/dτ, ∂(dy/dτ)/∂y)`` at one time ``t`` and every sample, from ONE model call
        (exact divergence only; the Jacobian ``(B, D, D)`` is what the divergence sums the diagonal of)."""
        scale, dt_dtau, dlogs = (float(v) for v in self.coords.factors(torch.tensor(t, dtype=torch.float64)))
        x = scale * y
        tm = self._model_time(torch.tensor(t, dtype=torch.float64), y)
        u, jac = self._guard(lambda: _velocity_jacobian(self.field, x, tm, self.cond, self.options.get("chunk_size")), x, tm)
        self.sample_evals += y.shape[0]
        if self.progress is not None:
            self.progress()
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        jk = dt_dtau * (jac - dlogs * eye)
        return (dt_dtau / scale) * (u - dlogs * x), jk.diagonal(dim1=1, dim2=2).sum(-1), jk


def check_data(x: Any, name: str = "x") -> Tensor:
    """A finite floating-point ``(B, *S)`` tensor with B ≥ 1, or a clear error."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        what = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor (float32 or float64), got {what}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, *S) with B >= 1 and data dimensions, got {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).reshape(x.shape[0], -1).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has NaN/inf entries (samples {bad}…); likelihoods need finite data")
    return x


def check_solve(field: Any, t_start: float | None, t_end: float | None, what: str, solver: str, divergence_: str,
                probes: int, probe_dist: str, rtol: float, atol: float, nfe: int | None, refine_tol: float | None) -> tuple[Any, float, float]:
    """The checks of every entry point: a field on a Gaussian path or an interpolant, the options, and the
    interval (default the path's ``[t_min, t_max]``, inside it, increasing). Returns ``(path, t_start, t_end)``."""
    if not (hasattr(field, "velocity") and hasattr(field, "path") and hasattr(field, "nfe")):
        raise TypeError(f"field must be a fd.Field or fd.InterpolantField (with .velocity, .path and .nfe), got {type(field).__name__}")
    path = field.path
    if not isinstance(path, (GaussianPath, StochasticInterpolant)):
        raise TypeError(f"field.path must be a GaussianPath or StochasticInterpolant, got {type(path).__name__}")
    _choice("solver", solver, LIKELIHOOD_SOLVERS)
    _choice("divergence", divergence_, DIVERGENCES)
    _choice("probe_dist", probe_dist, PROBE_DISTRIBUTIONS)
    check_int("probes", probes, 1)
    check_float("rtol", rtol, 0.0, low_open=True)
    check_float("atol", atol, 0.0, low_open=True)
    if nfe is not None:
        check_int("nfe", nfe, 1)
    if refine_tol is not None:
        check_float("refine_tol", refine_tol, 0.0, low_open=True)
    lo, hi = float(path.t_min), float(path.t_max)
    ts = check_float("t_start", lo if t_start is None else t_start)
    te = check_float("t_end", hi if t_end is None else t_end)
    if min(ts, te) < lo - 1e-12 or max(ts, te) > hi + 1e-12:
        raise ValueError(f"t_start={ts!r} and t_end={te!r} must lie in the path's safe interval [t_min, t_max] = [{lo!r}, {hi!r}]")
    if not ts < te:
        raise ValueError(f"need t_start < t_end (t_start is the noise/prior side, t_end the data side, as in fd.sample; "
                         f"{what}), got t_start={ts!r}, t_end={te!r}")
    return path, min(max(ts, lo), hi), min(max(te, lo), hi)


def prior_log_prob(prior: Prior, path: Any, t_prior: float) -> Callable[[Tensor], Tensor]:
    """The log-density ``(B, *S) -> (B,)`` at the prior end (``prior`` of ``log_likelihood``), its shape checked."""
    if not callable(prior):
        _choice("prior", prior, ("gaussian", "standard"), " or a callable z -> log pi(z) of shape (B,)")
        tt = torch.tensor(t_prior, dtype=torch.float64)
        if prior == "standard":
            std = 1.0
        elif isinstance(path, GaussianPath):
            std = float(path.sigma(tt))
        elif path.is_mirror:
            raise ValueError("prior='gaussian' needs a Gaussian base; the mirror interpolant has none (x0 = x1): pass prior=callable")
        else:  # x_t = a0 x0 + a1 x1 + γz: a1(t_min) x1 ≈ 0 is neglected
            a0, gamma = float(path.coefficients(tt)[0]), float(path.gamma(tt))
            std = math.sqrt(a0 * a0 + gamma * gamma)
        if std <= 0:
            raise ValueError(f"prior='gaussian' has zero width at t={t_prior!r}; pass prior=callable")

    def log_prob(z: Tensor) -> Tensor:
        if callable(prior):
            out = prior(z)
            if not isinstance(out, Tensor) or out.shape != (z.shape[0],):
                raise ValueError(f"prior must return a tensor of shape (B,) = ({z.shape[0]},), got {getattr(out, 'shape', out)}")
            return out
        d, sq = z[0].numel(), z.reshape(z.shape[0], -1).pow(2).sum(-1)
        return -0.5 * sq / std**2 - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)

    return log_prob


def _nodes(coords: FlowCoordinates, kind: Any, steps: int, t_a: float, t_b: float, startup: bool) -> tuple[Tensor, list[float]]:
    """The nodes from ``t_a`` (start of the solve) to ``t_b`` and their τ: a kind of :data:`LIKELIHOOD_GRIDS`
    with ``steps`` steps or an increasing explicit grid; with ``startup`` two nodes at 1/4 and 1/2 of
    the first step (in τ unless the grid is uniform in t) for the Adams start."""
    lo, hi = min(t_a, t_b), max(t_a, t_b)
    in_tau = isinstance(kind, str) and kind in ("flow", "logsnr")
    if not isinstance(kind, str):
        t = validate_grid(kind, lo, hi)
    elif kind == "flow":
        ends = coords.tau(torch.tensor([lo, hi], dtype=torch.float64))
        t = coords.t_of_tau(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64))
    else:
        _choice("grid", kind, LIKELIHOOD_GRIDS, " or an array of times")
        if kind == "logsnr" and not coords.gaussian:
            raise TypeError(f"grid='logsnr' needs a Gaussian path, got {type(coords.path).__name__}; use 'flow' or 'uniform'")
        t = make_grid(coords.path, kind, steps, lo, hi)
    t = t.flip(0) if t_a > t_b else t
    if startup:
        v = coords.tau(t) if in_tau else t
        first = torch.tensor([float(v[0]) + f * float(v[1] - v[0]) for f in (0.25, 0.5)], dtype=torch.float64)
        t = torch.cat([t[:1], coords.t_of_tau(first) if in_tau else first, t[1:]])
    t = t.clamp(lo, hi)
    t[0], t[-1] = t_a, t_b
    return t, coords.tau(t).tolist()  # τ from the times the model sees, so the quadrature matches them


@dataclass
class LogpSolve:
    """One solve of the augmented ODE from ``t_a`` to ``t_b``."""

    state: Tensor  # x(t_b)
    change: Tensor  # Δ with log p(x(t_b)) = log p(x(t_a)) − Δ; (B,) or (P, B)
    nfe: int
    grid: Tensor | None  # the nodes, increasing (fixed-step solvers)
    steps: Tensor | None  # accepted steps per sample (dopri5)
    refined: Tensor | None  # samples re-solved by dopri5 after the Adams check
    sample_evals: int  # Σ over model calls of the number of samples evaluated
    error_estimate: Tensor | None = None  # "adaptive": per-sample estimate of the error of the result, nats
    calls: Tensor | None = None  # "adaptive": model evaluations per sample


def _check_state(y: Tensor, ell: Tensor, solver: str, t: float | Tensor) -> None:
    if not (bool(torch.isfinite(y).all()) and bool(torch.isfinite(ell).all())):
        where = float(t) if not isinstance(t, Tensor) or t.numel() == 1 else float(t.min())
        raise NonFiniteLikelihoodError(f"solver {solver!r}: the augmented state became non-finite near t={where:.6g}; the model "
                                       "may output NaN/inf there, or the step is unstable (raise nfe or use solver='dopri5')")


def _dopri5(ev: _Evaluator, state: tuple[Tensor, Tensor], t_a: float, t_b: float, rtol: float, atol: float, cap: int,
            check: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample dopri5 in τ; the times of the ends are exact."""
    coords = ev.coords
    tau_a, tau_b = coords.tau(torch.tensor([t_a, t_b], dtype=torch.float64)).tolist()

    def time_of(s: Tensor) -> Tensor:
        return torch.where(s == tau_b, t_b, torch.where(s == tau_a, t_a, coords.t_of_tau(s)))

    check_step = (lambda s, idx, y: _check_state(y[0], y[1], "dopri5", coords.t_of_tau(s))) if check else None
    try:
        (y, ell), steps = ig.dopri5_per_sample(lambda s, y, idx: ev(y[0], time_of(s), idx), tau_a, tau_b, state, rtol=rtol,
                                               atol=atol, max_calls=cap, on_step=check_step, time_of=coords.t_of_tau)
    except ig.StepSizeUnderflowError as error:
        raise NonFiniteLikelihoodError(str(error)) from error
    return y, ell, steps


class _GaussianFrame:
    r"""The change of state of ``solver="adaptive"`` that makes a Gaussian's flow constant (``linearize``).

    From the Jacobian of the velocity at the data end, each sample gets the Gaussian its
    neighbourhood looks like there: in the coordinates :math:`z = x/\sigma` of log-SNR time, with
    :math:`u = \alpha/\sigma`, a Gaussian :math:`N(m, C)` has :math:`\hat x = m + uC(I + u^2C)^{-1}(z - um)`,
    so the Jacobian of :math:`\hat x` gives :math:`C = V\mathrm{diag}(c)V^\top` and :math:`\hat x` gives
    ``m``. Its probability-flow ODE solves in closed form, :math:`z = um + S(u)v` with
    :math:`S = V\mathrm{diag}(\sqrt{1 + u^2c})V^\top` and v constant; for any field the solver integrates
    :math:`dv/du = S^{-1}(\hat x - m - S_u v)` instead (exactly the same trajectory), which is ≈ 0 while
    the sample stays in its component — in particular over the stiff stretch near the data end, where
    the component variances :math:`c` span decades — and the log-determinant of :math:`y \mapsto v`
    (closed form) is taken out of the divergence and added back exactly. This is the Gaussian
    special case of exponential integrators with the linear part solved exactly (Hochbruck &
    Ostermann 2010, "Exponential integrators"), the linear part read off the Jacobian that the exact
    divergence computes anyway.
    """

    def __init__(self, y0: Tensor, k0: Tensor, jac: Tensor, tau0: float):
        dims = y0[0].numel()
        u0 = tau0 / (1.0 - tau0)
        eye = torch.eye(dims, dtype=torch.float64, device=jac.device)
        h = (eye + (1.0 - tau0) * jac.double()) / (1.0 + u0)  # ∂x̂/∂z
        sym = 0.5 * (h + h.transpose(1, 2))
        eta, self.vecs = torch.linalg.eigh(sym)
        ueta = u0 * eta
        # the frame only where the Jacobian is that of a probability-flow field: ∂x̂/∂z = u Cov[x₁|z] is
        # symmetric with u η in [0, 1); elsewhere (a field that is no PF-ODE, e.g. an untrained network)
        # the sample keeps flow coordinates (on = False)
        # measured on I − u ∂x̂/∂z = (I + u²C)⁻¹, the part that carries the information near the data end
        rest = (eye - u0 * sym).flatten(1).norm(dim=-1)
        asym = u0 * (h - h.transpose(1, 2)).flatten(1).norm(dim=-1) / (2 * rest).clamp_min(1e-300)
        self.on = (asym <= _FRAME_ASYMMETRY) & (ueta.amin(-1) >= -_FRAME_ASYMMETRY) & (ueta.amax(-1) < 1.0 - 1e-12)
        on = self.on.unsqueeze(-1)
        ueta = ueta.clamp(0.0, 1.0 - 1e-12)
        self.c = torch.where(on, ueta / (u0 * u0 * (1.0 - ueta)), 0.0)  # (B, D) component variances
        self.vecs = torch.where(on.unsqueeze(-1), self.vecs, eye)
        self.dtype, self.shape = y0.dtype, y0.shape
        yf = y0.reshape(y0.shape[0], -1).double()
        xhat = self._rot(yf + (1.0 - tau0) * k0.reshape(yf.shape).double())
        z = self._rot((1.0 + u0) * yf)
        self.m = torch.where(on, (1.0 + u0 * u0 * self.c) * xhat - u0 * self.c * z, 0.0)
        self.v0 = torch.where(on, (z - u0 * self.m) / torch.sqrt(1.0 + u0 * u0 * self.c), yf).to(y0.dtype)

    def shrink(self, u: Tensor, index: Tensor) -> Tensor:
        """y = shrink · V(um + Sv): 1/(1 + u) in the frame, 1 in flow coordinates; ``(n, 1)``."""
        return torch.where(self.on[index].unsqueeze(-1), 1.0 / (1.0 + u.reshape(-1, 1)), 1.0)

    def _rot(self, v: Tensor, index: Tensor | None = None) -> Tensor:
        vecs = self.vecs if index is None else self.vecs[index]
        return torch.einsum("bji,bj->bi", vecs, v)  # Vᵀ v

    def _unrot(self, v: Tensor, index: Tensor | None = None) -> Tensor:
        vecs = self.vecs if index is None else self.vecs[index]
        return torch.einsum("bij,bj->bi", vecs, v)  # V v

    def y(self, v: Tensor, u: Tensor, index: Tensor) -> Tensor:
        """The flow state of v at u (per sample) for the samples ``index``."""
        u = u.reshape(-1, 1)
        c, m = self.c[index], self.m[index]
        z = u * m + torch.sqrt(1.0 + u * u * c) * v.double()
        return (self._unrot(z, index) * self.shrink(u, index)).to(self.dtype).reshape(len(index), *self.shape[1:])

    def dv_du(self, v: Tensor, y: Tensor, k: Tensor, tau: Tensor, u: Tensor, index: Tensor) -> Tensor:
        tau, u = tau.reshape(-1, 1), u.reshape(-1, 1)
        c, m = self.c[index], self.m[index]
        xhat = self._rot((y.reshape(len(index), -1) + (1.0 - tau) * k.reshape(len(index), -1)).double(), index)
        root = torch.sqrt(1.0 + u * u * c)
        flow = k.reshape(len(index), -1).double() / (1.0 + u) ** 2  # dy/du, in flow coordinates
        return torch.where(self.on[index].unsqueeze(-1), (xhat - m - (u * c / root) * v.double()) / root, flow).to(self.dtype)

    def logdet_rate(self, u: Tensor, index: Tensor) -> Tensor:
        """d/du log|det ∂y/∂v| = Σ u c/(1 + u²c) − D/(1 + u)."""
        u = u.reshape(-1, 1)
        c = self.c[index]
        rate = (u * c / (1.0 + u * u * c)).sum(-1) - c.shape[-1] / (1.0 + u.squeeze(-1))
        return torch.where(self.on[index], rate, 0.0)

    def logdet(self, u: float) -> Tensor:
        """log|det ∂y/∂v| at u, every sample."""
        return torch.where(self.on, 0.5 * torch.log1p(u * u * self.c).sum(-1) - self.c.shape[-1] * math.log1p(u), 0.0)


def _adaptive(ev: _Evaluator, y: Tensor, ell: Tensor, t_a: float, t_b: float, atol: float, cap: int,
              check: bool, linearize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-sample variable-step Adams in ρ (:class:`LogSnrTime`), the error controlled in nats; with
    ``linearize``, in the Gaussian frame of :class:`_GaussianFrame` read off the data end."""
    clock = LogSnrTime(ev.coords, t_a, t_b)
    dims, batch = y[0].numel(), y.shape[0]
    frame, first = None, None
    rho_start = clock.rho_a
    tau_a = float(clock.tau(torch.tensor(clock.rho_a, dtype=torch.float64)))
    steps0 = calls0 = estimate0 = None
    if linearize and t_a > t_b and clock.rho_of_tau(_FRAME_U / (1.0 + _FRAME_U)) > clock.rho_b:
        if tau_a > _FRAME_U / (1.0 + _FRAME_U):  # first to u = _FRAME_U without the frame (t = 1 included)
            rho_start = clock.rho_of_tau(_FRAME_U / (1.0 + _FRAME_U))
            y, ell, steps0, calls0, estimate0 = _adaptive_run(ev, clock, None, y, ell, clock.rho_a, rho_start, atol, cap, check)
            tau_a = float(clock.tau(torch.tensor(rho_start, dtype=torch.float64)))
            cap = cap - int(calls0.max())
        k0, g0, jac = ev.jacobian(y, float(clock.t(torch.tensor(rho_start, dtype=torch.float64))))
        frame = _GaussianFrame(y, k0, jac, tau_a)
        first = (k0, g0)
    out, ell, steps, calls, estimate = _adaptive_run(ev, clock, frame, frame.v0 if frame is not None else y, ell, rho_start,
                                                     clock.rho_b, atol, cap, check, first)
    if steps0 is not None:
        steps, calls, estimate = steps + steps0, calls + calls0, estimate + estimate0
    if frame is None:
        return out, ell, steps, calls, estimate
    tau_b = float(clock.tau(torch.tensor(clock.rho_b, dtype=torch.float64)))
    u_a, u_b = tau_a / (1.0 - tau_a), tau_b / (1.0 - tau_b)
    y_b = frame.y(out, torch.full((batch,), u_b, dtype=torch.float64, device=out.device), torch.arange(batch, device=out.device))
    change = (frame.logdet(u_b) - frame.logdet(u_a)).to(dtype=ell.dtype, device=ell.device)
    return y_b, ell + (change.unsqueeze(-1) if ell.ndim == 2 else change), steps, calls, estimate


def _adaptive_run(ev: _Evaluator, clock: LogSnrTime, frame: _GaussianFrame | None, start: Tensor, ell: Tensor, rho_a: float,
                  rho_b: float, atol: float, cap: int, check: bool,
                  first: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One adaptive Adams run from ρ_a to ρ_b, in the frame or in flow coordinates (``first``: the
    evaluation at ρ_a, already made)."""
    dims = start[0].numel()
    cache: dict[str, Tensor] = {}

    def f(rho: Tensor, state: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal first
        tau, dtau = clock.tau(rho), clock.dtau(rho)
        u = tau / (1.0 - tau).clamp_min(1e-300)
        yy = state if frame is None else frame.y(state, u.to(state.device), idx)
        if first is not None:  # the data-end evaluation that gave the Jacobian
            (k, g), first = first, None
            k, g = k[idx], g[idx]
        else:
            k, g = ev(yy, clock.t(rho), idx)
        shape = (-1, *[1] * (k.ndim - 1))
        cache["eps"] = (yy - tau.to(dtype=yy.dtype, device=yy.device).reshape(shape) * k).reshape(len(idx), -1)
        cache["tau"] = tau
        w = dtau.to(dtype=g.dtype, device=g.device).reshape(-1, *[1] * (g.ndim - 1))
        if frame is None:
            return k * dtau.to(dtype=k.dtype, device=k.device).reshape(shape), g * w
        du = (dtau * (1.0 + u) ** 2).to(device=state.device)  # du/dρ
        dv = frame.dv_du(state, yy, k, tau.to(state.device), u.to(state.device), idx) * du.reshape(-1, 1).to(state.dtype)
        rate = (frame.logdet_rate(u.to(state.device), idx) * du).to(dtype=g.dtype).reshape(w.shape)
        return dv, g * w - rate

    def error(rho: Tensor, h: Tensor, s_c: Tensor, s_p: Tensor, k: Tensor, dq: Tensor, idx: Tensor) -> Tensor:
        # the state error in nats: its first-order effect on log p is the score of p_τ at y, -ε̂/(1-τ),
        # with ε̂ = y − τ dy/dτ in flow coordinates (a random direction: |score||e|/√D, as a floor)
        tau = cache["tau"].to(dtype=s_c.dtype, device=s_c.device).reshape(-1, 1)
        score = cache["eps"] / (1 - tau).clamp_min(1e-12)
        e = (s_c - s_p).reshape(s_c.shape[0], -1)
        if frame is not None:  # v → y: y = V S(u) v / (1 + u)
            u = (tau / (1 - tau).clamp_min(1e-300)).double()
            e = (frame._unrot(torch.sqrt(1.0 + u * u * frame.c[idx]) * e.double(), idx) * frame.shrink(u, idx)).to(s_c.dtype)
        state = torch.maximum((score * e).sum(-1).abs(), score.norm(dim=-1) * e.norm(dim=-1) / math.sqrt(dims))
        if check:
            _check_state(s_c, dq, "adaptive", clock.t(rho))
        return _MILNE * (state + dq.abs().reshape(dq.shape[0], -1).amax(-1))

    try:
        return ig.adams_per_sample(f, rho_a, rho_b, start, ell, error=error, tol=_STEP_FRACTION * atol, max_calls=cap, order=5,
                                   safety=0.8, per_unit_step=False, first_step=_FIRST_STEP)
    except ig.StepSizeUnderflowError as err:
        raise NonFiniteLikelihoodError(str(err)) from err


def integrate_logp(
    field: Any, x: Tensor, t_a: float, t_b: float, *, solver: str, nfe: int | None, grid: Any, rtol: float,
    atol: float, method: str, probes: Tensor | None, chunk_size: int | None, cond: dict, create_graph: bool,
    check: bool, progress: Callable[[], None] | None, refine_tol: float | None = None,
) -> LogpSolve:
    """Integrate ``(x, ℓ)`` from ``t_a`` to ``t_b`` (either direction; the grid is given increasing).

    With ``solver="adams"`` and ``refine_tol``, samples whose Milne indicator exceeds it are solved
    again, alone, by per-sample ``dopri5`` (``rtol``, ``atol``).
    """
    coords = FlowCoordinates(field.path)
    lo, hi = min(t_a, t_b), max(t_a, t_b)
    options = {"divergence": method, "chunk_size": chunk_size, "create_graph": create_graph}
    ev = _Evaluator(field, coords, lo, hi, probes, cond, options, progress)
    scale_a, scale_b = coords.factors(torch.tensor([t_a, t_b], dtype=torch.float64))[0].tolist()
    y = x / scale_a
    ell = y.new_zeros((y.shape[0],) if probes is None else (y.shape[0], probes.shape[0]))
    start_nfe, t, steps_taken, refined = field.nfe, None, None, None
    estimate, calls = None, None
    if solver == "adaptive":
        linear = method == "exact" and not create_graph and y[0].numel() <= _LINEARIZE_MAX_DIM
        y, ell, steps_taken, calls, estimate = _adaptive(ev, y, ell, t_a, t_b, atol, DEFAULT_ADAPTIVE_CAP if nfe is None else nfe, check,
                                                         linear)
    elif solver == "dopri5":
        y, ell, steps_taken = _dopri5(ev, (y, ell), t_a, t_b, rtol, atol, DEFAULT_ADAPTIVE_CAP if nfe is None else nfe, check)
    else:
        stages = 1 if solver == "adams" else ig.TABLEAUS[solver].stages
        budget = DEFAULT_LIKELIHOOD_NFE if nfe is None else nfe
        steps = budget - 3 if solver == "adams" else budget // stages  # adams: 2 start-up nodes + the first
        if isinstance(grid, str) and steps < 1:
            raise ValueError(f"nfe={budget} is too small for solver {solver!r}; it needs nfe >= {4 if solver == 'adams' else stages}")
        t, taus = _nodes(coords, grid, steps, t_a, t_b, startup=solver == "adams" and isinstance(grid, str))
        needed = len(t) if solver == "adams" else (len(t) - 1) * stages
        if not isinstance(grid, str) and nfe is not None and needed > nfe:
            raise ValueError(f"the explicit grid needs {needed} model evaluations with solver {solver!r}, more than nfe={nfe}")
        if solver == "adams":
            indicator = torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)

            def monitor(i: int, pred: Tensor, y_new: Tensor, total: Tensor) -> None:
                nonlocal indicator
                gap = ((y_new - pred).detach() / (1 + y_new.detach().abs())).reshape(y_new.shape[0], -1)
                indicator = torch.maximum(indicator, gap.double().pow(2).mean(-1).sqrt())
                if check:
                    _check_state(y_new, total, "adams", t[i + 1])

            y, ell = ig.adams_pec(lambda i, yy: ev(yy, t[i]), taus, y, on_step=monitor)
            if refine_tol is not None:
                refined = (indicator > refine_tol).cpu()
                if bool(refined.any()):
                    idx = refined.nonzero().flatten().to(x.device)
                    sub = _Evaluator(field, coords, lo, hi, None if probes is None else probes[:, idx], _index_cond(cond, idx), options)
                    cap = DEFAULT_ADAPTIVE_CAP if nfe is None or not isinstance(grid, str) else max(DEFAULT_ADAPTIVE_CAP, nfe)
                    y, ell = y.clone(), ell.clone()
                    y[idx], ell[idx], _ = _dopri5(sub, (x[idx] / scale_a, torch.zeros_like(ell[idx])), t_a, t_b, rtol, atol, cap, check)
                    ev.sample_evals += sub.sample_evals
        else:
            node_t = dict(zip(taus, t))
            rhs = lambda s, yy: ev(yy[0], node_t[s] if s in node_t else coords.t_of_tau(torch.tensor(s, dtype=torch.float64)))  # noqa: E731
            for i in range(len(taus) - 1):
                (y, ell), _ = ig.rk_step(rhs, taus[i], (y, ell), taus[i + 1] - taus[i], ig.TABLEAUS[solver], s_next=taus[i + 1])
                if check:
                    _check_state(y, ell, solver, t[i + 1])
        t = t if t_a < t_b else t.flip(0)
    # log p_Y(y_b) = log p_Y(y_a) − ℓ and log p_X = log p_Y − D log S.
    change = ell.movedim(-1, 0) + x[0].numel() * (math.log(scale_b) - math.log(scale_a))
    return LogpSolve(y * scale_b, change, field.nfe - start_nfe, t, steps_taken, refined, ev.sample_evals, estimate, calls)


def probe_std_error(per_probe: Tensor) -> Tensor:
    """Standard error of the mean over Hutchinson probes (dim 0); NaN with one probe."""
    p = per_probe.shape[0]
    return per_probe.std(0) / math.sqrt(p) if p > 1 else torch.full_like(per_probe[0], float("nan"))


@dataclass
class SampleLogpResult:
    """What :func:`sample_with_logp` returns: ``x`` at ``t_end``; ``log_prob`` ``(B,)`` its log-density
    (the prior at ``t_start`` pushed forward by the ODE; Hutchinson: mean over probes) = ``prior_term``
    :math:`\\log\\pi(x_{init})` + ``delta_logdet``; ``nfe``: model calls really made; ``grid``: the
    times visited (fixed-step solvers), increasing; ``std_error``: Hutchinson standard error;
    ``steps``: accepted steps per sample (``dopri5``); ``refined``: samples re-solved by ``dopri5``
    after the Adams check (see ``log_likelihood``)."""

    x: Tensor
    log_prob: Tensor
    prior_term: Tensor
    delta_logdet: Tensor
    nfe: int
    grid: Tensor | None = None
    std_error: Tensor | None = None
    steps: Tensor | None = None
    solver: str = "adams"
    options: dict = dataclass_field(default_factory=dict)
    refined: Tensor | None = None


def sample_with_logp(
    field: Any, x_init: Tensor, *, solver: str = "adams", nfe: int | None = None, grid: Any = "flow", rtol: float = 1e-5,
    atol: float | None = None, divergence: str = "exact", probes: int = 8, probe_dist: str = "rademacher",
    generator: torch.Generator | None = None, t_start: float | None = None, t_end: float | None = None,
    prior: Prior = "gaussian", cond: dict | None = None, chunk_size: int | None = None, check_finite: bool = True,
    refine_tol: float | None = 5e-3,
) -> SampleLogpResult:
    r"""Generate with the probability-flow ODE and the log-density of every sample, in one pass.

    Integrates the augmented ODE forwards from ``x_init`` at ``t_start`` (default ``t_min``; noise
    side) to ``t_end`` (default ``t_max``): :math:`\log p(x(t_{end})) = \log\pi(x_{init}) - \int
    \nabla\cdot u\,dt`. The log-density costs no model evaluation beyond sampling (backward passes
    only: D per evaluation for the exact divergence, ``probes`` for Hutchinson). Solvers, grids and
    options are those of :func:`flowdiff.likelihood.log_likelihood`; ``fd.sample(...,
    return_logp=True)`` runs this function. The density is that of the *state* at ``t_end``; a final
    denoising step (:math:`E[x_1|x_t]`) is not invertible and has no density.
    """
    x_init = check_data(x_init, "x_init")
    atol = (DEFAULT_ATOL_NATS if solver == "adaptive" else 1e-5) if atol is None else atol  # adaptive: nats
    path, ts, te = check_solve(field, t_start, t_end, "generation runs forward in t", solver, divergence, probes, probe_dist,
                               rtol, atol, nfe, refine_tol)
    prior_term = prior_log_prob(prior, path, ts)(x_init)
    z = draw_probes(x_init, probes, probe_dist, generator) if divergence == "hutchinson" else None
    sol = integrate_logp(field, x_init, ts, te, solver=solver, nfe=nfe, grid=grid, rtol=rtol, atol=atol, method=divergence,
                         probes=z, chunk_size=chunk_size, cond=dict(cond or {}), create_graph=False, check=check_finite,
                         progress=None, refine_tol=refine_tol)
    per_probe = prior_term.to(x_init.dtype) - sol.change  # log p(x_b) = log p(x_a) − Δ
    mean = (lambda v: v.mean(0)) if z is not None else (lambda v: v)  # noqa: E731
    return SampleLogpResult(
        x=sol.state.detach(), log_prob=mean(per_probe).detach(), prior_term=prior_term.detach(),
        delta_logdet=-mean(sol.change).detach(), nfe=sol.nfe, grid=sol.grid, steps=sol.steps, solver=solver,
        std_error=None if z is None else probe_std_error(per_probe).detach(), refined=sol.refined,
        options={"divergence": divergence, "probes": 0 if z is None else probes},
    )


def sample_returning_logp(
    field: Any, x_init: Tensor, solver: str | None, nfe: int | None, grid: Any, t_start: float | None,
    t_end: float | None, denoise_final: bool, generator: torch.Generator | None, cond: dict | None,
    check_finite: bool, options: dict,
) -> SampleResult:
    """``fd.sample(..., return_logp=True)``: :func:`sample_with_logp` (``options`` are its keywords), then
    the final denoise; ``nfe`` includes the final call. ``SampleResult.log_prob`` is the density of ``state``."""
    name = solver or "adams"
    if name not in LIKELIHOOD_SOLVERS:
        raise ValueError(f"return_logp=True needs a solver from {', '.join(LIKELIHOOD_SOLVERS)}, got solver={name!r}")
    own = {"solver", "nfe", "grid", "t_start", "t_end", "generator", "cond", "check_finite"}  # sample()'s arguments
    valid = [k for k, p in inspect.signature(sample_with_logp).parameters.items() if p.kind == p.KEYWORD_ONLY and k not in own]
    if unknown := sorted(set(options) - set(valid)):
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for return_logp=True; valid: {', '.join(valid)}")
    final_calls = base_final_calls(field, denoise_final)
    if nfe is not None and (nfe := check_int("nfe", nfe, 1)) - final_calls < 1:
        raise ValueError(f"nfe={nfe} leaves no evaluation for sampling after the final denoise")
    start_nfe, cc, kwargs = field.nfe, dict(cond or {}), dict(options, **({} if grid is None else {"grid": grid}))
    out = sample_with_logp(field, x_init, solver=name, nfe=None if nfe is None else nfe - final_calls, t_start=t_start,
                           t_end=t_end, cond=cond, generator=generator, check_finite=check_finite, **kwargs)
    t0, t1 = float(field.path.t_min if t_start is None else t_start), float(field.path.t_max if t_end is None else t_end)
    denoised = None  # E[x_1|x_t] on a Gaussian path, one Euler step of the ODE to t = 1 on an interpolant
    if denoise_final and isinstance(field.path, GaussianPath):
        denoised = GaussianEvaluator(field, field.path, cc)(out.x, t1)[0]
    elif denoise_final:
        denoised = out.x + (1.0 - t1) * field.velocity(out.x, time_tensor(t1, out.x), **cc)
    return SampleResult(
        x=out.x if denoised is None else denoised, nfe=field.nfe - start_nfe, solver=name, state=out.x,
        grid=out.grid if out.grid is not None else torch.tensor([t0, t1], dtype=torch.float64), denoised=denoised,
        nfe_budget=nfe, options=kwargs, log_prob=out.log_prob, log_prob_std_error=out.std_error,
    )
