r"""MRS: semi-analytic sampling of mean-reverting SDEs as shift – solve – unshift.

Li, Wang, Liu et al. 2025, "Mean-Reverting Diffusion: Faster Sampling for Image Restoration"
(MRS, ICLR) solve the reverse IR-SDE and its probability-flow ODE by variation of constants.
With :math:`y = x - \mu` the mean-reverting SDE is an ordinary Gaussian diffusion
(:class:`~flowdiff.mean_reverting.IRSDE`), so their formulas are the DPM-Solver(++) family in
``y``; for instance the first-order ODE step in data prediction,

.. math::

    x_t = \frac{\bar\sigma_t}{\bar\sigma_s}x_s + \alpha_t(1 - e^{-h})\hat x_0
        + \mu\Big(1 - \frac{\bar\sigma_t}{\bar\sigma_s} - \alpha_t + \frac{\bar\sigma_t}{\bar\sigma_s}\alpha_s\Big),
    \qquad h = \lambda_t - \lambda_s,

is DDIM on ``y`` written back in ``x`` (the μ-terms of every MRS formula are the shift). So
:func:`mrs_sample` shifts (``y = x − μ``), runs any solver of :func:`flowdiff.sample` on the field
of ``y`` (:func:`~flowdiff.mean_reverting.shifted_field`) and shifts back. :data:`MRS_SOLVERS`
names the members of the paper:

====================  ===============================================================
(kind, form, order)   solver on ``y``
====================  ===============================================================
ode, data, 1/2/3      ``ddim``, ``dpm-solver++2m``, ``dpm-solver++3m`` (Taylor form)
ode, noise, 1/2/3     ``dpm-solver`` (order 1), ``dpm-solver-2m``, ``dpm-solver-3m`` (Taylor)
sde, data, 1/2        ``sde-dpm-solver++1``, ``sde-dpm-solver++2`` (heun weight: MRS's
                      :math:`\alpha_t(1 - (1 - e^{-2h})/(2h))D_1`)
====================  ===============================================================

"form" is the solver's parametrisation (what it holds constant over a step); what the network
predicts (``noise``, ``data``, ``velocity``, ...) is independent of it and converted by the field.
The noise-form SDE step of MRS (:math:`-2\bar\sigma_t(e^h - 1)\hat\varepsilon` + noise) has no
counterpart among the library's integrators and is not offered (the paper finds it the least
stable at low NFE). Baselines, through the same shift: ``euler-maruyama`` (its default ε(t) is
the reverse diffusion, :math:`\bar\sigma^2\dot\lambda = \lambda^2\theta = \sigma_s^2/2`: Euler–
Maruyama on the IR-SDE reverse SDE) and ``ddpm`` (η = 1: the exact Gaussian posterior
:math:`q(x_{t'} \mid x_t, \hat x_0)`, IR-SDE's "optimal reverse path" posterior sampler; the same update as
``sde-dpm-solver++1``, i.e. SDE-MRS of order 1, on the same grid). Measured speed-ups
(docs/mean_reverting.md): about 4–5× fewer evaluations than Euler–Maruyama on digits restoration,
2.5–5× on an exact mixture; not the paper's 10–20×.

With no member named, :func:`mrs_sample` runs :data:`DEFAULT_SOLVER` (UniPC, Zhao et al. 2023,
"UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models") on
:func:`mrs_grid`, a jump grid for the IR-SDE's noise range; up to :data:`GRID_MAX_NFE` evaluations
the ODE members use that grid too. On exact mixtures (D = 2–32) this divides the 10-NFE error of
MRS's own order-2 member on its quadratic grid by about 4 and of DPM-Solver++(2M) by about 3, but
it is not far below 100-step Euler on the ODE (about equal: 0.023 vs 0.021 mean); against 100-step
Euler–Maruyama, each measured against the exact solution of its own equation (for Euler–Maruyama a fine
solve on the same Brownian path), it is about 0.4× (docs/mean_reverting.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..paths import GaussianPath
from ..solvers import SampleResult, get_solver, sample
from .field import check_mu, shifted_field
from .sde import IRSDE

__all__ = ["BASELINES", "DEFAULT_SOLVER", "GRID_MAX_NFE", "GRID_SIGMA_MAX", "GRID_SIGMA_MIN_SCALE", "MRS_SOLVERS",
           "mrs_grid", "mrs_sample", "mrs_solver"]

#: (kind, form, order) -> (solver name on y, its options) — module docstring.
MRS_SOLVERS: dict[tuple[str, str, int], tuple[str, dict[str, Any]]] = {
    ("ode", "data", 1): ("ddim", {}),
    ("ode", "data", 2): ("dpm-solver++2m", {"solver_type": "taylor"}),
    ("ode", "data", 3): ("dpm-solver++3m", {"solver_type": "taylor"}),
    ("ode", "noise", 1): ("dpm-solver", {"order": 1}),
    ("ode", "noise", 2): ("dpm-solver-2m", {"solver_type": "taylor"}),
    ("ode", "noise", 3): ("dpm-solver-3m", {"solver_type": "taylor"}),
    ("sde", "data", 1): ("sde-dpm-solver++1", {}),
    ("sde", "data", 2): ("sde-dpm-solver++2", {"solver_type": "heun"}),
}
#: The solver of :func:`mrs_sample` when no member is named: UniPC (data form, bh2, order 2 below
#: 20 steps) through the shift, on :func:`mrs_grid`. Chosen on six exact mixtures (D = 2-32) at 10 NFE:
#: mean error to the reference ODE solution 0.023, against 0.106 for MRS ode/data/2 on its
#: default (quadratic) grid and 0.048 for that member on this grid (docs/mean_reverting.md).
DEFAULT_SOLVER = "unipc"
#: :func:`mrs_grid`'s largest noise level σ̃ = σ̄/α where the log-SNR-uniform steps begin.
GRID_SIGMA_MAX = 3.0
#: :func:`mrs_grid`'s last node before the final denoise: σ̃ = ``GRID_SIGMA_MIN_SCALE / (steps + 1)``.
GRID_SIGMA_MIN_SCALE = 0.3
#: :func:`mrs_sample` uses :func:`mrs_grid` up to this many evaluations (above, UniPC switches to
#: noise form / order 3 and the solvers' own grids are better: 0.0216 against 0.107 at 20 NFE).
GRID_MAX_NFE = 12
#: The baselines of the MRS paper, as solver names on y.
BASELINES = {"euler-maruyama": "euler-maruyama", "posterior": "ddpm"}


def mrs_solver(kind: str = "ode", form: str = "data", order: int = 2) -> tuple[str, dict[str, Any]]:
    """The solver name and options of MRS's (``kind``, ``form``, ``order``) member (:data:`MRS_SOLVERS`)."""
    key = (kind, form, order)
    if key not in MRS_SOLVERS:
        valid = ", ".join(f"{k}/{f}/{o}" for k, f, o in MRS_SOLVERS)
        hint = " (the noise-form SDE step is not offered: use form='data')" if (kind, form) == ("sde", "noise") else ""
        raise ValueError(f"no MRS solver for kind={kind!r}, form={form!r}, order={order!r}{hint}; valid kind/form/order: {valid}")
    name, options = MRS_SOLVERS[key]
    return name, dict(options)


