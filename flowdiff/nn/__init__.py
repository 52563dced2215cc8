"""Networks with time (and class) conditioning, called as ``model(x, t, y=None)`` with ``t`` of shape ``(B,)``.

* :class:`MLP` — residual MLP for vectors ``(B, D)``.
* :class:`UNet` — small UNet for images ``(B, C, H, W)`` (8×8 digits, 32×32 images).
* :class:`TimeEmbedding`, :class:`LabelEmbedding`, :func:`drop_labels` — conditioning; label
  ``num_classes`` is the null label of classifier-free guidance (Ho & Salimans, 2022).
* :class:`Preconditioned` — EDM preconditioning (Karras et al., 2022) around any network, for
  every Gaussian path and prediction type.
* :func:`build_network` / :func:`available_networks` — construction by name.

This layer knows only torch.
"""

from flowdiff.nn.embeddings import (
    LabelEmbedding,
    TimeEmbedding,
    broadcast_time,
    drop_labels,
    sinusoidal_features,
    validate_labels,
)
from flowdiff.nn.gicnet import GICNet
from flowdiff.nn.mlp import MLP
from flowdiff.nn.precond import Preconditioned
from flowdiff.nn.registry import available_networks, build_network, register_network
from flowdiff.nn.unet import UNet

__all__ = [
    "GICNet",
    "MLP",
    "UNet",
    "Preconditioned",
    "TimeEmbedding",
    "LabelEmbedding",
    "drop_labels",
    "sinusoidal_features",
    "broadcast_time",
    "validate_labels",
    "build_network",
    "available_networks",
    "register_network",
]
