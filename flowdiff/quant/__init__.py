"""Post-training quantisation of diffusion networks: PTQ4DM (Shang et al., CVPR 2023) and Q-Diffusion (Li et al.,
ICCV 2023) (issue 19; docs/quant.md).

* :func:`quantize`: fake-quantised per-channel weights and per-tensor inputs (2-16 bits, symmetric or asymmetric),
  calibrated on the full-precision sampler's own trajectory (``single``, PTQ4DM's ``ndtc``, ``uniform``) or given
  data; BRECQ/AdaRound block reconstruction with QDrop and split shortcut quantisers for 4-bit weights.
* :func:`quantization_report`: per-call relative error along fresh trajectories and the same-noise sample deviation.
* :func:`save_quantized` / :func:`load_quantized` (integer codes), :func:`to_int8` (PyTorch's int8 kernels),
  :func:`model_bytes`.
"""

from .calibration import CALIBRATIONS, CalibrationSet, calibration_set, record_trajectory
from .core import quantization_report, quantize, quantized_layers
from .export import Int8Layer, load_quantized, model_bytes, save_quantized, to_int8
from .fake import QuantLayer, fake_quantize, qrange, search_scale

__all__ = [
    "CALIBRATIONS",
    "CalibrationSet",
    "Int8Layer",
    "QuantLayer",
    "calibration_set",
    "fake_quantize",
    "load_quantized",
    "model_bytes",
    "qrange",
    "quantization_report",
    "quantize",
    "quantized_layers",
    "record_trajectory",
    "save_quantized",
    "search_scale",
    "to_int8",
]
