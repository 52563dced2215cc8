r"""LML: the Levenberg–Marquardt correction of a solver step (Wang et al., ICCV 2025), as a step hook.

Wang, Yin, Qian, Li, Zhuang, Zhu, Zhang, Tang, Zhang, Zhao, Qian & Li 2025, "Unleashing
High-Quality Image Generation in Diffusion Sampling Using Second-Order Levenberg-Marquardt-
Langevin" (arXiv 2505.24222; official code ``zituitui/LML-diffusion-sampler``) replace the
model-dependent increment of each step by a damped low-rank Newton direction. Every exponential
step of :mod:`flowdiff.solvers.exponential` is a linear part plus an increment :math:`d`:

.. math::

    x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + d \quad(\text{data form}),\qquad
    x_{i+1} = \frac{\alpha_{i+1}}{\alpha_i}x_i + d \quad(\text{noise form}).

The released algorithm (``lm_correct``, used by its DDIM and multistep DPM-Solver(++)
schedulers; the paper text was not available to us, so this follows the code) takes the
low-rank factor :math:`e = \kappa\,d_{\text{prev}} + (1 - \kappa)\,d` (``e = d`` on the first
step), applies the Levenberg–Marquardt inverse by Sherman–Morrison, and restores the norm:

.. math::

    \tilde d = \lambda(\lambda I + e e^\top)^{-1} d = d - e\,\frac{\langle e, d\rangle}{\lambda + \|e\|^2},
    \qquad \tilde d \leftarrow \tilde d\,\frac{\|d\|}{\|\tilde d\|},

inner products per sample over all non-batch dimensions, then uses
:math:`x_{i+1} = (\text{linear part}) + \tilde d`; :math:`d_{\text{prev}}` is the uncorrected
increment of the previous step. The damping λ follows the README's table by NFE
(:func:`lml_damping`).

**κ = 0, the released default, is the identity**: then :math:`e = d`,
:math:`\tilde d = d\,\lambda/(\lambda + \|d\|^2)` and the renormalisation gives back
:math:`d` exactly (up to rounding; this module computes the correction in float64, so the
deviation is about :math:`10^{-16}\|d\|^2/\lambda` relative). The released scripts default to
``--kappa 0.0`` and the COCO script does not pass κ at all, so published LML samples may be
plain DPM-Solver samples. With κ > 0 the correction removes part of the component of
:math:`d` along :math:`e` and rescales — a real change whose effect we measured
(docs/lml.md, ``benchmarks/lml.py``).

The correction needs no model evaluation: :class:`LMLCorrection` is a ``Hooks(step=...)``
hook of :func:`~flowdiff.solvers.sample` that recovers :math:`d = x_{i+1} - c\,x_i` from the
states the loop reports (``c`` from the path at the two grid times) and returns the corrected
state, which the solver then continues from (its multistep history of model outputs is left as
it is, as in the released schedulers). :func:`lml_sample` wires it to a deterministic
exponential solver and picks the form from the solver's prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..paths import GaussianPath
from .base import SampleResult, get_solver, require_gaussian_path
from .loop import Hooks, LoopState, sample

__all__ = ["LML_FORMS", "RELEASED_DAMPING", "LMLCorrection", "lml_damping", "lml_direction", "lml_sample"]

#: The step forms LML can correct: which linear part is kept (module docstring).
LML_FORMS = ("data", "noise")
#: The README's damping λ by NFE for its CIFAR-10 DPM-Solver-3 runs (NFE: λ); :func:`lml_damping`
#: uses the entry of the largest listed NFE not above the budget (our reading between the rows).
RELEASED_DAMPING: dict[int, float] = {5: 8e-4, 7: 1e-3, 10: 8e-4, 12: 1e-3, 20: 5e-4, 30: 3e-4, 50: 1e-4, 100: 5e-5}


def lml_damping(nfe: int) -> float:
    """The released damping λ for ``nfe`` evaluations (:data:`RELEASED_DAMPING`; below 5 the 5-NFE value)."""
    nfe = check_int("nfe", nfe, 1)
    keys = [k for k in sorted(RELEASED_DAMPING) if k <= nfe]
    return RELEASED_DAMPING[keys[-1] if keys else min(RELEASED_DAMPING)]


def lml_direction(d: Tensor, d_prev: Tensor | None, kappa: float, damping: float) -> Tensor:
    r"""The LML-corrected increment :math:`\tilde d` (module docstring), per sample, in ``d``'s dtype.

    Arguments:
        d: the step's increment ``(B, *)``; ``d_prev``: the previous step's (``None`` on the first step).
        kappa: weight of ``d_prev`` in the low-rank factor, in ``[0, 1]``; ``damping``: λ > 0.
    """
    kappa = check_float("kappa", kappa, 0.0, 1.0)
    damping = check_float("damping", damping, 0.0, low_open=True)
    flat = d.reshape(d.shape[0], -1).to(torch.float64)
    e = flat if d_prev is None else kappa * d_prev.reshape(d.shape[0], -1).to(torch.float64) + (1.0 - kappa) * flat
    coef = (e * flat).sum(1, keepdim=True) / (damping + (e * e).sum(1, keepdim=True))
    out = flat - coef * e
    norm, new_norm = flat.norm(dim=1, keepdim=True), out.norm(dim=1, keepdim=True)
    # a zero increment stays zero (the released code divides 0 by 0 there)
    scale = torch.where(new_norm > 0, norm / torch.where(new_norm > 0, new_norm, torch.ones_like(new_norm)),
                        torch.zeros_like(norm))
    return (out * scale).reshape(d.shape).to(d.dtype)


class LMLCorrection:
    """The LML correction as a step hook (module docstring): ``Hooks(step=LMLCorrection(...))``.

    Arguments:
        path: the field's Gaussian path (for the linear part of each step).
        x_init: the state the run starts from; ``t_start``: its time.
        form: ``"data"`` (linear part σ_{i+1}/σ_i) or ``"noise"`` (α_{i+1}/α_i): the solver's form.
        kappa: in ``[0, 1]``; 0 is the identity (the released default).
        damping: λ > 0 (see :func:`lml_damping`).
        then: another step hook run after the correction (its resampling is followed).

    The callback and the trajectory of :func:`sample` see the uncorrected states (the loop
    reports a state before the step hook acts on it).
    """

    def __init__(self, path: GaussianPath, x_init: Tensor, t_start: float, form: str = "data", kappa: float = 0.0,
                 damping: float = 1e-3, then: Callable[[LoopState], LoopState | None] | None = None):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"LML needs a Gaussian path, got {type(path).__name__}")
        if form not in LML_FORMS:
            raise ValueError(f"unknown LML form {form!r}; valid: {', '.join(LML_FORMS)}")
        self.path, self.form = path, form
        self.kappa = check_float("kappa", kappa, 0.0, 1.0)
        self.damping = check_float("damping", damping, 0.0, low_open=True)
        self.then = then
        self.x_prev: Tensor = x_init
        self.t_prev = check_float("t_start", t_start, 0.0, 1.0)
        self.d_prev: Tensor | None = None
        self.deviation: list[float] = []  # per step: max relative change ‖d̃ − d‖/‖d‖ over the batch

    def linear_coefficient(self, t: float, t_next: float) -> float:
        tab = self.path.table([t, t_next])
        a, s = tab.alpha.tolist(), tab.sigma.tolist()
        if self.form == "data":
            return s[1] / s[0]
        if a[0] == 0.0:
            raise ValueError(f"LML in noise form cannot start where alpha = 0 (t={t!r}); use form='data'")
        return a[1] / a[0]

    def __call__(self, state: LoopState) -> LoopState | None:
        c = self.linear_coefficient(self.t_prev, state.t)
        d = state.x - c * self.x_prev
        corrected = lml_direction(d, self.d_prev, self.kappa, self.damping)
        flat_d = d.reshape(d.shape[0], -1)
        change = (corrected - d).reshape(d.shape[0], -1).norm(dim=1) / flat_d.norm(dim=1).clamp_min(1e-300)
        self.deviation.append(float(change.max()) if change.numel() else 0.0)
        x = c * self.x_prev + corrected
        self.d_prev, self.t_prev = d, state.t
        new = replace(state, x=x)
        if self.then is not None:
            out = self.then(new)
            if out is not None:
                new = out
                if out.ancestors is not None:
                    self.d_prev = self.d_prev[out.ancestors]
        self.x_prev = new.x
        return new


def lml_sample(field: Any, x_init: Tensor, solver: str = "dpm-solver++3m", nfe: int = 10, kappa: float = 0.0,
               damping: float | None = None, form: str | None = None, hooks: Hooks | None = None,
               t_start: float | None = None, **kwargs: Any) -> SampleResult:
    r""":func:`~flowdiff.solvers.sample` with the LML correction on every step of a deterministic solver.

    Arguments:
        field, x_init, solver, nfe, t_start, kwargs: as for :func:`~flowdiff.solvers.sample`;
            ``solver`` must be an ODE exponential integrator (``ddim``, ``dpm-solver*``,
            ``deis``, ``unipc``, ...; LML's own are DDIM and multistep DPM-Solver(++)).
        kappa: the EMA weight of the previous increment in ``[0, 1]``; 0 (the released default)
            is the identity.
        damping: λ; default :func:`lml_damping` of ``nfe``.
        form: ``"data"`` or ``"noise"``; default the solver's ``prediction`` (fixed by its name
            or given in ``kwargs``), else ``"data"``.
        hooks: other hooks; a step hook runs after the correction.

    Returns:
        The :class:`~flowdiff.SampleResult`; its ``options`` record ``lml_kappa``, ``lml_damping``,
        ``lml_form`` and ``lml_deviation`` (per step, the largest relative change of the increment).
    """
    spec = get_solver(solver)
    if spec.kind != "exponential" or spec.stochastic:
        raise ValueError(f"LML corrects deterministic exponential integrators; {solver!r} is a {spec.kind} solver"
                         f"{' (stochastic)' if spec.stochastic else ''}")
    path = require_gaussian_path(field, solver)
    if form is None:
        form = spec.fixed.get("prediction", kwargs.get("prediction", spec.defaults.get("prediction",
                              spec.cls.options.get("prediction") or "data")))
    damping = lml_damping(nfe) if damping is None else damping
    if t_start is None:
        times = kwargs.get("grid")
        t_start = float(times[0]) if times is not None and not isinstance(times, str) else float(path.t_min)
    hooks = Hooks() if hooks is None else hooks
    if not isinstance(hooks, Hooks):
        raise TypeError(f"hooks must be a fd.solvers.Hooks, got {type(hooks).__name__}")
    correction = LMLCorrection(path, x_init, t_start, form, kappa, damping, then=hooks.step)
    res = sample(field, x_init, solver=solver, nfe=nfe, t_start=t_start, hooks=replace(hooks, step=correction), **kwargs)
    res.options.update(lml_kappa=correction.kappa, lml_damping=correction.damping, lml_form=form,
                       lml_deviation=correction.deviation)
    res.log_weights = None if hooks.step is None else res.log_weights
    return res

