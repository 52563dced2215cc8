"""Input checks shared by the metrics (no flowdiff imports beyond this package)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor


def as_sample_matrix(x: object, name: str, min_samples: int = 1) -> Tensor:
    """Return ``x`` of shape ``(N, *shape)`` flattened to a floating ``(N, D)`` matrix.

    Arguments:
        x: a tensor of shape ``(N, *shape)``; integer tensors are promoted to
            the default floating dtype.
        name: the argument's name, used in error messages.
        min_samples: the smallest allowed ``N``.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is 0-d, has fewer than ``min_samples`` rows, has an
            empty feature dimension or holds non-finite values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, *shape), got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have shape (N, *shape) with a sample dimension, got a 0-d tensor")
    if x.shape[0] < min_samples:
        raise ValueError(
            f"{name} must hold at least {min_samples} samples, got N={x.shape[0]} (shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        if x.is_complex():
            raise TypeError(f"{name} must be real, got dtype {x.dtype}")
        x = x.to(torch.get_default_dtype())
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature per sample, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values (nan or inf); metrics need finite samples")
    return x


def as_sample_pair(x: object, y: object, min_samples: int = 1) -> tuple[Tensor, Tensor]:
    """Flatten two sample sets, check their feature dimensions agree and promote to one dtype.

    ``y`` is moved to ``x``'s device; both take ``torch.promote_types`` of their dtypes.

    Raises:
        ValueError: the flattened feature dimensions differ.
    """
    x2 = as_sample_matrix(x, "x", min_samples)
    y2 = as_sample_matrix(y, "y", min_samples)
    if x2.shape[1] != y2.shape[1]:
        raise ValueError(
            "x and y must have the same number of features per sample, got "
            f"D_x={x2.shape[1]} (x of shape {tuple(cast(Tensor, x).shape)}) and "
            f"D_y={y2.shape[1]} (y of shape {tuple(cast(Tensor, y).shape)})"
        )
    dtype = torch.promote_types(x2.dtype, y2.dtype)
    return x2.to(dtype), y2.to(device=x2.device, dtype=dtype)

