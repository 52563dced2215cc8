r"""Two-dimensional toy distributions, standardised to unit scale.

Every generator has the signature ``name(n, generator=None, *, return_labels=False, dtype=None,
device=None, **shape_parameters)`` and returns a tensor ``(n, 2)`` (and, with ``return_labels``,
the integer component/arm of each point, or ``None`` for the checkerboard).

**Scale.** Each set is drawn in its natural ("raw") coordinates, described in its docstring, then
centred on the exact population mean and divided by one scalar (shapes are not distorted) so that

.. math::

    \mathbb{E}[x] = 0, \qquad \mathbb{E}\,\|x\|^2 = 2,

i.e. the per-coordinate variances average to 1. The mean and second moment are computed in closed
form for the default and for any user-given shape parameters, so this holds exactly (up to
Monte Carlo error of the sample), not from a fitted estimate. The exception is the deliberately
non-standardised ``gmm`` set of :mod:`flowdiff.data.mixture`.

The shapes follow the toy sets of Grathwohl et al. (2019, "FFJORD") popularised by torchcfm
(Tong et al., 2024, "Improving and generalizing flow-based generative models with minibatch
optimal transport"); they are re-implemented here in torch so that a ``torch.Generator`` drives
every draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flowdiff._utils import check_float, check_int
from flowdiff.data._generators import as_generator, draw_device
from flowdiff.data.mixture import gaussian_mixture_samples, mixture_parameters

__all__ = [
    "checkerboard",
    "eight_gaussians",
    "moons",
    "spirals",
    "pinwheel",
    "rings",
    "gmm",
    "TOY_DATASETS",
    "TOY_NUM_CLASSES",
]

Generator = torch.Generator | int | None


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        check_float(name, value, 0.0)


def _finish(
    raw: Tensor,
    labels: Tensor | None,
    mean: tuple[float, float],
    second_moment: float,
    return_labels: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Centre on the exact mean, scale so that E|x|² = 2, cast; ``second_moment`` is E|raw - mean|²."""
    scale = math.sqrt(second_moment / 2.0)
    x = (raw - torch.tensor(mean, dtype=raw.dtype, device=raw.device)) / scale
    x = x.to(dtype=dtype or torch.get_default_dtype(), device=device)
    if not return_labels:
        return x
    return x, (labels.to(device=x.device) if labels is not None else None)


