r"""The IR-SDE family of mean-reverting SDEs as a Gaussian path of the shifted state ``y = x − μ``.

Luo, Gustafsson, Zhao, Sjölund & Schön 2023, "Image Restoration with Mean-Reverting Stochastic
Differential Equations" (IR-SDE, ICML) diffuse a clean image :math:`x_0` towards a noisy version of
the degraded image :math:`\mu` with the Ornstein–Uhlenbeck SDE (diffusion time :math:`s \in [0, 1]`)

.. math::

    dx = \theta_s(\mu - x)\,ds + \sigma_s\,dW, \qquad \sigma_s^2/\theta_s = 2\lambda^2,

whose stationary law is :math:`N(\mu, \lambda^2 I)` (``stationary_std`` = λ). With
:math:`\bar\theta_s = \int_0^s\theta` the marginal is exactly Gaussian,

.. math::

    x_s - \mu = e^{-\bar\theta_s}(x_0 - \mu) + \lambda\sqrt{1 - e^{-2\bar\theta_s}}\;z,

so the shifted state :math:`y = x - \mu` follows an ordinary Gaussian path
:math:`y = \alpha y_1 + \bar\sigma\varepsilon` with :math:`\alpha = e^{-\bar\theta}`,
:math:`\bar\sigma = \lambda\sqrt{1 - \alpha^2}` (a VP path with σ scaled by λ). Li, Wang, Liu et
al. 2025, "Mean-Reverting Diffusion: Faster Sampling for Image Restoration" (MRS, ICLR) use
exactly this to write semi-analytic solutions of the reverse SDE and its probability-flow ODE;
:class:`IRSDE` is that path in the library's time ``t = 1 − s`` (``t = 0``: the stationary end,
``t = 1``: the clean image), so every exponential integrator of :mod:`flowdiff.solvers` applies
to ``y`` (:mod:`flowdiff.mean_reverting.sampling`).

Schedules of :math:`\theta_s` (IR-SDE's code normalises :math:`\bar\theta_1` so that
:math:`e^{-\bar\theta_1}` equals ``terminal_alpha``, 0.01 by default):

* ``"cosine"`` (IR-SDE's default): :math:`\theta_s = k\,(1 - \bar a(s))`,
  :math:`\bar a(s) = \cos^2\!\big(\tfrac{s + \delta}{1 + \delta}\tfrac{\pi}{2}\big)/\cos^2\!\big(\tfrac{\delta}{1+\delta}\tfrac{\pi}{2}\big)`,
  δ = 0.008 — the continuous form of its ``cosine_theta_schedule`` (the improved-DDPM cosine
  ᾱ used as θ), integrated in closed form;
* ``"constant"``: :math:`\theta_s = k`, :math:`\bar\theta_s = k s`.

In ``t``: :math:`\dot\alpha = \theta\alpha`, :math:`\dot{\bar\sigma} = -\lambda\alpha^2\theta/\sqrt{1-\alpha^2}`,
:math:`\dot\lambda_{\log\mathrm{SNR}} = \theta/(1 - \alpha^2)`, and the reverse-diffusion coefficient
of the library's sampling equation, :math:`\varepsilon(t) = \bar\sigma^2\dot\lambda = \lambda^2\theta = \sigma_s^2/2`,
is IR-SDE's own (so ``euler-maruyama`` on ``y`` is Euler–Maruyama on the IR-SDE reverse SDE).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import check_float
from ..paths import GaussianPath

__all__ = ["IRSDE", "SCHEDULES"]

#: The θ schedules :class:`IRSDE` knows.
SCHEDULES = ("cosine", "constant")
_DELTA = 0.008  # the cosine schedule's offset (improved DDPM, IR-SDE)


class IRSDE(GaussianPath):
    r"""The IR-SDE path of ``y = x − μ`` (module docstring), in library time ``t = 1 − s``.

    Arguments:
        stationary_std: λ, the standard deviation of the stationary law :math:`N(\mu, \lambda^2 I)`
            (IR-SDE's ``max_sigma``; their 10/255–50/255 on ``[0, 1]`` images is 0.08–0.4 on ``[-1, 1]``).
        schedule: ``"cosine"`` (IR-SDE) or ``"constant"``.
        terminal_alpha: :math:`e^{-\bar\theta_1} = \alpha(t=0)` in ``(0, 1)`` (IR-SDE: 0.01).
        t_min, t_max: the safe interval; ``t = 1`` itself has σ̄ = 0 (infinite log-SNR).

    Everything is computed in float64 and returned in the dtype of ``t``.
    """

    def __init__(self, stationary_std: float = 0.5, schedule: str = "cosine", terminal_alpha: float = 0.01,
                 t_min: float = 0.0, t_max: float = 1.0 - 1e-3):
        self.stationary_std = check_float("stationary_std", stationary_std, 0.0, low_open=True)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown IR-SDE schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.terminal_alpha = check_float("terminal_alpha", terminal_alpha, 0.0, 1.0, low_open=True, high_open=True)
        t_min, t_max = float(t_min), float(t_max)
        if not 0.0 <= t_min < t_max < 1.0:
            raise ValueError(f"IRSDE needs 0 <= t_min < t_max < 1 (sigma = 0 at t = 1), got t_min={t_min!r}, t_max={t_max!r}")
        self.t_min, self.t_max = t_min, t_max
        self._a = math.pi / (2.0 * (1.0 + _DELTA))
        self._b = _DELTA * self._a
        self._c0 = math.cos(self._b) ** 2
        # k such that θ̄(1) = −log(terminal_alpha)
        self._k = 1.0
        self._k = -math.log(self.terminal_alpha) / float(self._theta_bar_s(torch.tensor(1.0, dtype=torch.float64)))

    # ----- θ in diffusion time s --------------------------------------------------------
    def _theta_s(self, s: Tensor) -> Tensor:
        if self.schedule == "constant":
            return torch.full_like(s, self._k)
        return self._k * (1.0 - torch.cos(self._a * s + self._b) ** 2 / self._c0)

    def _theta_bar_s(self, s: Tensor) -> Tensor:
        if self.schedule == "constant":
            return self._k * s
        a, b = self._a, self._b
        # ∫_0^s (c0 − cos²(au + b)) du = s cos(2b)/2 − cos(as + 2b) sin(as)/(2a)
        return (self._k / self._c0) * (0.5 * s * math.cos(2 * b) - torch.cos(a * s + 2 * b) * torch.sin(a * s) / (2 * a))

    def theta(self, t: Tensor | float) -> Tensor:
        r""":math:`\theta` at library time ``t`` (diffusion time ``1 − t``)."""
        t = self._t(t)
        return self._theta_s(1.0 - t.to(torch.float64)).to(t.dtype)

    def theta_bar(self, t: Tensor | float) -> Tensor:
        r""":math:`\bar\theta = -\log\alpha` at library time ``t``."""
        t = self._t(t)
        return self._theta_bar_s(1.0 - t.to(torch.float64)).to(t.dtype)

    def forward_sigma(self, t: Tensor | float) -> Tensor:
        r"""The forward SDE's diffusion coefficient :math:`\sigma_s = \lambda\sqrt{2\theta_s}` at ``t``."""
        return self.stationary_std * torch.sqrt(2.0 * self.theta(t))

    # ----- the Gaussian path of y -------------------------------------------------------
    def _parts(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = 1.0 - t.to(torch.float64)
        bar = self._theta_bar_s(s).clamp_min(0.0)
        return bar, self._theta_s(s), -torch.expm1(-2.0 * bar)  # θ̄, θ, 1 − α²

    def _alpha(self, t: Tensor) -> Tensor:
        bar, _, _ = self._parts(t)
        return torch.exp(-bar).to(t.dtype)

    def _sigma(self, t: Tensor) -> Tensor:
        _, _, one_minus = self._parts(t)
        return (self.stationary_std * torch.sqrt(one_minus)).to(t.dtype)

    def _d_alpha(self, t: Tensor) -> Tensor:
        bar, theta, _ = self._parts(t)
        return (theta * torch.exp(-bar)).to(t.dtype)

    def _d_sigma(self, t: Tensor) -> Tensor:
        bar, theta, one_minus = self._parts(t)
        return (-self.stationary_std * torch.exp(-2.0 * bar) * theta / torch.sqrt(one_minus)).to(t.dtype)

    def _log_snr(self, t: Tensor) -> Tensor:
        bar, _, one_minus = self._parts(t)
        return (-bar - math.log(self.stationary_std) - 0.5 * torch.log(one_minus)).to(t.dtype)

    def _d_log_snr(self, t: Tensor) -> Tensor:
        _, theta, one_minus = self._parts(t)
        return (theta / one_minus).to(t.dtype)

    def stationary_sample(self, mu: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""A draw of the sampler's start :math:`\mu + \bar\sigma(t_{min})z` (IR-SDE's
        ``noise_state``; the :math:`\alpha(t_{min})(x_0 - \mu)` part, 1 % by default, is neglected
        as every diffusion sampler neglects it)."""
        if not isinstance(mu, Tensor) or not mu.is_floating_point():
            raise TypeError(f"mu must be a floating-point torch.Tensor, got {type(mu).__name__}")
        z = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + float(self._sigma(torch.tensor(self.t_min, dtype=torch.float64))) * z

    def marginal(self, x0: Tensor, mu: Tensor, t: Tensor | float, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""Draw :math:`x_t = \mu + \alpha(t)(x_0 - \mu) + \bar\sigma(t)\varepsilon`; returns ``(x_t, ε)``."""
        if mu.shape != x0.shape:
            raise ValueError(f"mu of shape {tuple(mu.shape)} does not match x0 of shape {tuple(x0.shape)}; "
                             "the stationary mean needs one value per entry of x")
        y, noise = self.sample(x0 - mu, t, noise=noise, generator=generator)
        return mu + y, noise

    def _repr_params(self) -> dict:
        return {"stationary_std": self.stationary_std, "schedule": self.schedule, "terminal_alpha": self.terminal_alpha,
                "t_min": self.t_min, "t_max": self.t_max}
