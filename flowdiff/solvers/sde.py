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

The exponential samplers of this family (``ddpm``/DDIM-η, ``sde-dpm-solver++1``,
``sde-dpm-solver++2``) are one η-parametrised step in :mod:`flowdiff.solvers.exponential`. Here:

========================  =====================================================  =================
name                      method                                                 evaluations/step
========================  =====================================================  =================
``euler-maruyama``        Euler–Maruyama, any ε(t); any field                    1
``edm``, ``heun-churn``   EDM stochastic Heun with churn (Karras et al. 2022)    2
``pc``                    reverse-diffusion predictor + Langevin corrector       1 + n_corrector
========================  =====================================================  =================

All noise is drawn by the loop (:meth:`~flowdiff.solvers.loop.Run.gaussian`) with
``torch.randn(..., generator=generator)`` in the state's dtype and device, so a seeded generator
gives the same samples run after run, and every Gaussian move is reported to the transition hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int, expand_like
from ..fields import InterpolantField
from ..paths import GaussianPath
from .base import Solver, register_solver, velocity_calls
from .loop import Run

__all__ = ["EPS_OPTIONS", "Diffusion", "EDMHeunChurn", "EulerMaruyama", "PredictorCorrector", "diffusion_schedule"]

#: Named choices of ε(t) in the sampling equation.
EPS_OPTIONS = ("reverse-diffusion", "zero")

#: What a user may pass as ``eps``: a number ≥ 0, a callable of ``t``, or a name from EPS_OPTIONS.
Diffusion = float | int | str | Callable[[Tensor], Tensor]


def diffusion_schedule(eps: Diffusion, path: Any = None) -> Callable[[Tensor], Tensor]:
    r"""A user's ε(t) as a callable ``t -> ε(t)`` (``t`` a tensor, result of its shape): a number
    ≥ 0, a callable of ``t`` returning values ≥ 0, ``"zero"`` (the probability-flow ODE) or
    ``"reverse-diffusion"`` (:math:`\sigma^2\dot\lambda`, module docstring; needs a Gaussian ``path``)."""
    if isinstance(eps, str):
        if eps == "zero":
            return lambda t: torch.zeros_like(t)
        if eps == "reverse-diffusion":
            if not isinstance(path, GaussianPath):
                raise ValueError(f"eps='reverse-diffusion' needs a Gaussian path (it is sigma^2 * dlambda/dt), got "
                                 f"{type(path).__name__}; pass a number >= 0 or a callable of t instead")

            def reverse_diffusion(t: Tensor) -> Tensor:
                tab = path.table(t)  # σ²λ̇ = σ²α̇/α − σσ̇: finite wherever the path's coefficients are
                return (tab.sigma**2 * tab.d_log_snr).to(t.dtype)

            return reverse_diffusion
        raise ValueError(f"unknown eps {eps!r}; valid: a number >= 0, a callable of t, or one of {', '.join(EPS_OPTIONS)}")
    if callable(eps):
        return eps
    value = check_float("eps", eps, 0.0)
    return lambda t: torch.full_like(t, value)


class _EpsOnGrid:
    """ε(t) at the grid points: named and constant choices are tabulated once in float64 (no
    per-step tensor work); a user callable is called at each step with ``t`` of shape ``(B,)``."""

    def __init__(self, eps: Diffusion | None, path: GaussianPath | None, times: list[float]):
        if eps is None:  # the classical score-SDE sampler; on an interpolant ε = 1, the SI papers' usual constant
            eps = "reverse-diffusion" if path is not None else 1.0
        self.fn = diffusion_schedule(eps, path)
        self.table: list[float] | None = None
        if isinstance(eps, str) or not callable(eps):
            self.table = self.fn(torch.tensor(times, dtype=torch.float64)).tolist()
            for t, e in zip(times, self.table):
                _check_eps(e, t)

    def __call__(self, i: int, t: float, x: Tensor) -> Tensor | float:
        """ε at ``t`` for every sample: a Python float when constant over the batch, else ``(B, 1, …)``."""
        if self.table is not None:
            return self.table[i]
        tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        val = torch.as_tensor(self.fn(tb), dtype=x.dtype, device=x.device)
        if val.ndim == 0 or val.numel() == 1:
            return _check_eps(float(val.reshape(())), t)
        if val.shape != (x.shape[0],):
            raise ValueError(f"eps(t) must return a scalar or shape (B,) = ({x.shape[0]},), got {tuple(val.shape)}")
        _check_eps(float(val.min()), t)
        _check_eps(float(val.max()), t)
        return expand_like(val, x)


