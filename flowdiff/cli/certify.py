"""``flowdiff certify -c RUN --classifier digits --sigma 0.25 --n 1000 -o OUT``: certified L2 robustness of a
classifier smoothed through the run's denoiser (Cohen et al. 2019; Carlini et al. 2023; docs/certify.md).

The held-out split of the run's labelled data set is certified with CERTIFY; each noisy input is denoised
in one shot (``--steps 1``) by the run's model at the time matching the noise, then classified.
``--classifier digits`` is the metrics' digits CNN (:class:`flowdiff.metrics.frechet.DigitsFeatureExtractor`);
a file is a TorchScript module (``torch.jit.save``) taking data in the run's units and returning logits
or class indices. ``--no-denoise`` certifies the classifier alone (the baseline). ``--units unit``
(default for images) measures the noise and the radii on data mapped from ``[-1, 1]`` to ``[0, 1]`` (the
randomized-smoothing literature's convention: sigma there is 2 sigma in the model's units); ``model``
uses the run's own units. Writes ``OUT/certify.json`` (per-point class, radius, label; the table),
``OUT/certify.md`` and ``OUT/certify.png`` (certified accuracy against the radius).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from . import THREADS_HELP, _command, _fail, _first_line, _load_field_or_exit, _output_dir, _set_threads, app

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def _classifier(name: str, shape: tuple, dataset: str):
    import torch

    if name == "digits":
        if dataset != "digits":
            _fail(f"--classifier digits needs a run trained on digits, this one is on {dataset!r}; give a TorchScript file", 2)
        from ..metrics.frechet import DigitsFeatureExtractor

        return DigitsFeatureExtractor.load_or_train()
    path = Path(name)
    if not path.is_file():
        _fail(f"--classifier {name!r}: not 'digits' and not a file (a TorchScript module saved with torch.jit.save)", 2)
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as error:
        _fail(f"--classifier {path}: cannot load a TorchScript module: {_first_line(error)}", 1)


@app.command(name="certify")
@_command
def certify_command(
    checkpoint_arg: Optional[Path] = typer.Argument(None, metavar="CHECKPOINT", help="A checkpoint folder or a training --output folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="The same as the CHECKPOINT argument."),
    classifier: str = typer.Option("digits", "--classifier", help="digits (the metrics' CNN) or a TorchScript file."),
    sigma: float = typer.Option(0.25, "--sigma", help="Smoothing noise level (in --units)."),
    n: int = typer.Option(1000, "--n", help="Estimation draws per point."),
    n0: int = typer.Option(100, "--n0", help="Selection draws per point (fewer than --n)."),
    alpha: float = typer.Option(0.001, "--alpha", help="Failure probability of each certificate, in (0, 1)."),
    count: int = typer.Option(100, "--count", help="Held-out points certified (the first of the split)."),
    steps: int = typer.Option(1, "--steps", help="1: one-shot denoising; k > 1: k - 1 DDIM steps, then denoising."),
    denoise: bool = typer.Option(True, "--denoise/--no-denoise", help="Denoise with the run's model before classifying."),
    units: Optional[str] = typer.Option(None, "--units", help="unit ([0, 1] from the data's [-1, 1]; default for images) or model."),
    batch_size: int = typer.Option(1000, "--batch-size", help="Noisy inputs per classifier call."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the noise draws."),
    output: Path = typer.Option(Path("runs/certify"), "--output", "-o", help="Folder for certify.json, certify.md and certify.png."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Certified L2 robustness (randomized smoothing) of a classifier behind the run's one-shot denoiser."""
    import torch

    from .._utils import check_float, check_int
    from ..certify import DenoisedClassifier, certified_accuracy, certify, radius_cap
    from ..data import load_dataset
    from ..pipeline import write_json

    ckpt = checkpoint_arg or checkpoint
    if ckpt is None:
        _fail("name the checkpoint: flowdiff certify CHECKPOINT (or -c CHECKPOINT)", 2)
    sigma = check_float("--sigma", sigma, 0.0, low_open=True)
    alpha = check_float("--alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    n, n0 = check_int("--n", n, 2), check_int("--n0", n0, 1)
    if n0 >= n:
        _fail(f"--n0 must be smaller than --n, got --n0 {n0} and --n {n}", 2)
    count, steps = check_int("--count", count, 1), check_int("--steps", steps, 1)
    if units not in (None, "unit", "model"):
        _fail(f"unknown --units {units!r}; valid: unit, model", 2)
    out = _output_dir(output)
    field, config = _load_field_or_exit(ckpt, unlabeled="null")
    _set_threads(threads, field.model)
    dataset = (config.get("extra") or {}).get("dataset") or (config.get("data") or {}).get("name")
    held = load_dataset(dataset, split="heldout", seed=int((config.get("extra") or {}).get("seed") or 0))
    if held.y is None:
        _fail(f"data set {dataset!r} has no labels: certification needs labelled held-out data", 1)
    shape = tuple(held.shape)
    if units is None:
        units = "unit" if len(shape) == 3 else "model"
    scale, shift = (2.0, -1.0) if units == "unit" else (1.0, 0.0)
    net = _classifier(classifier, shape, dataset)

    def base(u: "torch.Tensor") -> "torch.Tensor":
        return net(scale * u + shift)

    smoothed = DenoisedClassifier(field, base, sigma, data_scale=scale, data_shift=shift, steps=steps) if denoise else base
    x = (held.x[:count].float() - shift) / scale
    labels = held.y[:count]
    wall, cpu = time.perf_counter(), time.process_time()
    prediction, radius = certify(smoothed, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                                 num_classes=held.num_classes, generator=torch.Generator().manual_seed(seed))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cap = radius_cap(sigma, n, alpha)
    accuracy = certified_accuracy(prediction, radius, labels, RADII).tolist()
    curve_radii = torch.linspace(0, cap * 1.05, 60).tolist()
    curve = certified_accuracy(prediction, radius, labels, curve_radii).tolist()
    result = {"checkpoint": str(ckpt), "classifier": classifier, "denoise": denoise, "steps": steps, "units": units,
              "sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "count": count, "radius_cap": cap,
              "t_star": getattr(smoothed, "t_star", None), "certified_accuracy": dict(zip(map(str, RADII), accuracy)),
              "abstain": float((prediction < 0).double().mean()), "queries_per_s": count * (n + n0) / wall,
              "wall_s": wall, "cpu_s": cpu, "prediction": prediction.tolist(), "radius": radius.tolist(),
              "label": labels.tolist(), "curve": {"radius": curve_radii, "certified_accuracy": curve}}
    write_json(result, out / "certify.json")
    header = "| radius | " + " | ".join(f"{r}" for r in RADII) + " |"
    table = [f"# flowdiff certify: {classifier}{' + one-shot denoiser' if denoise and steps == 1 else ''}"
             f"{f' + {steps}-step denoiser' if denoise and steps > 1 else ''}, sigma {sigma} ({units} units)", "",
             f"{count} held-out points, n0 {n0}, n {n}, alpha {alpha}; radius cap {cap:.3f}; "
             f"abstained {result['abstain']:.2f}; {result['queries_per_s']:.0f} queries/s.", "",
             header, "|---" * (len(RADII) + 1) + "|",
             "| certified accuracy | " + " | ".join(f"{a:.3f}" for a in accuracy) + " |"]
    (out / "certify.md").write_text("\n".join(table) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(curve_radii, curve)
        ax.set_xlabel(f"L2 radius ({units} units)")
        ax.set_ylabel("certified accuracy")
        ax.set_title(f"sigma {sigma}, n {n}, alpha {alpha}")
        ax.set_ylim(0, 1)
        fig.tight_layout()
        fig.savefig(out / "certify.png", dpi=100)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    typer.echo("certified accuracy at radius " + ", ".join(f"{r}: {a:.3f}" for r, a in zip(RADII, accuracy))
               + f" ({count} points, sigma {sigma}) -> {out}")
