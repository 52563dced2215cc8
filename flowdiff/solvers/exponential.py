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

The DDIM/DDPM family is one η-parametrised step (:class:`EtaStep`; smalldiffusion's one
sampler with two knobs; Song et al. 2021, DDIM Eq. 12, written in log-SNR for every Gaussian
path): with :math:`c = \eta\,\sigma_t\sqrt{1 - e^{-2h}}`,

.. math::

    x_t = \alpha_t\hat x + \sqrt{\sigma_t^2 - c^2}\,\hat\varepsilon + c\,z
        = \frac{\sigma_t}{\sigma_s}k\,x_s + \alpha_t(1 - k e^{-h})\,\hat x + c\,z,
    \qquad k = \sqrt{1 - \eta^2(1 - e^{-2h})},

``ddim`` (η = 0, the first-order exponential integrator above), ``ddpm`` (η option, default 1:
the exact posterior :math:`q(x_t\mid x_s, x_1 = \hat x)` of Ho et al. 2020) and
``sde-dpm-solver++1`` (η = 1, the exact linear part of the reverse SDE, Lu et al. 2022b §B);
``sde-dpm-solver++2`` adds the multistep correction :math:`c_2\,\alpha_t D_1` (see
:class:`SDEDPMSolverPP2`).

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
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from .base import Solver, check_choice, check_flag, lower_order_final, register_solver
from .loop import Run

__all__ = [
    "DEISSolver", "DPMSolverMultistep", "DPMSolverSinglestep", "EtaStep", "SDEDPMSolverPP2", "TunedMultistep",
    "UniPC", "guarded_orders", "lagrange_exp_weights", "singlestep_orders", "tuned_multistep_base", "tuned_multistep_sizes"
]

PREDICTION_FORMS = ("data", "noise")
SOLVER_TYPES = ("dpmsolver", "taylor")
UNIPC_VARIANTS = ("bh1", "bh2")
#: UniPC's default order is 3 from this many steps on, 2 below (see :class:`UniPC`).
UNIPC_ORDER3_STEPS = 20
#: Below this many steps UniPC defaults to data prediction with B(h) = e^h − 1 (see :class:`UniPC`).
UNIPC_DATA_STEPS = 12


class ExponentialSolver(Solver):
    """Base of the log-SNR solvers: the log-SNR must be finite on the grid before ``t_end``."""

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        lam = run.log_snr
        # α(t_start) = 0 (λ = −∞: pure noise, e.g. a flow-matching path from t = 0) is allowed in data form:
        # the first step is the exact limit x₁ = σ₁x₀/σ₀ + α₁x̂₀ and the warm-up starts at node 1.
        self.offset = int(lam[0] == -math.inf)
        if lam[0] != -math.inf and not math.isfinite(lam[0]):
            raise ValueError(
                f"solver {self.name!r} needs alpha(t_start) > 0 (a finite log-SNR), got lambda(t={run.times[0]!r})={lam[0]!r}; "
                f"start a little later"
            )
        if any(not math.isfinite(v) for v in lam[1:-1]):
            raise ValueError(f"solver {self.name!r}: the log-SNR must be finite on the grid before t_end, got {lam}")

    def warmup(self, i: int) -> int:
        """The highest order step ``i`` can take from its history (node 0 at λ = −∞ does not count)."""
        return max(1, i + 1 - self.offset)

    def setup(self, high: int) -> int:
        """Check ``order`` (1 … ``high``) and ``prediction``, set :attr:`form`; returns the order."""
        order = check_int("order", self.opts["order"], 1, high)
        self.form = _Form(self.run, check_choice(self.name, "prediction", self.opts["prediction"], PREDICTION_FORMS))
        return order

    def history(self, m: Tensor, keep: int) -> list[Tensor]:
        """Append the prediction ``m`` of this node to the multistep history (the last ``keep``)."""
        hist = self.memory.setdefault("hist", [])
        hist.append(m)
        if len(hist) > keep:
            hist.pop(0)
        return hist


class _Form:
    r"""The coefficients of one prediction form. The noise-prediction integrators are the
    data-prediction ones with α and σ exchanged and λ negated (the two exact solutions in the
    module docstring map onto each other so, exactly in floating point too), so every update
    below is written once, in data form, on this view: ``a, s, lam`` are (α, σ, λ) at the grid
    nodes for ``"data"`` and (σ, α, −λ) for ``"noise"``."""

    def __init__(self, run: Run, form: str):
        self.data = form == "data"
        self.a, self.s = (run.alpha, run.sigma) if self.data else (run.sigma, run.alpha)
        self.lam = run.log_snr if self.data else [-v for v in run.log_snr]
        self.alpha, self.sigma = run.alpha, run.sigma  # for the σ = 0 limit x = α x̂
        if not self.data and run.alpha[0] == 0.0:
            raise ValueError(f"solver {run.name!r} with prediction='noise' cannot start at alpha(t_start)=0 (pure noise, "
                             f"t_start={run.times[0]!r}): use prediction='data' or a later t_start")

    def h(self, i: int) -> float:
        return self.lam[i + 1] - self.lam[i]

    def pick(self, data: Tensor, noise: Tensor) -> Tensor:
        return data if self.data else noise

    def inner(self, coeff: tuple[float, float, float, float], h1: float) -> tuple[float, float, float]:
        """``(a, s, h1)`` of an intermediate point with coefficients (α, σ, α̇, σ̇) and log-SNR step ``h1``."""
        return (coeff[0], coeff[1], h1) if self.data else (coeff[1], coeff[0], -h1)

    def first_order(self, x: Tensor, i: int, m0: Tensor) -> Tensor:
        """DDIM / DPM-Solver-1 from node ``i`` to ``i + 1``."""
        return (self.s[i + 1] / self.s[i]) * x - (self.a[i + 1] * math.expm1(-self.h(i))) * m0


