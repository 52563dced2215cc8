r"""Time and class conditioning shared by every network in :mod:`flowdiff.nn`.

**Time.** A network sees the interpolation time :math:`t \in [0, 1]` (``t = 0`` base/noise,
``t = 1`` data) through sinusoidal features followed by a small MLP, the positional encoding of
Vaswani et al. (2017, "Attention is all you need") as used for diffusion time steps by Ho et al.
(2020, "Denoising diffusion probabilistic models"):

.. math::

    \phi(t) = \big[\cos(\omega_0 s t), \dots, \cos(\omega_{m-1} s t),
                   \sin(\omega_0 s t), \dots, \sin(\omega_{m-1} s t)\big],
    \qquad \omega_k = P^{-k/m},

with scale :math:`s = 1000` (so ``t`` in ``[0, 1]`` spans the same phases as DDPM's integer steps
``0..999``) and maximal period :math:`P = 10^4`. The highest frequency resolves differences in ``t``
of about ``1e-3``, the lowest one (``s / P = 0.1`` rad per unit time) is monotone over ``[0, 1]``.

**Classes.** ``num_classes = K`` gives an embedding table with ``K + 1`` rows; row ``K`` is the
*null label* used for classifier-free guidance (Ho & Salimans, 2022, "Classifier-free diffusion
guidance"): the same network is trained conditionally and, with probability ``p``, with the label
replaced by the null label (:func:`drop_labels`), so that ``y = None`` (null label) gives the
unconditional model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "TimeEmbedding",
    "LabelEmbedding",
    "sinusoidal_features",
    "broadcast_time",
    "drop_labels",
    "validate_labels",
    "check_input_dtype",
]


def sinusoidal_features(
    t: Tensor, num_features: int, scale: float = 1000.0, max_period: float = 10_000.0
) -> Tensor:
    r"""Sinusoidal features :math:`\phi(t)` of a batch of times (Vaswani et al., 2017; Ho et al., 2020).

    Arguments:
        t: times, shape ``(B,)``, floating point.
        num_features: even number of features ``2m``.
        scale: factor ``s`` applied to ``t`` before the sinusoids.
        max_period: the longest period ``P`` (in units of ``s t``).

    Returns:
        ``[cos(ω_k s t), sin(ω_k s t)]`` with ``ω_k = P^{-k/m}``, shape ``(B, 2m)``, dtype and device of ``t``.
    """
    if num_features <= 0 or num_features % 2 != 0:
        raise ValueError(f"num_features must be a positive even integer, got {num_features}")
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got shape {tuple(t.shape)}")
    half = num_features // 2
    exponents = torch.arange(half, dtype=t.dtype, device=t.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)
    phases = (scale * t)[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(phases), torch.sin(phases)], dim=-1)


def broadcast_time(t: Tensor | float, batch_size: int, like: Tensor) -> Tensor:
    """Turn ``t`` into a tensor of shape ``(B,)`` with the dtype and device of ``like``.

    The library convention is that callers pass ``t`` of shape ``(B,)``; a Python float, a 0-d
    tensor or a tensor of shape ``(1,)`` is accepted too and broadcast to the batch.

    Arguments:
        t: time(s), a float, or a tensor of shape ``()``, ``(1,)`` or ``(B,)``.
        batch_size: ``B``.
        like: a tensor whose floating dtype and device the result takes.

    Returns:
        Times of shape ``(B,)``.
    """
    if isinstance(t, bool) or not isinstance(t, (Tensor, float, int)):
        raise TypeError(f"t must be a float or a Tensor of shape (B,), got {type(t).__name__}")
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch_size)
    if t.ndim == 1 and t.shape[0] == batch_size:
        return t
    raise ValueError(
        f"t must be a scalar or have shape ({batch_size},) to match the batch, got shape {tuple(t.shape)}"
    )


class TimeEmbedding(nn.Module):
    r"""Embedding of the time ``t`` in ``[0, 1]``: sinusoidal features, then ``Linear → SiLU → Linear``.

    Arguments:
        dim: output dimension.
        num_features: number of sinusoidal features (even); defaults to ``dim`` rounded up to even.
        scale: factor ``s`` applied to ``t`` (default 1000, see the module docstring).
        max_period: longest period ``P`` of the sinusoids (default ``1e4``).
    """

    def __init__(
        self,
        dim: int,
        num_features: int | None = None,
        scale: float = 1000.0,
        max_period: float = 10_000.0,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        if num_features is None:
            num_features = dim + dim % 2
        if num_features <= 0 or num_features % 2 != 0:
            raise ValueError(f"num_features must be a positive even integer, got {num_features}")
        self.dim = dim
        self.num_features = num_features
        self.scale = float(scale)
        self.max_period = float(max_period)
        self.linear_in = nn.Linear(num_features, dim)
        self.linear_out = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        """Embed times ``t`` of shape ``(B,)`` into ``(B, dim)``."""
        features = sinusoidal_features(t, self.num_features, self.scale, self.max_period)
        hidden = nn.functional.silu(self.linear_in(features.to(self.linear_in.weight.dtype)))
        return self.linear_out(hidden)


class LabelEmbedding(nn.Module):
    """Class-label embedding with a null label for classifier-free guidance (Ho & Salimans, 2022).

    The table has ``num_classes + 1`` rows; index ``num_classes`` is the null label. ``y = None``
    means "unconditional" and uses the null label for the whole batch.

    Arguments:
        num_classes: number of real classes ``K``; labels are integers in ``[0, K]``.
        dim: embedding dimension.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        """The index of the null (unconditional) label, ``num_classes``."""
        return self.num_classes

    def forward(self, y: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """Embed labels ``y`` of shape ``(B,)`` (or ``None`` for the null label) into ``(B, dim)``."""
        if y is None:
            y = torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)
        else:
            y = validate_labels(y, batch_size, self.num_classes).to(device)
        return self.embedding(y)


