"""``flowdiff quantize -c RUN --bits 8 --calibration ndtc -o OUT``: post-training quantisation of a trained
network (PTQ4DM / Q-Diffusion; docs/quant.md).

Writes ``OUT/quantized.pt`` (integer weight codes, scales and input quantisers:
:func:`flowdiff.quant.save_quantized`; rebuild with ``fd.quant.load_quantized(load_field(RUN)[0].model, file)``),
``OUT/report.json`` (settings, per-call relative error along fresh full-precision trajectories, its worst
and mean, the same-noise sample deviation, file sizes) and ``OUT/error.png`` (the error against t).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from . import THREADS_HELP, _command, _fail, _load_field_or_exit, _output_dir, _set_threads, app


@app.command(name="quantize")
@_command
def quantize_command(
    checkpoint_arg: Optional[Path] = typer.Argument(None, metavar="CHECKPOINT", help="A checkpoint folder or a training --output folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="The same as the CHECKPOINT argument."),
    bits: int = typer.Option(8, "--bits", help="Weight bits, 2-16."),
    activation_bits: Optional[int] = typer.Option(None, "--activation-bits", help="Input (activation) bits, 2-16 (default max(bits, 8))."),
    calibration: str = typer.Option("ndtc", "--calibration", help="single, ndtc (PTQ4DM's normally distributed time steps) or uniform (Q-Diffusion)."),
    samples: int = typer.Option(256, "--samples", help="Calibration trajectories of the full-precision sampler (one (x_t, t) pair each)."),
    solver: str = typer.Option("ddim", "--solver", help="The full-precision sampler recorded for calibration and the report."),
    nfe: int = typer.Option(20, "--nfe", help="Its model evaluations per sample."),
    reconstruction: Optional[bool] = typer.Option(None, "--reconstruction/--no-reconstruction", help="BRECQ/AdaRound block reconstruction (default: on for 4 bits or fewer)."),
    reconstruction_iters: int = typer.Option(300, "--reconstruction-iters", help="Optimisation steps per block."),
    symmetric_activations: bool = typer.Option(False, "--symmetric-activations", help="Symmetric input codes (default asymmetric)."),
    report_samples: int = typer.Option(64, "--report-samples", help="Fresh trajectories for the error report."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the calibration trajectories."),
    output: Path = typer.Option(Path("runs/quantized"), "--output", "-o", help="Folder for quantized.pt, report.json and error.png."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Quantise a trained network after training, calibrated on its own sampling trajectory (PTQ4DM, Q-Diffusion)."""
    import torch

    from .._utils import check_int
    from ..pipeline import write_json
    from ..quant import CALIBRATIONS, model_bytes, quantization_report, quantize, save_quantized
    from ..solvers import available

    ckpt = checkpoint_arg or checkpoint
    if ckpt is None:
        _fail("name the checkpoint: flowdiff quantize CHECKPOINT (or -c CHECKPOINT)", 2)
    for name, value in (("--bits", bits), ("--activation-bits", activation_bits)):
        if value is not None and not 2 <= value <= 16:
            _fail(f"{name} must be an integer from 2 to 16, got {value}", 2)
    if calibration not in CALIBRATIONS:
        _fail(f"unknown calibration {calibration!r}; valid: {', '.join(CALIBRATIONS)}", 2)
    if solver not in available():
        _fail(f"unknown solver {solver!r}; valid: {', '.join(available())}", 2)
    samples = check_int("--samples", samples, 1)
    nfe = check_int("--nfe", nfe, 1)
    report_samples = check_int("--report-samples", report_samples, 1)
    out = _output_dir(output)
    field, config = _load_field_or_exit(ckpt)
    _set_threads(threads, field.model)
    shape = tuple((config.get("data") or {}).get("shape") or (config.get("model") or {}).get("data_shape") or ())
    if not shape:
        _fail(f"{ckpt}: config.json does not give the data shape", 1)
    start = time.process_time()
    quantized = quantize(field, bits, activation_bits=activation_bits, calibration=calibration, shape=shape,
                         num_samples=samples, solver=solver, nfe=nfe, seed=seed, reconstruction=reconstruction,
                         reconstruction_iters=reconstruction_iters, activation_symmetric=symmetric_activations)
    calibration_cpu = time.process_time() - start
    file = save_quantized(quantized.model, out / "quantized.pt", extra={"checkpoint": str(Path(ckpt).resolve())})
    float_file = out / ".float_size.pt"
    torch.save(field.model.state_dict(), float_file)
    float_bytes = float_file.stat().st_size
    float_file.unlink()
    report = quantization_report(field, quantized, shape, num_samples=report_samples, solver=solver, nfe=nfe)
    result = {"checkpoint": str(ckpt), "settings": quantized.model.quantization, "calibration_cpu_s": calibration_cpu,
              "quantized_file_bytes": file.stat().st_size, "float_file_bytes": float_bytes,
              "float_state_bytes": model_bytes(field.model), **report}
    write_json(result, out / "report.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        floor = 1e-16  # an exactly reproduced call (e.g. at 16 bits) has error 0, which a log axis cannot show
        ax.semilogy(report["t"], [max(e, floor) for e in report["relative_error_prediction"]], marker="o",
                    label=f"{field.prediction} prediction")
        ax.semilogy(report["t"], [max(e, floor) for e in report["relative_error"]], marker=".", label="noise prediction")
        ax.set_xlabel("t (0 noise, 1 data)")
        ax.set_ylabel("relative squared error")
        ax.set_title(f"W{bits}A{quantized.model.quantization['activation_bits']} {calibration}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "error.png", dpi=100)
        plt.close(fig)
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the plots only
        pass
    typer.echo(f"W{bits}A{quantized.model.quantization['activation_bits']} {calibration}: worst relative error "
               f"{report['worst_relative_error_prediction']:.3g} ({field.prediction}), {report['worst_relative_error']:.3g} "
               f"(noise); same-noise RMS deviation {report['sample_rms_deviation']:.4g}; "
               f"{file.stat().st_size / 1e3:.0f} kB vs {float_bytes / 1e3:.0f} kB float32 -> {out}")
