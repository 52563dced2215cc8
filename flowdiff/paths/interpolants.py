r"""Two-sided stochastic interpolants (Albergo, Boffi & Vanden-Eijnden 2023,
"Stochastic Interpolants: A Unifying Framework for Flows and Diffusions").

.. math::

    x_t = I(t, x_0, x_1) + \gamma(t) z, \qquad I = a_0(t) x_0 + a_1(t) x_1,
    \qquad z \sim N(0, I) \perp (x_0, x_1),

with :math:`I(0)=x_0`, :math:`I(1)=x_1`, :math:`\gamma(0)=\gamma(1)=0`. The fields, all
conditional expectations given :math:`x_t = x`:

* velocity :math:`v = E[\partial_t I]`,
* drift :math:`b = E[\partial_t I + \dot\gamma z] = v - \gamma\dot\gamma\, s`,
* denoiser :math:`\eta = E[z]`, score :math:`s = \nabla\log\rho_t = -\eta/\gamma`.

:math:`\gamma\dot\gamma` is given in closed form for every γ so that nothing divides 0 by 0
at the ends (for :math:`\gamma = \sqrt{a t(1-t)}`, :math:`\dot\gamma` is infinite at the
ends but :math:`\gamma\dot\gamma = a(1-2t)/2` is not).

A Gaussian path is the one-sided case (``x0 ~ N(0, I)``, ``γ = 0``); the *mirror*
interpolant joins the data to itself (``x0 = x1``, :math:`x_t = x_1 + \gamma z`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils import TimeLike, as_time_tensor, batch_time, check_float, check_time_range, expand_like

__all__ = ["Gamma", "StochasticInterpolant", "InterpolantSample", "GAMMAS", "INTERPOLANTS", "INTERPOLANT_TARGETS"]

GAMMAS = ("zero", "brownian", "bsquared", "sinesquared", "sigmoid")
INTERPOLANTS = ("linear", "trig", "encoder-decoder", "one-sided-linear", "one-sided-trig", "mirror")
#: What each training objective regresses on (see :meth:`StochasticInterpolant.target`).
INTERPOLANT_TARGETS = ("drift", "velocity", "denoiser", "score")


class Gamma:
    r"""The latent-noise scale γ(t) with γ(0) = γ(1) = 0, its derivative and γγ̇ in closed form.

    ============== ============================== ===================================
    name           γ(t)                           γ γ̇
    ============== ============================== ===================================
    zero           0                              0
    brownian       √(a t(1−t))                    a(1 − 2t)/2
    bsquared       a t(1−t)                       a² t(1−t)(1−2t)
    sinesquared    a sin²(πt)                     2π a² sin³(πt) cos(πt)
    sigmoid        a [σ(f(t−½)+1) − σ(f(t−½)−1)   γ γ̇ (γ̇ by the chain rule)
                   − σ(−f/2+1) + σ(−f/2−1)], f=10
    ============== ============================== ===================================
    """

    def __init__(self, name: str = "brownian", a: float = 1.0):
        if name not in GAMMAS:
            raise ValueError(f"unknown gamma {name!r}; valid: {', '.join(GAMMAS)}")
        self.name, self.a = name, check_float("a", a, 0.0, low_open=True)  # the amplitude of γ

    def __repr__(self) -> str:
        return f"Gamma({self.name!r}, a={self.a})"

    def gamma(self, t: Tensor) -> Tensor:
        a = self.a
        if self.name == "zero":
            return torch.zeros_like(t)
        if self.name == "brownian":
            return torch.sqrt(torch.clamp(a * t * (1 - t), min=0))
        if self.name == "bsquared":
            return a * t * (1 - t)
        if self.name == "sinesquared":
            return a * torch.sin(math.pi * t) ** 2
        f = 10.0
        sg = torch.sigmoid
        c = sg(torch.tensor(-f / 2 + 1, dtype=t.dtype)) - sg(torch.tensor(-f / 2 - 1, dtype=t.dtype))
        return a * (sg(f * (t - 0.5) + 1) - sg(f * (t - 0.5) - 1) - c)

    def d_gamma(self, t: Tensor) -> Tensor:
        """γ̇(t); infinite at the ends for ``brownian`` (use :meth:`gamma_d_gamma` there)."""
        a = self.a
        if self.name == "zero":
            return torch.zeros_like(t)
        if self.name == "brownian":
            return a * (1 - 2 * t) / (2 * torch.sqrt(a * t * (1 - t)))
        if self.name == "bsquared":
            return a * (1 - 2 * t)
        if self.name == "sinesquared":
            return a * 2 * math.pi * torch.sin(math.pi * t) * torch.cos(math.pi * t)
        f = 10.0
        s1, s2 = torch.sigmoid(f * (t - 0.5) + 1), torch.sigmoid(f * (t - 0.5) - 1)
        return a * f * (s1 * (1 - s1) - s2 * (1 - s2))

    def gamma_d_gamma(self, t: Tensor) -> Tensor:
        """γγ̇ in closed form (finite at both ends)."""
        a = self.a
        if self.name == "zero":
            return torch.zeros_like(t)
        if self.name == "brownian":
            return 0.5 * a * (1 - 2 * t)
        if self.name == "bsquared":
            return a * a * t * (1 - t) * (1 - 2 * t)
        if self.name == "sinesquared":
            return 2 * math.pi * a * a * torch.sin(math.pi * t) ** 3 * torch.cos(math.pi * t)
        return self.gamma(t) * self.d_gamma(t)


@dataclass
class InterpolantSample:
    """One draw of :math:`x_t` with what every objective needs.

    ``x_t_antithetic`` is :math:`I - \\gamma z` (Albergo et al. 2023, antithetic sampling).
    """

    x_t: Tensor
    t: Tensor
    z: Tensor
    x0: Tensor
    x1: Tensor
    dI_dt: Tensor
    gamma: Tensor
    d_gamma: Tensor
    x_t_antithetic: Tensor


class StochasticInterpolant:
    r"""A two-sided (or one-sided, or mirror) stochastic interpolant.

    Arguments:
        interpolant: ``"linear"`` (:math:`(1-t)x_0 + t x_1`), ``"trig"``
            (:math:`\sqrt{1-\gamma^2}(\cos(\pi t/2) x_0 + \sin(\pi t/2) x_1)`),
            ``"encoder-decoder"`` (:math:`\cos^2(\pi t)` times :math:`x_0` for t < ½, times
            :math:`x_1` after; pair it with γ = sin²), ``"one-sided-linear"`` /
            ``"one-sided-trig"`` (x₀ Gaussian, γ forced to zero: the Gaussian paths
            :class:`~flowdiff.paths.Linear`, :class:`~flowdiff.paths.Trig`), ``"mirror"``
            (x₀ = x₁, :math:`x_t = x_1 + \gamma z`).
        gamma: a :class:`Gamma` or its name.
        a: amplitude of γ when ``gamma`` is a name.
        t_min, t_max: safe interval for sampling and the score (γ > 0 inside).
    """

    def __init__(
        self,
        interpolant: str = "linear",
        gamma: str | Gamma = "brownian",
        a: float = 1.0,
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
    ):
        if interpolant not in INTERPOLANTS:
            raise ValueError(f"unknown interpolant {interpolant!r}; valid: {', '.join(INTERPOLANTS)}")
        self.interpolant = interpolant
        if interpolant.startswith("one-sided"):
            gamma = "zero"
        self.gamma_fn = gamma if isinstance(gamma, Gamma) else Gamma(gamma, a)
        if interpolant == "mirror" and self.gamma_fn.name == "zero":
            raise ValueError("the mirror interpolant needs gamma != 'zero' (x_t would equal x_1 for all t)")
        if interpolant == "trig" and self.gamma_fn.name != "zero":
            peak = float(self.gamma_fn.gamma(torch.linspace(0, 1, 1001, dtype=torch.float64)).max())
            if peak >= 1:
                raise ValueError(f"the trig interpolant needs gamma < 1, but max gamma = {peak:.3g} (reduce a)")
        t_min, t_max = check_float("t_min", t_min, 0.0, 1.0), check_float("t_max", t_max, 0.0, 1.0)
        if not t_min < t_max:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min!r}, t_max={t_max!r}")
        self.t_min, self.t_max = t_min, t_max

    def __repr__(self) -> str:
        return f"StochasticInterpolant({self.interpolant!r}, gamma={self.gamma_fn!r})"

    @property
    def one_sided(self) -> bool:
        """True when x₀ is the Gaussian base N(0, I) and γ = 0."""
        return self.interpolant.startswith("one-sided")

    @property
    def is_mirror(self) -> bool:
        return self.interpolant == "mirror"

    def config(self) -> dict:
        return {"name": "StochasticInterpolant", "interpolant": self.interpolant, "gamma": self.gamma_fn.name,
                "a": self.gamma_fn.a, "t_min": self.t_min, "t_max": self.t_max}

    # ----- coefficients -------------------------------------------------------------
    def coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r""":math:`(a_0, a_1, \dot a_0, \dot a_1)` with :math:`I = a_0 x_0 + a_1 x_1`."""
        t = as_time_tensor(t)
        check_time_range(t)
        return self._coefficients(t)

    def _coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kind = self.interpolant
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        if kind in ("linear", "one-sided-linear"):
            return 1 - t, t, -one, one
        if kind == "mirror":
            return zero, one, zero, zero
        if kind == "encoder-decoder":
            c2 = torch.cos(math.pi * t) ** 2
            dc2 = -math.pi * torch.sin(2 * math.pi * t)
            first = t < 0.5
            return (torch.where(first, c2, zero), torch.where(first, zero, c2),
                    torch.where(first, dc2, zero), torch.where(first, zero, dc2))
        # trig (γ-corrected amplitude) and one-sided trig (γ = 0)
        c, s = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        g = self.gamma_fn.gamma(t)
        r = torch.sqrt(1 - g * g)
        dr = -self.gamma_fn.gamma_d_gamma(t) / r
        return r * c, r * s, dr * c - r * 0.5 * math.pi * s, dr * s + r * 0.5 * math.pi * c

    def gamma(self, t: TimeLike) -> Tensor:
        t = as_time_tensor(t)
        check_time_range(t)
        return self.gamma_fn.gamma(t)

    def d_gamma(self, t: TimeLike) -> Tensor:
        t = as_time_tensor(t)
        check_time_range(t)
        return self.gamma_fn.d_gamma(t)

    def gamma_d_gamma(self, t: TimeLike) -> Tensor:
        t = as_time_tensor(t)
        check_time_range(t)
        return self.gamma_fn.gamma_d_gamma(t)

    def interpolate(self, t: TimeLike, x0: Tensor, x1: Tensor) -> Tensor:
        """:math:`I(t, x_0, x_1)` (``t`` a scalar or shape ``(B,)``)."""
        t = batch_time(t, x1)
        check_time_range(t)
        a0, a1, _, _ = self._coefficients(t)
        return expand_like(a0, x1) * x0 + expand_like(a1, x1) * x1

    def d_interpolate(self, t: TimeLike, x0: Tensor, x1: Tensor) -> Tensor:
        """:math:`\\partial_t I(t, x_0, x_1)`."""
        t = batch_time(t, x1)
        check_time_range(t)
        _, _, d0, d1 = self._coefficients(t)
        return expand_like(d0, x1) * x0 + expand_like(d1, x1) * x1

    # ----- sampling and targets -----------------------------------------------------
    def sample(
        self,
        x0: Tensor | None,
        x1: Tensor,
        t: TimeLike,
        z: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> InterpolantSample:
        """Draw :math:`x_t = I(t, x_0, x_1) + \\gamma(t) z` (and its antithetic twin).

        ``x0`` may be ``None`` for one-sided interpolants (drawn from N(0, I)) and for the
        mirror interpolant (set to ``x1``).
        """
        t = batch_time(t, x1)
        check_time_range(t)
        if self.is_mirror:
            x0 = x1
        elif x0 is None:
            if not self.one_sided:
                raise ValueError(f"x0 is required for the two-sided interpolant {self.interpolant!r}")
            x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        if x0.shape != x1.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} must equal x1 shape {tuple(x1.shape)}")
        if z is None:
            z = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        elif z.shape != x1.shape:
            raise ValueError(f"z shape {tuple(z.shape)} must equal x1 shape {tuple(x1.shape)}")
        a0, a1, d0, d1 = (expand_like(c, x1) for c in self._coefficients(t))
        interp = a0 * x0 + a1 * x1
        g = self.gamma_fn.gamma(t)
        # γ̇ is only needed multiplied by z; where γ = 0 (ends, or γ ≡ 0) it is finite except for
        # the Brownian γ, whose ends are excluded by sampling t in [t_min, t_max].
        gd = self.gamma_fn.d_gamma(t) if self.gamma_fn.name != "zero" else torch.zeros_like(t)
        gz = expand_like(g, x1) * z
        return InterpolantSample(
            x_t=interp + gz, t=t, z=z, x0=x0, x1=x1, dI_dt=d0 * x0 + d1 * x1,
            gamma=g, d_gamma=gd, x_t_antithetic=interp - gz,
        )

    def target(self, kind: str, sample: InterpolantSample, antithetic: bool = False) -> Tensor:
        """Regression target of ``kind`` for ``sample`` (its conditional expectation is the field).

        ``drift`` → ∂ₜI + γ̇z, ``velocity`` → ∂ₜI, ``denoiser`` → z, ``score`` → −z/γ. With
        ``antithetic=True`` the target for the antithetic point ``I − γz`` (z → −z).
        """
        if kind not in INTERPOLANT_TARGETS:
            raise ValueError(f"unknown interpolant target {kind!r}; valid: {', '.join(INTERPOLANT_TARGETS)}")
        z = -sample.z if antithetic else sample.z
        if kind == "velocity":
            return sample.dI_dt
        if kind == "drift":
            return sample.dI_dt + expand_like(sample.d_gamma, z) * z
        if kind == "denoiser":
            return z
        return -z / expand_like(sample.gamma, z)