def validate_labels(y: Tensor, batch_size: int, num_classes: int) -> Tensor:
    """Check that ``y`` is an integer tensor of shape ``(B,)`` with values in ``[0, num_classes]``.

    ``num_classes`` itself is allowed: it is the null label. Returns ``y`` as ``torch.long``.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be an integer Tensor of shape (B,) or None, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.shape != (batch_size,):
        raise ValueError(f"y must have shape ({batch_size},) to match the batch, got shape {tuple(y.shape)}")
    if y.numel() > 0:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high > num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} out of range: labels must lie in [0, {num_classes - 1}], "
                f"or equal {num_classes} (the null label)"
            )
    return y.long()


def drop_labels(
    y: Tensor, p: float, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""Replace each label by the null label ``num_classes`` with probability ``p``.

    This is the label dropout of classifier-free guidance (Ho & Salimans, 2022, "Classifier-free
    diffusion guidance"): one network learns both :math:`p(x \mid y)` and :math:`p(x)`.

    Arguments:
        y: integer labels, shape ``(B,)``, values in ``[0, num_classes]``.
        p: drop probability in ``[0, 1]``.
        num_classes: number of real classes ``K`` (the null label is ``K``).
        generator: random generator (its device is used for the draw); ``None`` uses the global one.

    Returns:
        A new label tensor of shape ``(B,)``, dtype ``torch.long``, on ``y``'s device.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if not isinstance(y, Tensor) or y.ndim != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be an integer Tensor of shape (B,), got {shape}")
    y = validate_labels(y, y.shape[0], num_classes)
    # Draw on the generator's device (torch requires it), then move to y's device.
    draw_device = generator.device if generator is not None else y.device
    uniform = torch.rand(y.shape, generator=generator, device=draw_device).to(y.device)
    return torch.where(uniform < p, torch.full_like(y, num_classes), y)


def check_input_dtype(x: Tensor, parameter: Tensor, network: str) -> None:
    """Raise ``TypeError`` unless ``x`` is floating point with the dtype of the network's parameters.

    Torch's own error for a dtype mismatch names neither the input nor the fix; this one does.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{network} input x must be a Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{network} input x must be floating point, got dtype {x.dtype}")
    if x.dtype != parameter.dtype:
        raise TypeError(
            f"{network} input x has dtype {x.dtype} but the network's parameters are {parameter.dtype}; "
            f"convert one of them, e.g. network.to({x.dtype})"
        )
