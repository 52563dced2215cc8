r"""Loss weightings on Gaussian paths :math:`x_t = \alpha x_1 + \sigma\varepsilon`, defined once on the data MSE.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

from .._utils import check_float
from ..paths import PREDICTIONS, GaussianPath, PathTable

__all__ = [
    "WEIGHTINGS",
    "CustomWeighting",
    "EDMWeighting",
    "LikelihoodWeighting",
    "MinSNRWeighting",
    "NoWeighting",
    "SNRWeighting",
    "ScheduleWeighting",
    "Weighting",
    "WeightingLike",
    "available_predictions",
    "available_weightings",
    "error_scale",
    "make_weighting",
]

#: Named weightings (see the module docstring for their definition on the data MSE).
WEIGHTINGS = ("none", "snr", "min-snr", "edm", "likelihood")


def available_weightings() -> tuple[str, ...]:
    """Names accepted by ``GaussianPathLoss(weighting=...)`` (the CLI's ``--weighting``)."""
    return WEIGHTINGS


def available_predictions() -> tuple[str, ...]:
    """Prediction types of :class:`~flowdiff.losses.GaussianPathLoss`."""
    return tuple(PREDICTIONS)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def _error_scale(a: Tensor, s: Tensor, dl: Tensor, prediction: str) -> Tensor:
    # k_p from (α, σ, λ̇); see error_scale.
    if prediction == "data":
        return torch.ones_like(a)
    if prediction == "noise":
        return (a / s) ** 2
    if prediction == "score":
        return (a / (s * s)) ** 2
    if prediction == "v":
        return ((a * a + s * s) / s) ** 2
    return (a * dl) ** 2


def error_scale(path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
    r""":math:`k_p(t) = \lVert\Delta p\rVert^2/\lVert\Delta\hat x\rVert^2`: the squared error of prediction ``p``
    per unit squared error of the data prediction, at the same :math:`(x_t, t)`.

    ``data`` 1; ``noise`` α²/σ²; ``score`` α²/σ⁴; ``v`` (α²+σ²)²/σ²; ``velocity`` α²λ̇².
    Computed in float64 from ``path.table(t)``, returned in ``t``'s dtype.
    """
    _check_prediction(prediction)
    if prediction == "data":
        return torch.ones_like(t)
    table = path.table(t)
    return _error_scale(table.alpha, table.sigma, table.d_log_snr, prediction).to(t.dtype)


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
        _check_prediction(prediction)
        return torch.ones_like(t)

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        raise TypeError("weighting 'none' is a unit weight on the model's own MSE and has no fixed data weight")


class ScheduleWeighting(Weighting):
    r"""A weighting in closed form in :math:`(\alpha, \sigma, \dot\lambda)`: the named ones.

    Subclasses implement :meth:`data_weight_of` (and may override :meth:`weight_of` with
    closed forms per prediction). The arithmetic is done in float64 on one
    :class:`~flowdiff.paths.PathTable` per call and returned in ``t``'s dtype;
    :meth:`weight_from_table` takes a table the caller already has (the loss: one schedule
    evaluation per batch).
    """

    def data_weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor, prediction: str) -> Tensor:
        """:math:`w_p = w_{data}/k_p` from the coefficients."""
        return self.data_weight_of(alpha, sigma, d_log_snr) / _error_scale(alpha, sigma, d_log_snr, prediction)

    def weight_from_table(self, table: PathTable, prediction: str) -> Tensor:
        """Weight on the MSE of ``prediction`` at ``table.t`` (float64, like the table)."""
        _check_prediction(prediction)
        return self.weight_of(table.alpha, table.sigma, table.d_log_snr, prediction)

    def data_weight(self, path: GaussianPath, t: Tensor) -> Tensor:
        table = path.table(t)
        return self.data_weight_of(table.alpha, table.sigma, table.d_log_snr).to(t.dtype)

    def weight(self, path: GaussianPath, t: Tensor, prediction: str) -> Tensor:
        return self.weight_from_table(path.table(t), prediction).to(t.dtype)


class SNRWeighting(ScheduleWeighting):
    r""":math:`w_{data} = \mathrm{SNR} = \alpha^2/\sigma^2`: the unweighted noise-prediction loss of Ho et al. 2020."""

    name = "snr"

    def data_weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor) -> Tensor:
        return (alpha / sigma) ** 2

    def weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor, prediction: str) -> Tensor:
        if prediction == "noise":  # exactly 1, without rounding
            return torch.ones_like(alpha)
        return super().weight_of(alpha, sigma, d_log_snr, prediction)


class MinSNRWeighting(ScheduleWeighting):
    r"""Min-SNR-γ (Hang et al. 2023): :math:`w_{data} = \min(\mathrm{SNR}, \gamma)`.

    On the noise MSE this is :math:`\min(1, \gamma/\mathrm{SNR})`: the ε-loss with its
    low-noise times (SNR > γ) down-weighted, which balances the conflicting gradients of
    different noise levels.
    """

    name = "min-snr"

    def __init__(self, gamma: float = 5.0):
        self.gamma = check_float("gamma", gamma, 0.0, low_open=True)

    def __repr__(self) -> str:
        return f"MinSNRWeighting(gamma={self.gamma!r})"

    def config(self) -> dict:
        return {"name": self.name, "gamma": self.gamma}

    def data_weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor) -> Tensor:
        return torch.clamp((alpha / sigma) ** 2, max=self.gamma)


class EDMWeighting(ScheduleWeighting):
    r"""EDM's :math:`\lambda(\tilde\sigma) = (\tilde\sigma^2 + \sigma_d^2)/(\tilde\sigma\,\sigma_d)^2` on the data MSE (Karras et al. 2022).

    :math:`\tilde\sigma = \sigma/\alpha` is the noise level in σ-space. It makes the effective
    loss weight of EDM's preconditioned network output 1 at every noise level. ``sigma_data``
    (σ_d) is the data's standard deviation (0.5 for images in [−1, 1]).
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = check_float("sigma_data", sigma_data, 0.0, low_open=True)

    def __repr__(self) -> str:
        return f"EDMWeighting(sigma_data={self.sigma_data!r})"

    def config(self) -> dict:
        return {"name": self.name, "sigma_data": self.sigma_data}

    def data_weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor) -> Tensor:
        sig = sigma / alpha
        sd2 = self.sigma_data**2
        return (sig * sig + sd2) / (sig * sig * sd2)


class LikelihoodWeighting(ScheduleWeighting):
    r"""Likelihood weighting (Song et al. 2021): :math:`g^2 = 2\sigma^2\dot\lambda` on the score MSE.

    On the data MSE :math:`2\dot\lambda\,\mathrm{SNR} = d\,\mathrm{SNR}/dt`, on the noise MSE
    :math:`2\dot\lambda`. With uniform time this is, up to constants, the continuous-time ELBO
    (Kingma et al. 2021); for VP, :math:`g^2 = \beta(1 - t)`.
    """

    name = "likelihood"

    def data_weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor) -> Tensor:
        return 2 * d_log_snr * (alpha / sigma) ** 2

    def weight_of(self, alpha: Tensor, sigma: Tensor, d_log_snr: Tensor, prediction: str) -> Tensor:
        # Closed forms per prediction (fewer roundings than w_data / k_p).
        if prediction == "noise":
            return 2 * d_log_snr
        if prediction == "score":
            return 2 * sigma * sigma * d_log_snr
        if prediction == "velocity":
            return 2 / (sigma * sigma * d_log_snr)
        return super().weight_of(alpha, sigma, d_log_snr, prediction)


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
        _check_prediction(prediction)
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