def mrs_grid(path: GaussianPath, steps: int, t_start: float | None = None, t_end: float | None = None) -> Tensor:
    r"""The default time grid of the MRS ODE members: :func:`flowdiff.solvers.jump_grid` with
    :math:`\tilde\sigma_{hi}` = :data:`GRID_SIGMA_MAX` and :math:`\tilde\sigma_{lo}` =
    :data:`GRID_SIGMA_MIN_SCALE` ``/(steps + 1)`` (σ̃ = σ̄/α of the IR-SDE path of ``y``).

    The IR-SDE starts at σ̃ = λ/α(t_min) = 50 (λ = 0.5, terminal α = 0.01) and ends at σ̃ ≈ 3e-4;
    a log-SNR-uniform or time-quadratic grid spends most of 10 steps where the denoiser of
    ``y`` hardly changes, and its last step into σ̃ ≈ 0 costs the largest error. This grid jumps
    to σ̃ = 3 in one step, spreads the rest log-SNR-uniformly down to σ̃ = 0.03 (9 steps) and
    leaves the rest to the final denoise. Measured on exact mixtures (five problems, D = 2-16):
    at 10 NFE it divides the error of UniPC by about 3 and of DPM-Solver++(2M) by about 2 against
    their default grids; (σ̃_hi, σ̃_lo·(N+1)) = (3, 0.3) was the best of {1, 2, 3, 7, 50} × {0.1, 0.2,
    0.3, 0.45}. Above 12 NFE it is worse than the solvers' own grids (:data:`GRID_MAX_NFE`).
    """
    from ..solvers import jump_grid

    return jump_grid(path, steps, t_start, t_end, sigma_max=GRID_SIGMA_MAX,
                     sigma_min=GRID_SIGMA_MIN_SCALE / (int(steps) + 1))