def _check_eps(e: float, t: float) -> float:
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"eps(t) must be finite and >= 0, got eps({t:.6g})={e!r}")
    return e


class _SDESolver(Solver):
    r"""Shared by Euler–Maruyama and predictor–corrector: ``b + ε s`` and ``s`` with the cheapest calls.

    On a Gaussian path one model call gives x̂ and ε̂, hence
    :math:`b = \dot\alpha\hat x + \dot\sigma\hat\varepsilon` and :math:`s = -\hat\varepsilon/\sigma`. On an
    interpolant, ``field.velocity`` gives b and ``field.score`` gives s (skipped when ε = 0).
    """

    options: dict[str, Any] = {"eps": None}

    @classmethod
    def calls_per_eval(cls, field: Any, options: dict) -> int:
        if not isinstance(field, InterpolantField):
            return 1
        eps = options["eps"]
        zero = eps == "zero" or (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps == 0)
        return velocity_calls(field) + (0 if zero else 1)

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.eps = _EpsOnGrid(self.opts["eps"], run.path, run.times)

    def drift(self, x: Tensor, i: int, e: Tensor | float) -> tuple[Tensor, Tensor | None]:
        """``(b + ε s, x̂ or None)`` at grid point ``i``."""
        run = self.run
        if run.path is not None:
            _, s, da, ds = run.coefficients(i)
            data, noise = run.evaluate(x, i)
            # b + ε s = α̇ x̂ + (σ̇ − ε/σ) ε̂, accumulated in place into one new tensor
            if isinstance(e, float):
                return torch.mul(data, da).add_(noise, alpha=ds - e / s), data
            return torch.mul(data, da).add_(noise * (ds - e / s)), data
        t = run.times[i]
        b = run.velocity(x, t)
        zero = (e == 0) if isinstance(e, float) else bool((e == 0).all())
        return (b, None) if zero else (b + e * run.score(x, t), None)

    def em_step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
        r"""One Euler–Maruyama step :math:`x + h\,(b + εs) + \sqrt{2εh}\,z` from node ``i``."""
        run = self.run
        t, h = run.times[i], run.times[i + 1] - run.times[i]
        e = self.eps(i, t, x)
        drift, data = self.drift(x, i, e)
        std = math.sqrt(2 * e * h) if isinstance(e, float) else torch.sqrt(2 * e * h)
        return run.gaussian(torch.add(x, drift, alpha=h), std, i, t, run.times[i + 1], x), data


class EulerMaruyama(_SDESolver):
    r"""Euler–Maruyama on the sampling SDE (Maruyama 1955), weak order 1:
    :math:`x_{i+1} = x_i + h_i[b + \varepsilon s](x_i, t_i) + \sqrt{2\varepsilon(t_i)h_i}\,z_i`.
    ``eps="zero"`` (or 0) is the Euler method on the probability-flow ODE and on an interpolant
    costs no score call (the budget planner counts it so).

    Arguments:
        eps: ε(t) as in :func:`diffusion_schedule`. Default: ``"reverse-diffusion"`` on a
            Gaussian path, ``1.0`` on an interpolant.
    """

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.em_step(i, x)


