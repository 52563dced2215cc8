r"""Diagonal Gaussian mixtures: exact samples for oracle tests.

.. math::

    p(x) = \sum_{k=1}^{K} w_k\, \mathcal{N}\big(x;\ \mu_k,\ \mathrm{diag}(s_k^2)\big),

sampled by drawing the component :math:`k \sim \mathrm{Categorical}(w)` and then
:math:`x = \mu_k + s_k \odot z`, :math:`z \sim \mathcal{N}(0, I)`.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from flowdiff._utils import check_int
from flowdiff.data._generators import as_generator, draw_device

__all__ = ["gaussian_mixture_samples", "mixture_parameters", "EIGHT_GAUSSIANS_RADIUS", "EIGHT_GAUSSIANS_SCALE"]

# Eight Gaussians on a circle (Grathwohl et al., 2019, "FFJORD"; radius 4, std 0.5 there) rescaled
# so that the mixture has mean 0 and covariance exactly I: the 8 equally spaced centres give
# E[x xᵀ] = (r²/2 + s²) I, and with s = r/8 (FFJORD's ratio) r²(1/2 + 1/64) = 1, i.e. r² = 64/33.
EIGHT_GAUSSIANS_RADIUS: float = math.sqrt(64.0 / 33.0)
EIGHT_GAUSSIANS_SCALE: float = EIGHT_GAUSSIANS_RADIUS / 8.0


def _mixture_table() -> dict[str, dict[str, list]]:
    angles = [2.0 * math.pi * k / 8 for k in range(8)]
    return {
        "eight_gaussians": {
            "means": [[EIGHT_GAUSSIANS_RADIUS * math.cos(a), EIGHT_GAUSSIANS_RADIUS * math.sin(a)] for a in angles],
            "scales": [EIGHT_GAUSSIANS_SCALE] * 8,
            "weights": [1.0 / 8] * 8,
        },
        # An asymmetric mixture (unequal weights and widths) for oracle tests; deliberately not
        # standardised: these parameters are the ground truth. Mean (-0.3, -0.3), E|x|² = 1.936.
        "gmm": {
            "means": [[-1.2, -0.6], [1.0, -0.8], [0.0, 1.2]],
            "scales": [0.3, 0.5, 0.2],
            "weights": [0.5, 0.3, 0.2],
        },
    }


def mixture_parameters(
    name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """Exact parameters of a built-in mixture data set, for analytic oracles.

    Arguments:
        name: ``"eight_gaussians"`` or ``"gmm"``.

    Returns:
        ``{"means": (K, D), "scales": (K,) standard deviations, "weights": (K,)}``.
    """
    table = _mixture_table()
    if name not in table:
        raise ValueError(f"unknown mixture {name!r}; valid names are {sorted(table)}")
    dtype = dtype or torch.get_default_dtype()
    return {key: torch.tensor(value, dtype=dtype, device=device) for key, value in table[name].items()}


@overload
def gaussian_mixture_samples(
    n: int,
    means: Tensor,
    scales: Tensor | float,
    weights: Tensor | None = ...,
    generator: torch.Generator | int | None = ...,
    return_labels: Literal[False] = ...,
) -> Tensor: ...


@overload
def gaussian_mixture_samples(
    n: int,
    means: Tensor,
    scales: Tensor | float,
    weights: Tensor | None = ...,
    generator: torch.Generator | int | None = ...,
    *,
    return_labels: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def gaussian_mixture_samples(
    n: int,
    means: Tensor,
    scales: Tensor | float,
    weights: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Exact samples of a diagonal Gaussian mixture :math:`\sum_k w_k \mathcal{N}(\mu_k, \mathrm{diag}(s_k^2))`.

    Arguments:
        n: number of samples.
        means: component means :math:`\mu_k`, shape ``(K, D)``.
        scales: standard deviations, a float, shape ``(K,)`` (isotropic per component) or ``(K, D)``.
        weights: mixture weights, shape ``(K,)``, non-negative (normalised here); ``None`` = uniform.
        generator: ``torch.Generator``, int seed, or ``None`` for torch's global RNG.
        return_labels: also return the component index of each sample.

    Returns:
        Samples ``(n, D)`` with the dtype and device of ``means`` (floating) — and labels ``(n,)``
        (``torch.long``) when ``return_labels``.
    """
    n = check_int("n", n, 0)
    means = torch.as_tensor(means)
    if not means.dtype.is_floating_point:
        means = means.to(torch.get_default_dtype())
    if means.ndim != 2 or means.shape[0] == 0:
        raise ValueError(f"means must have shape (K, D) with K >= 1, got shape {tuple(means.shape)}")
    num_components, dim = means.shape
    scales = torch.as_tensor(scales, dtype=means.dtype, device=means.device)
    if scales.ndim == 0:
        scales = scales.expand(num_components)
    if scales.shape == (num_components,):
        scales = scales[:, None].expand(num_components, dim)
    if scales.shape != (num_components, dim):
        raise ValueError(
            f"scales must be a float or have shape ({num_components},) or ({num_components}, {dim}), "
            f"got shape {tuple(scales.shape)}"
        )
    if bool((scales < 0).any()) or not bool(torch.isfinite(scales).all()):
        raise ValueError(f"scales must be finite and non-negative, got {scales.tolist()}")
    if weights is None:
        weights = torch.full((num_components,), 1.0 / num_components, dtype=means.dtype, device=means.device)
    weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
    if weights.shape != (num_components,):
        raise ValueError(f"weights must have shape ({num_components},), got shape {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights.tolist()}")

    generator = as_generator(generator)
    device = draw_device(generator)
    probabilities = (weights / weights.sum()).to(device=device, dtype=torch.float64)
    if n == 0:
        labels = torch.zeros(0, dtype=torch.long, device=device)
    else:
        labels = torch.multinomial(probabilities, n, replacement=True, generator=generator)
    noise = torch.randn(n, dim, generator=generator, device=device, dtype=torch.float64)
    labels = labels.to(means.device)
    samples = means[labels] + scales[labels] * noise.to(device=means.device, dtype=means.dtype)
    return (samples, labels) if return_labels else samples
