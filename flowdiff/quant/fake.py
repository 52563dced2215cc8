r"""Fake-quantised layers: per-channel weights, per-tensor activations, AdaRound rounding, split shortcuts.

Uniform affine quantisation (Jacob et al., CVPR 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference"):

.. math::
    Q(x) = s\,\big(\mathrm{clamp}(\lfloor x/s \rceil + z,\; q_{min},\; q_{max}) - z\big),

symmetric (:math:`z = 0`, :math:`q \in [-(2^{b-1}-1), 2^{b-1}-1]`) or asymmetric
(:math:`q \in [0, 2^b - 1]`, :math:`z = \lfloor -\ell/s \rceil`). Weights get one scale per output
channel, activations (a layer's input) one per tensor, as in PTQ4DM (Shang et al., CVPR 2023,
"Post-training Quantization on Diffusion Models") and Q-Diffusion (Li et al., ICCV 2023,
"Q-Diffusion: Quantizing Diffusion Models"). Ranges are chosen by a grid search over clipping
ratios of the min–max range minimising the squared quantisation error (per channel for weights,
on a sample of the calibration activations for inputs).

**AdaRound** (Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): the weight is :math:`s(\mathrm{clamp}(\lfloor w/s\rfloor + h(V) + z) - z)` with a
learnt :math:`V` and the rectified sigmoid :math:`h(V) = \mathrm{clip}(\mathrm{sigmoid}(V)(\zeta - \gamma) + \gamma, 0, 1)`,
:math:`\zeta = 1.1, \gamma = -0.1`, hardened to 0/1 at the end (:mod:`flowdiff.quant.reconstruct`).

**Split shortcut** (Q-Diffusion §4.3): a UNet up-block's input is ``cat(h, skip)`` whose two parts
have very different ranges; a layer reading it gets one activation quantiser and one weight
quantiser per channel group (``split``).

The network's output is not quantised (it is a layer's output, and only inputs are); attention's
matrix products, normalisations and embeddings stay in floating point.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuantLayer", "fake_quantize", "qrange", "search_scale"]

ZETA, GAMMA = 1.1, -0.1
_RATIOS = 40  # clipping ratios in the range search
_MAX_SAMPLES = 1 << 14  # activation values kept per layer (and group) for the range search


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(q_min, q_max)`` of ``bits``-bit codes (restricted symmetric range, or unsigned asymmetric)."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, q_min: int, q_max: int) -> Tensor:
    """:math:`s(\\mathrm{clamp}(\\lfloor x/s\\rceil + z, q_{min}, q_{max}) - z)` with a straight-through gradient."""
    quantized = scale * (torch.clamp(torch.round(x / scale) + zero, q_min, q_max) - zero)
    return x + (quantized - x).detach()


def _scale_zero(low: Tensor, high: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    q_min, q_max = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(low.abs(), high.abs()) / q_max
        return scale.clamp_min(1e-12), torch.zeros_like(scale)
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)  # zero must be representable (padding, ReLU zeros)
    scale = ((high - low) / (q_max - q_min)).clamp_min(1e-12)
    zero = torch.clamp(torch.round(-low / scale), q_min, q_max)
    return scale, zero


def search_scale(values: Tensor, bits: int, symmetric: bool, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point minimising the squared error over clipping ratios 0.2..1 of the min–max range.

    ``dim=None``: one (scale, zero) for all ``values``; ``dim=0``: one per row of ``values`` (shape ``(R, ...)``),
    returned with shape ``(R,)``.
    """
    flat = values.detach().reshape(values.shape[0], -1) if dim == 0 else values.detach().reshape(1, -1)
    flat = flat.float()
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    q_min, q_max = qrange(bits, symmetric)
    ratios = torch.linspace(0.2, 1.0, _RATIOS, dtype=flat.dtype, device=flat.device)
    scale, zero = _scale_zero(low[:, None] * ratios, high[:, None] * ratios, bits, symmetric)  # (R, ratios)
    error = torch.zeros_like(scale)
    # All ratios at once, in row chunks that keep the (rows, ratios, values) product small.
    step = max(1, (1 << 22) // max(1, _RATIOS * flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        rows = slice(start, start + step)
        f, s, z = flat[rows, None, :], scale[rows, :, None], zero[rows, :, None]
        error[rows] = (s * (torch.clamp(torch.round(f / s) + z, q_min, q_max) - z) - f).pow(2).mean(dim=2)
    # Ties (e.g. 16 bits, where every ratio is near lossless) go to the widest range.
    best = (error - error.amin(dim=1, keepdim=True) <= 1e-6 * error.amin(dim=1, keepdim=True)).to(torch.int64)
    choice = (best * torch.arange(_RATIOS, device=flat.device)).argmax(dim=1)
    best_scale = scale.gather(1, choice[:, None])[:, 0].to(values.dtype)
    best_zero = zero.gather(1, choice[:, None])[:, 0].to(values.dtype)
    if dim == 0:
        return best_scale, best_zero
    return best_scale[0], best_zero[0]


class QuantLayer(nn.Module):
    """A ``Conv2d`` or ``Linear`` with fake-quantised weights and input.

    Arguments:
        layer: the floating layer (its weight and bias are copied, not shared).
        weight_bits, activation_bits: code widths (2..16).
        weight_symmetric, activation_symmetric: symmetric (zero point 0) or asymmetric codes.
        split: input channels of the first group of a concatenated input (Q-Diffusion's split
            shortcut); ``None`` for one group.

    Modes (attributes): ``calibrating`` records input samples instead of quantising;
    ``quantize_weights`` / ``quantize_activations`` switch each quantiser; ``drop_probability``
    keeps each input element in floating point with this probability while training (QDrop,
    Wei et al., ICLR 2022).
    """

    def __init__(self, layer: nn.Module, weight_bits: int, activation_bits: int, *, weight_symmetric: bool = True,
                 activation_symmetric: bool = False, split: int | None = None) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        if self.kind == "conv":
            self.conv_options = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                                 "groups": layer.groups}
            if layer.padding_mode != "zeros":
                raise ValueError(f"QuantLayer supports zero padding only, got padding_mode={layer.padding_mode!r}")
            if layer.groups != 1 and split is not None:
                raise ValueError("a split shortcut needs groups=1")
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.weight_bits, self.activation_bits = int(weight_bits), int(activation_bits)
        self.weight_symmetric, self.activation_symmetric = bool(weight_symmetric), bool(activation_symmetric)
        in_channels = self.weight.shape[1]
        if split is not None and not 0 < split < in_channels:
            raise ValueError(f"split must lie in 1..{in_channels - 1} for {in_channels} input channels, got {split}")
        self.split = split
        self.groups = [(0, in_channels)] if split is None else [(0, split), (split, in_channels)]
        count, out = len(self.groups), self.weight.shape[0]
        self.register_buffer("weight_scale", torch.ones(count, out, dtype=self.weight.dtype, device=self.weight.device))
        self.register_buffer("weight_zero", torch.zeros(count, out, dtype=self.weight.dtype, device=self.weight.device))
        self.register_buffer("activation_scale", torch.ones(count, dtype=self.weight.dtype, device=self.weight.device))
        self.register_buffer("activation_zero", torch.zeros(count, dtype=self.weight.dtype, device=self.weight.device))
        self.register_buffer("output_range", torch.zeros(2, dtype=self.weight.dtype, device=self.weight.device))
        self.rounding: nn.Parameter | None = None  # AdaRound's V (None: round to nearest)
        self.calibrating = False
        self.quantize_weights = True
        self.quantize_activations = True
        self.drop_probability = 0.0
        self._samples: list[list[Tensor]] = [[] for _ in self.groups]
        self._seen = 0

    # ----- calibration -------------------------------------------------------------------------
    def calibrate_weights(self) -> None:
        """Per-output-channel weight ranges (squared-error search), one set per channel group."""
        for g, (start, stop) in enumerate(self.groups):
            scale, zero = search_scale(self.weight[:, start:stop], self.weight_bits, self.weight_symmetric, dim=0)
            self.weight_scale[g] = scale.to(self.weight_scale.dtype)
            self.weight_zero[g] = zero.to(self.weight_zero.dtype)

    def calibrate_activations(self) -> None:
        """Per-tensor input ranges from the recorded samples (squared-error search)."""
        for g, samples in enumerate(self._samples):
            if not samples:
                raise RuntimeError("no calibration inputs reached this layer; run the model on calibration data first")
            scale, zero = search_scale(torch.cat(samples), self.activation_bits, self.activation_symmetric)
            self.activation_scale[g] = scale.to(self.activation_scale.dtype)
            self.activation_zero[g] = zero.to(self.activation_zero.dtype)
        self._samples = [[] for _ in self.groups]

    def _record(self, x: Tensor, output: Tensor) -> None:
        generator = torch.Generator().manual_seed(self._seen)
        self._seen += 1
        for g, (start, stop) in enumerate(self.groups):
            values = x[:, start:stop].detach().reshape(-1)
            keep = min(values.numel(), _MAX_SAMPLES // 8)
            index = torch.randperm(values.numel(), generator=generator)[:keep].to(values.device)
            # The extremes always enter: the search starts from the full min-max range.
            self._samples[g].append(torch.cat([values[index], values.min()[None], values.max()[None]]).cpu())
            total = sum(len(s) for s in self._samples[g])
            if total > _MAX_SAMPLES:
                merged = torch.cat(self._samples[g])
                order = torch.randperm(len(merged), generator=generator)[:_MAX_SAMPLES // 2]
                self._samples[g] = [merged[order], merged.min()[None], merged.max()[None]]
        low, high = float(output.min()), float(output.max())
        if self._seen == 1:
            self.output_range.copy_(torch.tensor([low, high]))
        else:
            self.output_range.copy_(torch.tensor([min(low, float(self.output_range[0])), max(high, float(self.output_range[1]))]))

    # ----- quantisers --------------------------------------------------------------------------
    def _shape(self, value: Tensor) -> Tensor:
        return value.reshape(-1, *([1] * (self.weight.ndim - 1)))

    def soft_rounding(self) -> Tensor:
        """AdaRound's :math:`h(V)` in [0, 1]."""
        assert self.rounding is not None
        return torch.clamp(torch.sigmoid(self.rounding) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def init_rounding(self) -> None:
        """Start AdaRound from round-to-nearest: :math:`h(V) = w/s - \\lfloor w/s\\rfloor`."""
        parts = []
        for g, (start, stop) in enumerate(self.groups):
            scaled = self.weight[:, start:stop] / self._shape(self.weight_scale[g])
            rest = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
            parts.append(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.rounding = nn.Parameter(torch.cat(parts, dim=1))

    def harden_rounding(self) -> None:
        """Replace :math:`h(V)` by its 0/1 decision and fold it into the stored weight's codes."""
        if self.rounding is None:
            return
        with torch.no_grad():
            hard = (self.soft_rounding() >= 0.5).to(self.weight.dtype)
            for g, (start, stop) in enumerate(self.groups):
                scale = self._shape(self.weight_scale[g])
                floor = torch.floor(self.weight[:, start:stop] / scale)
                # A weight exactly on the chosen code: rounding to nearest then reproduces the decision.
                self.weight[:, start:stop] = (floor + hard[:, start:stop]) * scale
        self.rounding = None

    def quantized_weight(self) -> Tensor:
        """The fake-quantised weight (AdaRound's soft rounding while it is being learnt)."""
        parts = []
        for g, (start, stop) in enumerate(self.groups):
            weight = self.weight[:, start:stop]
            scale, zero = self._shape(self.weight_scale[g]), self._shape(self.weight_zero[g])
            q_min, q_max = qrange(self.weight_bits, self.weight_symmetric)
            if self.rounding is not None:
                codes = torch.floor(weight / scale) + self.soft_rounding()[:, start:stop]
                parts.append(scale * (torch.clamp(codes + zero, q_min, q_max) - zero))
            else:
                parts.append(fake_quantize(weight, scale, zero, q_min, q_max))
        return torch.cat(parts, dim=1)

    def quantized_input(self, x: Tensor) -> Tensor:
        parts = []
        q_min, q_max = qrange(self.activation_bits, self.activation_symmetric)
        for g, (start, stop) in enumerate(self.groups):
            part = x[:, start:stop]
            quantized = fake_quantize(part, self.activation_scale[g], self.activation_zero[g], q_min, q_max)
            if self.training and self.drop_probability > 0:
                keep = torch.rand_like(part) < self.drop_probability
                quantized = torch.where(keep, part, quantized)
            parts.append(quantized)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _operate(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.kind == "conv":
            return F.conv2d(x, weight, self.bias, **self.conv_options)
        return F.linear(x, weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            out = self._operate(x, self.weight)
            self._record(x, out)
            return out
        weight = self.quantized_weight() if self.quantize_weights else self.weight
        if self.quantize_activations:
            x = self.quantized_input(x)
        return self._operate(x, weight)

    def extra_repr(self) -> str:
        split = f", split={self.split}" if self.split is not None else ""
        sym = lambda s: "sym" if s else "asym"  # noqa: E731
        return (f"{self.kind}, W{self.weight_bits}{sym(self.weight_symmetric)} "
                f"A{self.activation_bits}{sym(self.activation_symmetric)}{split}")

    def state(self) -> dict[str, Any]:
        """What the error report shows of this layer."""
        return {"kind": self.kind, "weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "split": self.split, "activation_scale": self.activation_scale.tolist()}
