r"""The TSDiff denoiser: a bidirectional residual sequence network on windows of a time series.

Kollovieh et al. (2023), "Predict, Refine, Synthesize: Self-Guiding Diffusion Models for
Probabilistic Time Series Forecasting" (NeurIPS), use residual blocks around a bidirectional S4
layer with a gated :math:`\tanh\cdot\sigma` non-linearity, 1×1 skip/residual convolutions and a
sinusoidal diffusion-step embedding (the DiffWave block; Kong et al. 2021, "DiffWave: A Versatile
Diffusion Model for Audio Synthesis"). This module keeps the block and replaces the S4 layer by a
*dilated, non-causal convolution* whose dilations double until the receptive field covers the
whole window twice. Why: the windows here are short (context + horizon of a few hundred steps at
most), where a dilated stack sees the full window like S4 does, runs fast on a CPU, and needs none
of S4's dependencies (pykeops, complex kernels, careful discretisation). A final block of
*time mixing* (a learned linear map across the window's positions, as in MLP-Mixer; Tolstikhin et
al. 2021) gives every output position a direct, global view of every input position, which the
forecasting positions need (they must read the whole context).

Input ``x`` has shape ``(B, C, L)``: the series channel followed by any lag channels (all of them
are denoised, as in the paper). Optional time features ``(C_f, L)`` (position in the window and
position in the season) are concatenated as extra, non-denoised input channels. ``t`` is the
flowdiff time (``t = 1`` data, ``t = 0`` noise), shape ``(B,)``; the network predicts the noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TSDiffNet"]


def _step_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``1000·(1 − t)`` (the DDPM step scale), shape ``(B, dim)``."""
    half = dim // 2
    steps = (1.0 - t) * 1000.0
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1))
    args = steps[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _ResidualBlock(nn.Module):
    """DiffWave/TSDiff residual block: conv(h + step) → tanh·sigmoid gate → 1×1 residual and skip."""

    def __init__(self, hidden: int, dilation: int, embed: int):
        super().__init__()
        self.step = nn.Linear(embed, hidden)
        self.conv = nn.Conv1d(hidden, 2 * hidden, 3, padding=dilation, dilation=dilation)
        self.out = nn.Conv1d(hidden, 2 * hidden, 1)

    def forward(self, h: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        y = self.conv(h + self.step(emb)[:, :, None])
        gate, filt = y.chunk(2, dim=1)
        y = torch.sigmoid(gate) * torch.tanh(filt)
        residual, skip = self.out(y).chunk(2, dim=1)
        return (h + residual) / math.sqrt(2.0), skip


class TSDiffNet(nn.Module):
    """Noise-prediction network for windows ``(B, channels, length)``; see the module docstring.

    Arguments:
        channels: denoised channels (1 + number of lags).
        length: window length (context + horizon); fixes the time-mixing layer.
        features: number of time-feature channels passed to ``forward`` (0: none).
        hidden: width of the residual blocks.
        blocks: number of residual blocks (``None``: enough doubling dilations to cover ``2·length``).
        embed: width of the step embedding.
    """

    def __init__(self, channels: int, length: int, features: int = 0, hidden: int = 64,
                 blocks: int | None = None, embed: int = 64):
        super().__init__()
        if blocks is None:
            blocks, field = 0, 1
            while field < 2 * length:
                field += 2 * 2 ** blocks
                blocks += 1
            blocks = max(blocks, 4)
        self.channels, self.length, self.features = int(channels), int(length), int(features)
        self.embed_dim = int(embed)
        self.embed = nn.Sequential(nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed), nn.SiLU())
        self.inp = nn.Conv1d(channels + features, hidden, 1)
        dilations = [2 ** (i % 10) for i in range(blocks)]
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, d, embed) for d in dilations)
        self.mix_norm = nn.GroupNorm(1, hidden)
        self.mix = nn.Linear(length, length)
        self.head = nn.Sequential(nn.Conv1d(hidden, hidden, 1), nn.SiLU(), nn.Conv1d(hidden, channels, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor, t: Tensor, features: Tensor | None = None) -> Tensor:
        if x.ndim != 3 or x.shape[1] != self.channels or x.shape[2] != self.length:
            raise ValueError(f"x must have shape (B, {self.channels}, {self.length}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        emb = self.embed(_step_embedding(t, self.embed_dim))
        if self.features:
            if features is None:
                raise ValueError(f"this network takes {self.features} time-feature channels; features=None")
            x = torch.cat([x, features.to(x).expand(x.shape[0], -1, -1)], dim=1)
        h = self.inp(x)
        skips = 0.0
        for block in self.blocks:
            h, skip = block(h, emb)
            skips = skips + skip
        h = skips / math.sqrt(len(self.blocks))
        h = h + self.mix(self.mix_norm(h))
        return self.head(h)
