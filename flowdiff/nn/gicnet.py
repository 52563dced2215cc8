r"""Grid-Invariant Convolutional Network (GICNet) of Random Grid Neural Processes.

Vadeboncoeur, Kazlauskaite, Papandreou, Cirak, Girolami, Akyildiz, *Random Grid Neural Processes for
Parametric PDEs*, ICML 2023, §4. A field seen at *arbitrary* points :math:`(x_j, v_j)_{j\le N}` is mapped to a
fixed latent grid :math:`g_m` by one trainable, normalised (Nadaraya–Watson) EQ kernel per channel,

.. math::  h_j = \mathrm{swish}(A v_j + a) \in \mathbb R^P, \qquad
           V_p(g_m) = \frac{\sum_j k_p(g_m, x_j)\, h_{j,p}}{\sum_j k_p(g_m, x_j) + 10^{-6}}, \qquad
           k_p(g,x) = e^{-\|g-x\|^2 / (2\ell_p^2)},

with bandwidths :math:`\ell_p` geometric from ``min_bandwidth`` to ``max_bandwidth`` (trainable). The stack
[grid coordinates, :math:`V_1..V_P`] goes through a CNN, is flattened, concatenated with an MLP of the known inputs
``w`` ("trunk") and a head MLP gives a Gaussian over the output (mean, variance squashed into
:math:`[a, 1]`: :math:`a + (1-a)\,\mathrm{sigmoid}(o)`). The output does not depend on the number or order of
the points, which is what makes the inverse map usable on other grids than those of training.

This module imports only torch (it lives in ``flowdiff.nn``; ``flowdiff.pde`` uses it for the amortised inverse).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GICNet"]


class GICNet(nn.Module):
    """Set of points -> Gaussian over a finite vector (RGNP's amortised inverse map).

    Arguments:
        dim: spatial dimension ``d`` of the points (1, 2 or 3); points are expected in [-1, 1]^d.
        in_channels: values per point ``c``.
        out_features: size of the output vector (e.g. ``dz``).
        known_features: size of the known inputs ``w`` (0 for none).
        channels: ``P``, lifted channels (one kernel each).
        grid: latent grid points per axis (endpoints included).
        conv_channels, conv_layers: the CNN.
        hidden: width of the trunk and head MLPs.
        min_bandwidth, max_bandwidth: the geometric range of the initial bandwidths.
        min_variance: ``a`` in the variance squashing.

    ``forward(x (B, N, d), values (B, N, c), w (B, dw), mask=None) -> (mean (B, out), var (B, out))``.
    """

    def __init__(self, dim: int, in_channels: int, out_features: int, known_features: int = 0, *, channels: int = 16,
                 grid: int = 20, conv_channels: int = 16, conv_layers: int = 4, hidden: int = 128,
                 min_bandwidth: float = 1e-3, max_bandwidth: float = 1.0, min_variance: float = 1e-5) -> None:
        super().__init__()
        if dim not in (1, 2, 3):
            raise ValueError(f"GICNet supports dim 1, 2 or 3, got {dim}")
        for label, value in (("in_channels", in_channels), ("out_features", out_features), ("channels", channels),
                             ("grid", grid), ("conv_channels", conv_channels), ("hidden", hidden)):
            if int(value) < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if not 0 < min_bandwidth <= max_bandwidth:
            raise ValueError(f"need 0 < min_bandwidth <= max_bandwidth, got {min_bandwidth}, {max_bandwidth}")
        self.dim, self.out_features, self.known_features = dim, out_features, known_features
        self.min_variance = float(min_variance)
        self.lift = nn.Linear(in_channels, channels)
        frac = torch.linspace(0, 1, channels)
        self.log_bandwidth = nn.Parameter(math.log(min_bandwidth) + frac * math.log(max_bandwidth / min_bandwidth))
        axes = torch.meshgrid(*([torch.linspace(-1, 1, grid)] * dim), indexing="ij")
        self.register_buffer("grid_points", torch.stack(axes, dim=-1).reshape(-1, dim), persistent=False)
        self.grid_shape = (grid,) * dim
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        layers: list[nn.Module] = []
        width = channels + dim
        for _ in range(conv_layers):
            layers += [conv(width, conv_channels, 3, padding=1), nn.SiLU()]
            width = conv_channels
        self.cnn = nn.Sequential(*layers)
        self.branch = nn.Linear(width * grid**dim, hidden)
        self.trunk = nn.Sequential(nn.Linear(known_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()) \
            if known_features > 0 else None
        head_in = hidden * (2 if known_features > 0 else 1)
        self.head = nn.Sequential(nn.Linear(head_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 2 * out_features))

    def encode(self, x: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """The latent grid (B, P + d, *grid) of points ``x`` (B, N, d) with ``values`` (B, N, c); ``mask`` (B, N)
        (1 keep, 0 drop) lets cases with fewer points share a batch."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if values.ndim == 2:
            values = values.unsqueeze(-1)
        if values.shape[:2] != x.shape[:2]:
            raise ValueError(f"values {tuple(values.shape)} must match x {tuple(x.shape)} in (B, N)")
        h = nn.functional.silu(self.lift(values))  # (B, N, P)
        dist2 = ((self.grid_points[None, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)  # (B, G, N)
        ell2 = torch.exp(2 * self.log_bandwidth)  # (P,)
        k = torch.exp(-dist2[..., None] / (2 * ell2))  # (B, G, N, P)
        if mask is not None:
            k = k * mask[:, None, :, None].to(k)
        v = (k * h[:, None]).sum(2) / (k.sum(2) + 1e-6)  # (B, G, P)
        feats = torch.cat([self.grid_points.expand(x.shape[0], -1, -1).to(v), v], dim=-1)
        return feats.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_shape)

    def forward(self, x: Tensor, values: Tensor, w: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        feats = self.cnn(self.encode(x, values, mask)).flatten(1)
        hidden = nn.functional.silu(self.branch(feats))
        if self.trunk is not None:
            if w is None or w.shape != (x.shape[0], self.known_features):
                raise ValueError(f"w must have shape ({x.shape[0]}, {self.known_features}), got "
                                 f"{None if w is None else tuple(w.shape)}")
            hidden = torch.cat([hidden, self.trunk(w)], dim=-1)
        out = self.head(hidden)
        mean, raw = out.chunk(2, dim=-1)
        var = self.min_variance + (1 - self.min_variance) * torch.sigmoid(raw)
        return mean, var