def _intermediate(run: Run, i: int, r: float) -> tuple[float, tuple[float, float, float, float], float]:
    """The time inside step ``i`` at log-SNR ``λ_i + r h``: ``(t, (α, σ, α̇, σ̇), λ(t) − λ_i)``."""
    t = min(max(run.t_of_log_snr(run.log_snr[i] + r * run.h(i)), run.times[i]), run.times[i + 1])  # never leave the step
    coeff = run.at(t)
    return t, coeff, math.log(coeff[0] / coeff[1]) - run.log_snr[i]


class EtaStep(ExponentialSolver):
    r"""One step of the DDIM-η family (module docstring), one evaluation.

    Arguments:
        eta: in ``[0, 1]``: 0 is DDIM (deterministic), 1 the DDPM posterior / SDE-DPM-Solver++(1).
    """

    options = {"eta": 1.0}

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.eta = check_float("eta", self.opts["eta"], 0.0, 1.0)

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        run, eta = self.run, self.eta
        data, _ = run.evaluate(x, i)
        a_t, s_t, h = run.alpha[i + 1], run.sigma[i + 1], run.h(i)
        if s_t == 0.0:
            return a_t * data, data  # σ_t = 0: the exact limit x_t = α_t x̂
        one_minus = -math.expm1(-2 * h)  # 1 − e^{−2h}, accurate for small h
        log_k = -h if eta == 1.0 else 0.5 * math.log1p(-eta * eta * one_minus)
        # in-place accumulation into one new tensor: fewer kernels and allocations per step
        mean = torch.mul(x, s_t / run.sigma[i] * math.exp(log_k)).add_(data, alpha=-a_t * math.expm1(log_k - h))
        mean = self.correction(i, mean, data, h, one_minus)
        return run.gaussian(mean, eta * s_t * math.sqrt(one_minus), i, run.times[i], run.times[i + 1], x), data

    def correction(self, i: int, mean: Tensor, data: Tensor, h: float, one_minus: float) -> Tensor:
        return mean


class SDEDPMSolverPP2(EtaStep):
    r"""SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"; diffusers
    ``algorithm_type="sde-dpmsolver++"``, ``solver_order=2``): the η = 1 step plus
    :math:`c\,\alpha_t D_1`, :math:`D_1 = (m_0 - m_1)/r`, :math:`r = h_{i-1}/h`, with
    :math:`c = \tfrac12(1 - e^{-2h})` (``solver_type="midpoint"``, diffusers' default) or
    :math:`c = 1 - (1 - e^{-2h})/(2h)` (``"heun"``, the Taylor-exact weight). The first step is
    first order; with ``lower_order_final`` (default) so is the last one, into ``t_end`` (the
    extrapolated D1 over the grid's last λ-gap hurt at every NFE and grid measured,
    benchmarks/sde_solvers.py). diffusers' ``lower_order_final`` below 15 steps is
    ``lower_order_final=(steps < 15)`` here.
    """

    options = {"eta": 1.0, "solver_type": "midpoint", "lower_order_final": True}

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        check_choice(self.name, "solver_type", self.opts["solver_type"], ("midpoint", "heun"))
        check_flag(self.name, "lower_order_final", self.opts["lower_order_final"])
        self.prev_h = 0.0

    def correction(self, i: int, mean: Tensor, data: Tensor, h: float, one_minus: float) -> Tensor:
        prev = self.memory.get("prev")
        if prev is not None and not (self.opts["lower_order_final"] and i == self.run.steps - 1):
            midpoint = self.opts["solver_type"] == "midpoint"
            weight = 0.5 * one_minus if midpoint else 1.0 - one_minus / (2 * h)
            mean.add_(data - prev, alpha=self.run.alpha[i + 1] * weight / (self.prev_h / h))
        self.memory["prev"], self.prev_h = data, h
        return mean


def singlestep_orders(budget: int, order: int) -> list[int]:
    """Orders of the steps singlestep DPM-Solver-``order`` takes with ``budget`` evaluations: the
    official pattern (Lu et al. 2022, Sec. 3.4 "DPM-Solver-fast"; module docstring), summing to ``budget``."""
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


