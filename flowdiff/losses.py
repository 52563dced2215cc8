r"""Training objectives: regression losses on Gaussian paths and stochastic interpolants.

Every loss object is called the same way, so the Trainer never branches on the family::

    out = loss(model, x1, y=None, x0=None, generator=None)   # -> LossOutput(loss, per_sample, t)
    out.loss.backward()

``model(x_t, t)`` (or ``model(x_t, t, y=y)`` when labels are given) receives ``t`` of shape
``(B,)``. ``per_sample`` (shape ``(B,)``, detached) is each sample's weighted loss, for
logging against ``t``; no sample is ever coupled to another through a batch statistic.

Gaussian paths
--------------
For :math:`x_t = \alpha x_1 + \sigma\varepsilon` (``x1`` data, ``ε ~ N(0, I)``), a model of
prediction type ``p`` is regressed on the conditional target ``path.target(p, x1, ε, t)``
(ε, x₁, :math:`\dot\alpha x_1 + \dot\sigma\varepsilon`, :math:`-\varepsilon/\sigma` or
:math:`\alpha\varepsilon - \sigma x_1`); the minimiser is the conditional expectation, i.e. the
exact field (Vincent 2011; Ho et al. 2020; Lipman et al. 2023):

.. math::

    \mathcal L = E_{t, x_1, \varepsilon}\big[w(t)\,\overline{(f_\theta(x_t, t) - f^\star)^2}\big],

where the bar is the mean over the non-batch dimensions (a constant factor away from the sum).

**One error, five scales.** At fixed :math:`(x_t, t)` the predictions are affine images of
each other, so an error :math:`\Delta\hat x` of the data prediction is an error of every
other prediction by an exact factor (:math:`\mathrm{SNR} = \alpha^2/\sigma^2 = e^{2\lambda}`,
:math:`\dot\lambda = \dot\alpha/\alpha - \dot\sigma/\sigma`):

* data: :math:`\Delta\hat x`, so :math:`k_{data} = 1`;
* noise: :math:`-(\alpha/\sigma)\Delta\hat x`, :math:`k_{noise} = \mathrm{SNR} = \alpha^2/\sigma^2`;
* score: :math:`(\alpha/\sigma^2)\Delta\hat x`, :math:`k_{score} = \alpha^2/\sigma^4`;
* v: :math:`-((\alpha^2+\sigma^2)/\sigma)\Delta\hat x`, :math:`k_v = (\alpha^2+\sigma^2)^2/\sigma^2`;
* velocity: :math:`\alpha\dot\lambda\,\Delta\hat x`, :math:`k_{velocity} = \alpha^2\dot\lambda^2`,

where :math:`k_p = \lVert\Delta p\rVert^2/\lVert\Delta\hat x\rVert^2` (:func:`error_scale`)
(from :math:`x = \alpha\hat x + \sigma\hat\varepsilon` held fixed: :math:`\Delta\hat\varepsilon = -(\alpha/\sigma)\Delta\hat x`,
:math:`\Delta u = \dot\alpha\Delta\hat x + \dot\sigma\Delta\hat\varepsilon = \alpha\dot\lambda\Delta\hat x`,
:math:`\Delta v = \alpha\Delta\hat\varepsilon - \sigma\Delta\hat x`, :math:`\Delta s = -\Delta\hat\varepsilon/\sigma`). The
same factors relate the residuals to the conditional targets, since the targets obey
:math:`x_t = \alpha x_1 + \sigma\varepsilon` exactly.

**Weightings** are therefore defined once, as a weight :math:`w_{data}(t)` on the
*data-prediction* MSE — the convention of Hang et al. 2023 (min-SNR) and Karras et al. 2022
(EDM) — and applied to a model of prediction ``p`` as :math:`w_p = w_{data}/k_p`. The same
model error then gets the same loss whatever the network outputs:

* ``snr``: :math:`w_{data} = \mathrm{SNR}`; on the noise MSE 1 (Ho et al. 2020's ε-loss);
* ``min-snr``: :math:`w_{data} = \min(\mathrm{SNR}, \gamma)`; on the noise MSE :math:`\min(1, \gamma/\mathrm{SNR})`;
* ``edm``: :math:`w_{data} = (\tilde\sigma^2+\sigma_d^2)/(\tilde\sigma\sigma_d)^2` with
  :math:`\tilde\sigma = \sigma/\alpha`; on the noise MSE :math:`(\tilde\sigma^2+\sigma_d^2)/\sigma_d^2`;
* ``likelihood``: :math:`w_{data} = 2\dot\lambda\,\mathrm{SNR} = \tfrac{d}{dt}\mathrm{SNR}`; on the noise
  MSE :math:`2\dot\lambda`; on the score MSE :math:`g^2 = 2\sigma^2\dot\lambda`;
* ``none``: unit weight on the model's *own* MSE (so, alone among them, it depends on the prediction).

* min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
  the paper writes the weight on the x₀ loss; γ = 5 by default. For ε-prediction this is
  diffusers' ``min(SNR, γ)/SNR``, for v-prediction on a VP path ``min(SNR, γ)/(SNR + 1)``.
* EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
  Models"): :math:`\lambda(\tilde\sigma)` on the denoiser loss in σ-space, where the denoiser
  is our data prediction and :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}`.
* Likelihood weighting (Song, Durkan, Murray & Ermon 2021, "Maximum Likelihood Training of
  Score-Based Diffusion Models"): weight :math:`g^2` on the score MSE, where g is the
  diffusion coefficient of the forward (noising) SDE. Derivation: in noising time
  ``s = 1 − t`` the path is the marginal of :math:`dx = f x\,ds + g\,dW` with
  :math:`f = d\log\alpha/ds` and :math:`d\sigma^2/ds = 2f\sigma^2 + g^2`, so
  :math:`g^2 = 2\sigma^2\,d(\log\sigma - \log\alpha)/ds = 2\sigma^2\dot\lambda` in our time.
  Check, VP: :math:`\dot\lambda = \beta/(2\sigma^2)` gives :math:`g^2 = \beta(s)`. The weighted
  loss is then the continuous-time ELBO of Kingma et al. 2021 ("Variational Diffusion Models"),
  :math:`\tfrac12\int \tfrac{d}{dt}\mathrm{SNR}\,\lVert x_1 - \hat x\rVert^2 dt`, up to the factor
  ½, the data dimension (we average over dimensions) and the ``t``-independent terms.
* ``none`` is the plain MSE of whatever the model outputs (flow matching's velocity loss,
  Ho et al.'s ε-loss, ...), so it is the one weighting that depends on the prediction type.
* A callable ``w(t) -> Tensor (B,)`` is a weight on the data MSE, like the named ones;
  :class:`CustomWeighting` takes another ``reference`` prediction (or ``None`` for the
  model's own MSE).

Stochastic interpolants
-----------------------
For :math:`x_t = I(t, x_0, x_1) + \gamma(t) z` (Albergo, Boffi & Vanden-Eijnden 2023,
"Stochastic Interpolants: A Unifying Framework for Flows and Diffusions") the objectives

.. math::

    L_b = E[\tfrac12|\hat b|^2 - (\partial_t I + \dot\gamma z)\cdot\hat b],\quad
    L_v = E[\tfrac12|\hat v|^2 - \partial_t I\cdot\hat v],\quad
    L_s = E[\tfrac12|\hat s|^2 + \gamma^{-1}z\cdot\hat s],\quad
    L_\eta = E[\tfrac12|\hat\eta|^2 - z\cdot\hat\eta]

are, with target :math:`T` (:math:`\partial_t I + \dot\gamma z`, :math:`\partial_t I`,
:math:`-z/\gamma`, :math:`z`), :math:`\tfrac12|\hat f|^2 - T\cdot\hat f = \tfrac12|\hat f - T|^2 - \tfrac12|T|^2`:
the MSE to the target up to a model-independent term. :class:`InterpolantLoss` uses the MSE
(``objective="mse"``, so the exact field's loss is the irreducible conditional variance and
the numbers read like any regression loss) or the quadratic form itself
(``objective="quadratic"``, whose *value* has a much smaller variance near the endpoints for
the score, because the :math:`|z|^2/\gamma^2` term is gone). Gradients are identical.
Antithetic sampling evaluates both :math:`I \pm \gamma z` and averages, which cancels the
:math:`O(1/\gamma)` term :math:`\gamma^{-1}z\cdot\hat s` of the score objective near the ends.

Time samplers
-------------
:class:`UniformTime`, :class:`LogitNormalTime` (Esser et al. 2024, SD3), :class:`EDMTime`
(EDM's log-normal σ̃) and :class:`ImportanceTime` (any density on ``[t_min, t_max]``, with
weights that keep the *uniform-time* objective unbiased). Sampled times are clipped into the
path's safe interval ``[t_min, t_max]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from ._utils import batch_time, check_time_range, expand_like
from .couplings import Coupling
from .paths import PREDICTIONS, GaussianPath, StochasticInterpolant
from .paths.interpolants import INTERPOLANT_TARGETS

__all__ = [
    "OBJECTIVES",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "CustomWeighting",
    "EDMTime",
    "EDMWeighting",
    "GaussianPathLoss",
    "ImportanceTime",
    "InterpolantLoss",
    "LikelihoodWeighting",
    "LogitNormalTime",
    "LossOutput",
    "MinSNRWeighting",
    "NoWeighting",
    "SNRWeighting",
    "TimeSampler",
    "UniformTime",
    "Weighting",
    "available_interpolant_targets",
    "available_objectives",
    "available_predictions",
    "available_time_samplers",
    "available_weightings",
    "error_scale",
    "loss_from_config",
    "make_time_sampler",
    "make_weighting",
    "time_sampler_from_config",
]

#: Named weightings (see the module docstring for their definition on the data MSE).
WEIGHTINGS = ("none", "snr", "min-snr", "edm", "likelihood")
#: Named time samplers accepted as ``time_sampler=`` strings.
TIME_SAMPLERS = ("uniform", "logit-normal", "edm")
#: Forms of the interpolant objectives.
OBJECTIVES = ("mse", "quadratic")

Model = Callable[..., Tensor]


def available_weightings() -> tuple[str, ...]:
    """Names accepted by ``GaussianPathLoss(weighting=...)`` (the CLI's ``--weighting``)."""
    return WEIGHTINGS


def available_time_samplers() -> tuple[str, ...]:
    """Names accepted by ``time_sampler=`` (``"edm"`` only for Gaussian paths)."""
    return TIME_SAMPLERS


def available_predictions() -> tuple[str, ...]:
    """Prediction types of :class:`GaussianPathLoss`."""
    return tuple(PREDICTIONS)


def available_interpolant_targets() -> tuple[str, ...]:
    """Targets of :class:`InterpolantLoss`."""
    return tuple(INTERPOLANT_TARGETS)


def available_objectives() -> tuple[str, ...]:
    """Forms of :class:`InterpolantLoss` (``"mse"`` or ``"quadratic"``)."""
    return OBJECTIVES


@dataclass
class LossOutput:
    """What a loss returns.

    Attributes:
        loss: scalar mean of ``per_sample`` with its autograd graph (what to backpropagate).
        per_sample: each sample's weighted loss, shape ``(B,)``, detached (for logging).
        t: the times used, shape ``(B,)``.
    """

    loss: Tensor
    per_sample: Tensor
    t: Tensor


# =========================================================================================
# Time samplers
# =========================================================================================


def _check_unit_interval(t_min: float, t_max: float) -> tuple[float, float]:
    for name, v in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite number, got {v!r}")
    if not (0.0 <= t_min < t_max <= 1.0):
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min!r}, t_max={t_max!r}")
    return float(t_min), float(t_max)