def mrs_sample(model: Callable[..., Tensor], mu: Tensor, path: GaussianPath, prediction: str = "noise", *,
               kind: str | None = None, form: str | None = None, order: int | None = None, solver: str | None = None,
               nfe: int = 10,
               x_init: Tensor | None = None, generator: torch.Generator | None = None, cond: dict | None = None,
               **options: Any) -> SampleResult:
    r"""Restore: sample the reverse mean-reverting SDE/ODE of ``model`` from ``x_init`` (≈ μ + noise) to ``t_end``.

    Arguments:
        model: a mean-reverting network ``model(x, t, mu=μ, **cond)`` predicting ``prediction``
            (:mod:`flowdiff.mean_reverting.field`).
        mu: the stationary mean (the degraded images), shape ``(B, *)``.
        path: the :class:`~flowdiff.mean_reverting.IRSDE` (any Gaussian path of ``y = x − μ`` works).
        prediction: what ``model`` outputs: ``noise``, ``data``, ``velocity``, ``score`` or ``v``.
        kind, form, order: the MRS member (:func:`mrs_solver`): ``ode``/``sde`` (default ``ode``),
            ``data``/``noise`` (default ``data``), 1–3 (default 2). With none of them (and no
            ``solver``): :data:`DEFAULT_SOLVER` (UniPC on ``y``), the best measured at 5-20 NFE.
        solver: instead of (kind, form), any solver name of :func:`flowdiff.sample` (e.g. the
            baselines ``"euler-maruyama"`` and ``"ddpm"``, or ``"unipc"``); ``order`` is then that
            solver's ``order`` option.
        nfe: model evaluations, the final denoise included (:func:`flowdiff.sample`'s budget).
        x_init: the start at ``t_start``; default :meth:`IRSDE.stationary_sample` (μ + σ̄z).
        generator: for the start and the stochastic solvers.
        cond: further keyword arguments of every model call (``mu`` is passed by this function).
        options: passed to :func:`flowdiff.sample` (``grid``, ``hooks``, ``t_start``, solver options, ...);
            they override the MRS member's defaults. Without ``grid``, the ODE members and the
            default solver run on :func:`mrs_grid` when ``nfe`` ≤ :data:`GRID_MAX_NFE` (with the
            final denoise, ``denoise_final=True``); otherwise, and for the SDE members and the other
            solvers, on the solver's own default grid.

    Returns:
        A :class:`~flowdiff.SampleResult` in ``x`` coordinates (``x``, ``state``, ``denoised``
        and ``trajectory`` shifted back by μ).
    """
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a Gaussian path of y = x - mu (an IRSDE), got {type(path).__name__}")
    if not isinstance(mu, Tensor):
        raise TypeError(f"mu must be a torch.Tensor, got {type(mu).__name__}")
    if x_init is None:
        if isinstance(path, IRSDE):
            x_init = path.stationary_sample(mu, generator)
        else:
            x_init = mu + path.prior_sample(mu.shape, generator, mu.dtype, mu.device)
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a torch.Tensor, got {type(x_init).__name__}")
    mu = check_mu(mu, x_init, "x_init")
    ode_member = False
    if solver is None and kind is None and form is None and order is None:
        solver, ode_member = DEFAULT_SOLVER, True
    elif solver is None:
        kind = kind or "ode"
        solver, defaults = mrs_solver(kind, form or "data", 2 if order is None else order)
        options = {**defaults, **options}
        ode_member = kind == "ode"
    else:
        get_solver(solver)  # a clear error for an unknown name before any work
        if kind is not None or form is not None:
            raise ValueError(f"give either solver={solver!r} or the MRS member (kind={kind!r}, form={form!r}), not both")
        if order is not None:
            options = {**options, "order": order}
    jump = options.get("grid") is None and options.get("denoise_final", True) and isinstance(nfe, int)
    if ode_member and jump and 2 <= nfe <= GRID_MAX_NFE:
        # one evaluation per step for every ODE member and UniPC: nfe - 1 steps + the final denoise
        options["grid"] = mrs_grid(path, max(int(nfe) - 1, 1), options.get("t_start"), options.get("t_end"))
    field = shifted_field(model, path, mu, prediction)
    res = sample(field, x_init - mu, solver=solver, nfe=nfe, generator=generator, cond=cond, **options)
    shift = (lambda v: None if v is None else v + mu)
    return replace(res, x=res.x + mu, state=res.state + mu, denoised=shift(res.denoised),
                   trajectory=None if res.trajectory is None else [v + mu for v in res.trajectory])
