"""The ``flowdiff`` command: ``train``, ``sample``, ``eval`` and ``demo``.

Unknown names (dataset, path, prediction, network, solver) exit with status 2 and list the valid
ones; a missing or corrupt checkpoint prints one line and exits with status 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(
    help="flowdiff: train generative models on paths and stochastic interpolants, sample them fast, evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PREDICTIONS = ("noise", "data", "velocity", "score", "v")


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _check_name(kind: str, value: str, valid: list[str], allow_path: bool = False) -> None:
    if value in valid or (allow_path and Path(value).exists()):
        return
    extra = " (or an existing file/folder)" if allow_path else ""
    _fail(f"unknown {kind} {value!r}; valid: {', '.join(valid)}{extra}", 2)


def _valid_solvers() -> list[str]:
    from . import solvers

    return list(solvers.available())


def _train_impl(opts: dict[str, Any]) -> Path:
    from .data import available_datasets
    from .losses import available_time_samplers, available_weightings
    from .nn import available_networks
    from .paths import available_paths
    from .pipeline import train_run

    _check_name("dataset", opts["data"], list(available_datasets()), allow_path=True)
    _check_name("path", opts["path"], available_paths())
    _check_name("prediction", opts["prediction"], list(PREDICTIONS))
    _check_name("network", opts["network"], ["auto", *available_networks()])
    _check_name("weighting", opts["weighting"], list(available_weightings()))
    _check_name("time sampler", opts["time_sampler"], list(available_time_samplers()))
    out = Path(opts["output"])
    t0 = time.perf_counter()
    try:
        summary = _train_run_checked(train_run, opts, out)
    except ValueError as error:
        _fail(str(error).splitlines()[0], 2)
    final = getattr(summary, "final_loss", None)
    typer.echo(f"trained {opts['steps']} steps in {time.perf_counter() - t0:.1f} s"
               + (f", final loss {final:.4g}" if isinstance(final, float) else "") + f"; checkpoint: {out}")
    return out


# Training-recipe options (docs/training.md) with their defaults; each is also a YAML key.
_RECIPE_DEFAULTS: dict[str, Any] = {
    "precondition": False, "sigma_data": None, "label_dropout": 0.0, "lr_schedule": "cosine",
    "warmup_steps": 100, "grad_clip": 1.0, "weight_decay": 0.0, "ema_sigma_rel": None, "coupling": None,
}


def _train_run_checked(train_run: Any, opts: dict[str, Any], out: Path) -> Any:
    return train_run(
        data=opts["data"], path=opts["path"], prediction=opts["prediction"], network=opts["network"],
        steps=opts["steps"], batch_size=opts["batch"], lr=opts["lr"], output_dir=out, seed=opts["seed"],
        weighting=opts["weighting"], time_sampler=opts["time_sampler"], ema_decay=opts["ema_decay"],
        resume=opts["resume"], progress=opts.get("progress", True), checkpoint_every=opts["checkpoint_every"],
        network_kwargs=opts.get("network_kwargs"), **{k: opts[k] for k in _RECIPE_DEFAULTS if k in opts},
    )


@app.command()
def train(
    data: str = typer.Option("checkerboard", "--data", help="Built-in dataset name (checkerboard, eight_gaussians, moons, spirals, pinwheel, rings, gmm, digits) or a path to a folder of images, a .npy or a .pt file."),
    path: str = typer.Option("linear", "--path", help="Gaussian path: vp, subvp, ve, edm, linear (rectified flow), trig, cosine, ddpm."),
    prediction: str = typer.Option("velocity", "--prediction", help="What the network predicts: noise, data, velocity, score or v."),
    network: str = typer.Option("auto", "--network", help="mlp (vectors), unet (images) or auto (chosen from the data's shape)."),
    steps: int = typer.Option(4000, "--steps", min=1, help="Number of optimizer updates."),
    batch: int = typer.Option(512, "--batch", min=1, help="Batch size per update."),
    lr: float = typer.Option(2e-3, "--lr", min=0.0, help="Peak learning rate of AdamW (linear warm-up, cosine decay)."),
    output: Path = typer.Option(Path("runs/train"), "--output", "-o", help="Output folder for checkpoints and metrics.jsonl."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the data split, batches and noise."),
    weighting: str = typer.Option("none", "--weighting", help="Loss weighting: none, snr, min-snr, edm, likelihood."),
    time_sampler: str = typer.Option("uniform", "--time-sampler", help="Training time distribution: uniform, logit-normal or edm (EDM's log-normal noise levels)."),
    ema_decay: float = typer.Option(0.999, "--ema-decay", min=0.0, max=0.999999, help="Decay of the EMA of the weights (sampling uses the EMA)."),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", min=1, help="Save an (atomic) checkpoint every this many steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --output."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default; 1 is fastest for small MLPs on a busy machine)."),
    precondition: bool = typer.Option(False, "--precondition/--no-precondition", help="Wrap the network in EDM's preconditioning (c_skip, c_out, c_in; Karras et al. 2022); works for every path and prediction."),
    sigma_data: Optional[float] = typer.Option(None, "--sigma-data", help="σ_data of the preconditioning and the edm weighting (default: the training data's standard deviation)."),
    label_dropout: float = typer.Option(0.0, "--label-dropout", min=0.0, max=1.0, help="Train class-conditional (labelled data) with this label-dropout probability, for classifier-free guidance."),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="Learning-rate schedule after the warm-up: cosine or constant."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0, help="Linear learning-rate warm-up steps."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", min=0.0, help="Clip the global gradient norm to this value (0: no clipping)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", min=0.0, help="AdamW's decoupled weight decay."),
    coupling: Optional[str] = typer.Option(None, "--coupling", help="How noise and data are paired: independent (default) or ot (exact minibatch optimal transport)."),
    ema_sigma_rel: Optional[float] = typer.Option(None, "--ema-sigma-rel", help="Use EDM2's power-function EMA of this relative width (e.g. 0.1) instead of --ema-decay."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file whose keys (the long option names with underscores: data, path, prediction, network, steps, batch, lr, output, seed, weighting, time_sampler, ema_decay, ema_sigma_rel, checkpoint_every, threads, precondition, sigma_data, label_dropout, lr_schedule, warmup_steps, grad_clip, weight_decay, coupling, network_kwargs) override the defaults; command-line options given explicitly win; an unknown key is an error."),
) -> None:
    """Train a model and write checkpoints (safetensors + config.json) to --output."""
    opts = dict(data=data, path=path, prediction=prediction, network=network, steps=steps, batch=batch, lr=lr,
                output=output, seed=seed, weighting=weighting, time_sampler=time_sampler, ema_decay=ema_decay,
                checkpoint_every=checkpoint_every, resume=resume, threads=threads, precondition=precondition,
                sigma_data=sigma_data, label_dropout=label_dropout, lr_schedule=lr_schedule,
                warmup_steps=warmup_steps, grad_clip=grad_clip, weight_decay=weight_decay, ema_sigma_rel=ema_sigma_rel,
                coupling=coupling)
    if config is not None:
        import yaml

        if not config.is_file():
            _fail(f"config file not found: {config}", 2)
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            _fail(f"{config} must hold a mapping of option names to values", 2)
        unknown = sorted(set(loaded) - set(opts) - {"network_kwargs"})
        if unknown:
            _fail(f"unknown keys in {config}: {', '.join(unknown)}; valid: {', '.join(sorted(opts))}, network_kwargs", 2)
        given = {p.split("=")[0].lstrip("-").replace("-", "_") for p in sys.argv if p.startswith("--")}
        for key, value in loaded.items():
            if key not in given:
                opts[key] = value
    if not opts.get("grad_clip"):
        opts["grad_clip"] = None
    _set_threads(int(opts.pop("threads")))
    _train_impl(opts)


def _load_field_or_exit(checkpoint: Path):
    from .pipeline import load_field
    from .train import CheckpointError

    try:
        return load_field(checkpoint)
    except CheckpointError as error:
        _fail(str(error).splitlines()[0], 1)


def _sample_options(field: Any, solver: str, nfe: int, ems: Optional[Path], grid: Optional[str]) -> dict:
    """Solver options from the command line: EMS statistics and a grid kind or tuned-grid file."""
    from .solvers.grids import GRID_KINDS

    options: dict = {}
    if ems is not None:
        from .solvers import EMS

        try:
            options["ems"] = EMS.load(ems)
        except ValueError as error:
            _fail(str(error).splitlines()[0], 1)
    elif solver == "dpm-solver-v3":
        _fail("solver 'dpm-solver-v3' needs --ems FILE (make one with `flowdiff ems -c CHECKPOINT`)", 2)
    if grid is not None:
        if grid in GRID_KINDS:
            options["grid"] = grid
        elif Path(grid).is_file():
            from .solvers import load_grid

            try:
                tuned = load_grid(grid)
                options.update(tuned.sample_kwargs(field, solver, nfe))
            except ValueError as error:
                _fail(str(error).splitlines()[0], 2)
        else:
            _fail(f"unknown grid {grid!r}; valid: {', '.join(GRID_KINDS)} or a tuned-grid file", 2)
    return options


def _sample_impl(checkpoint: Path, solver: Optional[str], nfe: int, count: int, output: Path, seed: int,
                 ems: Optional[Path] = None, grid: Optional[str] = None, label: Optional[int] = None,
                 guidance_scale: Optional[float] = None) -> tuple[Path, Path, Any]:
    import torch

    from .pipeline import generate, save_samples_png

    from .solvers import default_solver

    if solver is not None:
        _check_name("solver", solver, _valid_solvers())
    field, cfg = _load_field_or_exit(checkpoint)
    shape = tuple(cfg["model"]["data_shape"])
    solver = default_solver(field, nfe) if solver is None else solver  # the library's default, not a name of its own
    options = _sample_options(field, solver, nfe, ems, grid)
    solver, nfe = options.pop("solver", solver), options.pop("nfe", nfe)
    t0 = time.perf_counter()
    try:
        x, used = generate(field, count, shape, solver=solver, nfe=nfe, seed=seed, label=label,
                           guidance_scale=guidance_scale, **options)
    except ValueError as error:
        _fail(str(error).splitlines()[0], 2)
    elapsed = time.perf_counter() - t0
    output.mkdir(parents=True, exist_ok=True)
    tensors = output / "samples.pt"
    tmp = tensors.with_suffix(".pt.tmp")
    torch.save({"x": x, "solver": solver, "nfe": used, "checkpoint": str(checkpoint), "label": label,
                "guidance_scale": guidance_scale}, tmp)
    tmp.replace(tensors)
    reference = None
    data = (cfg.get("extra") or {}).get("dataset")
    if x.ndim == 2 and x.shape[1] == 2 and data:
        from .data import load_dataset

        try:
            reference = load_dataset(data, split="heldout", seed=(cfg.get("extra") or {}).get("seed", 0)).x
        except ValueError:
            reference = None
    png = save_samples_png(x, output / "samples.png", reference=reference, title=f"{solver}, {used} NFE")
    typer.echo(f"{count} samples with {solver} at {used} model evaluations in {elapsed:.1f} s -> {tensors}, {png}")
    return tensors, png, cfg


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint folder or a training --output folder (its latest checkpoint)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="Solver name; `flowdiff solvers` lists them (default: the library's, fd.solvers.default_solver)."),
    nfe: int = typer.Option(50, "--nfe", min=1, help="Budget of model evaluations (including the final denoise)."),
    count: int = typer.Option(2000, "--count", "-n", min=1, help="Number of samples."),
    output: Path = typer.Option(Path("runs/samples"), "--output", "-o", help="Folder for samples.pt and samples.png."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the initial noise (and SDE noise)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
    ems: Optional[Path] = typer.Option(None, "--ems", help="Empirical model statistics for dpm-solver-v3 (from `flowdiff ems`)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Time grid: uniform, logsnr, quadratic, karras, shifted, or a tuned-grid file from `flowdiff tune-grid`."),
    label: Optional[int] = typer.Option(None, "--class", help="Class to generate (a class-conditional model, trained with --label-dropout)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale w (1: conditional model, >1: sharper classes); needs --class."),
) -> None:
    """Sample a trained model: writes samples.pt (tensors) and samples.png."""
    _set_threads(threads)
    _sample_impl(checkpoint, solver, nfe, count, output, seed, ems, grid, label, guidance_scale)


@app.command(name="eval")
def eval_(
    samples: Path = typer.Option(..., "--samples", "-s", help="A samples.pt written by `flowdiff sample`, or a folder holding one."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset to compare with (held-out split); default: the one the checkpoint was trained on."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the data split (use the training seed)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write metrics.json (default: beside the samples)."),
) -> None:
    """Metrics of samples against held-out data (sliced-W2, energy distance, MMD; digits Fréchet), with the data-vs-data floor."""
    _eval_impl(samples, data, seed, output)


def _eval_impl(samples: Path, data: Optional[str], seed: int, output: Optional[Path]) -> dict:
    import torch

    from .data import available_datasets
    from .pipeline import evaluate_samples, write_json

    file = samples / "samples.pt" if samples.is_dir() else samples
    if not file.is_file():
        _fail(f"samples file not found: {file}", 1)
    try:
        blob = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged file
        _fail(f"cannot read samples file {file}: {str(error).splitlines()[0] if str(error) else type(error).__name__}", 1)
    x = blob["x"] if isinstance(blob, dict) else blob
    if data is None and isinstance(blob, dict) and blob.get("checkpoint"):
        from .train import CheckpointError, load_checkpoint

        try:
            _, _, cfg = load_checkpoint(blob["checkpoint"])
            data = (cfg.get("extra") or {}).get("dataset")
        except CheckpointError:
            data = None
    if data is None:
        _fail("--data is required (the samples do not say which dataset they model)", 2)
    _check_name("dataset", data, list(available_datasets()), allow_path=True)
    metrics = evaluate_samples(x, data, seed=seed)
    out = write_json(metrics, (output or file.parent) / "metrics.json" if (output is None or output.suffix != ".json") else output)
    for key in ("sliced_w2", "energy_distance", "mmd2", "digits_frechet"):
        if key in metrics:
            typer.echo(f"{key:>16}: {metrics[key]:.4g}   (data-vs-data floor {metrics[key + '_floor']:.4g}, n = {metrics['num_samples']})")
    typer.echo(f"metrics -> {out}")
    return metrics


@app.command(name="ems")
def ems_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint folder or a training --output folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the statistics (default: <checkpoint>/ems.safetensors)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the data split and of the noise used for the estimate."),
    knots: int = typer.Option(400, "--knots", min=2, help="Log-SNR knots the statistics are estimated at (the cost is proportional)."),
    samples: int = typer.Option(512, "--samples", min=2, help="Training points noised at every knot (the cost is proportional)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Points per model call."),
    probes: int = typer.Option(1, "--probes", min=1, help="Hutchinson probes per point (for data of more than 32 dimensions)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
) -> None:
    """Estimate DPM-Solver-v3's empirical model statistics (Zheng et al. 2023) for a trained model.

    The cost, reported at the end, is about knots × samples / batch_size forward passes plus as
    many forward-mode JVPs (which cost 3–5 forward passes each on a CPU)."""
    from .pipeline import ems_from_checkpoint
    from .train import CheckpointError

    _set_threads(threads)
    try:
        stats = ems_from_checkpoint(checkpoint, output, seed=seed, num_lambdas=knots, num_samples=samples,
                                    batch_size=batch_size, probes=probes)
    except CheckpointError as error:
        _fail(str(error).splitlines()[0], 1)
    except ValueError as error:
        _fail(str(error).splitlines()[0], 2)
    cost = stats.cost
    typer.echo(f"EMS written ({stats}); {cost.get('seconds', float('nan')):.0f} s, {cost.get('model_calls')} model calls "
               f"({cost.get('jvp_calls')} JVPs)")


@app.command(name="tune-grid")
def tune_grid_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint folder or a training --output folder."),
    solver: str = typer.Option("dpm-solver++", "--solver", help="The solver the grid is tuned for."),
    nfe: int = typer.Option(10, "--nfe", min=2, help="The budget the grid is tuned for (final denoise included)."),
    ems: Optional[Path] = typer.Option(None, "--ems", help="EMS file, needed when --solver is dpm-solver-v3."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the grid (default: <checkpoint>/grid_<solver>_nfe<N>.safetensors)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the noise batch used for tuning."),
    count: int = typer.Option(128, "--count", min=4, help="Noise draws tuned on (a quarter is held out)."),
    max_evals: int = typer.Option(400, "--max-evals", min=1, help="Most solver runs the search may make."),
    time_budget: float = typer.Option(60.0, "--time-budget", min=0.0, help="Seconds after which the search stops with the best grid so far."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0: torch's default)."),
) -> None:
    """Fit the step locations of a solver at a given NFE to a trained model (reuse with `sample --grid FILE`)."""
    from .pipeline import tune_grid_from_checkpoint
    from .train import CheckpointError

    _check_name("solver", solver, _valid_solvers())
    _set_threads(threads)
    try:
        tuned = tune_grid_from_checkpoint(checkpoint, solver, nfe, output, seed=seed, ems=ems, count=count,
                                          max_evals=max_evals, time_budget=time_budget)
    except CheckpointError as error:
        _fail(str(error).splitlines()[0], 1)
    except ValueError as error:
        _fail(str(error).splitlines()[0], 2)
    typer.echo(f"tuned grid for {solver} at {nfe} NFE: {[round(float(t), 5) for t in tuned.grid]}")


@app.command()
def solvers() -> None:
    """List the solver names `flowdiff sample --solver` accepts."""
    for name in _valid_solvers():
        typer.echo(name)


@app.command()
def demo(
    data: str = typer.Option("checkerboard", "--data", help="2-D toy dataset to train on."),
    steps: int = typer.Option(12000, "--steps", min=1, help="Training steps (12000: about 65 CPU seconds; measured in docs/training.md)."),
    output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Output folder."),
    nfe: int = typer.Option(50, "--nfe", min=2, help="Model evaluations for sampling."),
    solver: Optional[str] = typer.Option(None, "--solver", help="Solver for sampling (default: the library's, fd.solvers.default_solver)."),
    count: int = typer.Option(2000, "--count", min=10, help="Number of samples (the floor uses the same size)."),
    threads: int = typer.Option(1, "--threads", min=0, help="CPU threads for torch (0: torch's default). The demo's network is so small that one thread is as fast as two and immune to a busy machine."),
) -> None:
    """The main job: train on a 2-D toy set, sample, write the PNG and the metrics, print where they are."""
    _set_threads(threads)
    t0 = time.perf_counter()
    # Rectified flow with a small residual MLP: about a minute of training on one core. More steps
    # paid more than a wider net, a larger batch, EDM preconditioning or OT pairing (docs/training.md).
    opts = dict(data=data, path="linear", prediction="velocity", network="mlp", steps=steps, batch=256, lr=2e-3,
                output=output / "checkpoints", seed=0, weighting="none", time_sampler="uniform", ema_decay=0.999,
                checkpoint_every=max(1, steps // 4), resume=False, network_kwargs={"hidden": 128, "depth": 3})
    ckpt = _train_impl(opts)
    tensors, png, _ = _sample_impl(ckpt, solver, nfe, count, output, seed=1)
    metrics = _eval_impl(tensors, data, 0, None)
    ratio = metrics["sliced_w2"] / metrics["sliced_w2_floor"]
    typer.echo("")
    typer.echo(f"demo finished in {time.perf_counter() - t0:.0f} s")
    typer.echo(f"  sliced-W2 samples vs held-out : {metrics['sliced_w2']:.4f}")
    typer.echo(f"  sliced-W2 data vs data (floor): {metrics['sliced_w2_floor']:.4f}   ratio {ratio:.2f}")
    typer.echo(f"  samples : {tensors}")
    typer.echo(f"  picture : {png}")
    typer.echo(f"  metrics : {output / 'metrics.json'}")
    typer.echo(f"  model   : {ckpt}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