def _check_finite_number(name: str, value: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {name}={value!r}")
    return float(value)


class TimeSampler:
    """Draws training times ``t`` and importance weights.

    ``sample(n, generator, dtype, device) -> (t, weight)``, both of shape ``(n,)``: the loss
    multiplies each sample by ``weight``. Samplers that *define* the time distribution of the
    objective (uniform, logit-normal, EDM) return unit weights; :class:`ImportanceTime`
    returns the likelihood ratio that keeps the uniform-time objective unbiased.
    """

    t_min: float = 0.0
    t_max: float = 1.0

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - interface

    def config(self) -> dict:
        """A JSON-serialisable description (see :func:`time_sampler_from_config`)."""
        raise TypeError(f"{type(self).__name__} has no config; give it a config() method to record it in checkpoints")

    @staticmethod
    def _check_n(n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got n={n!r}")
        return n


class UniformTime(TimeSampler):
    """``t ~ U[t_min, t_max]`` with unit weights."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max = _check_unit_interval(t_min, t_max)

    def __repr__(self) -> str:
        return f"UniformTime(t_min={self.t_min!r}, t_max={self.t_max!r})"

    def config(self) -> dict:
        return {"name": "uniform", "t_min": self.t_min, "t_max": self.t_max}

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        u = torch.rand(n, generator=generator, dtype=dtype, device=device)
        return self.t_min + (self.t_max - self.t_min) * u, torch.ones(n, dtype=dtype, device=device)


class LogitNormalTime(TimeSampler):
    r"""Logit-normal times :math:`t = \mathrm{sigmoid}(m + s\,n)`, :math:`n \sim N(0, 1)`, unit weights.

    Esser et al. 2024 ("Scaling Rectified Flow Transformers for High-Resolution Image
    Synthesis", SD3) found ``m = 0, s = 1`` best for rectified flow: it concentrates training on
    intermediate times. Their convention has noise at t = 1; ours has noise at t = 0, so
    ``mean = m`` here corresponds to ``−m`` there. CDF:
    :math:`F(t) = \Phi((\mathrm{logit}(t) - m)/s)`.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean = _check_finite_number("mean", mean)
        self.std = _check_finite_number("std", std, positive=True)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean!r}, std={self.std!r})"

    def config(self) -> dict:
        return {"name": "logit-normal", "mean": self.mean, "std": self.std}

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        z = torch.randn(n, generator=generator, dtype=dtype, device=device)
        return torch.sigmoid(self.mean + self.std * z), torch.ones(n, dtype=dtype, device=device)


class EDMTime(TimeSampler):
    r"""EDM's training noise levels (Karras et al. 2022): :math:`\ln\tilde\sigma \sim N(P_{mean}, P_{std}^2)`.

    With :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}`, the time is
    ``t = path.t_of_log_snr(−ln σ̃)``, so the same distribution of noise levels is used on any
    Gaussian path. Unit weights. Noise levels outside the path's range are clipped by the loss
    to its safe interval. Defaults ``P_mean = −1.2``, ``P_std = 1.2`` are EDM's.
    """

    def __init__(self, path: GaussianPath, p_mean: float = -1.2, p_std: float = 1.2):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"EDMTime needs a flowdiff.paths.GaussianPath, got {type(path).__name__}")
        self.path = path
        self.p_mean = _check_finite_number("p_mean", p_mean)
        self.p_std = _check_finite_number("p_std", p_std, positive=True)
        self.t_min, self.t_max = path.t_min, path.t_max

    def __repr__(self) -> str:
        return f"EDMTime({self.path!r}, p_mean={self.p_mean!r}, p_std={self.p_std!r})"

    def config(self) -> dict:
        # The path is recorded by the loss that owns the sampler.
        return {"name": "edm", "p_mean": self.p_mean, "p_std": self.p_std}

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=dtype, device=device)
        t = self.path._t_of_log_snr(-log_sigma)
        return t.clamp(self.t_min, self.t_max), torch.ones(n, dtype=dtype, device=device)


