r"""``quantize``: post-training quantisation of a diffusion network (PTQ4DM, Q-Diffusion).

Shang, Yuan, Xie, Wu & Yan (CVPR 2023), "Post-training Quantization on Diffusion Models" (PTQ4DM),
and Li, Xu, Dong, Dong, Lian, Keutzer & Shi (ICCV 2023), "Q-Diffusion: Quantizing Diffusion Models".

Steps of :func:`quantize`:

1. a calibration set of model inputs ``(x_t, t)`` (:mod:`flowdiff.quant.calibration`: from the
   full-precision sampler's own trajectories, one strategy of ``single``/``ndtc``/``uniform``, or
   given);
2. a copy of the network whose ``Conv2d``/``Linear`` layers become :class:`~flowdiff.quant.fake.QuantLayer`
   (per-output-channel weights, per-tensor inputs; the first and the last layer executed keep at
   least 8 bits, as both papers do; in a flowdiff UNet the up-blocks' layers that read
   ``cat(h, skip)`` get split quantisers);
3. input ranges from the calibration set run through the floating network, weight ranges per channel
   (squared-error searches);
4. optionally block reconstruction (:mod:`flowdiff.quant.reconstruct`, BRECQ/AdaRound with QDrop),
   the recipe for 4-bit weights.

The result is the network with the same call signature (``model(x, t, **cond)``), or a
:class:`~flowdiff.Field` when a field was given.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from flowdiff._utils import check_int
from flowdiff.fields import Field

from .calibration import CALIBRATIONS, CalibrationSet, calibration_set
from .fake import QuantLayer

__all__ = ["quantization_report", "quantize", "quantized_layers"]


def _check_bits(name: str, bits: Any) -> int:
    ok = isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 16
    if not ok:
        raise ValueError(f"{name} must be an integer from 2 to 16, got {name}={bits!r}")
    return int(bits)


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The fake-quantised layers of a quantised network, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLayer)}


def _as_calibration_set(calibration: Any) -> CalibrationSet | None:
    if isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, (tuple, list)) and len(calibration) in (2, 3):
        x, t = calibration[0], calibration[1]
        cond = dict(calibration[2]) if len(calibration) == 3 else {}
        if not isinstance(x, Tensor) or not isinstance(t, Tensor):
            raise TypeError("a calibration pair must be (x, t) or (x, t, cond) tensors")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape != x.shape[:1]:
            raise ValueError(f"calibration t must have shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
        return CalibrationSet(x, t, cond)
    return None


@torch.no_grad()
def _probe(model: nn.Module, x: Tensor, t: Tensor, cond: dict) -> tuple[list[str], str | None, dict[str, int]]:
    """Execution order of the Conv2d/Linear layers, the first one reading data-shaped input, and UNet split points."""
    from flowdiff.nn.unet import UNet

    order: list[str] = []
    first_data: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def layer_hook(module: nn.Module, inputs: tuple) -> None:
        name = names[module]
        if name not in order:
            order.append(name)
        if not first_data and tuple(inputs[0].shape[1:]) == tuple(x.shape[1:]):
            first_data.append(name)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(layer_hook))
    splits: dict[str, int] = {}
    stage_channels: dict[nn.Module, int] = {}

    def stage_hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        stage_channels[module] = output.shape[1]

    unets = [m for m in model.modules() if isinstance(m, UNet)]
    for unet in unets:
        handles.append(unet.middle.register_forward_hook(stage_hook))
        for stage in unet.up:
            handles.append(stage.register_forward_hook(stage_hook))
    try:
        model(x, t, **cond)
    finally:
        for handle in handles:
            handle.remove()
    # Q-Diffusion's split shortcut: up stage i reads cat(h, skip), h from the stage before it.
    for unet in unets:
        previous = unet.middle
        for stage in unet.up:
            block = stage[0]
            h_channels = stage_channels.get(previous)
            if h_channels is not None and hasattr(block, "conv_in"):
                for layer in (block.conv_in, block.skip):
                    if isinstance(layer, nn.Conv2d) and layer.in_channels > h_channels:
                        splits[names[layer]] = h_channels
            previous = stage
    return order, (first_data[0] if first_data else (order[0] if order else None)), splits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(
    model: nn.Module | Field,
    bits: int = 8,
    *,
    activation_bits: int | None = None,
    calibration: str | CalibrationSet | tuple = "ndtc",
    shape: tuple[int, ...] | None = None,
    path: Any = None,
    prediction: str | None = None,
    num_samples: int = 256,
    solver: str | None = None,
    nfe: int = 50,
    seed: int = 0,
    ndtc_mean: float = 0.4,
    ndtc_std: float = 0.4,
    uniform_steps: int = 16,
    single_call: int | None = None,
    weight_symmetric: bool = True,
    activation_symmetric: bool = False,
    first_last_bits: int | None = 8,
    split_shortcut: bool = True,
    reconstruction: bool | None = None,
    reconstruction_iters: int = 300,
    batch_size: int = 256,
    cond: dict | None = None,
) -> Any:
    """Post-training quantisation of a diffusion network; the result keeps the call signature.

    Arguments:
        model: a network ``model(x, t, **cond)``, or a :class:`flowdiff.Field` (then a Field is returned).
        bits: weight bits, 2..16.
        activation_bits: input (activation) bits, 2..16; default ``max(bits, 8)`` (W4A8 for ``bits=4``).
        calibration: ``"single"``, ``"ndtc"`` (PTQ4DM), ``"uniform"`` (Q-Diffusion), a
            :class:`~flowdiff.quant.calibration.CalibrationSet`, or a pair ``(x, t)`` / triple ``(x, t, cond)``.
        shape: one sample's shape (needed by the named strategies).
        path, prediction: the model's path and prediction type when ``model`` is a bare network.
        num_samples: calibration pairs (= full-precision trajectories sampled).
        solver, nfe: the full-precision sampler the named strategies record.
        ndtc_mean, ndtc_std: NDTC's normal (fractions of the way from the data end; PTQ4DM: 0.4, 0.4).
        uniform_steps: calls the uniform strategy spreads over.
        single_call: the call the single strategy uses (default the middle one).
        weight_symmetric, activation_symmetric: code types.
        first_last_bits: the first layer reading data and the last layer keep at least this many
            weight and input bits (``None``: no exception).
        split_shortcut: split quantisers for the UNet up-blocks' concatenated inputs.
        reconstruction: BRECQ/AdaRound block reconstruction; default on for ``bits <= 4``.
        reconstruction_iters: optimisation steps per block.
        batch_size: rows per calibration forward pass.
        cond: conditioning for the calibration sampler.

    Returns:
        The quantised copy (the input is not modified), with ``.quantization`` (a dict: the settings
        and the calibration used); a Field around it if a Field was given.
    """
    bits = _check_bits("bits", bits)
    activation_bits = _check_bits("activation_bits", max(bits, 8) if activation_bits is None else activation_bits)
    if first_last_bits is not None:
        first_last_bits = _check_bits("first_last_bits", first_last_bits)
    batch_size = check_int("batch_size", batch_size, 1)
    if isinstance(model, Field):
        field = model
        network = model.model
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or a flowdiff.Field, got {type(model).__name__}")
        network = model
        field = Field(model, path, prediction) if path is not None and prediction is not None else None
    if not isinstance(network, nn.Module):
        raise TypeError(f"the field's model must be a torch.nn.Module to be quantised, got {type(network).__name__}")
    data = _as_calibration_set(calibration)
    if data is None:
        if not isinstance(calibration, str):
            raise TypeError(f"calibration must be one of {', '.join(CALIBRATIONS)}, a CalibrationSet or (x, t); "
                            f"got {type(calibration).__name__}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {calibration!r}; valid: {', '.join(CALIBRATIONS)} (or a CalibrationSet / (x, t))")
        if field is None:
            raise ValueError(f"calibration={calibration!r} samples the model: give a Field, or path= and prediction=")
        if shape is None:
            raise ValueError(f"calibration={calibration!r} samples the model: give shape= (one sample's shape)")
        data = calibration_set(field, tuple(shape), calibration, num_samples=num_samples, solver=solver, nfe=nfe,
                               seed=seed, mean=ndtc_mean, std=ndtc_std, steps=uniform_steps, call=single_call, cond=cond)
    if not torch.isfinite(data.x).all() or not torch.isfinite(data.t).all():
        raise ValueError("the calibration inputs hold non-finite values (the full-precision sampler diverged?)")

    quantized = copy.deepcopy(network).eval()
    x0, t0, c0 = next(data.chunks(batch_size))
    order, first, splits = _probe(quantized, x0, t0, c0)
    if not order:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantise")
    last = order[-1]
    for name in order:
        layer = quantized.get_submodule(name)
        wide = first_last_bits is not None and name in (first, last)
        weight_bits = max(bits, first_last_bits) if wide else bits
        input_bits = max(activation_bits, first_last_bits) if wide else activation_bits
        split = splits.get(name) if split_shortcut else None
        _replace(quantized, name, QuantLayer(layer, weight_bits, input_bits, weight_symmetric=weight_symmetric,
                                             activation_symmetric=activation_symmetric, split=split))
    layers = quantized_layers(quantized)
    with torch.no_grad():
        for layer in layers.values():
            layer.calibrating = True
        for x, t, c in data.chunks(batch_size):
            quantized(x, t, **c)
        for layer in layers.values():
            layer.calibrating = False
            layer.calibrate_activations()
            layer.calibrate_weights()
    reconstruction = bits <= 4 if reconstruction is None else bool(reconstruction)
    if reconstruction:
        from .reconstruct import reconstruct

        reconstruct(network, quantized, data, order, iters=reconstruction_iters, seed=seed)
    quantized.requires_grad_(False)
    quantized.quantization = {
        "bits": bits, "activation_bits": activation_bits, "calibration": data.strategy, "num_samples": len(data),
        "weight_symmetric": weight_symmetric, "activation_symmetric": activation_symmetric,
        "first_last_bits": first_last_bits, "first_layer": first, "last_layer": last,
        "splits": {name: split for name, split in splits.items() if split_shortcut},
        "reconstruction": reconstruction, "solver": solver, "nfe": nfe,
    }
    if isinstance(model, Field):
        return Field(quantized, model.path, model.prediction)
    return quantized


@torch.no_grad()
def quantization_report(reference: Field, quantized: Field, shape: tuple[int, ...], *, num_samples: int = 64,
                        solver: str | None = None, nfe: int = 20, seed: int = 1234, cond: dict | None = None) -> dict[str, Any]:
    r"""Per-call relative error of the quantised prediction along fresh full-precision trajectories.

    On the inputs ``(x_t, t)`` of the full-precision sampler (``num_samples`` trajectories, seed
    ``seed``, a seed other than calibration's), the relative noise-prediction error
    :math:`\|\hat\varepsilon_q - \hat\varepsilon\|^2 / \|\hat\varepsilon\|^2` per call (PTQ4DM's diagnostic;
    ``relative_error``), the same for the model's own output (``relative_error_prediction``: for a
    data- or velocity-predicting network the noise error vanishes at the noise end, where
    :math:`\hat\varepsilon \approx x_t`), their worst and mean over calls, and the same-noise deviation of the final samples
    :math:`\mathrm{RMS}(x^q - x)` (both sampled deterministically from the same noise).
    """
    from flowdiff.solvers import sample

    from .calibration import record_trajectory

    calls = record_trajectory(reference, shape, num_samples, solver=solver, nfe=nfe, seed=seed, cond=cond)
    times, errors, own = [], [], []

    def relative(approx: Tensor, exact: Tensor) -> float:
        return float((approx - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30))

    for x, t, c in calls:
        exact, approx = reference.predict(x, t, **c), quantized.predict(x, t, **c)
        own.append(relative(approx, exact))
        convert = reference.convert
        errors.append(relative(convert(approx, x, t, reference.prediction, "noise"),
                               convert(exact, x, t, reference.prediction, "noise")))
        times.append(float(t[0]))
    device = x.device
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = reference.path.prior_sample((num_samples, *shape), generator=generator, dtype=torch.float32, device=device)
    noise = noise.to(calls[0][0].dtype)
    x_ref = sample(reference, noise, solver=solver, nfe=nfe, cond=cond).x
    x_q = sample(quantized, noise, solver=solver, nfe=nfe, cond=cond).x
    return {
        "t": times, "relative_error": errors, "worst_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "prediction": reference.prediction, "relative_error_prediction": own,
        "worst_relative_error_prediction": max(own), "mean_relative_error_prediction": sum(own) / len(own),
        "sample_rms_deviation": float((x_q - x_ref).pow(2).mean().sqrt()),
        "num_samples": num_samples, "solver": solver, "nfe": nfe,
    }
