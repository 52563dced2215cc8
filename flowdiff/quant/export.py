r"""Saving a quantised network as integer codes, and real int8 inference through PyTorch's backend.

**Export.** :func:`save_quantized` writes each quantised layer's weight as integer codes (int8 up to
8 bits, int16 above) with its per-channel scales and zero points, the input quantisers, and the
floating parameters of everything else; :func:`load_quantized` rebuilds the quantised network on a
fresh copy of the floating architecture. The file is about a quarter of the float32 one at 8 bits.

**Real int8.** :func:`to_int8` replaces each 8-bit layer with symmetric per-channel weights and one
input group by PyTorch's static quantised kernels (``torch.ao.nn.quantized.Conv2d``/``Linear``,
fbgemm/x86 or qnnpack): the input is quantised to ``quint8`` with the calibrated scale and zero
point, the product runs on int8 codes with int32 accumulation, the output is requantised with the
range observed during calibration and dequantised. Other layers (split inputs, other widths,
asymmetric weights) stay fake-quantised; ``to_int8`` reports how many were converted. The kernels
exist on CPU only. PyTorch marks its quantised tensor types as deprecated (to move to torchao);
the warnings are silenced here.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fake import QuantLayer, qrange

__all__ = ["Int8Layer", "load_quantized", "model_bytes", "save_quantized", "to_int8"]


def _codes(layer: QuantLayer) -> Tensor:
    parts = []
    for g, (start, stop) in enumerate(layer.groups):
        scale = layer._shape(layer.weight_scale[g])
        zero = layer._shape(layer.weight_zero[g])
        q_min, q_max = qrange(layer.weight_bits, layer.weight_symmetric)
        parts.append(torch.clamp(torch.round(layer.weight[:, start:stop] / scale) + zero, q_min, q_max))
    codes = torch.cat(parts, dim=1)
    return codes.to(torch.int8 if layer.weight_bits <= 8 and layer.weight_symmetric else torch.int16)


def save_quantized(model: nn.Module, file: str | Path, extra: dict | None = None) -> Path:
    """Write a quantised network (integer weight codes + scales; other parameters as they are)."""
    from .core import quantized_layers

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantised layer (run flowdiff.quant.quantize first)")
    state = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layers and key.endswith(".weight"):
            continue  # stored as codes
        state[key] = value
    payload = {
        "format": "flowdiff-quantized", "version": 1, "state": state,
        "codes": {name: _codes(layer) for name, layer in layers.items()},
        "layers": {name: {"kind": layer.kind, "weight_bits": layer.weight_bits, "activation_bits": layer.activation_bits,
                          "weight_symmetric": layer.weight_symmetric, "activation_symmetric": layer.activation_symmetric,
                          "split": layer.split} for name, layer in layers.items()},
        "quantization": getattr(model, "quantization", {}), "extra": dict(extra or {}),
    }
    file = Path(file)
    torch.save(payload, file)
    return file


def load_quantized(model: nn.Module, file: str | Path) -> nn.Module:
    """Rebuild the quantised network saved by :func:`save_quantized` on ``model`` (its floating architecture; copied)."""
    from .core import _replace

    payload = torch.load(Path(file), map_location="cpu", weights_only=True)
    if payload.get("format") != "flowdiff-quantized":
        raise ValueError(f"{file}: not a flowdiff quantised model")
    quantized = copy.deepcopy(model).eval()
    for name, spec in payload["layers"].items():
        layer = quantized.get_submodule(name)
        _replace(quantized, name, QuantLayer(layer, spec["weight_bits"], spec["activation_bits"],
                                             weight_symmetric=spec["weight_symmetric"],
                                             activation_symmetric=spec["activation_symmetric"], split=spec["split"]))
    missing, unexpected = quantized.load_state_dict(payload["state"], strict=False)
    if unexpected or any(not key.endswith(".weight") for key in missing):
        raise ValueError(f"{file}: does not match this architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, codes in payload["codes"].items():
        layer = quantized.get_submodule(name)
        parts = []
        for g, (start, stop) in enumerate(layer.groups):
            scale, zero = layer._shape(layer.weight_scale[g]), layer._shape(layer.weight_zero[g])
            parts.append(scale * (codes[:, start:stop].to(scale.dtype) - zero))
        layer.weight.data = torch.cat(parts, dim=1).to(layer.weight.dtype)
    quantized.requires_grad_(False)
    quantized.quantization = payload.get("quantization", {})
    return quantized


def model_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes (packed int8 weights count as int8)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


class Int8Layer(nn.Module):
    """A quantised layer run by PyTorch's int8 kernels (float in, float out)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        import torch.ao.nn.quantized as nnq

        weight = layer.weight.detach().float().cpu()
        scale = layer.weight_scale[0].detach().double().cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            bias = None if layer.bias is None else layer.bias.detach().float().cpu()
            if layer.kind == "conv":
                w = layer.weight
                options = layer.conv_options
                self.op = nnq.Conv2d(w.shape[1] * options["groups"], w.shape[0], tuple(w.shape[2:]), stride=options["stride"],
                                     padding=options["padding"], dilation=options["dilation"], groups=options["groups"],
                                     bias=bias is not None)
            else:
                self.op = nnq.Linear(weight.shape[1], weight.shape[0], bias_=bias is not None)
            self.op.set_weight_bias(qweight, bias)
            low, high = (float(v) for v in layer.output_range)
            low, high = min(low, 0.0), max(high, 0.0)
            out_scale = max((high - low) / 255.0, 1e-8)
            self.op.scale, self.op.zero_point = out_scale, int(min(max(round(-low / out_scale), 0), 255))
        in_scale, in_zero = float(layer.activation_scale[0]), int(layer.activation_zero[0])
        if layer.activation_symmetric:  # codes -127..127 -> quint8 with zero point 128
            in_zero = 128
        self.input_scale, self.input_zero = in_scale, in_zero

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (float32; for code that inspects a layer's ``weight``, e.g. its dtype)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.op.weight().dequantize()

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = torch.quantize_per_tensor(x.float(), self.input_scale, self.input_zero, torch.quint8)
            return self.op(qx).dequantize().to(dtype)


def _convertible(layer: QuantLayer) -> bool:
    return (layer.weight_bits == 8 and layer.activation_bits == 8 and layer.weight_symmetric and layer.split is None
            and layer.rounding is None and (layer.kind == "linear" or layer.conv_options["groups"] == 1)
            and layer.weight.device.type == "cpu")


def to_int8(model: nn.Module, engine: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of a quantised network with its 8-bit layers on PyTorch's int8 kernels.

    Returns ``(model, info)``; ``info`` counts converted and kept layers and names the engine.
    """
    from .core import _replace, quantized_layers

    if engine is not None:
        if engine not in torch.backends.quantized.supported_engines:
            raise ValueError(f"unknown quantised engine {engine!r}; this build has {', '.join(torch.backends.quantized.supported_engines)}")
        torch.backends.quantized.engine = engine
    converted = copy.deepcopy(model).cpu().float().eval()
    layers = quantized_layers(converted)
    if not layers:
        raise ValueError("the model has no quantised layer (run flowdiff.quant.quantize first)")
    done, kept = [], []
    for name, layer in layers.items():
        if _convertible(layer):
            _replace(converted, name, Int8Layer(layer))
            done.append(name)
        else:
            kept.append(name)
    return converted, {"converted": len(done), "kept_fake": kept, "engine": torch.backends.quantized.engine}
