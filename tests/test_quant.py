"""Post-training quantisation (PTQ4DM / Q-Diffusion): quantisers, calibration pairs, the quantised network, export."""

import pytest
import torch

import flowdiff as fd
from flowdiff.nn import UNet
from flowdiff.quant import (
    CalibrationSet,
    QuantLayer,
    calibration_set,
    fake_quantize,
    load_quantized,
    qrange,
    quantization_report,
    quantize,
    quantized_layers,
    record_trajectory,
    save_quantized,
    search_scale,
    to_int8,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)


def tiny_field(seed: int = 0) -> fd.Field:
    """A small UNet with random (not zero-initialised) weights on the linear path, predicting data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet(in_channels=1, channels=(8, 16), num_res_blocks=1, groups=4, num_heads=2)
        for parameter in net.parameters():
            if parameter.ndim > 1:
                torch.nn.init.normal_(parameter, std=0.8 / parameter[0].numel() ** 0.5)
    return fd.Field(net.eval().requires_grad_(False), fd.paths.Linear(), "data")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_quantisers_are_exact_on_their_grid_and_within_half_a_step_inside_the_range():
    for bits, symmetric in ((8, True), (4, False), (2, True), (16, False)):
        q_min, q_max = qrange(bits, symmetric)
        scale, zero = torch.tensor(0.05), torch.tensor(0.0 if symmetric else float((q_max + 1) // 3))
        codes = torch.arange(q_min, q_max + 1, dtype=torch.float64)[:: max(1, (q_max - q_min) // 200)]
        on_grid = scale * (codes - zero)
        torch.testing.assert_close(fake_quantize(on_grid, scale, zero, q_min, q_max), on_grid)
        inside = on_grid.min() + (on_grid.max() - on_grid.min()) * torch.rand(500, dtype=torch.float64)
        assert float((fake_quantize(inside, scale, zero, q_min, q_max) - inside).abs().max()) <= 0.025 + 1e-12
    # The range search: per-channel scales, symmetric zero points 0, asymmetric zero points representable.
    weight = torch.randn(1, 20, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    scale, zero = search_scale(weight, 8, True, dim=0)
    assert scale.shape == (6,) and bool((zero == 0).all())
    torch.testing.assert_close(scale, scale[0] * torch.arange(1, 7, dtype=torch.float64), rtol=1e-5, atol=0)  # per channel
    scale, zero = search_scale(torch.rand(1000, dtype=torch.float64) + 0.5, 8, False)
    assert 0 <= float(zero) <= 255


def test_quant_layer_matches_the_float_layer_at_16_bits_and_splits_its_input():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.cat([torch.randn(4, 2, 5, 5), 50 * torch.randn(4, 4, 5, 5)], dim=1).double()  # very different ranges
    for bits, tolerance in ((16, 1e-7), (8, 1e-3)):
        for split in (None, 2):
            layer = QuantLayer(conv, bits, bits, split=split)
            layer.calibrating = True
            layer(x)
            layer.calibrating = False
            layer.calibrate_activations()
            layer.calibrate_weights()
            assert relative(layer(x), conv(x)) < tolerance
    # At 4-bit inputs the split keeps the small-range channels: much lower error than one shared quantiser.
    errors = {}
    for split in (None, 2):
        layer = QuantLayer(conv, 8, 4, split=split)
        layer.calibrating = True
        layer(x)
        layer.calibrating = False
        layer.calibrate_activations()
        layer.calibrate_weights()
        errors[split] = relative(layer(x[:, :2].repeat(1, 3, 1, 1) * torch.tensor([1.0, 1, 0, 0, 0, 0]).double()[None, :, None, None]),
                                 conv(x[:, :2].repeat(1, 3, 1, 1) * torch.tensor([1.0, 1, 0, 0, 0, 0]).double()[None, :, None, None]))
    assert errors[2] < 0.1 * errors[None]
    with pytest.raises(ValueError, match="split"):
        QuantLayer(conv, 8, 8, split=6)


def test_calibration_pairs_each_state_with_its_own_time():
    # PTQ4DM's reference code labels x at step T-1-k with time k; here every (x, t) is one model call.
    field = tiny_field()
    calls = record_trajectory(field, SHAPE, 12, solver="ddim", nfe=10, seed=3)
    times = [float(c[1][0]) for c in calls]
    for strategy in ("ndtc", "uniform", "single"):
        data = calibration_set(field, SHAPE, strategy, num_samples=12, solver="ddim", nfe=10, seed=3)
        assert len(data) == 12 and data.strategy == strategy
        for row in range(12):
            step = times.index(float(data.t[row]))
            torch.testing.assert_close(data.x[row], calls[step][0][row], rtol=0, atol=0)
        if strategy == "single":
            assert len(set(data.t.tolist())) == 1
    # NDTC's normal N(0.4, 0.4) over the fraction from the data end puts most pairs near the data end.
    data = calibration_set(field, SHAPE, "ndtc", num_samples=64, solver="ddim", nfe=10, seed=0)
    calls = record_trajectory(field, SHAPE, 64, solver="ddim", nfe=10, seed=0)
    times = [float(c[1][0]) for c in calls]
    from_data_end = torch.tensor([(len(times) - 1 - times.index(float(t))) / (len(times) - 1) for t in data.t])
    # E[clip(N(0.4, 0.4), 0, 1)] = 0.42; 64 draws have a standard error of about 0.04.
    assert 0.3 < float(from_data_end.mean()) < 0.55 and float((from_data_end == 0).double().mean()) > 0.05
    with pytest.raises(ValueError, match="unknown calibration"):
        calibration_set(field, SHAPE, "gaussian")


def test_quantize_keeps_the_call_signature_and_the_prediction():
    field = tiny_field()
    held_out = calibration_set(field, SHAPE, "uniform", num_samples=16, solver="ddim", nfe=8, seed=7)
    x, t = held_out.x, held_out.t  # states the sampler visits (not the calibration's: another seed)
    before = [p.clone() for p in field.model.parameters()]
    errors = {}
    for bits in (16, 8, 4):
        qfield = quantize(field, bits, calibration="uniform", shape=SHAPE, num_samples=32, solver="ddim", nfe=8,
                          reconstruction=False)
        assert isinstance(qfield, fd.Field) and qfield.prediction == "data"
        out = qfield.model(x, t)
        assert out.shape == x.shape and out.dtype == x.dtype
        errors[bits] = relative(out, field.model(x, t))
        info = qfield.model.quantization
        assert info["bits"] == bits and info["activation_bits"] == max(bits, 8)
    # States outside the calibration's ranges are clipped, so even 16 bits are not exact on fresh states ...
    assert errors[16] < 5e-3 and errors[8] < 2e-2 and errors[16] < errors[8] < errors[4]
    # ... but they are on the calibration inputs themselves.
    exact = quantize(field.model, 16, calibration=(x, t))
    assert relative(exact(x, t), field.model(x, t)) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, field.model.parameters()))  # the input is untouched
    layers = quantized_layers(qfield.model)
    info = qfield.model.quantization
    assert info["first_layer"] == "input_conv" and info["last_layer"] == "output_conv"
    assert layers["input_conv"].weight_bits == 8 and layers["output_conv"].weight_bits == 8
    assert layers["down.0.0.conv_in"].weight_bits == 4
    # Q-Diffusion's split shortcut on every up block reading cat(h, skip).
    assert set(info["splits"]) == {f"up.{i}.0.{name}" for i in range(4) for name in ("conv_in", "skip")}
    assert layers["up.0.0.conv_in"].split == 16 and len(layers["up.0.0.conv_in"].groups) == 2
    assert isinstance(exact, torch.nn.Module) and exact.quantization["calibration"] == "given"


def test_ndtc_beats_single_step_calibration_at_its_worst_call():
    field = tiny_field(1)
    reports = {}
    for strategy in ("single", "ndtc"):
        qfield = quantize(field, 8, activation_bits=6, calibration=strategy, shape=SHAPE, num_samples=32, solver="ddim",
                          nfe=6)
        reports[strategy] = quantization_report(field, qfield, SHAPE, num_samples=8, solver="ddim", nfe=6)
    for report in reports.values():
        assert len(report["relative_error"]) == len(report["t"]) == 6
        assert report["worst_relative_error"] >= report["mean_relative_error"] > 0
    assert reports["ndtc"]["worst_relative_error_prediction"] < reports["single"]["worst_relative_error_prediction"]


def test_block_reconstruction_lowers_the_error_of_low_bit_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32), torch.nn.SiLU(),
                              torch.nn.Linear(32, 4)).requires_grad_(False)

    class Timed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x + t[:, None])

    model = Timed()
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    t = torch.rand(256, generator=torch.Generator().manual_seed(1))
    errors = {}
    for recon in (False, True):
        q = quantize(model, 3, calibration=(x, t), first_last_bits=None, reconstruction=recon, reconstruction_iters=150)
        errors[recon] = relative(q(x, t), model(x, t))
        assert all(layer.rounding is None for layer in quantized_layers(q).values())
    assert errors[True] < 0.7 * errors[False]


def test_export_round_trip_and_int8_kernels():
    field = tiny_field()
    qfield = quantize(field, 8, calibration="ndtc", shape=SHAPE, num_samples=32, solver="ddim", nfe=8)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.full((8,), 0.6)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        file = save_quantized(qfield.model, Path(folder) / "q.pt")
        restored = load_quantized(field.model, file)
        torch.save(field.model.state_dict(), Path(folder) / "fp.pt")
        assert file.stat().st_size < 0.75 * (Path(folder) / "fp.pt").stat().st_size  # per-tensor overhead dominates a tiny net
    torch.testing.assert_close(restored(x, t), qfield.model(x, t), rtol=1e-5, atol=1e-6)
    int8_model, info = to_int8(qfield.model)
    assert info["converted"] > 0 and len(info["kept_fake"]) == 8  # the split layers stay fake-quantised
    assert relative(int8_model(x, t), qfield.model(x, t)) < 0.01


def test_bad_input_is_refused_with_the_value():
    field = tiny_field()
    for bits in (1, 17, 0, "8", 8.0, True):
        with pytest.raises(ValueError, match="bits"):
            quantize(field, bits, calibration="single", shape=SHAPE)
    with pytest.raises(ValueError, match="activation_bits"):
        quantize(field, 8, activation_bits=20, calibration="single", shape=SHAPE)
    with pytest.raises(ValueError, match="unknown calibration 'normal'"):
        quantize(field, 8, calibration="normal", shape=SHAPE)
    with pytest.raises(ValueError, match="shape"):
        quantize(field, 8, calibration="ndtc")
    with pytest.raises(ValueError, match="path= and prediction="):
        quantize(field.model, 8, calibration="ndtc", shape=SHAPE)
    with pytest.raises(TypeError, match="nn.Module"):
        quantize(lambda x, t: x, 8, calibration=(torch.zeros(2, 1), torch.zeros(2)))
    with pytest.raises(ValueError, match="non-finite"):
        quantize(field.model, 8, calibration=(torch.full((2, *SHAPE), float("nan")), torch.zeros(2)))
    assert isinstance(CalibrationSet(torch.zeros(2, 1), torch.zeros(2)), CalibrationSet)


def tiny_checkpoint(folder):
    """A class-conditional digits UNet checkpoint written directly (no training: the commands only need a network)."""
    from flowdiff.nn import build_network
    from flowdiff.train.checkpoint import CHECKPOINT_FORMAT, save_checkpoint

    kwargs = {"channels": [8, 16], "num_res_blocks": 1, "num_classes": 10}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_network("unet", (1, 8, 8), **kwargs)
    path = {"name": "Linear", "t_min": 0.001, "t_max": 0.999}
    config = {"format": CHECKPOINT_FORMAT, "version": 1, "path": path,
              "model": {"name": "unet", "data_shape": [1, 8, 8], "kwargs": kwargs},
              "data": {"name": "digits", "shape": [1, 8, 8], "num_classes": 10},
              "extra": {"dataset": "digits", "seed": 0, "prediction": "data", "path": path}}
    save_checkpoint(folder, 1, net.state_dict(), net.state_dict(), config, {}, 1)
    return folder


def test_quantize_command_writes_the_model_and_its_report(tmp_path):
    import json

    from typer.testing import CliRunner

    from flowdiff.cli import app
    from flowdiff.pipeline import load_field

    run = tiny_checkpoint(tmp_path / "run")
    invoke = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    res = invoke("quantize", "-c", run, "--bits", 8, "--calibration", "ndtc", "--samples", 8, "--nfe", 4,
                 "--report-samples", 4, "-o", tmp_path / "q", "--threads", 1)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["settings"]["calibration"] == "ndtc" and len(report["relative_error"]) == 4
    assert (tmp_path / "q" / "error.png").read_bytes()[:4] == b"\x89PNG"
    field, _ = load_field(run)
    restored = load_quantized(field.model, tmp_path / "q" / "quantized.pt")
    assert len(quantized_layers(restored)) > 0
    for args, word in (((" --bits", 17), "--bits"), (("--calibration", "normal"), "ndtc"), (("--solver", "magic"), "ddim")):
        res = invoke("quantize", "-c", run, *[a.strip() if isinstance(a, str) else a for a in args], "-o", tmp_path / "bad")
        assert res.exit_code == 2 and word in res.output, res.output