def checkerboard(
    n: int,
    generator: Generator = None,
    *,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    r"""Uniform on the 8 "black" cells of a 4×4 checkerboard.

    Raw form: unit cells on :math:`[-2, 2]^2`, cell :math:`(i, j)` (integer lower-left corner)
    black when :math:`i + j` is even. Each coordinate is then uniform on :math:`[-2, 2]` with
    variance 4/3, so the standardised board is :math:`[-\sqrt{3}, \sqrt{3}]^2` with cells of side
    :math:`\sqrt{3}/2`. There are no labels (``None``).
    """
    n = check_int("n", n, 0)
    generator = as_generator(generator)
    draw = draw_device(generator)
    column = torch.randint(0, 4, (n,), generator=generator, device=draw) - 2
    # In each column two of the four rows are black: those with row ≡ column (mod 2).
    row_pair = torch.randint(0, 2, (n,), generator=generator, device=draw)
    row = 2 * row_pair - 2 + torch.remainder(column, 2)
    offset = torch.rand(n, 2, generator=generator, device=draw, dtype=torch.float64)
    raw = torch.stack([column, row], dim=1).to(torch.float64) + offset
    return _finish(raw, None, (0.0, 0.0), 2 * 4.0 / 3.0, return_labels, dtype, device)


def eight_gaussians(
    n: int,
    generator: Generator = None,
    *,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    r"""Eight equally weighted Gaussians on a circle (FFJORD's "8gaussians").

    Centres :math:`r(\cos 2\pi k/8, \sin 2\pi k/8)`, standard deviation :math:`s = r/8`, with
    :math:`r^2 = 64/33` so that the covariance is exactly :math:`I` (already standardised). The
    exact parameters are :func:`flowdiff.data.mixture_parameters("eight_gaussians")
    <flowdiff.data.mixture.mixture_parameters>`; labels are the component ``k``.
    """
    n = check_int("n", n, 0)
    parameters = mixture_parameters("eight_gaussians", dtype=torch.float64)
    x, labels = gaussian_mixture_samples(n, **parameters, generator=generator, return_labels=True)
    x = x.to(dtype=dtype or torch.get_default_dtype(), device=device)
    return (x, labels.to(x.device)) if return_labels else x


def gmm(
    n: int,
    generator: Generator = None,
    *,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """The asymmetric 3-component 2-D Gaussian mixture ``mixture_parameters("gmm")`` (not standardised).

    Meant for tests against the analytic mixture oracle: its parameters are the ground truth.
    """
    n = check_int("n", n, 0)
    parameters = mixture_parameters("gmm", dtype=torch.float64)
    x, labels = gaussian_mixture_samples(n, **parameters, generator=generator, return_labels=True)
    x = x.to(dtype=dtype or torch.get_default_dtype(), device=device)
    return (x, labels.to(x.device)) if return_labels else x


def moons(
    n: int,
    generator: Generator = None,
    *,
    noise: float = 0.1,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    r"""Two interleaved half circles (scikit-learn's ``make_moons`` shape), equal weights.

    Raw form, :math:`\theta \sim U[0, \pi]`: outer moon :math:`(\cos\theta, \sin\theta)` (label 0),
    inner moon :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)` (label 1), plus
    :math:`\mathcal{N}(0, \text{noise}^2 I)`. Exact moments: mean :math:`(\tfrac12, \tfrac14)`,
    variances :math:`\tfrac34 + \text{noise}^2` and :math:`\tfrac{9}{16} - \tfrac1\pi + \text{noise}^2`.
    """
    n = check_int("n", n, 0)
    _check_non_negative(noise=noise)
    generator = as_generator(generator)
    draw = draw_device(generator)
    labels = torch.randint(0, 2, (n,), generator=generator, device=draw)
    theta = math.pi * torch.rand(n, generator=generator, device=draw, dtype=torch.float64)
    outer = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    inner = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    raw = torch.where(labels[:, None] == 0, outer, inner)
    raw = raw + noise * torch.randn(n, 2, generator=generator, device=draw, dtype=torch.float64)
    second_moment = 0.75 + (9.0 / 16.0 - 1.0 / math.pi) + 2.0 * noise**2
    return _finish(raw, labels, (0.5, 0.25), second_moment, return_labels, dtype, device)


def spirals(
    n: int,
    generator: Generator = None,
    *,
    turns: float = 1.5,
    noise: float = 0.3,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    r"""Two interleaved Archimedean spirals (FFJORD's "2spirals"), equal weights.

    Raw form: :math:`\theta = 2\pi\,\text{turns}\,\sqrt{u}`, :math:`u \sim U[0, 1]` (the square
    root spreads points evenly along the arc, whose length element grows like :math:`\theta`),
    arm 0 at :math:`\theta(\cos\theta, \sin\theta)`, arm 1 its point reflection, plus
    :math:`\mathcal{N}(0, \text{noise}^2 I)`. Mean 0 by symmetry and
    :math:`\mathbb{E}\|x\|^2 = \mathbb{E}\theta^2 + 2\,\text{noise}^2 = (2\pi\,\text{turns})^2/2 + 2\,\text{noise}^2`.
    """
    n = check_int("n", n, 0)
    _check_non_negative(noise=noise, turns=turns)
    if turns <= 0:
        raise ValueError(f"turns must be positive, got {turns}")
    generator = as_generator(generator)
    draw = draw_device(generator)
    labels = torch.randint(0, 2, (n,), generator=generator, device=draw)
    max_angle = 2.0 * math.pi * turns
    theta = max_angle * torch.sqrt(torch.rand(n, generator=generator, device=draw, dtype=torch.float64))
    arm = theta[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    sign = 1.0 - 2.0 * labels.to(torch.float64)
    raw = sign[:, None] * arm + noise * torch.randn(n, 2, generator=generator, device=draw, dtype=torch.float64)
    second_moment = max_angle**2 / 2.0 + 2.0 * noise**2
    return _finish(raw, labels, (0.0, 0.0), second_moment, return_labels, dtype, device)


def pinwheel(
    n: int,
    generator: Generator = None,
    *,
    num_arms: int = 5,
    radial_std: float = 0.3,
    tangential_std: float = 0.1,
    rate: float = 0.25,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    r"""Pinwheel: ``num_arms`` curved Gaussian arms.

    After Johnson et al. (2016, "Composing graphical models with neural networks for structured
    representations and fast inference") as used by FFJORD.

    Raw form: :math:`f = (1 + \text{radial\_std}\, z_1,\ \text{tangential\_std}\, z_2)`, arm
    :math:`k` uniform, rotated by the angle :math:`2\pi k/\text{num\_arms} + \text{rate}\, e^{f_1}`.
    Rotations preserve the norm, so :math:`\mathbb{E}\|x\|^2 = 1 + \text{radial\_std}^2 +
    \text{tangential\_std}^2`; the mean is 0 because the arms' base angles are equally spaced
    (:math:`\sum_k e^{2\pi i k/K} = 0`) and independent of :math:`f`. Labels are the arm ``k``.
    """
    n = check_int("n", n, 0)
    _check_non_negative(radial_std=radial_std, tangential_std=tangential_std, rate=rate)
    num_arms = check_int("num_arms", num_arms, 2)  # the mean is 0 only from 2 arms on
    generator = as_generator(generator)
    draw = draw_device(generator)
    labels = torch.randint(0, num_arms, (n,), generator=generator, device=draw)
    z = torch.randn(n, 2, generator=generator, device=draw, dtype=torch.float64)
    radial = 1.0 + radial_std * z[:, 0]
    tangential = tangential_std * z[:, 1]
    angle = 2.0 * math.pi * labels.to(torch.float64) / num_arms + rate * torch.exp(radial)
    cos, sin = torch.cos(angle), torch.sin(angle)
    raw = torch.stack([cos * radial - sin * tangential, sin * radial + cos * tangential], dim=1)
    second_moment = 1.0 + radial_std**2 + tangential_std**2
    return _finish(raw, labels, (0.0, 0.0), second_moment, return_labels, dtype, device)


def rings(
    n: int,
    generator: Generator = None,
    *,
    num_rings: int = 4,
    noise: float = 0.1,
    return_labels: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor | None]:
    r"""Concentric circles of radii ``1, 2, ..., num_rings`` (raw units), equally many points each.

    Raw form: ring :math:`k` uniform, angle uniform, radius :math:`k + 1`, plus
    :math:`\mathcal{N}(0, \text{noise}^2 I)`. Mean 0 and
    :math:`\mathbb{E}\|x\|^2 = \tfrac1K\sum_{k=1}^{K} k^2 + 2\,\text{noise}^2 = (K+1)(2K+1)/6 + 2\,\text{noise}^2`;
    with the defaults the standardised radii are about 0.37, 0.73, 1.10, 1.46. Labels are the ring.
    """
    n = check_int("n", n, 0)
    _check_non_negative(noise=noise)
    num_rings = check_int("num_rings", num_rings, 1)
    generator = as_generator(generator)
    draw = draw_device(generator)
    labels = torch.randint(0, num_rings, (n,), generator=generator, device=draw)
    angle = 2.0 * math.pi * torch.rand(n, generator=generator, device=draw, dtype=torch.float64)
    radius = (labels + 1).to(torch.float64)
    raw = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    raw = raw + noise * torch.randn(n, 2, generator=generator, device=draw, dtype=torch.float64)
    second_moment = (num_rings + 1) * (2 * num_rings + 1) / 6.0 + 2.0 * noise**2
    return _finish(raw, labels, (0.0, 0.0), second_moment, return_labels, dtype, device)


TOY_DATASETS: dict[str, Callable[..., Tensor | tuple[Tensor, Tensor | None]]] = {
    "checkerboard": checkerboard,
    "eight_gaussians": eight_gaussians,
    "gmm": gmm,
    "moons": moons,
    "pinwheel": pinwheel,
    "rings": rings,
    "spirals": spirals,
}
"""Name → generator for the 2-D toy sets."""

TOY_NUM_CLASSES: dict[str, int | None] = {
    "checkerboard": None,
    "eight_gaussians": 8,
    "gmm": 3,
    "moons": 2,
    "pinwheel": 5,
    "rings": 4,
    "spirals": 2,
}
"""Number of label values of each toy set with the default shape parameters (``None``: unlabelled)."""
