r"""Gaussian paths :math:`x_t = \alpha(t)\,x_1 + \sigma(t)\,\varepsilon`.

Time convention (binding, see DESIGN.md): ``t = 0`` is the base (noise), ``t = 1`` is
the data; :math:`\alpha` increases and :math:`\sigma` decreases in ``t``. The half
log signal-to-noise ratio :math:`\lambda(t) = \log(\alpha(t)/\sigma(t))` is strictly
increasing, and every path gives its exact inverse :math:`t(\lambda)` (closed form
wherever one exists).

Score-SDE families (VP, sub-VP, VE; Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations") are written in their own SDE
time :math:`s \in [0, 1]` with data at ``s = 0``; here ``s = 1 - t``.

Every path has a *safe interval* ``[t_min, t_max]`` on which every conversion between
prediction types is finite (``sigma > 0`` and ``alpha > 0``, both derivatives finite).
Samplers start at ``t_min`` and stop at ``t_max`` by default.

Each public method accepts ``t`` as a Python number or a tensor of any shape, checks
that it lies in ``[0, 1]``, and returns a tensor of the same shape (and the dtype and
device of ``t``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .._utils import TimeLike, as_time_tensor, check_time_range

__all__ = [
    "GaussianPath",
    "PathCoefficients",
    "PathTable",
    "VP",
    "SubVP",
    "VE",
    "EDM",
    "Linear",
    "Trig",
    "Cosine",
    "Discrete",
    "Shifted",
    "Custom",
    "PREDICTIONS",
]

#: Prediction types a model may output on a Gaussian path (DESIGN.md).
PREDICTIONS = ("noise", "data", "velocity", "score", "v")


@dataclass(frozen=True)
class PathCoefficients:
    """Values and time derivatives of a Gaussian path at some ``t`` (same shape as ``t``)."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