class ImportanceTime(TimeSampler):
    r"""Importance sampling of ``t`` from a density ``q`` on ``[t_min, t_max]``, unbiased for uniform time.

    The objective stays :math:`E_{t\sim U[t_{min}, t_{max}]}[\ell(t)]`: times are drawn from
    ``q`` and each sample gets the likelihood ratio

    .. math::  w(t) = \frac{1/(t_{max} - t_{min})}{q(t)}, \qquad E_q[w\,\ell] = E_U[\ell],\ E_q[w] = 1.

    A good ``q`` is proportional to the typical per-sample loss (e.g. Song et al. 2021 sample
    ∝ the likelihood weight to reduce the variance of the likelihood objective).

    ``density`` is a callable on ``[t_min, t_max]`` (unnormalised, vectorised over a float64
    tensor) or a table of values on ``num_points`` equally spaced points (``(K,)``, K ≥ 2) from
    ``t_min`` to ``t_max``. Either way ``q`` is the *piecewise-linear* interpolant of the table
    (``num_points = 1025`` samples of a callable), normalised exactly; it is sampled exactly
    by inverting its piecewise-quadratic CDF, so the weights are exact for the ``q`` that is
    really sampled. The density must be finite and > 0 at every table point.
    """

    def __init__(
        self,
        density: Callable[[Tensor], Tensor] | Sequence[float] | Tensor,
        t_min: float = 0.0,
        t_max: float = 1.0,
        num_points: int = 1025,
    ):
        self.t_min, self.t_max = _check_unit_interval(t_min, t_max)
        if callable(density):
            if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
                raise ValueError(f"num_points must be an int >= 2, got num_points={num_points!r}")
            grid = torch.linspace(self.t_min, self.t_max, num_points, dtype=torch.float64)
            values = torch.as_tensor(density(grid), dtype=torch.float64)
            if values.shape != grid.shape:
                raise ValueError(
                    f"density(t) must return one value per time: got shape {tuple(values.shape)} for t of shape {tuple(grid.shape)}"
                )
        else:
            values = torch.as_tensor(density, dtype=torch.float64).flatten().clone()
            if values.numel() < 2:
                raise ValueError(f"a tabulated density needs at least 2 values, got {values.numel()}")
            grid = torch.linspace(self.t_min, self.t_max, values.numel(), dtype=torch.float64)
        if not torch.isfinite(values).all() or (values <= 0).any():
            bad = values[~torch.isfinite(values) | (values <= 0)][0].item()
            raise ValueError(
                f"the importance density must be finite and > 0 on [t_min, t_max] (got {bad!r}); "
                "a zero density would leave times that are never sampled and bias the objective"
            )
        h = grid[1] - grid[0]
        masses = 0.5 * h * (values[1:] + values[:-1])  # trapezoids = exact mass of the linear interpolant
        total = masses.sum()
        self._grid, self._h = grid, float(h)
        self._values = values / total  # normalised density at the grid points
        self._cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(masses / total, 0)])
        self._cum[-1] = 1.0

    def __repr__(self) -> str:
        return f"ImportanceTime(num_points={self._grid.numel()}, t_min={self.t_min!r}, t_max={self.t_max!r})"

    def config(self) -> dict:
        # The normalised table defines q exactly, so it rebuilds the same sampler.
        return {"name": "importance", "values": self._values.tolist(), "t_min": self.t_min, "t_max": self.t_max}

    def density(self, t: Tensor) -> Tensor:
        """The normalised sampling density :math:`q(t)` (piecewise linear), same shape as ``t``."""
        t64 = torch.as_tensor(t, dtype=torch.float64).cpu()
        k = ((t64 - self.t_min) / self._h).floor().clamp(0, self._grid.numel() - 2).long()
        frac = (t64 - self._grid[k]) / self._h
        q = self._values[k] * (1 - frac) + self._values[k + 1] * frac
        inside = (t64 >= self.t_min) & (t64 <= self.t_max)
        return torch.where(inside, q, torch.zeros_like(q)).to(torch.as_tensor(t).dtype)

    def cdf(self, t: Tensor) -> Tensor:
        """The exact CDF of :math:`q` (piecewise quadratic)."""
        t64 = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(self.t_min, self.t_max)
        k = ((t64 - self.t_min) / self._h).floor().clamp(0, self._grid.numel() - 2).long()
        u = t64 - self._grid[k]
        qa, qb = self._values[k], self._values[k + 1]
        return self._cum[k] + qa * u + 0.5 * (qb - qa) / self._h * u * u

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        r = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        cum = self._cum.to(r.device)
        values = self._values.to(r.device)
        k = (torch.searchsorted(cum, r, right=True) - 1).clamp(0, values.numel() - 2)
        m = r - cum[k]  # mass to cover inside segment k
        qa, qb = values[k], values[k + 1]
        slope = (qb - qa) / self._h
        # Solve qa·u + ½ slope·u² = m for u in [0, h]; this form is stable for slope of either sign (and 0).
        u = 2 * m / (qa + torch.sqrt(torch.clamp(qa * qa + 2 * slope * m, min=0)))
        u = u.clamp(0, self._h)
        t = self._grid.to(r.device)[k] + u
        q = qa + slope * u
        weight = 1.0 / ((self.t_max - self.t_min) * q)
        return t.to(dtype), weight.to(dtype)


