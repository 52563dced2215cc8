r"""Training a mean-reverting network with its condition, and the digits restoration degradations.

The network sees the state and the condition, ``model(x_t, t, mu=μ)``, where
:math:`x_t = \mu + \alpha(t)(x_0 - \mu) + \bar\sigma(t)\varepsilon` is the IR-SDE marginal
(:class:`~flowdiff.mean_reverting.IRSDE`; Luo et al. 2023, "Image Restoration with Mean-Reverting
Stochastic Differential Equations"). :func:`mean_reverting_loss` regresses the chosen prediction
(:mod:`flowdiff.mean_reverting.field` for what each means in ``x``) by mean squared error at
uniform times — IR-SDE's noise matching for ``"noise"``; its maximum-likelihood "optimal reverse
path" loss has the same minimiser. :class:`MeanConditioned` makes any same-shape network
(``flowdiff.nn.UNet(in_channels=2C)`` or an MLP on ``2D`` features) μ-conditioned by
concatenation, as IR-SDE's UNet concatenates the degraded image.

:func:`degrade` makes the conditions of the digits restoration task (images in ``[-1, 1]``):
``denoise`` (additive Gaussian noise), ``deblur`` (5×5 Gaussian blur, replicate padding) and
``inpaint`` (a 4×4 square at a random place set to 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import check_float
from ..paths import PREDICTIONS, GaussianPath
from .field import MU, check_mu

__all__ = ["DEGRADATIONS", "MeanConditioned", "degrade", "mean_reverting_loss"]

#: The digits restoration tasks of :func:`degrade`.
DEGRADATIONS = ("denoise", "deblur", "inpaint")


def mean_reverting_loss(model: Callable[..., Tensor], path: GaussianPath, x0: Tensor, mu: Tensor,
                        prediction: str = "noise", t: Tensor | None = None, generator: torch.Generator | None = None,
                        cond: dict | None = None) -> Tensor:
    r"""Mean squared error of ``model(x_t, t, mu=μ)`` against the ``prediction`` target (a 0-d tensor).

    Arguments:
        model: the network; called with ``mu`` (and ``cond``) as keywords.
        path: the :class:`IRSDE` (a Gaussian path of ``y = x − μ``).
        x0: clean data ``(B, *)``; ``mu``: the conditions (degraded data), same shape.
        prediction: ``noise`` (ε), ``data`` (x₀), ``velocity`` (dx/dt), ``score``, ``v`` (of ``y``).
        t: times ``(B,)``; default uniform on ``[t_min, t_max]``.
    """
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}")
    mu = check_mu(mu, x0, "x0")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    if t is None:
        u = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device)
        t = path.t_min + (path.t_max - path.t_min) * u
    y0 = x0 - mu
    y, noise = path.sample(y0, t, generator=generator)
    target = path.target(prediction, y0, noise, t)
    if prediction == "data":
        target = target + mu
    out = model(y + mu, t, **{MU: mu, **(cond or {})})
    if out.shape != x0.shape:
        raise ValueError(f"the model must return a tensor of shape {tuple(x0.shape)}, got {tuple(out.shape)}")
    loss = (out - target).pow(2).mean()
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"non-finite mean-reverting loss ({float(loss)}); check the data, mu and the path")
    return loss


class MeanConditioned(nn.Module):
    """A μ-conditioned network from one on twice the channels: ``net(cat([x, μ], 1), t, **cond)``,
    of which the first ``C`` channels are returned (``C = x.shape[1]``).

    Arguments:
        network: maps ``(B, 2C, *)`` to ``(B, 2C, *)`` (e.g. ``UNet(in_channels=2C)``) or to ``(B, C, *)``.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor, t: Tensor, mu: Tensor | None = None, **cond: Any) -> Tensor:
        if mu is None:
            raise TypeError("MeanConditioned needs the stationary mean: call it as model(x, t, mu=...)")
        mu = check_mu(mu, x)
        out = self.network(torch.cat([x, mu], dim=1), t, **cond)
        return out[:, :x.shape[1]]


def _gaussian_kernel(size: int, std: float, like: Tensor) -> Tensor:
    r = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (r / std) ** 2)
    k = torch.outer(k, k)
    return (k / k.sum())[None, None]


def degrade(x: Tensor, task: str, generator: torch.Generator | None = None, noise_std: float = 0.4,
            blur_std: float = 1.5) -> Tensor:
    """The condition μ of a digits restoration ``task`` for clean images ``x`` ``(B, C, H, W)`` in ``[-1, 1]``.

    ``denoise``: ``x + noise_std·n``; ``deblur``: 5×5 Gaussian blur of standard deviation
    ``blur_std`` (replicate padding, per channel); ``inpaint``: a 4×4 square (one random
    position per image) set to 0. ``generator`` seeds the noise and the squares.
    """
    if task not in DEGRADATIONS:
        raise ValueError(f"unknown restoration task {task!r}; valid: {', '.join(DEGRADATIONS)}")
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"degrade needs images of shape (B, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if task == "denoise":
        std = check_float("noise_std", noise_std, 0.0)
        return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if task == "deblur":
        std = check_float("blur_std", blur_std, 0.0, low_open=True)
        channels = x.shape[1]
        kernel = _gaussian_kernel(5, std, x).expand(channels, 1, 5, 5)
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=channels)
    b, _, h, w = x.shape
    if h < 4 or w < 4:
        raise ValueError(f"inpaint needs images of at least 4x4, got {h}x{w}")
    rows = torch.randint(0, h - 3, (b,), generator=generator)
    cols = torch.randint(0, w - 3, (b,), generator=generator)
    ii = torch.arange(h)[None, :, None]
    jj = torch.arange(w)[None, None, :]
    hole = ((ii >= rows[:, None, None]) & (ii < rows[:, None, None] + 4) & (jj >= cols[:, None, None])
            & (jj < cols[:, None, None] + 4)).to(x.device)
    return x.masked_fill(hole[:, None], 0.0)