def _singlestep_update(run: Run, f: _Form, x: Tensor, i: int, order: int, solver_type: str, data0: Tensor,
                       m0: Tensor) -> Tensor:
    """One singlestep DPM-Solver(++) step of ``order`` from node ``i`` (official update formulas, data form on ``f``)."""
    if run.sigma[i + 1] == 0.0:
        return run.alpha[i + 1] * data0  # σ_{i+1} = 0: the exact first-order limit
    if order == 1:
        return f.first_order(x, i, m0)
    h, s_s, a_t, s_t = f.h(i), f.s[i], f.a[i + 1], f.s[i + 1]
    phi_1 = math.expm1(-h)
    base = (s_t / s_s) * x - (a_t * phi_1) * m0
    if order == 2:
        t1, c1, h1 = _intermediate(run, i, 0.5)
        a_1, s_1, h1 = f.inner(c1, h1)
        r1 = h1 / h
        u = (s_1 / s_s) * x - (a_1 * math.expm1(-h1)) * m0  # the intermediate point by a first-order step
        m1 = f.pick(*run.evaluate_at(u, t1, c1))
        if solver_type == "dpmsolver":
            return base - (0.5 / r1 * a_t * phi_1) * (m1 - m0)
        return base + (a_t * (phi_1 / h + 1.0) / r1) * (m1 - m0)
    # order 3 at r1 = 1/3, r2 = 2/3 (the λ of the points actually evaluated, exact after the time inverse)
    t1, c1, h1 = _intermediate(run, i, 1.0 / 3.0)
    t2, c2, h2 = _intermediate(run, i, 2.0 / 3.0)
    a_1, s_1, h1 = f.inner(c1, h1)
    a_2, s_2, h2 = f.inner(c2, h2)
    r1, r2 = h1 / h, h2 / h
    phi_22 = math.expm1(-h2) / h2 + 1.0
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    m1 = f.pick(*run.evaluate_at((s_1 / s_s) * x - (a_1 * math.expm1(-h1)) * m0, t1, c1))
    u2 = (s_2 / s_s) * x - (a_2 * math.expm1(-h2)) * m0 + (r2 / r1 * a_2 * phi_22) * (m1 - m0)
    m2 = f.pick(*run.evaluate_at(u2, t2, c2))
    if solver_type == "dpmsolver":
        return base + (a_t * phi_2 / r2) * (m2 - m0)
    d1_0, d1_1 = (m1 - m0) / r1, (m2 - m0) / r2
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return base + (a_t * phi_2) * d1 - (a_t * phi_3) * d2


