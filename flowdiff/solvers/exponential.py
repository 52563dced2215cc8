r"""Exponential integrators of the probability-flow ODE of a Gaussian path, in log-SNR.

For :math:`x_t = \alpha_t x_1 + \sigma_t\varepsilon` with half log-SNR
:math:`\lambda_t = \log(\alpha_t/\sigma_t)` (increasing in ``t``), the probability-flow ODE
has the exact variation-of-constants solutions (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver
for Diffusion Probabilistic Model Sampling in Around 10 Steps", Prop. 3.1; Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Eq. 8):

.. math::

    x_t = \frac{\sigma_t}{\sigma_s}x_s + \sigma_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}\hat x(\lambda)\,d\lambda
        \quad\text{(data prediction)},\qquad
    x_t = \frac{\alpha_t}{\alpha_s}x_s - \alpha_t\int_{\lambda_s}^{\lambda_t} e^{-\lambda}\hat\varepsilon(\lambda)\,d\lambda
        \quad\text{(noise prediction)}.

The linear part is integrated exactly; the solvers differ in how they approximate the
prediction inside the integral. With ``h = λ_t − λ_s`` and
:math:`\varphi_1(z) = (e^z - 1)/z`, :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`:

* ``ddim`` (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"; = DPM-Solver-1 =
  DPM-Solver++(1)): :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s + \alpha_t(1 - e^{-h})\hat x_s`.
* ``dpm-solver-2s``, ``dpm-solver-3s``: DPM-Solver-2/3 *singlestep* (noise prediction,
  intermediate points at :math:`r_1 = 1/2` resp. :math:`r_1 = 1/3, r_2 = 2/3` of each step in λ;
  Lu et al. 2022, Alg. 4–5); ``dpm-solver++2s``, ``dpm-solver++3s`` the data-prediction forms.
* ``dpm-solver`` (orders 1–3, option ``order``, default 3), ``dpm-solver-2m``, ``dpm-solver-3m``:
  multistep noise prediction (Lu et al. 2022b, Alg. 2 in noise form; the official code's
  ``multistep`` method); ``dpm-solver++2m`` (alias ``dpm-solver++``), ``dpm-solver++3m``: the
  data-prediction multistep methods (DPM-Solver++ Alg. 2 and its third-order extension).
  With :math:`r_0 = h_{i-1}/h`, :math:`D_1 = (m_0 - m_1)/r_0` (2M):
  :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(e^{-h}-1)m_0 - \tfrac12\alpha_t(e^{-h}-1)D_1`
  (``solver_type="dpmsolver"``) or :math:`+\,\alpha_t(\tfrac{e^{-h}-1}{h}+1)D_1` (``"taylor"``).
* ``unipc``: UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector
  Framework for Fast Sampling of Diffusion Models"): the UniP-p predictor plus the UniC
  corrector, which reuses the model evaluation at the predicted point (no extra evaluation)
  and raises the order to ``p + 1``. ``variant="bh1"`` (:math:`B(h) = h`) or ``"bh2"``
  (:math:`B(h) = e^h - 1`), ``order`` 1–3, ``prediction="data"|"noise"``. The corrector is
  skipped after the last step (the final evaluation is the denoising call), and a step that
  reaches σ = 0 is the exact first-order limit :math:`x_t = \alpha_t\hat x_s` (diffusers'
  ``bh1`` computes ``−∞·0 = NaN`` there).
* ``deis``: DEIS, the polynomial exponential integrator "tAB" (Zhang & Chen 2023, "Fast Sampling
  of Diffusion Models with Exponential Integrator"): the last ``order`` predictions are
  interpolated by a Lagrange polynomial in λ and the integral above is computed *exactly*
  (orders 1–4, ``prediction="noise"|"data"``). In noise form it is the ``logrho`` variant of
  diffusers (a Lagrange polynomial in :math:`\log\tilde\sigma = -\lambda`).

Multistep methods warm up with lower orders and, when ``lower_order_final`` applies, take
order ``min(order, steps − i)`` on step ``i`` so that the last step is first order
(crowsonkb/k-diffusion#43; the official code does this below 10 steps, diffusers below 15).
``lower_order_final`` is ``True`` (always), ``False`` (never) or an int ``n`` (only with
fewer than ``n`` steps).

Budget: multistep methods and ``ddim`` make one evaluation per step, at the step's start
(``steps = budget``); singlestep DPM-Solver-k makes ``k`` per step and follows the official
order pattern for ``B`` evaluations: order 3 takes ``B//3 + 1`` steps of orders
``[3, …, 3, 2, 1]`` (B ≡ 0 mod 3), ``[3, …, 3, 1]`` (≡ 1) or ``[3, …, 3, 2]`` (≡ 2); order 2
takes ``⌈B/2⌉`` steps ``[2, …, 2(, 1)]``.

All coefficient arithmetic is done in float64 on the host (α, σ, λ, φ-functions) and applied
to the state in its own dtype (EDM and the official DPM-Solver do the same). Every solver here
needs a Gaussian path; on a stochastic interpolant it raises a TypeError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import GaussianEvaluator, PathTable, register_solver, require_gaussian_path

__all__ = [
    "ddim",
    "deis",
    "dpm_solver_multistep",
    "dpm_solver_singlestep",
    "lagrange_exp_weights",
    "singlestep_orders",
    "unipc",
]

Callback = Callable[[int, float, Tensor, "Tensor | None"], None]
PREDICTION_FORMS = ("data", "noise")
SOLVER_TYPES = ("dpmsolver", "taylor")
UNIPC_VARIANTS = ("bh1", "bh2")
#: UniPC's default order is 3 from this many steps on, 2 below (see :func:`unipc`).
UNIPC_ORDER3_STEPS = 20
#: Below this many steps UniPC defaults to data prediction with B(h) = e^h − 1 (see :func:`unipc`).
UNIPC_DATA_STEPS = 12


# ---------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------


class _Engine:
    """α, σ, λ at the grid nodes (float64) and one-call (x̂, ε̂) evaluations."""

    def __init__(self, field: Any, grid: Tensor, cond: dict | None, name: str):
        self.name = name
        self.path = require_gaussian_path(field, name)
        self.table = PathTable.build(self.path, grid)
        self.evaluator = GaussianEvaluator(field, self.path, cond)
        self.steps = len(grid) - 1
        lam = self.table.log_snr
        if not math.isfinite(lam[0]):
            raise ValueError(
                f"solver {name!r} needs alpha(t_start) > 0 (a finite log-SNR), got lambda(t={self.table.t[0]!r})={lam[0]!r}; "
                f"start a little later"
            )
        if any(not math.isfinite(v) for v in lam[:-1]):
            raise ValueError(f"solver {name!r}: the log-SNR must be finite on the grid before t_end, got {lam}")
        self.evals = 0

    def t(self, i: int) -> float:
        return self.table.t[i]

    def lam(self, i: int) -> float:
        return self.table.log_snr[i]

    def alpha(self, i: int) -> float:
        return self.table.alpha[i]

    def sigma(self, i: int) -> float:
        return self.table.sigma[i]

    def h(self, i: int) -> float:
        """Log-SNR step from node ``i`` to ``i + 1`` (``inf`` when it reaches σ = 0)."""
        return self.table.log_snr[i + 1] - self.table.log_snr[i]

    def evaluate(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """(x̂, ε̂) at node ``i``: one model call."""
        tb = self.table
        self.evals += 1
        return self.evaluator(x, tb.t[i], (tb.alpha[i], tb.sigma[i], tb.d_alpha[i], tb.d_sigma[i]))

    def intermediate(self, i: int, r: float) -> tuple[float, tuple[float, float, float, float], float]:
        """The time inside step ``i`` at log-SNR ``λ_i + r h``: ``(t, (α, σ, α̇, σ̇), λ(t) − λ_i)``."""
        lam = self.lam(i) + r * self.h(i)
        tt = float(self.path._t_of_log_snr(torch.tensor([lam], dtype=torch.float64)))
        t = min(max(tt, self.table.t[i]), self.table.t[i + 1])  # never leave the step
        coeff = self.evaluator.coefficients(t)
        return t, coeff, math.log(coeff[0] / coeff[1]) - self.lam(i)

    def evaluate_at(self, x: Tensor, t: float, coeff: tuple[float, float, float, float]) -> tuple[Tensor, Tensor]:
        """(x̂, ε̂) at an intermediate time ``t`` with its coefficients (one model call)."""
        self.evals += 1
        return self.evaluator(x, t, coeff)

    def first_order(self, x: Tensor, i: int, m0: Tensor, form: str) -> Tensor:
        """DDIM / DPM-Solver-1 from node ``i`` to ``i + 1`` with prediction ``m0`` of type ``form``."""
        h = self.h(i)
        a0, s0, a1, s1 = self.alpha(i), self.sigma(i), self.alpha(i + 1), self.sigma(i + 1)
        if form == "data":
            return (s1 / s0) * x - (a1 * math.expm1(-h)) * m0
        return (a1 / a0) * x - (s1 * math.expm1(h)) * m0


def _check_choice(solver: str, label: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{solver}: unknown {label} {value!r}; valid: {', '.join(map(repr, allowed))}")
    return value


def _check_order(solver: str, order: Any, low: int, high: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not low <= order <= high:
        raise ValueError(f"{solver}: order must be an integer in [{low}, {high}], got order={order!r}")
    return order


def _final_order(lower_order_final: Any, steps: int, i: int, order: int, solver: str) -> int:
    """Order allowed on step ``i`` of ``steps`` by the lower-order-final policy (module docstring)."""
    if isinstance(lower_order_final, bool):
        active = lower_order_final
    elif isinstance(lower_order_final, int) and lower_order_final >= 0:
        active = steps < lower_order_final
    else:
        raise ValueError(
            f"{solver}: lower_order_final must be True, False or an int >= 0 (apply below that many steps), "
            f"got {lower_order_final!r}"
        )
    return min(order, steps - i) if active else order


def _check_budget(engine: _Engine, needed: int, max_evals: int | None) -> None:
    if max_evals is not None and needed > max_evals:
        raise ValueError(
            f"solver {engine.name!r}: {engine.steps} steps need {needed} evaluations, more than the budget {max_evals}"
        )


def _expm1_div(z: float) -> float:
    """:math:`\\varphi_1(z) = (e^z - 1)/z` without cancellation (1 at z = 0)."""
    return 1.0 if z == 0.0 else math.expm1(z) / z


# ---------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------


def ddim(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
) -> Tensor:
    r"""Deterministic DDIM (Song et al. 2021), the first-order exponential integrator:
    :math:`x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h_i})\hat x(x_i, t_i)`.
    One evaluation per step."""
    eng = _Engine(field, grid, cond, "ddim")
    _check_budget(eng, eng.steps, max_evals)
    for i in range(eng.steps):
        data, _ = eng.evaluate(x, i)
        x = eng.first_order(x, i, data, "data")
        if callback is not None:
            callback(i, eng.t(i + 1), x, data)
    return x


# ---------------------------------------------------------------------------------------
# Singlestep DPM-Solver(-2/3) and DPM-Solver++(2S/3S)
# ---------------------------------------------------------------------------------------


def singlestep_orders(budget: int, order: int) -> list[int]:
    """Orders of the steps that singlestep DPM-Solver-``order`` takes with ``budget`` evaluations.

    The official DPM-Solver pattern (Lu et al. 2022, Sec. 3.4 "DPM-Solver-fast"): order 3 takes
    ``budget // 3 + 1`` steps ``[3, …, 3, 2, 1]``, ``[3, …, 3, 1]`` or ``[3, …, 3, 2]`` for
    ``budget mod 3 = 0, 1, 2``; order 2 takes ``⌈budget/2⌉`` steps ``[2, …, 2(, 1)]``; order 1
    takes ``budget`` steps. The orders always sum to ``budget``.
    """
    if budget < 1:
        return []
    if order == 3:
        k = budget // 3 + 1
        rem = budget % 3
        return [3] * (k - 2) + [2, 1] if rem == 0 else [3] * (k - 1) + [rem]
    if order == 2:
        return [2] * (budget // 2) + ([1] if budget % 2 else [])
    return [1] * budget


def _orders_for_steps(steps: int, budget: int, order: int) -> list[int]:
    """Orders for a given number of steps within ``budget`` (lower the last steps first)."""
    orders = [order] * steps
    excess = sum(orders) - budget
    for j in range(steps - 1, -1, -1):
        if excess <= 0:
            break
        cut = min(excess, orders[j] - 1)
        orders[j] -= cut
        excess -= cut
    return orders


def _singlestep_update(
    eng: _Engine, x: Tensor, i: int, order: int, form: str, solver_type: str, data0: Tensor, noise0: Tensor
) -> Tensor:
    """One singlestep DPM-Solver(++) step of ``order`` from node ``i`` (official update formulas)."""
    m0 = data0 if form == "data" else noise0
    h = eng.h(i)
    if order == 1 or not math.isfinite(h):
        if not math.isfinite(h):
            return eng.alpha(i + 1) * data0  # σ_{i+1} = 0: the exact first-order limit
        return eng.first_order(x, i, m0, form)
    a_s, s_s, a_t, s_t = eng.alpha(i), eng.sigma(i), eng.alpha(i + 1), eng.sigma(i + 1)

    def pick(d: Tensor, n: Tensor) -> Tensor:
        return d if form == "data" else n

    if order == 2:
        t1, c1, h1 = eng.intermediate(i, 0.5)
        a_1, s_1 = c1[0], c1[1]
        r1 = h1 / h
        # intermediate point u = x_{s1} by a first-order step
        if form == "data":
            u = (s_1 / s_s) * x - (a_1 * math.expm1(-h1)) * m0
        else:
            u = (a_1 / a_s) * x - (s_1 * math.expm1(h1)) * m0
        m1 = pick(*eng.evaluate_at(u, t1, c1))
        if form == "data":
            phi_1 = math.expm1(-h)
            base = (s_t / s_s) * x - (a_t * phi_1) * m0
            if solver_type == "dpmsolver":
                return base - (0.5 / r1 * a_t * phi_1) * (m1 - m0)
            return base + (a_t * (phi_1 / h + 1.0) / r1) * (m1 - m0)
        phi_1 = math.expm1(h)
        base = (a_t / a_s) * x - (s_t * phi_1) * m0
        if solver_type == "dpmsolver":
            return base - (0.5 / r1 * s_t * phi_1) * (m1 - m0)
        return base - (s_t * (phi_1 / h - 1.0) / r1) * (m1 - m0)

    # order 3 at r1 = 1/3, r2 = 2/3 (the λ of the points actually evaluated, exact after the time inverse)
    t1, c1, h1 = eng.intermediate(i, 1.0 / 3.0)
    t2, c2, h2 = eng.intermediate(i, 2.0 / 3.0)
    a_1, s_1 = c1[0], c1[1]
    a_2, s_2 = c2[0], c2[1]
    r1, r2 = h1 / h, h2 / h
    if form == "data":
        phi_11, phi_12, phi_1 = math.expm1(-h1), math.expm1(-h2), math.expm1(-h)
        phi_22 = math.expm1(-h2) / h2 + 1.0
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        u1 = (s_1 / s_s) * x - (a_1 * phi_11) * m0
        m1 = pick(*eng.evaluate_at(u1, t1, c1))
        u2 = (s_2 / s_s) * x - (a_2 * phi_12) * m0 + (r2 / r1 * a_2 * phi_22) * (m1 - m0)
        m2 = pick(*eng.evaluate_at(u2, t2, c2))
        base = (s_t / s_s) * x - (a_t * phi_1) * m0
        if solver_type == "dpmsolver":
            return base + (a_t * phi_2 / r2) * (m2 - m0)
        d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return base + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
    phi_11, phi_12, phi_1 = math.expm1(h1), math.expm1(h2), math.expm1(h)
    phi_22 = math.expm1(h2) / h2 - 1.0
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    u1 = (a_1 / a_s) * x - (s_1 * phi_11) * m0
    m1 = pick(*eng.evaluate_at(u1, t1, c1))
    u2 = (a_2 / a_s) * x - (s_2 * phi_12) * m0 - (r2 / r1 * s_2 * phi_22) * (m1 - m0)
    m2 = pick(*eng.evaluate_at(u2, t2, c2))
    base = (a_t / a_s) * x - (s_t * phi_1) * m0
    if solver_type == "dpmsolver":
        return base - (s_t * phi_2 / r2) * (m2 - m0)
    d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return base - (s_t * phi_2) * d1 - (s_t * phi_3) * d2


def dpm_solver_singlestep(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    order: int = 3,
    prediction: str = "noise",
    solver_type: str = "dpmsolver",
) -> Tensor:
    r"""Singlestep DPM-Solver-``order`` (Lu et al. 2022, Alg. 4–5; DPM-Solver++(2S) for data).

    Each step of order k evaluates the model at its start and at k − 1 intermediate points
    (λ_s + r h with r = 1/2, or 1/3 and 2/3), using the official update formulas
    (``solver_type="dpmsolver"``, or the Taylor form ``"taylor"``). Step orders follow
    :func:`singlestep_orders` for the budget (the last steps are of lower order).
    """
    name = f"dpm-solver{'++' if prediction == 'data' else '-'}{order}s"
    _check_order(name, order, 1, 3)
    _check_choice(name, "prediction", prediction, PREDICTION_FORMS)
    _check_choice(name, "solver_type", solver_type, SOLVER_TYPES)
    eng = _Engine(field, grid, cond, name)
    budget = eng.steps * order if max_evals is None else max_evals
    orders = _orders_for_steps(eng.steps, budget, order)
    if sum(orders) > budget:
        _check_budget(eng, sum(orders), max_evals)
    for i, k in enumerate(orders):
        data, noise = eng.evaluate(x, i)
        x = _singlestep_update(eng, x, i, k, prediction, solver_type, data, noise)
        if callback is not None:
            callback(i, eng.t(i + 1), x, data)
    return x


# ---------------------------------------------------------------------------------------
# Multistep DPM-Solver (noise) and DPM-Solver++ (data)
# ---------------------------------------------------------------------------------------


def _multistep_update(
    eng: _Engine, x: Tensor, i: int, order: int, form: str, solver_type: str, hist: list[Tensor], data0: Tensor
) -> Tensor:
    """One multistep step of ``order`` from node ``i``; ``hist[-1]`` is the prediction at node ``i``."""
    h = eng.h(i)
    if not math.isfinite(h):
        return eng.alpha(i + 1) * data0
    m0 = hist[-1]
    if order == 1:
        return eng.first_order(x, i, m0, form)
    a_s, s_s, a_t, s_t = eng.alpha(i), eng.sigma(i), eng.alpha(i + 1), eng.sigma(i + 1)
    h0 = eng.lam(i) - eng.lam(i - 1)
    r0 = h0 / h
    d1_0 = (m0 - hist[-2]) / r0
    if form == "data":
        phi_1 = math.expm1(-h)
        base = (s_t / s_s) * x - (a_t * phi_1) * m0
    else:
        phi_1 = math.expm1(h)
        base = (a_t / a_s) * x - (s_t * phi_1) * m0
    sign = 1.0 if form == "data" else -1.0
    coef = a_t if form == "data" else s_t
    phi_2 = phi_1 / h + sign  # (e^{-h}-1)/h + 1  or  (e^h-1)/h - 1
    if order == 2:
        if solver_type == "dpmsolver":
            return base - (0.5 * coef * phi_1) * d1_0
        return base + (sign * coef * phi_2) * d1_0
    h1 = eng.lam(i - 1) - eng.lam(i - 2)
    r1 = h1 / h
    d1_1 = (hist[-2] - hist[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h - 0.5
    # The official code and diffusers weight D2 by φ₃ although D2 = h²p''/2 of the quadratic
    # through the three predictions: the exact (Taylor) weight is 2φ₃. Their 3M is therefore
    # formally second order (measured slope 2.0); "taylor" gives the third-order method.
    w2 = 2.0 * phi_3 if solver_type == "taylor" else phi_3
    return base + (sign * coef * phi_2) * d1 - (coef * w2) * d2


def dpm_solver_multistep(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    order: int = 3,
    prediction: str = "noise",
    solver_type: str = "dpmsolver",
    lower_order_final: bool | int = 10,
) -> Tensor:
    r"""Multistep DPM-Solver (``prediction="noise"``) or DPM-Solver++ (``"data"``), orders 1–3.

    Lu et al. 2022b ("DPM-Solver++", Alg. 2 and Appendix B): step ``i`` uses the predictions
    at nodes ``i, i−1, …`` (one new evaluation per step), with the official multistep
    update formulas (module docstring; order 3 has one form, order 2 ``solver_type``
    ``"dpmsolver"`` or ``"taylor"``). Warm-up with lower orders; ``lower_order_final`` as in
    the module docstring (default: below 10 steps, as the official code).
    """
    name = f"dpm-solver{'++' if prediction == 'data' else ''}{order}m"
    _check_order(name, order, 1, 3)
    _check_choice(name, "prediction", prediction, PREDICTION_FORMS)
    _check_choice(name, "solver_type", solver_type, SOLVER_TYPES)
    eng = _Engine(field, grid, cond, name)
    _check_budget(eng, eng.steps, max_evals)
    hist: list[Tensor] = []
    for i in range(eng.steps):
        data, noise = eng.evaluate(x, i)
        hist.append(data if prediction == "data" else noise)
        if len(hist) > 3:
            hist.pop(0)
        k = min(order, i + 1, _final_order(lower_order_final, eng.steps, i, order, name))
        x = _multistep_update(eng, x, i, k, prediction, solver_type, hist, data)
        if callback is not None:
            callback(i, eng.t(i + 1), x, data)
    return x


# ---------------------------------------------------------------------------------------
# UniPC
# ---------------------------------------------------------------------------------------


def _unipc_coefficients(rks: list[float], hh: float, variant: str, order: int) -> tuple[list[list[float]], list[float], float, float]:
    """Vandermonde rows R, right-hand side b, hφ₁ = e^{hh} − 1 and B(h) of UniPC (diffusers' form)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return rows, b, h_phi_1, b_h


def _solve(rows: list[list[float]], b: list[float]) -> list[float]:
    a = torch.tensor(rows, dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_step(
    eng: _Engine,
    x: Tensor,
    i: int,
    order: int,
    form: str,
    variant: str,
    hist: list[Tensor],
    lams: list[float],
    model_t: Tensor | None,
) -> Tensor:
    """UniP-``order`` from node ``i`` (``model_t is None``) or UniC-``order`` of that step,
    given the prediction ``model_t`` at the predicted point of node ``i + 1``.

    ``hist[-1]`` is the prediction at node ``i`` (λ = ``lams[-1]``), older ones before it.
    """
    h = eng.h(i)
    a_s, s_s, a_t, s_t = eng.alpha(i), eng.sigma(i), eng.alpha(i + 1), eng.sigma(i + 1)
    m0 = hist[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lams[-1]) / h
        rks.append(rk)
        d1s.append((hist[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h if form == "data" else h
    rows, b, h_phi_1, b_h = _unipc_coefficients(rks, hh, variant, order)
    if form == "data":
        x_lin = (s_t / s_s) * x - (a_t * h_phi_1) * m0
        coef = a_t * b_h
    else:
        x_lin = (a_t / a_s) * x - (s_t * h_phi_1) * m0
        coef = s_t * b_h
    if model_t is None:  # predictor
        if not d1s:
            return x_lin
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
        res = sum(r * d for r, d in zip(rhos, d1s))
        return x_lin - coef * res
    rhos = [0.5] if order == 1 else _solve(rows, b)  # corrector
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + rhos[-1] * (model_t - m0)
    return x_lin - coef * res


def unipc(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    order: int | None = None,
    variant: str | None = None,
    prediction: str | None = None,
    corrector: bool = True,
    disable_corrector: tuple[int, ...] | list[int] = (),
    lower_order_final: bool | int = True,
) -> Tensor:
    r"""UniPC: UniP-``order`` predictor + UniC corrector (Zhao et al. 2023, Alg. 1–3).

    With history :math:`m_0 = \hat m(\lambda_i)`, :math:`r_k = (\lambda_{i-k} - \lambda_i)/h`,
    :math:`D_k = (m_k - m_0)/r_k` and (data form) :math:`hh = -h`:

    .. math::

        \tilde x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i - \alpha_{i+1}(e^{hh}-1)\,m_0
            - \alpha_{i+1}B(h)\sum_{k=1}^{p-1}\rho^P_k D_k,

    with :math:`\rho^P` solving the Vandermonde system :math:`R\rho = b`,
    :math:`b_j = hh\,\varphi_{j+1}(hh)\,j!/B(h)` (``ρ = ½`` for p = 2). After evaluating the
    model at :math:`\tilde x_{i+1}` (the next step's evaluation), the corrector recomputes the
    step with :math:`D_p = m(\tilde x_{i+1}) - m_0` added (``ρ^C`` from the full system, ½ for
    p = 1) — order p + 1 for free. ``disable_corrector`` lists step indices whose result is not
    corrected; ``corrector=False`` disables it everywhere. The last step is never corrected.

    Arguments:
        order: predictor order p in 1–3. Default: 2 below ``UNIPC_ORDER3_STEPS`` (20) steps, 3
            (UniPC-3, the paper's choice without guidance) from there on. Measured
            (docs/solvers.md): on the exact mixture UniPC-3 is the more accurate from 12 NFE, but
            on the trained digits UNet it is unstable below 20 steps (error 0.104 against
            UniPC-2's 0.0156 at 12 NFE, 0.036 against 0.0052 at 15) and ties from 25 NFE.
        variant: ``"bh1"`` (B(h) = hh) or ``"bh2"`` (B(h) = e^{hh} − 1). Default: ``"bh2"``
            below ``UNIPC_DATA_STEPS`` (12) steps, ``"bh1"`` from there.
        prediction: ``"data"`` (UniPC with x̂, diffusers' ``predict_x0``) or ``"noise"``. Default:
            ``"data"`` below 12 steps, ``"noise"`` from there. Measured (docs/solvers.md): at 5–10
            NFE data prediction with bh2 has 0.4–0.9× the error of noise prediction on the exact
            mixture and 0.1–0.3× on the trained digits UNet (0.0825 against 0.837 at 5 NFE);
            from 15 NFE noise prediction is the more accurate on both.
        lower_order_final: see the module docstring (default: always, as diffusers' UniPC).
    """
    name = "unipc"
    steps = len(grid) - 1
    if order is None:
        order = 3 if steps >= UNIPC_ORDER3_STEPS else 2
    if prediction is None:
        prediction = "data" if steps < UNIPC_DATA_STEPS else "noise"
    if variant is None:
        variant = "bh2" if steps < UNIPC_DATA_STEPS else "bh1"
    _check_order(name, order, 1, 3)
    _check_choice(name, "variant", variant, UNIPC_VARIANTS)
    _check_choice(name, "prediction", prediction, PREDICTION_FORMS)
    disabled = {int(j) for j in disable_corrector}
    eng = _Engine(field, grid, cond, name)
    _check_budget(eng, eng.steps, max_evals)
    hist: list[Tensor] = []
    lams: list[float] = []
    x_prev: Tensor | None = None  # state at the start of the previous step
    prev_order = 0
    pending: tuple[int, Tensor] | None = None  # (step index, data) whose callback waits for the correction
    for i in range(eng.steps):
        data, noise = eng.evaluate(x, i)
        m = data if prediction == "data" else noise
        if x_prev is not None and corrector and (i - 1) not in disabled and math.isfinite(eng.h(i - 1)):
            x = _unipc_step(eng, x_prev, i - 1, prev_order, prediction, variant, hist, lams, m)
        if pending is not None and callback is not None:
            callback(pending[0], eng.t(i), x, pending[1])
        hist.append(m)
        lams.append(eng.lam(i))
        if len(hist) > order:
            hist.pop(0)
            lams.pop(0)
        k = min(order, i + 1, _final_order(lower_order_final, eng.steps, i, order, name))
        x_prev = x
        prev_order = k
        if not math.isfinite(eng.h(i)):
            x = eng.alpha(i + 1) * data  # step to σ = 0: exact first-order limit, no −∞·0
        else:
            x = _unipc_step(eng, x, i, k, prediction, variant, hist, lams, None)
        pending = (i, data)
    if pending is not None and callback is not None:
        callback(pending[0], eng.t(eng.steps), x, pending[1])
    return x


# ---------------------------------------------------------------------------------------
# DEIS: exact integration of the Lagrange interpolant
# ---------------------------------------------------------------------------------------


def _exp_moment(n: int, delta: float) -> float:
    r""":math:`\int_0^\delta v^n e^v\,dv` (series for small |δ|, recurrence otherwise)."""
    if abs(delta) < 1.0:
        total, term = 0.0, 1.0  # term = δ^m / m!
        for m in range(60):
            total += term * delta ** (n + 1) / (n + m + 1)
            term *= delta / (m + 1)
            if abs(term) < 1e-18:
                break
        return total
    val = math.expm1(delta)
    for k in range(1, n + 1):
        val = delta**k * math.exp(delta) - k * val
    return val


def lagrange_exp_weights(nodes: list[float], delta: float) -> list[float]:
    r"""Weights :math:`w_j = \int_0^\delta e^v L_j(v)\,dv` of the Lagrange basis on ``nodes``.

    ``∫_0^δ e^v p(v) dv = Σ_j w_j p(nodes[j])`` exactly for every polynomial ``p`` of degree
    ``< len(nodes)`` — the quadrature behind DEIS and the Taylor-form DPM-Solver(++).
    """
    weights = []
    for j, vj in enumerate(nodes):
        # coefficients of L_j(v) = Π_{k≠j} (v − v_k)/(v_j − v_k), lowest degree first
        poly = [1.0]
        denom = 1.0
        for k, vk in enumerate(nodes):
            if k == j:
                continue
            poly = [(-vk * poly[0])] + [poly[m - 1] - vk * poly[m] for m in range(1, len(poly))] + [poly[-1]]
            denom *= vj - vk
        weights.append(sum(c * _exp_moment(n, delta) for n, c in enumerate(poly)) / denom)
    return weights


def deis(
    field: Any,
    x: Tensor,
    grid: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    max_evals: int | None = None,
    order: int = 3,
    prediction: str = "noise",
    lower_order_final: bool | int = 10,
) -> Tensor:
    r"""DEIS / tAB-DEIS (Zhang & Chen 2023): multistep exponential integrator with the last
    ``order`` predictions interpolated by a Lagrange polynomial in λ and integrated exactly.

    Noise form (:math:`v = \lambda_i - \lambda`, nodes :math:`v_k = \lambda_i - \lambda_{i-k}`):
    :math:`x_{i+1} = \alpha_{i+1}\big[x_i/\alpha_i + e^{-\lambda_i}\sum_k w_k\hat\varepsilon_{i-k}\big]`,
    :math:`w_k = \int_0^{-h} e^{v} L_k(v)\,dv` (:func:`lagrange_exp_weights`); data form:
    :math:`x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \sigma_{i+1}e^{\lambda_i}\sum_k w_k\hat x_{i-k}`
    with :math:`v = \lambda - \lambda_i`, :math:`w_k = \int_0^{h}e^v L_k(v)\,dv`.
    Orders 1–4; one evaluation per step.
    """
    name = "deis"
    _check_order(name, order, 1, 4)
    _check_choice(name, "prediction", prediction, PREDICTION_FORMS)
    eng = _Engine(field, grid, cond, name)
    _check_budget(eng, eng.steps, max_evals)
    hist: list[Tensor] = []
    for i in range(eng.steps):
        data, noise = eng.evaluate(x, i)
        hist.append(data if prediction == "data" else noise)
        if len(hist) > order:
            hist.pop(0)
        k = min(order, i + 1, _final_order(lower_order_final, eng.steps, i, order, name))
        h = eng.h(i)
        if not math.isfinite(h):
            x = eng.alpha(i + 1) * data
        else:
            lam_i = eng.lam(i)
            if prediction == "data":
                nodes = [eng.lam(i - j) - lam_i for j in range(k)]
                w = lagrange_exp_weights(nodes, h)
                acc = sum(wj * hist[-(j + 1)] for j, wj in enumerate(w))
                x = (eng.sigma(i + 1) / eng.sigma(i)) * x + (eng.sigma(i + 1) * math.exp(lam_i)) * acc
            else:
                nodes = [lam_i - eng.lam(i - j) for j in range(k)]
                w = lagrange_exp_weights(nodes, -h)
                acc = sum(wj * hist[-(j + 1)] for j, wj in enumerate(w))
                a1 = eng.alpha(i + 1)
                x = (a1 / eng.alpha(i)) * x + (a1 * math.exp(-lam_i)) * acc
        if callback is not None:
            callback(i, eng.t(i + 1), x, data)
    return x


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def _fixed(fn: Callable[..., Tensor], solver: str, defaults: dict | None = None, **fixed: Any) -> Callable[..., Tensor]:
    """``fn`` with some options fixed by the registered name (passing them again is an error)
    and others given new defaults (``defaults``, which the caller may override)."""
    defaults = dict(defaults or {})

    def wrapped(field: Any, x: Tensor, grid: Tensor, **kwargs: Any) -> Tensor:
        for key, value in fixed.items():
            if key in kwargs:
                raise ValueError(f"solver {solver!r} fixes {key}={value!r}; use another solver name to change it")
        return fn(field, x, grid, **{**defaults, **kwargs}, **fixed)

    wrapped.__name__ = solver.replace("-", "_").replace("+", "p")
    settings = ", ".join(f"{k}={v!r}" for k, v in {**fixed, **defaults}.items())
    wrapped.__doc__ = f"``{solver}``: :func:`{fn.__name__}` with {settings}."
    return wrapped


def _singlestep_steps(order: int) -> Callable[[int], int]:
    return lambda budget: len(singlestep_orders(budget, order))


_EXP: dict[str, Any] = {"kind": "exponential", "requires_gaussian_path": True, "default_grid": "logsnr"}

register_solver("ddim", ddim, evals_per_step=1, aliases=("dpm-solver-1",),
                description="DDIM = DPM-Solver-1, first order", **_EXP)
for _order in (2, 3):
    register_solver(f"dpm-solver-{_order}s", _fixed(dpm_solver_singlestep, f"dpm-solver-{_order}s", order=_order, prediction="noise"),
                    evals_per_step=_order, steps_for_budget=_singlestep_steps(_order),
                    description=f"singlestep DPM-Solver-{_order} (noise prediction)", **_EXP)
    register_solver(f"dpm-solver++{_order}s", _fixed(dpm_solver_singlestep, f"dpm-solver++{_order}s", order=_order, prediction="data"),
                    evals_per_step=_order, steps_for_budget=_singlestep_steps(_order),
                    description=f"singlestep DPM-Solver++({_order}S) (data prediction)", **_EXP)
register_solver("dpm-solver", _fixed(dpm_solver_multistep, "dpm-solver", prediction="noise"), evals_per_step=1,
                description="multistep DPM-Solver, noise prediction, option order (default 3)", **_EXP)
for _order in (2, 3):
    register_solver(f"dpm-solver-{_order}m", _fixed(dpm_solver_multistep, f"dpm-solver-{_order}m", order=_order, prediction="noise"),
                    evals_per_step=1, description=f"multistep DPM-Solver order {_order} (noise prediction)", **_EXP)
# DPM-Solver++ defaults: the time-quadratic grid and a first-order last step at every NFE
# (measured best on the DDPM-schedule GMM benchmark, docs/solvers.md; the official code's
# "below 10 steps" rule lets a second-order step with a large step ratio end the run).
_PP = {"lower_order_final": True}
register_solver("dpm-solver++2m", _fixed(dpm_solver_multistep, "dpm-solver++2m", _PP, order=2, prediction="data"),
                evals_per_step=1, aliases=("dpm-solver++",), description="DPM-Solver++(2M), data prediction",
                **{**_EXP, "default_grid": "quadratic"})
register_solver("dpm-solver++3m", _fixed(dpm_solver_multistep, "dpm-solver++3m", _PP, order=3, prediction="data"),
                evals_per_step=1, description="DPM-Solver++(3M), data prediction", **{**_EXP, "default_grid": "quadratic"})
register_solver("unipc", unipc, evals_per_step=1,
                description="UniPC predictor-corrector (order 1-3, noise/data, bh1/bh2: defaults by budget)",
                **{**_EXP, "default_grid": "quadratic"})
register_solver("deis", deis, evals_per_step=1,
                description="DEIS polynomial exponential integrator (orders 1-4, noise/data)", **_EXP)