def make_time_sampler(
    sampler: str | TimeSampler,
    path: GaussianPath | StochasticInterpolant | None = None,
) -> TimeSampler:
    """A :class:`TimeSampler` from a name (:data:`TIME_SAMPLERS`) or an instance (returned as is).

    ``"uniform"`` is uniform on the path's safe interval; ``"logit-normal"`` is
    ``LogitNormalTime(0, 1)``; ``"edm"`` is ``EDMTime(path)`` (Gaussian paths only).
    """
    if isinstance(sampler, TimeSampler):
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(f"time_sampler must be a name or a TimeSampler, got {type(sampler).__name__}")
    if sampler not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {sampler!r}; valid: {', '.join(TIME_SAMPLERS)}")
    if sampler == "uniform":
        return UniformTime(*(path.t_min, path.t_max) if path is not None else (0.0, 1.0))
    if sampler == "logit-normal":
        return LogitNormalTime()
    if not isinstance(path, GaussianPath):
        raise ValueError(  # noqa: TRY004 - the name is what is wrong here, not the path's type
            "time_sampler='edm' needs a GaussianPath (noise levels σ/α); valid here: uniform, logit-normal"
        )
    return EDMTime(path)


def time_sampler_from_config(config: dict, path: GaussianPath | StochasticInterpolant | None = None) -> TimeSampler:
    """Rebuild a time sampler from its :meth:`~TimeSampler.config` (``path`` is needed for ``"edm"``)."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name == "uniform":
        return UniformTime(**cfg)
    if name == "logit-normal":
        return LogitNormalTime(**cfg)
    if name == "importance":
        return ImportanceTime(cfg.pop("values"), **cfg)
    if name == "edm":
        if not isinstance(path, GaussianPath):
            raise ValueError("an 'edm' time sampler config needs the GaussianPath it samples for")
        return EDMTime(path, **cfg)
    raise ValueError(f"unknown time sampler config name {name!r}; valid: uniform, logit-normal, importance, edm")


# =========================================================================================
# Weightings
# =========================================================================================


def _coefficients(path: GaussianPath, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return path._alpha(t), path._sigma(t), path._d_log_snr(t)


def error_scale(path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
    r""":math:`k_p(t) = \lVert\Delta p\rVert^2/\lVert\Delta\hat x\rVert^2`: the squared error of prediction ``p``
    per unit squared error of the data prediction, at the same :math:`(x_t, t)`.

    ``data`` 1; ``noise`` α²/σ²; ``score`` α²/σ⁴; ``v`` (α²+σ²)²/σ²; ``velocity`` α²λ̇².
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    a, s, dl = _coefficients(path, t)
    if prediction == "data":
        return torch.ones_like(t)
    if prediction == "noise":
        return (a / s) ** 2
    if prediction == "score":
        return (a / (s * s)) ** 2
    if prediction == "v":
        return ((a * a + s * s) / s) ** 2
    return (a * dl) ** 2


