"""Build a network by name for a given per-sample data shape.

``build_network("mlp", (2,))`` gives an :class:`~flowdiff.nn.MLP` for 2-D points,
``build_network("unet", (1, 8, 8), num_classes=10)`` a class-conditional
:class:`~flowdiff.nn.UNet` for 8×8 digits. Other layers (graphs, sequences) register their own
builders with :func:`register_network`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from flowdiff._utils import check_int
from flowdiff.nn.mlp import MLP
from flowdiff.nn.unet import UNet

__all__ = ["build_network", "available_networks", "register_network"]

NetworkBuilder = Callable[..., nn.Module]
"""``builder(data_shape: tuple[int, ...], **kwargs) -> nn.Module``."""


def _build_mlp(data_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    if "dim" in kwargs and kwargs["dim"] != math.prod(data_shape):
        raise ValueError(f"dim={kwargs['dim']} does not match data_shape {data_shape} ({math.prod(data_shape)} values)")
    kwargs.pop("dim", None)
    return MLP(dim=math.prod(data_shape), sample_shape=data_shape, **kwargs)


def _build_unet(data_shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    if len(data_shape) != 3:
        raise ValueError(f"the unet needs image data of shape (C, H, W), got data_shape {data_shape}")
    channels, height, width = data_shape
    if "in_channels" in kwargs and kwargs["in_channels"] != channels:
        raise ValueError(f"in_channels={kwargs['in_channels']} does not match data_shape {data_shape}")
    kwargs.pop("in_channels", None)
    network = UNet(in_channels=channels, **kwargs)
    divisor = network.resolution_divisor
    if height % divisor != 0 or width % divisor != 0:
        raise ValueError(
            f"a unet with channels={network.channels} needs H and W divisible by {divisor}, "
            f"got data_shape {data_shape}; use fewer levels"
        )
    return network


_NETWORKS: dict[str, NetworkBuilder] = {"mlp": _build_mlp, "unet": _build_unet}


def available_networks() -> list[str]:
    """The names :func:`build_network` accepts, sorted."""
    return sorted(_NETWORKS)


def register_network(name: str, builder: NetworkBuilder, overwrite: bool = False) -> None:
    """Make ``build_network(name, data_shape, **kwargs)`` call ``builder(data_shape, **kwargs)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name.lower() in _NETWORKS and not overwrite:
        raise ValueError(f"a network named {name!r} is already registered; pass overwrite=True to replace it")
    _NETWORKS[name.lower()] = builder


def build_network(name: str, data_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build the network ``name`` for samples of shape ``data_shape`` (without the batch axis).

    Arguments:
        name: one of :func:`available_networks` (case-insensitive).
        data_shape: per-sample shape, e.g. ``(2,)`` or ``(1, 8, 8)``.
        kwargs: passed to the network's constructor (``hidden``, ``channels``, ``num_classes``, ...).

    Returns:
        The network, an ``nn.Module`` called as ``model(x, t, y=None)``.
    """
    if not isinstance(name, str) or name.lower() not in _NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names are {available_networks()}")
    data_shape = tuple(data_shape)
    if len(data_shape) == 0:
        raise ValueError(f"data_shape must be a non-empty tuple of positive integers, got {data_shape}")
    # numpy integers (and other integer scalars) through __index__; no silent truncation of 2.5 to 2
    data_shape = tuple(
        check_int(f"data_shape[{i}]", operator.index(s) if hasattr(s, "__index__") else s, 1)
        for i, s in enumerate(data_shape)
    )
    return _NETWORKS[name.lower()](data_shape, **kwargs)