@dataclass(frozen=True)
class PathTable:
    r"""Every schedule quantity of a Gaussian path at times ``t``, in float64.

    What solvers, likelihoods and losses need for their coefficient arithmetic (EDM and
    DPM-Solver do theirs in float64): :math:`\alpha, \sigma, \dot\alpha, \dot\sigma`, the half
    log-SNR :math:`\lambda = \log(\alpha/\sigma)` from the path's own closed form (more accurate than
    ``log(alpha/sigma)`` at the ends) and :math:`\dot\lambda`. Tensors of the shape of ``t``, float64,
    on ``t``'s device. Built by :meth:`GaussianPath.table`.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor
    log_snr: Tensor
    d_log_snr: Tensor

    def __len__(self) -> int:
        return self.t.numel()

    def floats(self, i: int = 0) -> tuple[float, float, float, float]:
        """``(α, σ, α̇, σ̇)`` at the ``i``-th time (flattened) as Python floats."""
        return (
            float(self.alpha.flatten()[i]),
            float(self.sigma.flatten()[i]),
            float(self.d_alpha.flatten()[i]),
            float(self.d_sigma.flatten()[i]),
        )


def _check_positive(name: str, value: float, strict: bool = True) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if (strict and value <= 0) or (not strict and value < 0):
        raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {name}={value!r}")
    return float(value)


def _check_interval(t_min: float, t_max: float) -> tuple[float, float]:
    if not (0.0 <= t_min < t_max <= 1.0):
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min!r}, t_max={t_max!r}")
    return float(t_min), float(t_max)


class GaussianPath:
    r"""Base class of the one-sided Gaussian paths :math:`x_t = \alpha x_1 + \sigma\varepsilon`.

    Subclasses implement the unchecked ``_alpha``, ``_sigma``, ``_d_alpha``, ``_d_sigma``,
    ``_log_snr`` and ``_t_of_log_snr``; this class adds validation, derived quantities
    (``d_log_snr``), sampling of :math:`x_t` and the regression targets of each prediction.
    """

    t_min: float = 0.0
    t_max: float = 1.0

    # ----- to implement -------------------------------------------------------------
    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_snr(self, t: Tensor) -> Tensor:
        return torch.log(self._alpha(t)) - torch.log(self._sigma(t))

    def _d_log_snr(self, t: Tensor) -> Tensor:
        return self._d_alpha(t) / self._alpha(t) - self._d_sigma(t) / self._sigma(t)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return _bisect_log_snr(self, lam)

    # ----- public, validated --------------------------------------------------------
    def _t(self, t: TimeLike) -> Tensor:
        t = as_time_tensor(t)
        check_time_range(t)
        return t

    def alpha(self, t: TimeLike) -> Tensor:
        """Signal coefficient :math:`\\alpha(t)`."""
        return self._alpha(self._t(t))

    def sigma(self, t: TimeLike) -> Tensor:
        """Noise coefficient :math:`\\sigma(t)`."""
        return self._sigma(self._t(t))

    def d_alpha(self, t: TimeLike) -> Tensor:
        """Time derivative :math:`\\dot\\alpha(t)`."""
        return self._d_alpha(self._t(t))

    def d_sigma(self, t: TimeLike) -> Tensor:
        """Time derivative :math:`\\dot\\sigma(t)`."""
        return self._d_sigma(self._t(t))

    def log_snr(self, t: TimeLike) -> Tensor:
        """Half log-SNR :math:`\\lambda(t) = \\log\\alpha(t) - \\log\\sigma(t)`."""
        return self._log_snr(self._t(t))

    def d_log_snr(self, t: TimeLike) -> Tensor:
        """:math:`\\dot\\lambda(t) = \\dot\\alpha/\\alpha - \\dot\\sigma/\\sigma` (> 0)."""
        return self._d_log_snr(self._t(t))

    def t_of_log_snr(self, lam: TimeLike) -> Tensor:
        """Exact inverse of :meth:`log_snr`: the ``t`` with ``log_snr(t) == lam``, in ``[0, 1]``
        (round-off of the inversion, e.g. −1.8e-16 for a DDPM table's own end, is clamped)."""
        lam = as_time_tensor(lam, name="lam")
        if torch.isnan(lam).any():
            raise ValueError("lam must not be NaN")
        return self._t_of_log_snr(lam).clamp(0.0, 1.0)

    def coefficients(self, t: TimeLike) -> PathCoefficients:
        """:math:`(\\alpha, \\sigma, \\dot\\alpha, \\dot\\sigma)` at ``t`` in one call."""
        return self._coefficients(self._t(t))

    def table(self, t: TimeLike) -> PathTable:
        """α, σ, α̇, σ̇, λ, λ̇ at ``t`` in float64 (:class:`PathTable`), ``t`` validated once.

        ``t``: a number, a sequence of numbers or a tensor of times in ``[0, 1]`` (a few ulps of
        round-off outside are accepted). The public, float64 way for solvers and losses to read
        a schedule; the underscore methods are the subclasses' unchecked implementations.
        """
        if not isinstance(t, Tensor) and not isinstance(t, (int, float)):
            t = torch.as_tensor(t, dtype=torch.float64)
        t = self._t(as_time_tensor(t).to(torch.float64))
        c = self._coefficients(t)
        return PathTable(
            t=t, alpha=c.alpha, sigma=c.sigma, d_alpha=c.d_alpha, d_sigma=c.d_sigma,
            log_snr=self._log_snr(t), d_log_snr=self._d_log_snr(t),
        )

    def _coefficients(self, t: Tensor) -> PathCoefficients:
        # Paths whose four values share work (a table look-up) override this.
        return PathCoefficients(self._alpha(t), self._sigma(t), self._d_alpha(t), self._d_sigma(t))

    @property
    def safe_interval(self) -> tuple[float, float]:
        """``(t_min, t_max)``: where every conversion between predictions is finite."""
        return (self.t_min, self.t_max)

    # ----- sampling and targets -----------------------------------------------------
    def sample(
        self, x1: Tensor, t: TimeLike, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw :math:`x_t = \\alpha(t) x_1 + \\sigma(t)\\varepsilon`.

        Arguments:
            x1: data, shape ``(B, *)``.
            t: times, a scalar or shape ``(B,)``.
            noise: optional :math:`\\varepsilon` of the shape of ``x1``.

        Returns:
            ``(x_t, noise)``.
        """
        from .._utils import batch_time, expand_like

        t = batch_time(t, x1)
        check_time_range(t)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        elif noise.shape != x1.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x1 shape {tuple(x1.shape)}")
        a = expand_like(self._alpha(t), x1)
        s = expand_like(self._sigma(t), x1)
        return a * x1 + s * noise, noise

    def target(self, prediction: str, x1: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
        """Regression target of ``prediction`` for the pair ``(x1, noise)`` at ``t``.

        ``noise`` → ε; ``data`` → x₁; ``velocity`` → α̇x₁ + σ̇ε; ``v`` → αε − σx₁
        (Salimans & Ho 2022, "Progressive Distillation"); ``score`` → −ε/σ (the
        conditional score; its minimiser is ∇log p_t).
        """
        from .._utils import batch_time, expand_like

        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        t = batch_time(t, x1)
        check_time_range(t)
        if prediction == "noise":
            return noise
        if prediction == "data":
            return x1
        a = expand_like(self._alpha(t), x1)
        s = expand_like(self._sigma(t), x1)
        if prediction == "v":
            return a * noise - s * x1
        if prediction == "score":
            return -noise / s
        return expand_like(self._d_alpha(t), x1) * x1 + expand_like(self._d_sigma(t), x1) * noise

    def prior_sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """A draw of the base at ``t_min``: :math:`\\sigma(t_{min})\\,\\varepsilon`.

        This neglects the :math:`\\alpha(t_{min})x_1` part of :math:`x_{t_{min}}`, which is
        what every diffusion/flow sampler does (α(t_min) ≈ 0.0066 for VP, 0 for VE's
        signal-free limit, t_min for Linear).
        """
        dtype = dtype or torch.get_default_dtype()
        noise = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self._sigma(torch.tensor(self.t_min, dtype=dtype, device=device)) * noise

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of :math:`N(0, \\sigma(t_{min})^2 I)` at ``x`` (summed over non-batch dims)."""
        s = self._sigma(torch.tensor(self.t_min, dtype=x.dtype, device=x.device))
        d = x[0].numel()
        sq = x.reshape(x.shape[0], -1).pow(2).sum(-1)
        return -0.5 * sq / s**2 - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._repr_params().items())
        return f"{type(self).__name__}({params})"

    def _repr_params(self) -> dict:
        return {"t_min": self.t_min, "t_max": self.t_max}

    def config(self) -> dict:
        """A JSON-serialisable description (``name`` + parameters) used by checkpoints."""
        return {"name": type(self).__name__, **self._repr_params()}


def _bisect_log_snr(path: GaussianPath, lam: Tensor, iters: int = 80) -> Tensor:
    """Invert a strictly increasing λ(t) by bisection on ``[t_min, t_max]`` in float64.

    Values of λ outside ``[λ(t_min), λ(t_max)]`` are clamped to the interval ends.
    """
    lam64 = lam.to(torch.float64)
    lo = torch.full_like(lam64, path.t_min)
    hi = torch.full_like(lam64, path.t_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = path._log_snr(mid) < lam64
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (0.5 * (lo + hi)).to(lam.dtype)


# ---------------------------------------------------------------------------------------
# Score-SDE families
# ---------------------------------------------------------------------------------------


class VP(GaussianPath):
    r"""Variance-preserving path of the score SDE with linear β (Song et al. 2021; DDPM's continuous limit).

    In SDE time :math:`s = 1 - t`: :math:`\beta(s) = \beta_{min} + s(\beta_{max} - \beta_{min})`,
    :math:`\log\alpha = -\tfrac14 s^2(\beta_{max}-\beta_{min}) - \tfrac12 s\beta_{min}`,
    :math:`\sigma = \sqrt{1-\alpha^2}`. The inverse of λ is closed form (as in DPM-Solver,
    Lu et al. 2022): :math:`s = 2L / (\beta_{min} + \sqrt{\beta_{min}^2 + 2\Delta\beta L})` with
    :math:`L = \log(1 + e^{-2\lambda})`.

    Safe interval: ``[0, 1 - 1e-3]`` (σ → 0 and σ̇ → ∞ at ``t = 1``; 1e-3 is score_sde's
    and DPM-Solver's sampling ``eps``).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 0.0, t_max: float = 1.0 - 1e-3):
        self.beta_min = _check_positive("beta_min", beta_min, strict=False)
        self.beta_max = _check_positive("beta_max", beta_max)
        if self.beta_min >= self.beta_max:
            raise ValueError(f"need beta_min < beta_max, got beta_min={beta_min!r}, beta_max={beta_max!r}")
        self.t_min, self.t_max = _check_interval(t_min, t_max)

    def _repr_params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, **super()._repr_params()}

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (1 - t) * (self.beta_max - self.beta_min)

    def _log_alpha(self, t: Tensor) -> Tensor:
        s = 1 - t
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def _d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._beta(t) * self._alpha(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        la = self._log_alpha(t)
        return -0.5 * self._beta(t) * torch.exp(2 * la) / torch.sqrt(-torch.expm1(2 * la))

    def _log_snr(self, t: Tensor) -> Tensor:
        la = self._log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def _d_log_snr(self, t: Tensor) -> Tensor:
        # λ̇ = ½β/σ²
        return 0.5 * self._beta(t) / (-torch.expm1(2 * self._log_alpha(t)))

    def _s_of_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # Root of ¼Δβ s² + ½β_min s + log α = 0, written without cancellation.
        m = -log_alpha
        db = self.beta_max - self.beta_min
        return 4 * m / (self.beta_min + torch.sqrt(self.beta_min**2 + 4 * db * m))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        return 1 - self._s_of_log_alpha(log_alpha)


class SubVP(VP):
    r"""Sub-VP path of the score SDE (Song et al. 2021): same α as :class:`VP`, :math:`\sigma = 1 - \alpha^2`.

    Inverse of λ in closed form: :math:`\alpha = 2e^{\lambda}/(1 + \sqrt{1 + 4e^{2\lambda}})`, then
    the VP quadratic for ``s``.

    Safe interval: near the data σ ≈ β_min·s is a hundred times smaller than VP's √(β_min s),
    so conversions into noise or score lose digits much sooner. By default ``t_max`` is where
    sub-VP reaches the noise level (log-SNR) of :class:`VP` at ``1 − 1e-3`` (t_max ≈ 0.977).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 0.0, t_max: float | None = None):
        super().__init__(beta_min, beta_max, t_min, 1.0 - 1e-3)
        if t_max is None:
            vp = VP(beta_min, beta_max)
            lam_max = vp._log_snr(torch.tensor(vp.t_max, dtype=torch.float64))
            t_max = float(self._t_of_log_snr(lam_max))
        self.t_min, self.t_max = _check_interval(t_min, t_max)

    def _sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(2 * self._log_alpha(t))

    def _d_sigma(self, t: Tensor) -> Tensor:
        # σ = 1 − α², σ̇ = −2αα̇ = −β α²
        return -self._beta(t) * torch.exp(2 * self._log_alpha(t))

    def _log_snr(self, t: Tensor) -> Tensor:
        la = self._log_alpha(t)
        return la - torch.log(-torch.expm1(2 * la))

    def _d_log_snr(self, t: Tensor) -> Tensor:
        la = self._log_alpha(t)
        a2 = torch.exp(2 * la)
        return 0.5 * self._beta(t) + self._beta(t) * a2 / (-torch.expm1(2 * la))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        # log α from α² e^λ + α − e^λ = 0, stable for both signs of λ.
        pos = lam > 0
        lam_p = torch.where(pos, lam, torch.zeros_like(lam))
        lam_n = torch.where(pos, torch.zeros_like(lam), lam)
        e = torch.exp(-lam_p)
        la_pos = -torch.log(0.5 * (e + torch.sqrt(e * e + 4)))
        la_neg = lam_n + math.log(2.0) - torch.log1p(torch.sqrt(1 + 4 * torch.exp(2 * lam_n)))
        log_alpha = torch.where(pos, la_pos, la_neg)
        return 1 - self._s_of_log_alpha(log_alpha)


class VE(GaussianPath):
    r"""Variance-exploding path (Song et al. 2021): α = 1, geometric σ.

    :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^{1-t}`; :math:`\lambda = -\log\sigma`,
    so :math:`t(\lambda) = 1 - (-\lambda - \log\sigma_{min})/\log(\sigma_{max}/\sigma_{min})`.
    Safe on all of ``[0, 1]``. The base at ``t = 0`` is :math:`N(0, \sigma_{max}^2 I)`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0, t_max: float = 1.0):
        self.sigma_min = _check_positive("sigma_min", sigma_min)
        self.sigma_max = _check_positive("sigma_max", sigma_max)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        self.t_min, self.t_max = _check_interval(t_min, t_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _repr_params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **super()._repr_params()}

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp((1 - t) * self._log_ratio)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return -self._log_ratio * self._sigma(t)

    def _log_snr(self, t: Tensor) -> Tensor:
        return -(math.log(self.sigma_min) + (1 - t) * self._log_ratio)

    def _d_log_snr(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self._log_ratio)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return 1 - (-lam - math.log(self.sigma_min)) / self._log_ratio


class EDM(VE):
    r"""The EDM noise range (Karras et al. 2022, "Elucidating the Design Space..."): VE with
    σ ∈ [0.002, 80] and the data scale ``sigma_data`` used by EDM preconditioning and loss
    weighting. Time is log-linear in σ; EDM's ρ-spaced steps are a *grid* (``solvers``).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, **kw):
        super().__init__(sigma_min, sigma_max, **kw)
        self.sigma_data = _check_positive("sigma_data", sigma_data)

    def _repr_params(self) -> dict:
        return {**super()._repr_params(), "sigma_data": self.sigma_data}


# ---------------------------------------------------------------------------------------
# Flow-matching style paths
# ---------------------------------------------------------------------------------------


class Linear(GaussianPath):
    r"""Rectified flow / conditional OT path (Liu et al. 2023; Lipman et al. 2023): α = t, σ = 1 − t.

    :math:`\lambda = \log t - \log(1-t)`, :math:`t(\lambda) = \mathrm{sigmoid}(\lambda)`.
    Safe interval ``[1e-3, 1 - 1e-3]`` by default: at ``t = 0`` the data prediction from a
    noise prediction divides by α = 0, at ``t = 1`` the score divides by σ = 0. A
    velocity-prediction ODE may be run on all of ``[0, 1]`` by passing ``t_min=0, t_max=1``.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        self.t_min, self.t_max = _check_interval(t_min, t_max)

    def _alpha(self, t: Tensor) -> Tensor:
        return t

    def _sigma(self, t: Tensor) -> Tensor:
        return 1 - t

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def _log_snr(self, t: Tensor) -> Tensor:
        return torch.log(t) - torch.log1p(-t)

    def _d_log_snr(self, t: Tensor) -> Tensor:
        return 1 / (t * (1 - t))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(lam)


class Trig(GaussianPath):
    r"""Trigonometric / GVP path (Albergo & Vanden-Eijnden 2023; Ma et al. 2024, SiT):
    α = sin(πt/2), σ = cos(πt/2); :math:`t(\lambda) = \tfrac{2}{\pi}\arctan(e^{\lambda})`.
    Safe interval ``[1e-3, 1 - 1e-3]`` by default (see :class:`Linear`).
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        self.t_min, self.t_max = _check_interval(t_min, t_max)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def _log_snr(self, t: Tensor) -> Tensor:
        return torch.log(torch.tan(0.5 * math.pi * t))

    def _d_log_snr(self, t: Tensor) -> Tensor:
        return math.pi / torch.sin(math.pi * t)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return (2 / math.pi) * torch.atan(torch.exp(lam))


class Cosine(GaussianPath):
    r"""Improved-DDPM cosine schedule (Nichol & Dhariwal 2021), continuous as in DPM-Solver.

    With diffusion time :math:`\tau = 1 - t` and :math:`\theta(\tau) = \frac{\tau + s}{1 + s}\frac{\pi}{2}`:
    :math:`\alpha = \cos\theta(\tau)/\cos\theta(0)`, :math:`\sigma = \sqrt{1-\alpha^2}`.
    α reaches 0 at τ = 1, so sampling starts at τ = 0.9946 (``t_min = 0.0054``), DPM-Solver's
    ``T`` for this schedule, safely inside iDDPM's β ≤ 0.999 clip. The inverse of λ is closed form.
    """

    def __init__(self, s: float = 0.008, t_min: float | None = None, t_max: float = 1 - 1e-3):
        self.s = _check_positive("s", s)
        self.t_min, self.t_max = _check_interval(1 - 0.9946 if t_min is None else t_min, t_max)
        self._log_cos0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _repr_params(self) -> dict:
        return {"s": self.s, **super()._repr_params()}

    def _theta(self, t: Tensor) -> Tensor:
        return ((1 - t) + self.s) / (1 + self.s) * (0.5 * math.pi)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.cos(self._theta(t)) / math.exp(self._log_cos0)

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(1 - self._alpha(t) ** 2, min=0))

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.sin(self._theta(t)) * (0.5 * math.pi / (1 + self.s)) / math.exp(self._log_cos0)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        theta = torch.acos(torch.clamp(torch.exp(log_alpha + self._log_cos0), -1, 1))
        tau = theta * 2 * (1 + self.s) / math.pi - self.s
        return 1 - tau


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> tuple[Tensor, Tensor]:
    """Piecewise-linear interpolation with linear extrapolation; returns (value, slope)."""
    xp = xp.to(device=x.device, dtype=x.dtype)
    fp = fp.to(device=x.device, dtype=x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    slope = (f1 - f0) / (x1 - x0)
    return f0 + slope * (x - x0), slope


class Discrete(GaussianPath):
    r"""A DDPM β table made continuous (Ho et al. 2020; continuous form of DPM-Solver, Lu et al. 2022).

    :math:`\log\alpha_k = \tfrac12\sum_{i\le k}\log(1-\beta_i)` at diffusion time
    :math:`\tau_k = k/N`, with :math:`\log\alpha = 0` at τ = 0, is interpolated piecewise
    linearly in τ = 1 − t. Its inverse is exact (log α is piecewise linear and monotone).
    Safe interval ``[0, 1 - 1/N]`` (the first training step).
    """

    def __init__(self, betas: Sequence[float] | Tensor, t_min: float = 0.0, t_max: float | None = None):
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if b.numel() < 2:
            raise ValueError(f"betas must have at least 2 entries, got {b.numel()}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError(f"every beta must lie in (0, 1), got min={float(b.min())!r}, max={float(b.max())!r}")
        self.betas = b
        n = b.numel()
        self.num_steps = n
        la = 0.5 * torch.cumsum(torch.log1p(-b), 0)
        # Table in increasing t: t = 1 − τ, τ_k = k/N, k = N … 0.
        self._t_table = torch.flip(1 - torch.arange(0, n + 1, dtype=torch.float64) / n, [0])
        self._la_table = torch.flip(torch.cat([torch.zeros(1, dtype=torch.float64), la]), [0])
        self.t_min, self.t_max = _check_interval(t_min, 1 - 1 / n if t_max is None else t_max)

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Discrete":
        """DDPM's linear β table (diffusers ``beta_schedule="linear"``)."""
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "Discrete":
        """Stable Diffusion's table: √β linear (diffusers ``"scaled_linear"``)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2)

    def _repr_params(self) -> dict:
        return {"num_steps": self.num_steps, **super()._repr_params()}

    def config(self) -> dict:
        return {"name": "Discrete", "betas": self.betas.tolist(), "t_min": self.t_min, "t_max": self.t_max}

    def _log_alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        la, slope = _interp(t, self._t_table, self._la_table)
        return la.clamp(max=0.0), slope  # t = 1 - ulp must not give log α > 0 (σ² < 0, a NaN log-SNR)

    def _coefficients(self, t: Tensor) -> PathCoefficients:
        la, slope = self._log_alpha(t)  # one table look-up for all four values
        alpha, one_minus_a2 = torch.exp(la), -torch.expm1(2 * la)
        sigma = torch.sqrt(one_minus_a2)
        return PathCoefficients(alpha, sigma, alpha * slope, -alpha * alpha * slope / sigma)

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t)[0])

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)[0]))

    def _d_alpha(self, t: Tensor) -> Tensor:
        la, slope = self._log_alpha(t)
        return torch.exp(la) * slope

    def _d_sigma(self, t: Tensor) -> Tensor:
        la, slope = self._log_alpha(t)
        return -torch.exp(2 * la) * slope / torch.sqrt(-torch.expm1(2 * la))

    def _log_snr(self, t: Tensor) -> Tensor:
        la = self._log_alpha(t)[0]
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def _d_log_snr(self, t: Tensor) -> Tensor:
        la, slope = self._log_alpha(t)
        return slope / (-torch.expm1(2 * la))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam)
        t, _ = _interp(log_alpha, self._la_table, self._t_table)
        return t


class Shifted(GaussianPath):
    r"""Resolution shift of SD3/Flux (Esser et al. 2024): a monotone time warp of ``path``.

    With noise time :math:`u = 1 - t`, the warped time is
    :math:`u' = \frac{k u}{1 + (k-1) u}` (``k = shift``), and
    :math:`\alpha'(t) = \alpha(1-u')`, :math:`\sigma'(t) = \sigma(1-u')`. For
    :class:`Linear` this lowers λ by exactly :math:`\log k`; ``k > 1`` spends more time at
    high noise.
    """

    def __init__(self, path: GaussianPath, shift: float):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a GaussianPath, got {type(path).__name__}")
        self.base = path
        self.shift = _check_positive("shift", shift)
        self.t_min = float(self._unwarp(torch.tensor(path.t_min, dtype=torch.float64)))
        self.t_max = float(self._unwarp(torch.tensor(path.t_max, dtype=torch.float64)))

    def _repr_params(self) -> dict:
        return {"path": self.base, "shift": self.shift}

    def config(self) -> dict:
        return {"name": "Shifted", "path": self.base.config(), "shift": self.shift}

    def _warp(self, t: Tensor) -> Tensor:
        u = 1 - t
        return 1 - self.shift * u / (1 + (self.shift - 1) * u)

    def _d_warp(self, t: Tensor) -> Tensor:
        u = 1 - t
        return self.shift / (1 + (self.shift - 1) * u) ** 2

    def _unwarp(self, w: Tensor) -> Tensor:
        up = 1 - w
        return 1 - up / (self.shift - (self.shift - 1) * up)

    def _alpha(self, t: Tensor) -> Tensor:
        return self.base._alpha(self._warp(t))

    def _sigma(self, t: Tensor) -> Tensor:
        return self.base._sigma(self._warp(t))

    def _d_alpha(self, t: Tensor) -> Tensor:
        return self.base._d_alpha(self._warp(t)) * self._d_warp(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self.base._d_sigma(self._warp(t)) * self._d_warp(t)

    def _log_snr(self, t: Tensor) -> Tensor:
        return self.base._log_snr(self._warp(t))

    def _d_log_snr(self, t: Tensor) -> Tensor:
        return self.base._d_log_snr(self._warp(t)) * self._d_warp(t)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return self._unwarp(self.base._t_of_log_snr(lam))


class Custom(GaussianPath):
    r"""A path from user callables α(t), σ(t) (elementwise torch functions).

    Derivatives come from autograd unless ``d_alpha``/``d_sigma`` are given; the inverse of
    λ is found by bisection in float64 on ``[t_min, t_max]`` (λ must be strictly increasing
    there; it is checked on a grid at construction).
    """

    def __init__(
        self,
        alpha: Callable[[Tensor], Tensor],
        sigma: Callable[[Tensor], Tensor],
        t_min: float = 1e-3,
        t_max: float = 1 - 1e-3,
        d_alpha: Callable[[Tensor], Tensor] | None = None,
        d_sigma: Callable[[Tensor], Tensor] | None = None,
    ):
        if not callable(alpha) or not callable(sigma):
            raise TypeError("alpha and sigma must be callables t -> Tensor")
        self.t_min, self.t_max = _check_interval(t_min, t_max)
        self._alpha_fn, self._sigma_fn = alpha, sigma
        self._d_alpha_fn, self._d_sigma_fn = d_alpha, d_sigma
        grid = torch.linspace(self.t_min, self.t_max, 257, dtype=torch.float64)
        a, s = self._alpha(grid), self._sigma(grid)
        if not (torch.isfinite(a).all() and torch.isfinite(s).all()) or (a <= 0).any() or (s <= 0).any():
            raise ValueError("custom alpha and sigma must be finite and > 0 on [t_min, t_max]")
        if (torch.diff(self._log_snr(grid)) <= 0).any():
            raise ValueError("custom path: log(alpha/sigma) must be strictly increasing on [t_min, t_max]")

    @staticmethod
    def _derivative(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(tt).sum(), tt)
        return g

    def _alpha(self, t: Tensor) -> Tensor:
        return self._alpha_fn(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self._sigma_fn(t)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return self._d_alpha_fn(t) if self._d_alpha_fn else self._derivative(self._alpha_fn, t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self._d_sigma_fn(t) if self._d_sigma_fn else self._derivative(self._sigma_fn, t)

    def config(self) -> dict:
        raise TypeError("a Custom path holds Python callables and cannot be written to a config")