class Weighting:
    r"""A loss weighting, defined as :math:`w_{data}(t)` on the data-prediction MSE.

    :meth:`weight` gives the weight on the MSE of any prediction type,
    :math:`w_p = w_{data}/k_p` (:func:`error_scale`), so that one error costs the same whatever
    the prediction. Subclasses implement :meth:`data_weight`; a weighting whose
    ``reference`` is ``None`` is a weight on the model's own MSE instead (``none``).
    """

    name: str = "custom"
    reference: str | None = "data"

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def weight(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        """Weight on the MSE of ``prediction`` at times ``t`` (shape of ``t``)."""
        return self.data_weight(path, t) / error_scale(path, t, prediction)

    def __call__(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        return self.weight(path, t, prediction)

    def config(self) -> dict:
        """A JSON-serialisable description (see :func:`make_weighting`, which accepts it back)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoWeighting(Weighting):
    """Unit weight on the model's own MSE (plain regression on whatever it predicts)."""

    name, reference = "none", None

    def weight(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        return torch.ones_like(t)

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        raise TypeError("weighting 'none' is a unit weight on the model's own MSE and has no fixed data weight")


class SNRWeighting(Weighting):
    r""":math:`w_{data} = \mathrm{SNR} = \alpha^2/\sigma^2`: the unweighted noise-prediction loss of Ho et al. 2020."""

    name = "snr"

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        a, s, _ = _coefficients(path, t)
        return (a / s) ** 2

    def weight(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        if prediction == "noise":  # exactly 1, without rounding
            return torch.ones_like(t)
        return super().weight(path, t, prediction)


class MinSNRWeighting(Weighting):
    r"""Min-SNR-γ (Hang et al. 2023): :math:`w_{data} = \min(\mathrm{SNR}, \gamma)`.

    On the noise MSE this is :math:`\min(1, \gamma/\mathrm{SNR})`: the ε-loss with its
    low-noise times (SNR > γ) down-weighted, which balances the conflicting gradients of
    different noise levels.
    """

    name = "min-snr"

    def __init__(self, gamma: float = 5.0):
        self.gamma = _check_finite_number("gamma", gamma, positive=True)

    def __repr__(self) -> str:
        return f"MinSNRWeighting(gamma={self.gamma!r})"

    def config(self) -> dict:
        return {"name": self.name, "gamma": self.gamma}

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        a, s, _ = _coefficients(path, t)
        return torch.clamp((a / s) ** 2, max=self.gamma)


class EDMWeighting(Weighting):
    r"""EDM's :math:`\lambda(\tilde\sigma) = (\tilde\sigma^2 + \sigma_d^2)/(\tilde\sigma\,\sigma_d)^2` on the data MSE (Karras et al. 2022).

    :math:`\tilde\sigma = \sigma/\alpha` is the noise level in σ-space. It makes the effective
    loss weight of EDM's preconditioned network output 1 at every noise level. ``sigma_data``
    (σ_d) is the data's standard deviation (0.5 for images in [−1, 1]).
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = _check_finite_number("sigma_data", sigma_data, positive=True)

    def __repr__(self) -> str:
        return f"EDMWeighting(sigma_data={self.sigma_data!r})"

    def config(self) -> dict:
        return {"name": self.name, "sigma_data": self.sigma_data}

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        a, s, _ = _coefficients(path, t)
        sig = s / a
        sd2 = self.sigma_data**2
        return (sig * sig + sd2) / (sig * sig * sd2)


class LikelihoodWeighting(Weighting):
    r"""Likelihood weighting (Song et al. 2021): :math:`g^2 = 2\sigma^2\dot\lambda` on the score MSE.

    On the data MSE :math:`2\dot\lambda\,\mathrm{SNR} = d\,\mathrm{SNR}/dt`, on the noise MSE
    :math:`2\dot\lambda`. With uniform time this is, up to constants, the continuous-time ELBO
    (Kingma et al. 2021); for VP, :math:`g^2 = \beta(1 - t)`.
    """

    name = "likelihood"

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        a, s, dl = _coefficients(path, t)
        return 2 * dl * (a / s) ** 2

    def weight(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        # Closed forms per prediction (fewer roundings than w_data / k_p).
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        _, s, dl = _coefficients(path, t)
        if prediction == "noise":
            return 2 * dl
        if prediction == "score":
            return 2 * s * s * dl
        if prediction == "velocity":
            return 2 / (s * s * dl)
        return super().weight(path, t, prediction)


class CustomWeighting(Weighting):
    r"""A user weight ``fn(t) -> Tensor`` (shape of ``t``) on the MSE of ``reference``.

    ``reference`` ∈ {data, noise, velocity, score, v} makes it prediction-invariant like the
    named weightings (:math:`w_{data} = fn(t)\,k_{reference}(t)`); ``reference=None`` applies
    ``fn`` to the model's own MSE.
    """

    name = "custom"

    def __init__(self, fn: Callable[[Tensor], Tensor], reference: str | None = "data"):
        if not callable(fn):
            raise TypeError(f"fn must be a callable t -> Tensor, got {type(fn).__name__}")
        if reference is not None and reference not in PREDICTIONS:
            raise ValueError(f"unknown reference {reference!r}; valid: None, {', '.join(PREDICTIONS)}")
        self.fn, self.reference = fn, reference

    def __repr__(self) -> str:
        return f"CustomWeighting({getattr(self.fn, '__name__', 'fn')}, reference={self.reference!r})"

    def config(self) -> dict:
        raise TypeError("a CustomWeighting holds a Python callable and cannot be written to a config")

    def _fn(self, t: Tensor) -> Tensor:
        w = torch.as_tensor(self.fn(t), dtype=t.dtype, device=t.device)
        if w.ndim == 0:
            w = w.expand_as(t)
        if w.shape != t.shape:
            raise ValueError(f"the weighting function must return shape {tuple(t.shape)}, got {tuple(w.shape)}")
        return w

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        if self.reference is None:
            raise TypeError("a CustomWeighting with reference=None weights the model's own MSE; it has no data weight")
        return self._fn(t) * error_scale(path, t, self.reference)

    def weight(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if self.reference is None or self.reference == prediction:
            return self._fn(t)
        return self._fn(t) * error_scale(path, t, self.reference) / error_scale(path, t, prediction)


WeightingLike = Union[str, dict, Weighting, Callable[[Tensor], Tensor]]  # noqa: UP007 - a runtime alias


def make_weighting(weighting: WeightingLike, *, gamma: float = 5.0, sigma_data: float = 0.5) -> Weighting:
    """A :class:`Weighting` from a name (:data:`WEIGHTINGS`), its ``config()`` dict, an instance, or a callable on the data MSE."""
    if isinstance(weighting, Weighting):
        return weighting
    if isinstance(weighting, dict):  # a Weighting.config()
        cfg = dict(weighting)
        name = cfg.pop("name", None)
        if name not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {name!r}; valid: {', '.join(WEIGHTINGS)}")
        return make_weighting(name, gamma=cfg.get("gamma", gamma), sigma_data=cfg.get("sigma_data", sigma_data))
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)} or a callable")
        if weighting == "none":
            return NoWeighting()
        if weighting == "snr":
            return SNRWeighting()
        if weighting == "min-snr":
            return MinSNRWeighting(gamma)
        if weighting == "edm":
            return EDMWeighting(sigma_data)
        return LikelihoodWeighting()
    if callable(weighting):
        return CustomWeighting(weighting, reference="data")
    raise TypeError(f"weighting must be a name, a Weighting or a callable t -> Tensor, got {type(weighting).__name__}")


# =========================================================================================
# Shared input checks
# =========================================================================================


def _check_inputs(model: Model, x1: Tensor, y: Tensor | None, x0: Tensor | None, x0_name: str) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t, **cond), got {type(model).__name__}")
    if not isinstance(x1, Tensor):
        raise TypeError(f"x1 must be a torch.Tensor, got {type(x1).__name__}")
    if x1.ndim < 1 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, *) with B >= 1, got {tuple(x1.shape)}")
    if not x1.is_floating_point():
        raise TypeError(f"x1 must be a floating tensor, got dtype {x1.dtype}")
    if y is not None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
        if y.ndim == 0 or y.shape[0] != x1.shape[0]:
            raise ValueError(
                f"y must have one entry per sample: x1 has batch size {x1.shape[0]}, y has shape {tuple(y.shape)}"
            )
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"{x0_name} must be a torch.Tensor or None, got {type(x0).__name__}")
        if x0.shape != x1.shape:
            raise ValueError(f"{x0_name} shape {tuple(x0.shape)} must equal x1 shape {tuple(x1.shape)}")


def _call_model(model: Model, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    out = model(x, t) if y is None else model(x, t, y=y)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return a tensor of the input's shape {tuple(x.shape)}, got {shape}")
    return out


def _times(
    sampler: TimeSampler, t: Tensor | float | None, x1: Tensor, t_min: float, t_max: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Sampled (or given) times clipped to [t_min, t_max], and the importance weights."""
    if t is None:
        tt, w = sampler.sample(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
    else:
        tt = batch_time(t, x1)
        check_time_range(tt)
        w = torch.ones_like(tt)
    return tt.clamp(t_min, t_max), w


def _mean_over_features(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).mean(dim=1)


# =========================================================================================
# Gaussian-path loss
# =========================================================================================


class GaussianPathLoss:
    r"""Weighted regression of a model on a Gaussian path's conditional target.

    .. math::

        \ell_i = \omega(t_i)\, w_p(t_i)\,\overline{\big(f_\theta(x_{t_i}, t_i) - f^\star_p(x_1, \varepsilon, t_i)\big)^2},
        \qquad x_t = \alpha x_1 + \sigma\varepsilon,

    with :math:`f^\star_p` = ``path.target(prediction, ...)``, :math:`w_p` the weighting on the
    MSE of ``prediction`` (module docstring) and :math:`\omega` the time sampler's importance
    weight. ``loss`` is the batch mean.

    Arguments:
        path: the :class:`~flowdiff.paths.GaussianPath`.
        prediction: what the model outputs: ``"velocity"``, ``"noise"``, ``"data"``,
            ``"score"`` or ``"v"``.
        weighting: ``"none"``, ``"snr"``, ``"min-snr"``, ``"edm"``, ``"likelihood"``, a
            :class:`Weighting`, or a callable ``w(t)`` on the data MSE.
        time_sampler: ``"uniform"`` (on the path's safe interval), ``"logit-normal"``,
            ``"edm"`` or a :class:`TimeSampler`. Times are clipped to ``[path.t_min, path.t_max]``.
        gamma: γ of min-SNR.
        sigma_data: σ_d of the EDM weighting; ``None`` takes ``path.sigma_data`` when the path
            has one (:class:`~flowdiff.paths.EDM`), else 0.5.
        coupling: optional :class:`~flowdiff.couplings.Coupling` applied to
            ``(ε, x1, y)`` before ``x_t`` is formed (minibatch OT flow matching, Tong et al. 2023).

    Call ``loss(model, x1, y=None, x0=None, generator=None, t=None)``: ``x0`` is the noise ε
    (drawn N(0, I) when ``None``); ``t`` fixes the times (no importance weights).
    """

    def __init__(
        self,
        path: GaussianPath,
        prediction: str = "velocity",
        weighting: WeightingLike = "none",
        time_sampler: str | TimeSampler = "uniform",
        gamma: float = 5.0,
        sigma_data: float | None = None,
        coupling: Coupling | None = None,
    ):
        if not isinstance(path, GaussianPath):
            hint = " (use InterpolantLoss for stochastic interpolants)" if isinstance(path, StochasticInterpolant) else ""
            raise TypeError(f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}{hint}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if coupling is not None and not isinstance(coupling, Coupling):
            raise TypeError(f"coupling must be a flowdiff.couplings.Coupling or None, got {type(coupling).__name__}")
        if sigma_data is None:
            sigma_data = float(getattr(path, "sigma_data", 0.5))
        self.path, self.prediction, self.coupling = path, prediction, coupling
        self.weighting = make_weighting(weighting, gamma=gamma, sigma_data=sigma_data)
        self.time_sampler = make_time_sampler(time_sampler, path)

    def __repr__(self) -> str:
        return (f"GaussianPathLoss({self.path!r}, prediction={self.prediction!r}, weighting={self.weighting!r}, "
                f"time_sampler={self.time_sampler!r})")

    def config(self) -> dict:
        """A JSON-serialisable description; :func:`loss_from_config` rebuilds the loss from it."""
        return {
            "name": "GaussianPathLoss",
            "path": self.path.config(),
            "prediction": self.prediction,
            "weighting": self.weighting.config(),
            "time_sampler": self.time_sampler.config(),
            "coupling": None if self.coupling is None else self.coupling.config(),
        }

    def weight(self, t: Tensor) -> Tensor:
        """The weighting :math:`w_p(t)` on this loss's prediction MSE (no importance weight)."""
        return self.weighting.weight(self.path, t, self.prediction)

    def __call__(
        self,
        model: Model,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | float | None = None,
    ) -> LossOutput:
        _check_inputs(model, x1, y, x0, "x0 (the noise)")
        noise = x0 if x0 is not None else torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        if self.coupling is not None:
            noise, x1, y = self.coupling.pair(noise, x1, y, generator)
        path = self.path
        tt, importance = _times(self.time_sampler, t, x1, path.t_min, path.t_max, generator)
        a, s = expand_like(path._alpha(tt), x1), expand_like(path._sigma(tt), x1)
        x_t = a * x1 + s * noise
        target = self._target(x1, noise, tt, a, s)
        out = _call_model(model, x_t, tt, y)
        per_sample = importance * self.weight(tt) * _mean_over_features((out - target) ** 2)
        return LossOutput(per_sample.mean(), per_sample.detach(), tt)

    def _target(self, x1: Tensor, noise: Tensor, t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        # Same as path.target, reusing α, σ and skipping its host-synchronising range check.
        p = self.prediction
        if p == "noise":
            return noise
        if p == "data":
            return x1
        if p == "v":
            return a * noise - s * x1
        if p == "score":
            return -noise / s
        return expand_like(self.path._d_alpha(t), x1) * x1 + expand_like(self.path._d_sigma(t), x1) * noise


# =========================================================================================
# Stochastic-interpolant loss
# =========================================================================================


class InterpolantLoss:
    r"""The objectives of Albergo, Boffi & Vanden-Eijnden 2023 for a stochastic interpolant.

    For :math:`x_t^\pm = I(t, x_0, x_1) \pm \gamma(t) z` and target :math:`T^\pm` of ``target``
    (``drift`` :math:`\partial_t I \pm \dot\gamma z`, ``velocity`` :math:`\partial_t I`,
    ``score`` :math:`\mp z/\gamma`, ``denoiser`` :math:`\pm z`):

    * ``objective="mse"``: :math:`\ell = \tfrac12\big(\overline{|\hat f(x^+) - T^+|^2} + \overline{|\hat f(x^-) - T^-|^2}\big)`;
    * ``objective="quadratic"``: :math:`\ell = \tfrac12\sum_\pm \overline{\tfrac12|\hat f(x^\pm)|^2 - T^\pm\cdot\hat f(x^\pm)}`
      (the paper's form; equal to :math:`\tfrac12(\text{MSE} - \overline{|T|^2})`, so the same minimiser
      and half the gradient);

    with only the ``+`` term when ``antithetic=False``. Bars are means over features.

    * Two-sided interpolants need ``x0`` from the caller (the base samples).
    * One-sided interpolants (``"one-sided-linear"``, ``"one-sided-trig"``, γ = 0) draw
      ``x0 ~ N(0, I)`` when it is not given; the Gaussian ``x0`` plays the role of ``z``:
      the antithetic pair is :math:`\pm a_0 x_0 + a_1 x_1`, and the score target is
      :math:`-x_0/a_0` (:math:`\nabla\log\rho_t = -E[x_0|x_t]/a_0`). ``denoiser`` is not
      defined there (η = E[z] = 0); use a :class:`GaussianPathLoss` with ``prediction="noise"``.
    * Mirror interpolants use ``x0 = x1`` (a given ``x0`` is ignored).

    Arguments:
        interpolant: the :class:`~flowdiff.paths.StochasticInterpolant`.
        target: ``"drift"`` (b), ``"velocity"`` (v), ``"score"`` (s) or ``"denoiser"`` (η).
        antithetic: average over :math:`I \pm \gamma z` (two model evaluations per sample,
            batched in one call).
        time_sampler: ``"uniform"`` (on ``[interpolant.t_min, interpolant.t_max]``),
            ``"logit-normal"`` or a :class:`TimeSampler`; times are clipped to the safe interval.
        objective: ``"mse"`` or ``"quadratic"``.
        coupling: optional :class:`~flowdiff.couplings.Coupling` applied to ``(x0, x1, y)``
            (not for mirror interpolants).
    """

    def __init__(
        self,
        interpolant: StochasticInterpolant,
        target: str = "drift",
        antithetic: bool = True,
        time_sampler: str | TimeSampler = "uniform",
        objective: str = "mse",
        coupling: Coupling | None = None,
    ):
        if not isinstance(interpolant, StochasticInterpolant):
            hint = " (use GaussianPathLoss for Gaussian paths)" if isinstance(interpolant, GaussianPath) else ""
            raise TypeError(f"interpolant must be a StochasticInterpolant, got {type(interpolant).__name__}{hint}")
        if target not in INTERPOLANT_TARGETS:
            raise ValueError(f"unknown interpolant target {target!r}; valid: {', '.join(INTERPOLANT_TARGETS)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
        if coupling is not None and not isinstance(coupling, Coupling):
            raise TypeError(f"coupling must be a flowdiff.couplings.Coupling or None, got {type(coupling).__name__}")
        if coupling is not None and interpolant.is_mirror:
            raise ValueError("a coupling has no effect on the mirror interpolant (x0 = x1); pass coupling=None")
        no_gamma = interpolant.gamma_fn.name == "zero"
        if interpolant.one_sided and target == "denoiser":
            raise ValueError(
                "target 'denoiser' (η = E[z]) is zero for a one-sided interpolant (γ = 0); valid there: "
                "drift, velocity, score (or use GaussianPathLoss with prediction='noise')"
            )
        if no_gamma and not interpolant.one_sided and target in ("score", "denoiser"):
            raise ValueError(f"target {target!r} needs gamma != 'zero' for the two-sided interpolant; valid: drift, velocity")
        self.interpolant, self.target, self.objective, self.coupling = interpolant, target, objective, coupling
        # With γ ≡ 0 (two-sided) the two antithetic points coincide: one evaluation is the same estimator.
        self.antithetic = antithetic and (interpolant.one_sided or not no_gamma)
        self.time_sampler = make_time_sampler(time_sampler, interpolant)

    def __repr__(self) -> str:
        return (f"InterpolantLoss({self.interpolant!r}, target={self.target!r}, antithetic={self.antithetic!r}, "
                f"objective={self.objective!r}, time_sampler={self.time_sampler!r})")

    def config(self) -> dict:
        """A JSON-serialisable description; :func:`loss_from_config` rebuilds the loss from it."""
        return {
            "name": "InterpolantLoss",
            "interpolant": self.interpolant.config(),
            "target": self.target,
            "antithetic": self.antithetic,
            "objective": self.objective,
            "time_sampler": self.time_sampler.config(),
            "coupling": None if self.coupling is None else self.coupling.config(),
        }

    def __call__(
        self,
        model: Model,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | float | None = None,
    ) -> LossOutput:
        it = self.interpolant
        _check_inputs(model, x1, y, None if it.is_mirror else x0, "x0")
        if it.is_mirror:
            x0 = x1
        elif x0 is None:
            if not it.one_sided:
                raise ValueError(
                    f"x0 (the base samples) is required for the two-sided interpolant {it.interpolant!r}; "
                    "only one-sided interpolants draw x0 ~ N(0, I) themselves"
                )
            x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        if self.coupling is not None:
            x0, x1, y = self.coupling.pair(x0, x1, y, generator)
        tt, importance = _times(self.time_sampler, t, x1, it.t_min, it.t_max, generator)

        if it.one_sided:
            a0, a1, d0, d1 = (expand_like(c, x1) for c in it._coefficients(tt))
            points = [a0 * x0 + a1 * x1]
            targets = [self._one_sided_target(x0, x1, a0, d0, d1, sign=1.0)]
            if self.antithetic:
                points.append(-a0 * x0 + a1 * x1)
                targets.append(self._one_sided_target(x0, x1, a0, d0, d1, sign=-1.0))
        else:
            sample = it.sample(x0, x1, tt, generator=generator)
            points = [sample.x_t]
            targets = [it.target(self.target, sample)]
            if self.antithetic:
                points.append(sample.x_t_antithetic)
                targets.append(it.target(self.target, sample, antithetic=True))

        n = len(points)
        x_in = torch.cat(points) if n > 1 else points[0]
        t_in = tt.repeat(n) if n > 1 else tt
        y_in = None if y is None else (torch.cat([y] * n) if n > 1 else y)
        out = _call_model(model, x_in, t_in, y_in)
        terms = []
        for k, (f, target) in enumerate(zip(out.chunk(n), targets)):
            if self.objective == "mse":
                terms.append(_mean_over_features((f - target) ** 2))
            else:
                terms.append(_mean_over_features(0.5 * f * f - target * f))
        per_sample = importance * (sum(terms) / n)
        return LossOutput(per_sample.mean(), per_sample.detach(), tt)

    def _one_sided_target(self, x0: Tensor, x1: Tensor, a0: Tensor, d0: Tensor, d1: Tensor, sign: float) -> Tensor:
        # The Gaussian x0 is the noise: drift = velocity = ∂ₜI, score = −x0/a0 (with x0 → −x0 for the twin).
        if self.target == "score":
            return -sign * x0 / a0
        return sign * d0 * x0 + d1 * x1


def loss_from_config(config: dict) -> GaussianPathLoss | InterpolantLoss:
    """Rebuild a loss from the dict written by its ``config()`` method (e.g. from a checkpoint)."""
    from .couplings import coupling_from_config
    from .paths import path_from_config

    cfg = dict(config)
    name = cfg.pop("name", None)
    coupling = None if cfg.get("coupling") is None else coupling_from_config(cfg["coupling"])
    if name == "GaussianPathLoss":
        path = path_from_config(cfg["path"])
        if not isinstance(path, GaussianPath):
            raise ValueError(f"a GaussianPathLoss config needs a Gaussian path, got {cfg['path'].get('name')!r}")
        return GaussianPathLoss(
            path, cfg["prediction"], make_weighting(cfg["weighting"]),
            time_sampler_from_config(cfg["time_sampler"], path), coupling=coupling,
        )
    if name == "InterpolantLoss":
        interpolant = path_from_config(cfg["interpolant"])
        if not isinstance(interpolant, StochasticInterpolant):
            raise ValueError("an InterpolantLoss config needs a StochasticInterpolant")
        return InterpolantLoss(
            interpolant, cfg["target"], antithetic=cfg["antithetic"],
            time_sampler=time_sampler_from_config(cfg["time_sampler"], interpolant),
            objective=cfg["objective"], coupling=coupling,
        )
    raise ValueError(f"unknown loss config name {name!r}; valid: GaussianPathLoss, InterpolantLoss")
