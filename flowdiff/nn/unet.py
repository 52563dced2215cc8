r"""A small time-conditioned UNet for images ``(B, C, H, W)``.

The architecture follows the DDPM/ADM UNet (Ronneberger et al., 2015, "U-Net"; Ho et al., 2020,
"Denoising diffusion probabilistic models"; Dhariwal & Nichol, 2021, "Diffusion models beat GANs
on image synthesis") at a size that trains on a CPU:

* an input 3×3 convolution to ``channels[0]``;
* one *level* per entry of ``channels``: ``num_res_blocks`` residual blocks (GroupNorm → SiLU →
  conv, plus a projection of the time/class embedding added per channel), optional multi-head
  self-attention, then a stride-2 downsampling convolution except at the last level;
* a middle block ``ResBlock → Attention → ResBlock`` at the lowest resolution;
* the mirrored upsampling path with skip connections (concatenation), nearest-neighbour
  upsampling followed by a 3×3 convolution;
* GroupNorm → SiLU → 3×3 convolution back to ``in_channels``.

``H`` and ``W`` must be divisible by ``2 ** (len(channels) - 1)``: ``channels=(32, 64)`` works on
8×8 digits (8 → 4) and on 32×32 images; ``(64, 128, 256)`` works on 32×32 (32 → 16 → 8).

**Zero initialisation.** The last convolution of every residual block, the output projection of
every attention block and the final convolution start at zero (ADM's ``zero_module``), so every
block starts as the identity and a fresh network outputs exactly 0: the first loss is the target's
second moment and conversions between predictions, which divide by ``α`` or ``σ`` near the ends of
the path, do not amplify random outputs. Gradients reach every parameter from the third step on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flowdiff.nn.embeddings import LabelEmbedding, TimeEmbedding, broadcast_time, check_input_dtype

__all__ = ["UNet"]


def _zero(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """``skip(x) + conv2(Drop(SiLU(GN(conv1(SiLU(GN(x))) + P SiLU(e)))))`` with ``conv2 = 0`` at init."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed_projection = nn.Linear(embed_dim, out_channels)
        self.norm_out = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        h = h + self.embed_projection(F.silu(embedding))[:, :, None, None]
        h = self.conv_out(self.dropout(F.silu(self.norm_out(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    r"""Multi-head self-attention over the ``H·W`` positions: ``x + W_o softmax(QKᵀ/√d) V``, ``W_o = 0`` at init."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.projection = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, channels // self.num_heads, height * width)
        # (B, heads, tokens, head_dim) for scaled_dot_product_attention.
        query, key, value = (qkv[:, i].transpose(-1, -2) for i in range(3))
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.projection(attended)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (halves ``H`` and ``W``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _EmbedSequential(nn.ModuleList):
    """A sequence of layers where residual blocks also receive the conditioning embedding."""

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, embedding) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """Small time-conditioned UNet; the output has the input's shape ``(B, C, H, W)``.

    Arguments:
        in_channels: image channels ``C``.
        channels: width of each resolution level; one downsampling between consecutive levels.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention: per level, whether to add self-attention after each residual block; a single
            bool applies to every level. Default: attention at the lowest resolution only (when
            there is more than one level). The middle block always has attention when
            ``mid_attention`` is true.
        time_embed_dim: dimension of the time/class embedding; default ``4 * channels[0]``.
        num_classes: number of classes ``K`` for class conditioning (null label ``K``), or ``None``.
        dropout: dropout probability inside the residual blocks.
        groups: number of GroupNorm groups; must divide every entry of ``channels``.
        num_heads: attention heads; must divide the width of every level with attention.
        mid_attention: whether the middle block has self-attention.

    Call ``model(x, t, y=None)`` with ``t`` of shape ``(B,)`` in ``[0, 1]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        num_res_blocks: int = 1,
        attention: bool | Sequence[bool] | None = None,
        time_embed_dim: int | None = None,
        num_classes: int | None = None,
        dropout: float = 0.0,
        groups: int = 8,
        num_heads: int = 4,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if len(channels) == 0 or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive integers, got {channels}")
        if isinstance(num_res_blocks, bool) or not isinstance(num_res_blocks, int) or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be a positive integer, got {num_res_blocks!r}")
        if groups < 1 or any(c % groups != 0 for c in channels):
            raise ValueError(f"groups={groups} must divide every entry of channels={channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if attention is None:
            attention = tuple(level == len(channels) - 1 and len(channels) > 1 for level in range(len(channels)))
        elif isinstance(attention, bool):
            attention = (attention,) * len(channels)
        attention = tuple(bool(a) for a in attention)
        if len(attention) != len(channels):
            raise ValueError(
                f"attention must have one entry per level ({len(channels)} for channels={channels}), got {attention}"
            )
        for level, width in enumerate(channels):
            needs_heads = attention[level] or (mid_attention and level == len(channels) - 1)
            if needs_heads and (num_heads < 1 or width % num_heads != 0):
                raise ValueError(f"num_heads={num_heads} must divide the width {width} of attention level {level}")
        time_embed_dim = 4 * channels[0] if time_embed_dim is None else time_embed_dim
        if time_embed_dim < 1:
            raise ValueError(f"time_embed_dim must be a positive integer, got {time_embed_dim}")

        self.in_channels = in_channels
        self.channels = channels
        self.attention = attention
        self.num_classes = num_classes
        self.time_embedding = TimeEmbedding(time_embed_dim)
        self.label_embedding = LabelEmbedding(num_classes, time_embed_dim) if num_classes is not None else None

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, time_embed_dim, groups, dropout)

        self.input_conv = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths = [channels[0]]
        width = channels[0]
        for level, level_width in enumerate(channels):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(width, level_width)]
                width = level_width
                if attention[level]:
                    layers.append(AttentionBlock(width, num_heads, groups))
                self.down.append(_EmbedSequential(layers))
                skip_widths.append(width)
            if level != len(channels) - 1:
                self.down.append(_EmbedSequential([Downsample(width)]))
                skip_widths.append(width)

        middle: list[nn.Module] = [res_block(width, width)]
        if mid_attention:
            middle.append(AttentionBlock(width, num_heads, groups))
        middle.append(res_block(width, width))
        self.middle = _EmbedSequential(middle)

        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            for index in range(num_res_blocks + 1):
                layers = [res_block(width + skip_widths.pop(), channels[level])]
                width = channels[level]
                if attention[level]:
                    layers.append(AttentionBlock(width, num_heads, groups))
                if level != 0 and index == num_res_blocks:
                    layers.append(Upsample(width))
                self.up.append(_EmbedSequential(layers))

        self.output_norm = nn.GroupNorm(groups, width)
        # Zero output at initialisation (see the module docstring for why).
        self.output_conv = _zero(nn.Conv2d(width, in_channels, 3, padding=1))

    @property
    def resolution_divisor(self) -> int:
        """``H`` and ``W`` must be multiples of this number, ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Evaluate the network.

        Arguments:
            x: images, shape ``(B, in_channels, H, W)`` with ``H, W`` multiples of ``resolution_divisor``.
            t: times, shape ``(B,)`` (a scalar is broadcast).
            y: integer labels ``(B,)`` in ``[0, num_classes]`` (``num_classes`` = null label);
                ``None`` means unconditional. Must be ``None`` for an unconditional net.

        Returns:
            Output of shape, dtype and device of ``x``.
        """
        check_input_dtype(x, self.input_conv.weight, "UNet")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        divisor = self.resolution_divisor
        if x.shape[2] % divisor != 0 or x.shape[3] % divisor != 0:
            raise ValueError(
                f"UNet with {len(self.channels)} levels needs H and W divisible by {divisor}, "
                f"got H={x.shape[2]}, W={x.shape[3]}"
            )
        batch_size = x.shape[0]
        t = broadcast_time(t, batch_size, x)
        embedding = self.time_embedding(t)
        if self.label_embedding is not None:
            embedding = embedding + self.label_embedding(y, batch_size, x.device)
        elif y is not None:
            raise ValueError("y was given but this UNet is unconditional (num_classes=None)")

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, embedding)
            skips.append(h)
        h = self.middle(h, embedding)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.output_conv(F.silu(self.output_norm(h)))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, num_classes={self.num_classes}"