class PredictorCorrector(_SDESolver):
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
    huge steps where a sample's score vanishes). Each corrector step costs one evaluation, and
    the budget planner gives ``budget // (1 + n_corrector)`` steps. The transition hook sees each
    corrector move as a Gaussian with the realised δ (which depends on the batch-mean noise norm).

    Arguments:
        snr: ``r > 0`` (0.16 is Song et al.'s CIFAR-10 VE value; diffusers uses 0.15).
        n_corrector: Langevin steps per time step, ≥ 0 (0 gives Euler–Maruyama).
        eps: the predictor's ε(t), as in :class:`EulerMaruyama`.
    """

    options = {"snr": 0.16, "n_corrector": 1, "eps": None}

    @classmethod
    def evals_per_step(cls, options: dict) -> int:
        return 1 + check_int("n_corrector", options["n_corrector"], 0)

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        self.snr = check_float("snr", self.opts["snr"], 0.0, low_open=True)
        self.n_corrector = check_int("n_corrector", self.opts["n_corrector"], 0)

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
        run = self.run
        x, data = self.em_step(i, x)
        t_next = run.times[i + 1]
        for _ in range(self.n_corrector):
            if run.path is not None:
                score = run.evaluate(x, i + 1)[1] / (-run.sigma[i + 1])
            else:
                score = run.score(x, t_next)
            z = run.randn(x)
            flat = x.shape[0], -1
            # Batch-averaged norms, as in score_sde's LangevinCorrector: a per-sample ratio
            # explodes where the score vanishes (a mode's centre), which low dimensions hit.
            noise_norm = float(z.reshape(flat).norm(dim=1).mean())
            score_norm = float(score.reshape(flat).norm(dim=1).mean())
            if score_norm == 0.0:
                # A field with zero score everywhere (e.g. an untrained network) gives no
                # direction and an infinite step: skip the move (the evaluation is spent).
                continue
            delta = 2 * (self.snr * noise_norm / score_norm) ** 2
            x = run.gaussian(x + delta * score, math.sqrt(2 * delta), i, t_next, t_next, x, z=z)
        return x, data


class EDMHeunChurn(Solver):
    r"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2), for any Gaussian path.

    It works on :math:`\tilde x = x/\alpha` with noise level :math:`\tilde\sigma = \sigma/\alpha =
    e^{-\lambda}`, where the PF-ODE is :math:`d\tilde x/d\tilde\sigma = (\tilde x - D)/\tilde\sigma`,
    :math:`D(\tilde x, \tilde\sigma) = \hat x(\alpha\tilde x, t)`. Step ``i`` (noise levels
    :math:`\tilde\sigma_i > \tilde\sigma_{i+1}` of the grid times):

    1. churn: :math:`\gamma_i = \min(S_{churn}/N, \sqrt2 - 1)` if
       :math:`S_{tmin} \le \tilde\sigma_i \le S_{tmax}` else 0;
       :math:`\hat\sigma = \tilde\sigma_i(1 + \gamma_i)`,
       :math:`\hat x = \tilde x_i + S_{noise}\sqrt{\hat\sigma^2 - \tilde\sigma_i^2}\,z` (the Gaussian
       transition the hook sees, in the scaled state :math:`\tilde x`);
    2. Heun from :math:`\hat\sigma` to :math:`\tilde\sigma_{i+1}`:
       :math:`d = (\hat x - D(\hat x, \hat\sigma))/\hat\sigma`,
       :math:`x' = \hat x + (\tilde\sigma_{i+1} - \hat\sigma)d`,
       :math:`\tilde x_{i+1} = \hat x + (\tilde\sigma_{i+1} - \hat\sigma)\tfrac12(d + d'(x'))`.

    Every step is a Heun step (2 evaluations; ``t_end`` has σ > 0), except that an odd budget
    makes the last step an Euler step. :math:`\hat\sigma` is capped at the noise level of the
    path's ``t_min``. The default grid is time-quadratic (measured better than EDM's ρ = 7 grid
    at 10–20 NFE on the d = 32 mixture); ``grid="karras"`` gives EDM's own.

    Arguments:
        S_churn: total churn ≥ 0 (0 gives EDM's deterministic Heun, Algorithm 1). Default 40
            (EDM's ImageNet-64 setting is 40–80).
        S_tmin, S_tmax: the σ̃ range where churn is applied (EDM's ImageNet values 0.05, 50).
        S_noise: noise inflation ≥ 0; 1 keeps the exact marginals (EDM used 1.003 to offset
            the over-smoothing of trained denoisers).
    """

    options = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.0}
    evals = 2

    @classmethod
    def steps_for(cls, budget: int, options: dict) -> int:
        return (budget + 1) // 2  # an odd budget pays for an Euler last step

    def __init__(self, run: Run, options: dict):
        super().__init__(run, options)
        o = self.opts
        self.S_churn = check_float("S_churn", o["S_churn"], 0.0)
        self.S_tmin = check_float("S_tmin", o["S_tmin"], 0.0)
        self.S_tmax = math.inf if o["S_tmax"] == math.inf else check_float("S_tmax", o["S_tmax"], 0.0)
        if self.S_tmin > self.S_tmax:
            raise ValueError(f"need S_tmin <= S_tmax, got S_tmin={self.S_tmin!r}, S_tmax={self.S_tmax!r}")
        self.S_noise = check_float("S_noise", o["S_noise"], 0.0)
        self.heun_last = run.budget is None or run.budget >= 2 * run.steps
        if run.alpha[0] == 0.0:
            raise ValueError(f"solver {self.name!r} works in the noise level sigma/alpha, infinite at alpha(t_start)=0 "
                             f"(t_start={run.times[0]!r}); start later or use dpm-solver++2m / sde-dpm-solver++2")
        self.noise_level = [math.exp(-lam) for lam in run.log_snr]  # σ̃ = σ/α
        self.t_floor = float(run.path.t_min)  # type: ignore[union-attr]
        self.sigma_cap = math.exp(-float(run.path.table([self.t_floor]).log_snr))  # type: ignore[union-attr]
        self.gamma_max = min(self.S_churn / run.steps, math.sqrt(2.0) - 1.0)
        self.last: Tensor | None = None

    def denoise(self, x_tilde: Tensor, t: float, i: int | None) -> Tensor:
        # grid point i: tabulated coefficients; a churned time: computed here
        coeff = self.run.coefficients(i) if i is not None else self.run.at(t)
        return self.run.evaluate_at(coeff[0] * x_tilde, t, coeff)[0]

    def step(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        run = self.run
        # continue in σ̃-space from the tilde state when x is what the last step returned
        x_tilde = self.memory["x_tilde"] if x is self.last else x / run.alpha[i]
        sig, sig_next = self.noise_level[i], self.noise_level[i + 1]
        t_hat, sig_hat = run.times[i], sig
        if self.gamma_max > 0 and self.S_tmin <= sig <= self.S_tmax:
            sig_hat = min(sig * (1.0 + self.gamma_max), self.sigma_cap)
            if sig_hat > sig:
                t_hat = max(run.t_of_log_snr(-math.log(sig_hat)), self.t_floor)
                # The exact σ̃ at the time the model will see (t_of_log_snr is exact up to round-off).
                sig_hat = math.exp(-float(run.path.table([t_hat]).log_snr))  # type: ignore[union-attr]
                std = self.S_noise * math.sqrt(max(sig_hat**2 - sig**2, 0.0))
                # x_tilde is this step's own tensor (fresh or last step's), so the draw may go in place
                x_tilde = run.gaussian(x_tilde, std, i, run.times[i], t_hat, x_tilde)
            else:
                sig_hat = sig
        data = self.denoise(x_tilde, t_hat, i if t_hat == run.times[i] else None)
        d = (x_tilde - data) / sig_hat
        x_pred = x_tilde + (sig_next - sig_hat) * d
        if i == run.steps - 1 and not self.heun_last:
            x_tilde = x_pred
        else:
            data = self.denoise(x_pred, run.times[i + 1], i + 1)
            d_next = (x_pred - data) / sig_next
            x_tilde = x_tilde + (sig_next - sig_hat) * 0.5 * (d + d_next)
        self.memory["x_tilde"] = x_tilde
        self.last = run.alpha[i + 1] * x_tilde
        return self.last, data


_SDE: dict[str, Any] = {"kind": "sde", "stochastic": True}
register_solver("euler-maruyama", EulerMaruyama, description="Euler–Maruyama on dX = [b + eps(t) s]dt + sqrt(2 eps(t))dW; "
                "eps a number, callable, 'reverse-diffusion' or 'zero'", **_SDE)
# measured better than EDM's own Karras grid at 10-20 NFE (benchmarks/results/sde_solvers.md)
register_solver("edm", EDMHeunChurn, requires_gaussian_path=True, default_grid="quadratic", aliases=("heun-churn",),
                description="EDM stochastic Heun with churn in sigma/alpha (Karras et al. 2022, Alg. 2)", **_SDE)
register_solver("pc", PredictorCorrector, description="reverse-diffusion predictor + Langevin corrector, SNR step rule "
                "(Song et al. 2021); 1 + n_corrector evals/step", **_SDE)
