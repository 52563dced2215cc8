r"""Time-conditioned residual MLP for vector data ``(B, D)``.

The network is a stack of pre-norm residual blocks (He et al., 2016, "Identity mappings in deep
residual networks"), each adding a projection of the conditioning embedding
:math:`e = \mathrm{TimeEmbedding}(t) + \mathrm{LabelEmbedding}(y)`:

.. math::

    h \leftarrow h + W_2\,\mathrm{Drop}\big(\mathrm{SiLU}(\mathrm{LN}(
        W_1\,\mathrm{SiLU}(\mathrm{LN}(h)) + P\,\mathrm{SiLU}(e)))\big).

**Zero initialisation.** ``W_2`` of every block and the output layer start at zero (as the
``zero_module`` layers of Dhariwal & Nichol, 2021, "Diffusion models beat GANs on image
synthesis"), so each block starts as the identity and a fresh network outputs exactly 0. A zero
prediction is the safest start for every parametrisation: for noise/data/velocity targets the
initial loss equals the target's second moment instead of a random, possibly huge value, and the
conversions between predictions (which divide by ``α`` or ``σ`` near the ends of the path) do not
amplify random initial outputs. Gradients still flow: the output layer gets a gradient at the
first step, the block outputs at the second, every parameter from the third on.

**Fourier features of the input** (optional, ``fourier_features = m > 0``). A small MLP of ``x``
learns low frequencies first and rounds sharp edges (the spectral bias); Tancik et al. (2020,
"Fourier features let networks learn high frequency functions in low dimensional domains") feed it

.. math::

    \gamma(x) = \big[x,\ \cos(2\pi B x),\ \sin(2\pi B x)\big], \qquad
    B \in \mathbb{R}^{m \times D},\ B_{ij} \sim \mathcal{N}(0, s^2),

with ``s`` = ``fourier_scale`` (in cycles per unit of ``x``). ``B`` is drawn from its own generator
seeded by ``fourier_seed``, so the network's configuration alone rebuilds it: it is a
non-persistent buffer, absent from the state dict (checkpoints without Fourier features load
unchanged, and one with them needs only its configuration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowdiff.nn.embeddings import LabelEmbedding, TimeEmbedding, broadcast_time, check_input_dtype

__all__ = ["MLP"]


class ResidualBlock(nn.Module):
    """Pre-norm residual block ``h + W2 Drop(SiLU(LN(W1 SiLU(LN h) + P SiLU(e))))`` with ``W2 = 0`` at init."""

    def __init__(self, hidden: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden)
        self.linear_in = nn.Linear(hidden, hidden)
        self.embed_projection = nn.Linear(embed_dim, hidden)
        self.norm_out = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.linear_out = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear_out.weight)
        nn.init.zeros_(self.linear_out.bias)

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        update = self.linear_in(nn.functional.silu(self.norm_in(h)))
        update = update + self.embed_projection(nn.functional.silu(embedding))
        update = self.linear_out(self.dropout(nn.functional.silu(self.norm_out(update))))
        return h + update


class MLP(nn.Module):
    """Residual MLP with time (and optional class) conditioning for data of shape ``(B, D)``.

    Arguments:
        dim: data dimension ``D``.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        time_embed_dim: dimension of the time/class embedding; defaults to ``hidden``.
        num_classes: number of classes ``K`` for class conditioning (null label ``K``), or ``None``.
        dropout: dropout probability inside the blocks.
        sample_shape: per-sample shape of the data when it is not a vector (e.g. ``(1, 8, 8)``);
            the input ``(B, *sample_shape)`` is flattened to ``(B, D)`` and the output reshaped
            back. ``prod(sample_shape)`` must equal ``dim``. ``None`` means ``(dim,)``.
        fourier_features: number ``m`` of random Fourier frequencies of the input (Tancik et al.,
            2020); the first layer then sees ``[x, cos(2π B x), sin(2π B x)]`` (``D + 2m`` values).
            ``0`` (default) feeds ``x`` alone.
        fourier_scale: standard deviation ``s`` of the frequencies ``B`` (cycles per unit of ``x``).
        fourier_seed: seed of the generator that draws ``B``.

    Call ``model(x, t, y=None)`` with ``x`` of shape ``(B, D)`` (or ``(B, *sample_shape)``), ``t``
    of shape ``(B,)`` in ``[0, 1]`` and ``y`` integer labels ``(B,)`` or ``None``.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        time_embed_dim: int | None = None,
        num_classes: int | None = None,
        dropout: float = 0.0,
        sample_shape: Sequence[int] | None = None,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
        fourier_seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        for name, value in (("fourier_features", fourier_features), ("fourier_seed", fourier_seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(fourier_scale, bool) or not isinstance(fourier_scale, (int, float)) or not (
            math.isfinite(fourier_scale) and fourier_scale > 0
        ):
            raise ValueError(f"fourier_scale must be a finite positive number, got {fourier_scale!r}")
        if sample_shape is None:
            sample_shape = (dim,)
        sample_shape = tuple(int(s) for s in sample_shape)
        if math.prod(sample_shape) != dim or any(s < 1 for s in sample_shape):
            raise ValueError(f"sample_shape {sample_shape} does not hold dim={dim} values")
        time_embed_dim = hidden if time_embed_dim is None else time_embed_dim
        if time_embed_dim < 1:
            raise ValueError(f"time_embed_dim must be a positive integer, got {time_embed_dim}")

        self.dim = dim
        self.sample_shape = sample_shape
        self.num_classes = num_classes
        self.fourier_features = fourier_features
        self.fourier_scale = float(fourier_scale)
        self.fourier_seed = fourier_seed
        # B of gamma(x) (module docstring): drawn from the seed's own generator, without touching
        # torch's global one; non-persistent, so the configuration rebuilds it.
        frequencies = torch.randn(fourier_features, dim, generator=torch.Generator().manual_seed(fourier_seed),
                                  dtype=torch.float64) * self.fourier_scale
        self.register_buffer("fourier_frequencies", frequencies.to(torch.get_default_dtype()), persistent=False)
        self.time_embedding = TimeEmbedding(time_embed_dim)
        self.label_embedding = LabelEmbedding(num_classes, time_embed_dim) if num_classes is not None else None
        self.input_layer = nn.Linear(dim + 2 * fourier_features, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, time_embed_dim, dropout) for _ in range(depth))
        self.output_norm = nn.LayerNorm(hidden)
        self.output_layer = nn.Linear(hidden, dim)
        # Zero output at initialisation (see the module docstring for why).
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Evaluate the network.

        Arguments:
            x: data, shape ``(B, D)`` or ``(B, *sample_shape)``.
            t: times, shape ``(B,)`` (a scalar is broadcast).
            y: integer labels, shape ``(B,)``, in ``[0, num_classes]`` (``num_classes`` = null
                label); ``None`` means unconditional. Must be ``None`` for an unconditional net.

        Returns:
            Output of the same shape, dtype and device as ``x``.
        """
        check_input_dtype(x, self.input_layer.weight, "MLP")
        if x.ndim < 2 or tuple(x.shape[1:]) not in {self.sample_shape, (self.dim,)}:
            raise ValueError(
                f"MLP expects x of shape (B, {self.dim})"
                + (f" or (B, *{self.sample_shape})" if self.sample_shape != (self.dim,) else "")
                + f", got shape {tuple(x.shape)}"
            )
        batch_size = x.shape[0]
        input_shape = x.shape
        t = broadcast_time(t, batch_size, x)
        embedding = self.time_embedding(t)
        if self.label_embedding is not None:
            embedding = embedding + self.label_embedding(y, batch_size, x.device)
        elif y is not None:
            raise ValueError("y was given but this MLP is unconditional (num_classes=None)")

        h = self.input_layer(self._input_features(x.reshape(batch_size, self.dim)))
        for block in self.blocks:
            h = block(h, embedding)
        out = self.output_layer(nn.functional.silu(self.output_norm(h)))
        return out.reshape(input_shape)

    def _input_features(self, x: Tensor) -> Tensor:
        """``x`` itself, or ``[x, cos(2π B x), sin(2π B x)]`` with Fourier features (shape ``(B, D + 2m)``)."""
        if self.fourier_features == 0:
            return x
        phases = (2.0 * math.pi) * (x @ self.fourier_frequencies.to(x.dtype).T)
        return torch.cat([x, torch.cos(phases), torch.sin(phases)], dim=-1)

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, sample_shape={self.sample_shape}, num_classes={self.num_classes}"
        if self.fourier_features:
            text += f", fourier_features={self.fourier_features}, fourier_scale={self.fourier_scale}"
        return text