class DPMSolverSinglestep(ExponentialSolver):
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, Alg. 4–5; DPM-Solver++(2S/3S) for data;
    module docstring), ``solver_type`` ``"dpmsolver"`` (official) or ``"taylor"``; step orders
    from :func:`singlestep_orders`."""

    options = {"order": 3, "prediction": "noise", "solver_type": "dpmsolver"}

    @classmethod
    def evals_per_step(cls, options: dict) -> int:
        return int(options["order"])

    @classmethod
    def steps_for(cls, budget: int, options: dict) -> int:
        return len(singlestep_orders(budget, int(options["order"])))

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        order = self.setup(3)
        if self.offset:
            raise ValueError(f"singlestep solver {self.name!r} cannot start at alpha(t_start)=0 (pure noise): its intermediate "
                             "points would sit at lambda = -inf; use dpm-solver++2m, dpm-solver++3m, unipc or deis with "
                             "prediction='data', or a later t_start")
        self.solver_type = check_choice(self.name, "solver_type", self.opts["solver_type"], SOLVER_TYPES)
        self.orders = _orders_for_steps(run.steps, run.steps * order if run.budget is None else run.budget, order)

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        data, noise = self.run.evaluate(x, i)
        m0 = self.form.pick(data, noise)
        return _singlestep_update(self.run, self.form, x, i, self.orders[i], self.solver_type, data, m0), data


def _multistep_update(f: _Form, x: Tensor, i: int, order: int, solver_type: str, hist: list[Tensor], data0: Tensor) -> Tensor:
    """One multistep step of ``order`` from node ``i`` (data form on ``f``); ``hist[-1]`` is the prediction at node ``i``."""
    h = f.h(i)
    if f.sigma[i + 1] == 0.0:
        return f.alpha[i + 1] * data0  # σ_{i+1} = 0: the exact first-order limit
    m0 = hist[-1]
    if order == 1:
        return f.first_order(x, i, m0)
    s_s, a_t, s_t = f.s[i], f.a[i + 1], f.s[i + 1]
    r0 = (f.lam[i] - f.lam[i - 1]) / h
    d1_0 = (m0 - hist[-2]) / r0
    phi_1 = math.expm1(-h)
    base = (s_t / s_s) * x - (a_t * phi_1) * m0
    phi_2 = phi_1 / h + 1.0
    if order == 2:
        if solver_type == "dpmsolver":
            return base - (0.5 * a_t * phi_1) * d1_0
        return base + (a_t * phi_2) * d1_0
    r1 = (f.lam[i - 1] - f.lam[i - 2]) / h
    d1_1 = (hist[-2] - hist[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h - 0.5
    # The official code and diffusers weight D2 by φ₃ although D2 = h²p''/2 of the quadratic
    # through the three predictions: the exact (Taylor) weight is 2φ₃. Their 3M is therefore
    # formally second order (measured slope 2.0); "taylor" gives the third-order method.
    w2 = 2.0 * phi_3 if solver_type == "taylor" else phi_3
    return base + (a_t * phi_2) * d1 - (a_t * w2) * d2


class DPMSolverMultistep(ExponentialSolver):
    """Multistep DPM-Solver (``prediction="noise"``) or DPM-Solver++ (``"data"``), orders 1–3
    (Lu et al. 2022b, Alg. 2 and App. B; module docstring): one evaluation per step; warm-up with
    lower orders; ``lower_order_final`` default: below 10 steps, as the official code."""

    options = {"order": 3, "prediction": "noise", "solver_type": "dpmsolver", "lower_order_final": 10, "guard": None}

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.order = self.setup(3)
        self.solver_type = check_choice(self.name, "solver_type", self.opts["solver_type"], SOLVER_TYPES)
        self.guard = _check_guard(self.name, self.opts["guard"])  # off by default: the official method, unchanged

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        data, noise = self.run.evaluate(x, i)
        hist = self.history(self.form.pick(data, noise), 3)
        k = min(self.order, self.warmup(i), lower_order_final(self.opts["lower_order_final"], self.run.steps, i, self.order, self.name))
        if self.guard is None or k == 1 or self.form.sigma[i + 1] == 0.0:
            return _multistep_update(self.form, x, i, k, self.solver_type, hist, data), data
        updates = [_multistep_update(self.form, x, i, q, self.solver_type, hist, data) for q in range(1, k + 1)]
        orders = guarded_orders((self.form.s[i + 1] / self.form.s[i]) * x, updates, self.guard)
        return _pick_by_order(orders, updates), data


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


def guarded_orders(x_base: Tensor, updates: list[Tensor], theta: float) -> Tensor:
    r"""Per-sample order of a multistep step under the stability guard (issue 12).

    ``updates[k]`` is the step's result at order ``k + 1`` (``updates[0]`` the first-order,
    exponential-Euler one) and ``x_base`` the linear part alone (:math:`\frac{\sigma_t}{\sigma_s}x`
    in data form). The order-``p`` method adds a correction :math:`c_p = x^{(p)} - x^{(p-1)}` to
    the order-``p − 1`` one (:math:`c_1 = x^{(1)} - x_{base}`, the prediction's own term); these
    are the successive terms of the Taylor expansion of the prediction inside the exponential
    integral, which shrink on a smooth trajectory (by about the step's h times the ratio of
    successive derivatives). When a sample's :math:`\lVert c_p\rVert > \theta\lVert c_{p-1}\rVert`
    its finite differences do not resolve the prediction any more (they amplify model error or a
    turn of the trajectory the step is too long for): that sample takes order ``p − 1`` for the
    smallest failing ``p`` (first order, which is always stable, if even ``c_2`` fails). Returns the order per
    sample, ``(B,)`` int64 (``1 … len(updates)``). Measurements: :class:`UniPC`'s ``guard``.
    """
    order = torch.full((x_base.shape[0],), len(updates), dtype=torch.long, device=x_base.device)
    norms = [(updates[0] - x_base).flatten(1).norm(dim=1)]
    norms += [(updates[k] - updates[k - 1]).flatten(1).norm(dim=1) for k in range(1, len(updates))]
    for p in range(2, len(updates) + 1):  # p: the 1-based order under test; the first failure decides
        bad = (order >= p) & ~(norms[p - 1] <= theta * norms[p - 2])  # NaN counts as bad
        order = torch.where(bad, torch.full_like(order, p - 1), order)
    return order


def _pick_by_order(order: Tensor, updates: list[Tensor]) -> Tensor:
    """``updates[order − 1]`` per sample (``order`` as from :func:`guarded_orders`)."""
    out = updates[-1]
    for k in range(len(updates) - 1, 0, -1):
        if bool((order == k).any()):
            mask = (order == k).view(-1, *([1] * (out.ndim - 1)))
            out = torch.where(mask, updates[k - 1], out)
    return out


def _check_guard(name: str, value: Any) -> float | None:
    """The ``guard`` option: ``None``/``False``/0 (off) or θ > 0."""
    if value is None or value is False or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: guard must be None/False/0 (off) or a finite threshold > 0 "
                         f"(ratio of successive order corrections), got {value!r}")
    return float(value)


def _unipc_step(f: _Form, x: Tensor, i: int, order: int, variant: str, hist: list[Tensor], lams: list[float],
                model_t: Tensor | None) -> Tensor:
    """UniP-``order`` from node ``i`` (``model_t is None``) or UniC-``order`` of that step,
    given the prediction ``model_t`` at the predicted point of node ``i + 1`` (data form on ``f``).

    ``hist[-1]`` is the prediction at node ``i`` (λ = ``lams[-1]``), older ones before it.
    """
    h = f.h(i)
    m0 = hist[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lams[-1]) / h
        rks.append(rk)
        d1s.append((hist[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    rows, b, h_phi_1, b_h = _unipc_coefficients(rks, -h, variant, order)
    x_lin = (f.s[i + 1] / f.s[i]) * x - (f.a[i + 1] * h_phi_1) * m0
    coef = f.a[i + 1] * b_h
    if model_t is None:  # predictor
        if not d1s:
            return x_lin
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
        res = sum(r * d for r, d in zip(rhos, d1s))
        return x_lin - coef * res
    rhos = [0.5] if order == 1 else _solve(rows, b)  # corrector
    res = sum((r * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + rhos[-1] * (model_t - m0)
    return x_lin - coef * res


class UniPC(ExponentialSolver):
    r"""UniPC: UniP-``order`` predictor + UniC corrector (Zhao et al. 2023, Alg. 1–3).

    With history :math:`m_0 = \hat m(\lambda_i)`, :math:`r_k = (\lambda_{i-k} - \lambda_i)/h`,
    :math:`D_k = (m_k - m_0)/r_k` and (data form) :math:`hh = -h`:

    .. math::

        \tilde x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i - \alpha_{i+1}(e^{hh}-1)\,m_0
            - \alpha_{i+1}B(h)\sum_{k=1}^{p-1}\rho^P_k D_k,

    with :math:`\rho^P` solving the Vandermonde system :math:`R\rho = b`,
    :math:`b_j = hh\,\varphi_{j+1}(hh)\,j!/B(h)` (``ρ = ½`` for p = 2). After evaluating the
    model at :math:`\tilde x_{i+1}` (the next step's evaluation, :meth:`revise`), the corrector
    recomputes the step with :math:`D_p = m(\tilde x_{i+1}) - m_0` added (``ρ^C`` from the full
    system, ½ for p = 1) — order p + 1 for free. ``disable_corrector`` lists step indices whose
    result is not corrected; ``corrector=False`` disables it everywhere. The last step is never
    corrected.

    Arguments:
        order: predictor order p in 1–3. Default: 2 below ``UNIPC_ORDER3_STEPS`` (20) steps, 3
            (UniPC-3, the paper's choice without guidance) from there on. Measured
            (docs/solvers.md): on the exact mixture UniPC-3 is the more accurate from 12 NFE, but
            on the trained digits UNet it is unstable below 20 steps (error 0.104 against
            UniPC-2's 0.0156 at 12 NFE, 0.036 against 0.0052 at 15) and ties from 25 NFE.
        variant: ``"bh1"`` (B(h) = hh) or ``"bh2"`` (B(h) = e^{hh} − 1). Default: ``"bh2"``
            below ``UNIPC_DATA_STEPS`` (12) steps and with the default data form, ``"bh1"`` otherwise.
        prediction: ``"data"`` (UniPC with x̂, diffusers' ``predict_x0``) or ``"noise"``. Default:
            ``"data"`` below 12 steps; from there the model's own form: ``"noise"`` for a
            noise-prediction field, ``"data"`` for data, velocity and v fields. Measured
            (docs/solvers.md): at 5–10 NFE data prediction with bh2 has 0.4–0.9× the error of
            noise prediction on the exact mixture and 0.1–0.3× on a noise-prediction digits UNet
            (0.0825 against 0.837 at 5 NFE); from 15 NFE noise prediction is the more accurate on
            those noise fields, while on data- and velocity-prediction digits models data/bh2 has
            0.2–0.5× the error of noise/bh1 at 15–20 NFE (benchmarks/results/solvers_trained.md).
        lower_order_final: see the module docstring (default: always, as diffusers' UniPC).
        guard: the stability guard θ of :func:`guarded_orders` (``None``, the default: off): a
            sample whose order-p correction outgrows θ times its order-(p−1) one takes the lower
            order on that step (predictor and its corrector). Off by default because no θ helped
            everywhere it was measured (benchmarks/results/guard.md, same noise and grid): θ = 1
            gives UniPC-3 in data form 0.45–0.9x the unguarded error at 8–12 NFE on the exact
            mixtures and the digits UNet, but 1.1–1.3x at 10–20 NFE on a stiff single Gaussian
            (3.5–7.8x on a log-SNR grid of 12–16 steps), 1.1–1.2x for noise forms, and 1.8–2.6x
            at 25–30 NFE on a model with a time-oscillating error; θ = 4 almost never acts. The
            defaults avoid the unstable regime instead: order 2 below ``UNIPC_ORDER3_STEPS``
            steps and data prediction below ``UNIPC_DATA_STEPS``, which θ = 1 never lowered. ``dpm-solver``/``dpm-solver++`` multistep take the
            same option, also off by default (the official method).
    """

    options = {"order": None, "variant": None, "prediction": None, "corrector": True, "disable_corrector": (),
               "lower_order_final": True, "guard": None}
    corrects = True

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        steps, o = run.steps, self.opts
        self.order = check_int("order", (3 if steps >= UNIPC_ORDER3_STEPS else 2) if o["order"] is None else o["order"], 1, 3)
        # From UNIPC_DATA_STEPS on, the form follows the model's own output: noise for a noise-prediction
        # model, data (with bh2) for data, velocity and v models (benchmarks/results/solvers_trained.md).
        noise_model = getattr(run.field, "prediction", "noise") == "noise"
        default_form = "noise" if steps >= UNIPC_DATA_STEPS and noise_model else "data"
        self.form = _Form(run, check_choice(self.name, "prediction", default_form if o["prediction"] is None
                                            else o["prediction"], PREDICTION_FORMS))
        default_variant = "bh1" if steps >= UNIPC_DATA_STEPS and (noise_model or o["prediction"] is not None) else "bh2"
        self.variant = check_choice(self.name, "variant", default_variant if o["variant"] is None else o["variant"],
                                    UNIPC_VARIANTS)
        self.disabled = {int(j) for j in o["disable_corrector"]}
        self.guard = _check_guard(self.name, o["guard"])
        self.lams: list[float] = []
        self.prev_order = 0
        self.prev_orders: Tensor | None = None  # per-sample orders of the last predictor under the guard

    def _evaluate(self, x: Tensor, i: int) -> None:
        data, noise = self.run.evaluate(x, i)
        self.memory["now"] = (data, self.form.pick(data, noise))

    def revise(self, i: int, x: Tensor) -> Tensor:
        self._evaluate(x, i)
        run = self.run
        if self.opts["corrector"] and (i - 1) not in self.disabled and math.isfinite(run.h(i - 1)):
            args = (self.form, self.memory["x_prev"], i - 1)
            rest = (self.variant, self.memory["hist"], self.lams, self.memory["now"][1])
            orders = self.prev_orders
            if orders is None or bool((orders == self.prev_order).all()):
                x = _unipc_step(*args, self.prev_order, *rest)
            else:  # the guard lowered some samples' predictor: their corrector takes the same order
                x = _pick_by_order(orders, [_unipc_step(*args, q, *rest) if bool((orders == q).any()) else x
                                            for q in range(1, self.prev_order + 1)])
        return x

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        run = self.run
        if i == 0:
            self._evaluate(x, 0)
        data, m = self.memory.pop("now")
        hist = self.history(m, self.order)
        self.lams = (self.lams + [self.form.lam[i]])[-self.order:]
        k = min(self.order, self.warmup(i), lower_order_final(self.opts["lower_order_final"], run.steps, i, self.order, self.name))
        self.memory["x_prev"], self.prev_order, self.prev_orders = x, k, None
        if run.sigma[i + 1] == 0.0:
            return run.alpha[i + 1] * data, data  # step to σ = 0: exact first-order limit, no −∞·0
        if self.guard is None or k == 1:
            return _unipc_step(self.form, x, i, k, self.variant, hist, self.lams, None), data
        updates = [_unipc_step(self.form, x, i, q, self.variant, hist, self.lams, None) for q in range(1, k + 1)]
        self.prev_orders = guarded_orders((self.form.s[i + 1] / self.form.s[i]) * x, updates, self.guard)
        return _pick_by_order(self.prev_orders, updates), data


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


class DEISSolver(ExponentialSolver):
    r"""DEIS / tAB-DEIS (Zhang & Chen 2023): multistep exponential integrator with the last
    ``order`` predictions interpolated by a Lagrange polynomial in λ and integrated exactly.

    Noise form (:math:`v = \lambda_i - \lambda`, nodes :math:`v_k = \lambda_i - \lambda_{i-k}`):
    :math:`x_{i+1} = \alpha_{i+1}\big[x_i/\alpha_i + e^{-\lambda_i}\sum_k w_k\hat\varepsilon_{i-k}\big]`,
    :math:`w_k = \int_0^{-h} e^{v} L_k(v)\,dv` (:func:`lagrange_exp_weights`); data form:
    :math:`x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \sigma_{i+1}e^{\lambda_i}\sum_k w_k\hat x_{i-k}`
    with :math:`v = \lambda - \lambda_i`, :math:`w_k = \int_0^{h}e^v L_k(v)\,dv`.
    Orders 1–4; one evaluation per step.
    """

    options = {"order": 3, "prediction": "noise", "lower_order_final": 10}

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.order = self.setup(4)

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        run, f = self.run, self.form
        data, noise = run.evaluate(x, i)
        hist = self.history(f.pick(data, noise), self.order)
        k = min(self.order, self.warmup(i), lower_order_final(self.opts["lower_order_final"], run.steps, i, self.order, self.name))
        if run.sigma[i + 1] == 0.0:
            return run.alpha[i + 1] * data, data
        if f.lam[i] == -math.inf:  # from pure noise: the φ-form first step (e^λ · ∫ would be 0 · ∞)
            return f.first_order(x, i, hist[-1]), data
        lam = f.lam
        w = lagrange_exp_weights([lam[i - j] - lam[i] for j in range(k)], f.h(i))
        acc = sum(wj * hist[-(j + 1)] for j, wj in enumerate(w))
        return (f.s[i + 1] / f.s[i]) * x + (f.s[i + 1] * math.exp(lam[i])) * acc, data


def tuned_multistep_base(lam: list[float], i: int, history: int) -> list[float]:
    r"""The coefficients :math:`c_{i,k}`, ``k = 1 … min(i, history)``, of :class:`TunedMultistep`
    before tuning: DPM-Solver++(2M) in its Taylor form on the nodes' log-SNR ``lam``,
    :math:`c_{i,1} = \frac{\varphi_2(-h)}{\varphi_1(-h)\,r}` with :math:`r = h_{i-1}/h_i`
    (:math:`\varphi_1(-h) = (1 - e^{-h})/h`, :math:`\varphi_2(-h) = (e^{-h} - 1 + h)/h^2`), the others 0."""
    out = [0.0] * min(i, history)
    if out and math.isfinite(lam[i - 1]):
        h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
        em = math.expm1(-h)
        out[0] = (em / h + 1.0) / (-em) * (h / h_prev)
    return out


def tuned_multistep_sizes(steps: int, history: int) -> tuple[int, int]:
    """Number of step coefficients and of final weights of :class:`TunedMultistep`."""
    return sum(min(i, history) for i in range(steps)), min(steps, history)


class TunedMultistep(ExponentialSolver):
    r"""A linear multistep exponential integrator whose coefficients are free parameters, to be
    fitted to one model, one NFE and one grid by :func:`flowdiff.solvers.tuning.tune_solver`.

    In data prediction, with the predictions :math:`m_j = \hat x(x_j, t_j)` at the nodes and
    :math:`h_i = \lambda_{i+1} - \lambda_i`,

    .. math::

        x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i}x_i + \alpha_{i+1}(1 - e^{-h_i})
            \Big[m_i + \sum_{k=1}^{\min(i, K)} c_{i,k}\,(m_i - m_{i-k})\Big],\qquad
        \hat x = m_N + \sum_{k=1}^{\min(N, K)} w_k\,(m_N - m_{N-k}),

    where :math:`m_N` is the final denoising call at the last node (the solver makes it itself,
    so its last step and the output can use it). Every explicit multistep method in data form
    — DDIM, DPM-Solver++(2M/3M), DEIS, and UniPC with its corrector, whose corrected states are
    again linear combinations of the past predictions — is a member of this family for some
    ``c``; the consistency condition (weights summing to one) is built in. This is the
    "learned solver coefficients" idea of Zhou et al. 2024 ("Fast ODE-based Sampling for
    Diffusion Models in Around 5 Steps", AMED), Frankel et al. 2025 ("S4S: Solving for a
    Diffusion Model Solver") and, for the steps alone, Tong et al. 2024 ("Learning to
    Discretize Denoising Diffusion ODEs", LD3): the coefficients and the step locations are
    fitted to the model on pilot trajectories against a fine solve of the same ODE.

    Arguments:
        coefficients: offsets added to the untuned :math:`c_{i,k}` (:func:`tuned_multistep_base`,
            DPM-Solver++(2M) in Taylor form), flattened step by step (``k = 1 … min(i, K)`` for
            ``i = 0 … N − 1``); ``None``: all zero.
        final_weights: :math:`w_1 … w_{\min(N, K)}`; ``None``: all zero (the output is :math:`m_N`).
        history: K, how many past predictions a step may use (default 3).

    Untuned (both ``None``) it is DPM-Solver++(2M) (Taylor form) with a second-order last step.
    """

    options = {"coefficients": None, "final_weights": None, "history": 3}

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.form = _Form(run, "data")
        self.history_length = check_int("history", self.opts["history"], 1, 16)
        n_coef, n_final = tuned_multistep_sizes(run.steps, self.history_length)
        self.offsets = self._vector("coefficients", self.opts["coefficients"], n_coef)
        self.final_weights = self._vector("final_weights", self.opts["final_weights"], n_final)
        self.first = [sum(min(j, self.history_length) for j in range(i)) for i in range(run.steps)]

    def _vector(self, name: str, value: Any, size: int) -> list[float]:
        if value is None:
            return [0.0] * size
        try:
            out = [float(v) for v in (value.tolist() if isinstance(value, Tensor) else value)]
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of {size} floats, got {value!r}") from err
        if len(out) != size:
            raise ValueError(f"{self.name!r} with {self.run.steps} steps and history={self.history_length} needs {size} "
                             f"{name}, got {len(out)}; tune them for this grid (flowdiff.solvers.tuning.tune_solver)")
        if not all(math.isfinite(v) for v in out):
            raise ValueError(f"{name} must be finite, got {out}")
        return out

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        run, f = self.run, self.form
        data, _ = run.evaluate(x, i)
        hist = self.history(data, self.history_length + 1)
        if run.sigma[i + 1] == 0.0:
            return run.alpha[i + 1] * data, data  # σ = 0: the exact first-order limit
        base = tuned_multistep_base(f.lam, i, self.history_length)
        combined = data
        for k, c in enumerate(base, start=1):
            if len(hist) > k:
                combined = combined + (c + self.offsets[self.first[i] + k - 1]) * (data - hist[-1 - k])
        return f.first_order(x, i, combined), data

    def revise(self, i: int, x: Tensor) -> Tensor:
        if i == self.run.steps:  # the final denoise, made here so that the output can use the history
            data, _ = self.run.evaluate(x, i)
            hist = self.memory.get("hist", [])
            out = data
            for k, w in enumerate(self.final_weights, start=1):
                if w != 0.0 and len(hist) >= k:
                    out = out + w * (data - hist[-k])
            self.memory["final_denoised"] = out
        return x


# Registration: names are configurations (fixed options, changed defaults) of the classes.

_EXP: dict[str, Any] = {"kind": "exponential", "requires_gaussian_path": True, "default_grid": "logsnr"}
# DPM-Solver++ defaults: the time-quadratic grid and a first-order last step at every NFE
# (measured best on the DDPM-schedule GMM benchmark, docs/solvers.md; the official code's
# "below 10 steps" rule lets a second-order step with a large step ratio end the run).
_PP: dict[str, Any] = {**_EXP, "default_grid": "quadratic", "defaults": {"lower_order_final": True}}
_SDE: dict[str, Any] = {"kind": "sde", "requires_gaussian_path": True, "stochastic": True}

register_solver("ddim", EtaStep, fixed={"eta": 0.0}, aliases=("dpm-solver-1",),
                description="DDIM = DPM-Solver-1, first order (the eta step with eta = 0)", **_EXP)
register_solver("ddpm", EtaStep, description="ancestral DDPM posterior step; eta in [0, 1] gives DDIM-eta "
                "(Ho et al. 2020; Song et al. 2021)", **_SDE)
# best measured at 10-20 NFE on the quadratic grid (benchmarks/results/sde_solvers.md)
register_solver("sde-dpm-solver++1", EtaStep, fixed={"eta": 1.0}, default_grid="quadratic",
                description="SDE-DPM-Solver++(1): exact linear part of the reverse SDE in log-SNR (Lu et al. 2022)", **_SDE)
register_solver("sde-dpm-solver++2", SDEDPMSolverPP2, fixed={"eta": 1.0}, default_grid="quadratic",
                aliases=("sde-dpm-solver++",), description="SDE-DPM-Solver++(2M) multistep, midpoint or heun weight "
                "(Lu et al. 2022; diffusers sde-dpmsolver++)", **_SDE)
for _order in (2, 3):
    for _form, _pre, _label in (("noise", "-", "DPM-Solver-{o}"), ("data", "++", "DPM-Solver++({o}S)")):
        register_solver(f"dpm-solver{_pre}{_order}s", DPMSolverSinglestep, fixed={"order": _order, "prediction": _form},
                        description=f"singlestep {_label.format(o=_order)} ({_form} prediction)", **_EXP)
    register_solver(f"dpm-solver-{_order}m", DPMSolverMultistep, fixed={"order": _order, "prediction": "noise"},
                    description=f"multistep DPM-Solver order {_order} (noise prediction)", **_EXP)
    register_solver(f"dpm-solver++{_order}m", DPMSolverMultistep, fixed={"order": _order, "prediction": "data"},
                    aliases=("dpm-solver++",) if _order == 2 else (),
                    description=f"DPM-Solver++({_order}M), data prediction", **_PP)
register_solver("dpm-solver", DPMSolverMultistep, fixed={"prediction": "noise"},
                description="multistep DPM-Solver, noise prediction, option order (default 3)", **_EXP)
register_solver("unipc", UniPC, description="UniPC predictor-corrector (order 1-3, noise/data, bh1/bh2: defaults by budget)",
                **{**_EXP, "default_grid": "quadratic"})
# Untuned it is DPM-Solver++(2M) (Taylor form). Pass a tune_solver result as **tuned.sample_kwargs(field):
# sample(grid=tuned) uses its solver, NFE, grid and tuned coefficients as well.
register_solver("tuned-multistep", TunedMultistep, final_denoise=True,
                description="linear multistep exponential integrator with free coefficients (tune_solver fits them)",
                **{**_EXP, "default_grid": "quadratic"})
register_solver("deis", DEISSolver, description="DEIS polynomial exponential integrator (orders 1-4, noise/data)", **_EXP)
