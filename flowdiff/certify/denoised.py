r"""Denoised smoothing with any flowdiff model (Carlini et al., 2023; Salman et al., 2020).

Carlini, Tramèr, Dvijotham, Rice, Sun & Kolter (ICLR 2023), "(Certified!!) Adversarial Robustness
for Free!": an off-the-shelf diffusion model denoises the Gaussian-noised input of randomized
smoothing (Cohen et al., 2019), and an off-the-shelf classifier labels the result; the composition
is the base classifier :math:`f` that :func:`flowdiff.certify.certify` smooths. Salman, Sun, Yang,
Kapoor & Kolter (NeurIPS 2020), "Denoised Smoothing" introduced the denoiser-plus-classifier split.

**The matching time.** Inputs live in their own units :math:`u` (e.g. images in ``[0, 1]``); the
model was trained on :math:`x = a\,u + b` (``data_scale`` :math:`a`, ``data_shift`` :math:`b`; e.g.
digits in ``[-1, 1]``: :math:`a = 2, b = -1`). Smoothing noise :math:`u + \sigma\varepsilon` is
:math:`x + a\sigma\varepsilon` in model units. On a Gaussian path
:math:`x_t = \alpha(t)x_1 + \sigma(t)\varepsilon` the state :math:`\alpha(t^*)(x + a\sigma\varepsilon)` is an
exact forward sample at the :math:`t^*` with :math:`\sigma(t^*)/\alpha(t^*) = a\sigma`, i.e. half
log-SNR :math:`\lambda(t^*) = -\log(a\sigma)` (``path.t_of_log_snr``: exact for every flowdiff
path, continuous or discrete). When that noise level is below the path's smallest
(:math:`t^* > t_{max}`) the model is queried at :math:`t_{max}` after adding the missing noise
:math:`\sqrt{(\sigma/\alpha)^2(t_{max}) - (a\sigma)^2}\,\varepsilon'`: the base classifier is then
randomised, which Cohen et al.'s certificate allows (the probability is over both draws).

**One shot or a few steps.** ``steps=1`` (the paper's choice, found better than multi-step
sampling) returns the Tweedie denoiser :math:`\hat x = E[x_1 \mid x_{t^*}]`; ``steps=k`` runs
:math:`k - 1` deterministic DDIM steps (Song et al., 2021) from :math:`t^*` towards the data end on a
grid uniform in log-SNR, then denoises.

A class-conditional network loaded with ``flowdiff.pipeline.load_field`` draws a label mixture
when called without labels (``ClassMixtureModel``); a denoiser must not guess the class, so that
wrapper is replaced by its null-label network (label dropout's unconditional model).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from flowdiff._utils import check_float, check_int
from flowdiff.fields import Field

__all__ = ["DenoisedClassifier", "smoothing_time"]


def smoothing_time(path: Any, sigma: float, data_scale: float = 1.0) -> float:
    r"""The time :math:`t^*` whose noise-to-signal ratio :math:`\sigma(t)/\alpha(t)` is ``data_scale * sigma``.

    Unclipped: may lie outside the path's safe interval (see :class:`DenoisedClassifier`).
    """
    sigma = check_float("sigma", sigma, 0.0, low_open=True)
    data_scale = check_float("data_scale", data_scale, 0.0, low_open=True)
    return float(path.t_of_log_snr(torch.tensor(-math.log(data_scale * sigma), dtype=torch.float64)))


def _unlabeled_field(field: Field) -> Field:
    """The null-label network of a ``ClassMixtureModel`` (it would draw a random class per row)."""
    model = field.model
    if getattr(model, "unlabeled_default", None) == "mixture" and isinstance(getattr(model, "model", None), nn.Module):
        return Field(model.model, field.path, field.prediction)
    return field


class DenoisedClassifier(nn.Module):
    r"""``classifier(denoise(u))``: a flowdiff model's denoiser at the smoothing noise, then a classifier.

    Arguments:
        field: a :class:`flowdiff.Field` on a Gaussian path (any prediction type).
        classifier: maps a batch of inputs (in input units) to class indices or logits.
        sigma: the smoothing noise level in input units (the ``sigma`` given to ``certify``).
        data_scale: :math:`a` in :math:`x = a u + b` (model units from input units).
        data_shift: :math:`b`.
        steps: 1 for one-shot denoising, ``k > 1`` for ``k - 1`` DDIM steps then denoising.
        cond: keyword conditioning passed to the model (e.g. ``{"y": labels}``); default none.
        generator: draws the extra noise when :math:`t^* > t_{max}`.

    Attributes:
        t_star: the time the model is first queried at.
        extra_noise: the standard deviation (model units, scaled by :math:`\alpha(t^*)`) added
            before the first query; 0 unless the smoothing noise is below the path's smallest.
    """

    def __init__(self, field: Field, classifier: Callable[[Tensor], Tensor], sigma: float, *, data_scale: float = 1.0,
                 data_shift: float = 0.0, steps: int = 1, cond: dict | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(field, Field):
            raise TypeError(f"field must be a flowdiff.Field (a model on a Gaussian path), got {type(field).__name__}")
        if not callable(classifier):
            raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
        self.sigma = check_float("sigma", sigma, 0.0, low_open=True)
        self.data_scale = check_float("data_scale", data_scale, 0.0, low_open=True)
        self.data_shift = check_float("data_shift", data_shift)
        self.steps = check_int("steps", steps, 1)
        self.field = _unlabeled_field(field)
        if isinstance(self.field.model, nn.Module):
            self.network = self.field.model  # registered, so .to()/.eval() reach it
        if isinstance(classifier, nn.Module):
            self.classifier = classifier
        else:
            self._classifier_fn = classifier
        self.cond = dict(cond or {})
        self.generator = generator
        path = self.field.path
        wanted = smoothing_time(path, self.sigma, self.data_scale)
        t_min, t_max = path.safe_interval
        if wanted < t_min:
            raise ValueError(f"sigma={self.sigma} (x{self.data_scale} in model units) is noisier than the path reaches "
                             f"at t_min={t_min} (sigma/alpha={float(path.sigma(t_min) / path.alpha(t_min)):.4g})")
        self.t_star = min(wanted, t_max)
        ratio = float(path.sigma(self.t_star) / path.alpha(self.t_star))
        self.extra_noise = math.sqrt(max(ratio ** 2 - (self.data_scale * self.sigma) ** 2, 0.0)) if wanted > t_max else 0.0

    def _classify(self, u: Tensor) -> Tensor:
        if hasattr(self, "classifier"):
            return self.classifier(u)
        return self._classifier_fn(u)

    def _times(self) -> list[float]:
        if self.steps == 1:
            return [self.t_star]
        path = self.field.path
        t_max = path.safe_interval[1]
        start, end = float(path.log_snr(self.t_star)), float(path.log_snr(t_max))
        grid = torch.linspace(start, end, self.steps + 1, dtype=torch.float64)[:-1]
        return [self.t_star] + [float(path.t_of_log_snr(lam)) for lam in grid[1:]]

    @torch.no_grad()
    def denoise(self, u: Tensor) -> Tensor:
        """The denoised inputs (input units, ``u``'s shape) of noisy inputs ``u``."""
        path = self.field.path
        x = self.data_scale * u + self.data_shift
        if self.extra_noise > 0:
            x = x + self.extra_noise * torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        times = self._times()
        x = float(path.alpha(times[0])) * x
        for i, t in enumerate(times):
            denoised = self.field.denoise(x, t, **self.cond)
            if i + 1 < len(times):
                alpha, sigma = float(path.alpha(t)), float(path.sigma(t))
                noise = (x - alpha * denoised) / sigma
                nxt = times[i + 1]
                x = float(path.alpha(nxt)) * denoised + float(path.sigma(nxt)) * noise
        return (denoised - self.data_shift) / self.data_scale

    @torch.no_grad()
    def forward(self, u: Tensor) -> Tensor:
        """The classifier's output (indices or logits) on the denoised inputs."""
        return self._classify(self.denoise(u))
