"""The ``flowdiff`` command: ``train``, ``sample``, ``eval``, ``likelihood``, ``ems``, ``tune-grid``,
``solvers``, ``restore``, ``finetune``, ``forecast`` and ``demo`` (docs/cli.md); the modality modules
in this package add their own (``quantize``, ``certify``, ...).

Errors. Every mistake a user can make ends in one line ``error: ...`` on stderr that names the
value and what is allowed, with exit status 2 for usage errors (unknown names, values out of
range, an output that names a file, a run folder that already holds a run) and 1 for data and
I/O errors (unreadable or non-finite data, a missing or corrupt checkpoint, an output folder that
cannot be written). ``--debug`` (or ``FLOWDIFF_DEBUG=1``) shows the traceback as well. Ctrl-C
exits with 130 (SIGTERM: 143); a training run first saves a resumable checkpoint.

Output locations are checked (created, writable) before any expensive work. Long jobs report
progress on stderr: a bar on a terminal, one line every ten seconds otherwise; ``--quiet``
silences it. ``--threads`` (every command) defaults to :func:`flowdiff._utils.default_threads`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(
    help="flowdiff: train generative models on paths and stochastic interpolants, sample them fast, evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PREDICTIONS = ("noise", "data", "velocity", "score", "v")

#: Process-wide switches set by the global options (``--quiet``, ``--debug``) or FLOWDIFF_DEBUG.
_STATE: dict[str, bool] = {"quiet": False, "debug": False}

THREADS_HELP = "CPU threads for torch (default: 1 for small networks, else min(cores/2, 4) — docs/cli.md; 0: torch's own default)."
DEVICE_HELP = "Device: cpu, cuda, cuda:N or mps (an error names the ones this machine has)."

# ---------------------------------------------------------------------------------------------
# extension points for the other modalities (graphs, time series, trajectories, PDE fields, ...)
# ---------------------------------------------------------------------------------------------
# A modality's command module (flowdiff/cli/<name>.py, imported at the end of this file) registers
# handlers here; ``train``/``sample``/``eval``/``forecast`` ask each handler's predicate in turn and
# hand the whole command to the first that claims it.
#
#   TRAIN_HANDLERS:    (claims(data: str, task: str | None) -> bool,
#                       run(options: dict, explicit: set[str]) -> None)
#                      ``options`` holds every ``train`` option (config file merged) and ``explicit`` the
#                      names the user set (command line or --config), so a modality can use its own defaults.
#   SAMPLE_HANDLERS:   (claims(checkpoint: Path) -> bool, run(options: dict, explicit: set[str]) -> None)
#   EVAL_HANDLERS:     (claims(samples: Path) -> bool, run(options: dict, explicit: set[str]) -> None)
#   FORECAST_HANDLERS: (claims(checkpoint: Path) -> bool, run(options: dict, explicit: set[str]) -> None)
Handler = tuple[Callable[..., bool], Callable[[dict, set], None]]
TRAIN_HANDLERS: list[Handler] = []
SAMPLE_HANDLERS: list[Handler] = []
EVAL_HANDLERS: list[Handler] = []
FORECAST_HANDLERS: list[Handler] = []


def _explicit(ctx: Any) -> set[str]:
    """Names of the parameters of ``ctx``'s command that the user gave on the command line."""
    # typer may vendor its own click, whose ParameterSource is another enum class: compare by name.
    return {name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


def _claimed(handlers: list[Handler], *key: Any) -> Optional[Callable[[dict, set], None]]:
    for claims, run in handlers:
        if claims(*key):
            return run
    return None


def _debug() -> bool:
    return _STATE["debug"] or os.environ.get("FLOWDIFF_DEBUG", "") not in ("", "0")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _fail(message: str, code: int) -> None:
    if _debug() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _exit_code_of(error: BaseException) -> int:
    """1 for data, checkpoint, I/O and numerical failures; 2 for the rest (bad values, usage)."""
    from ..data import DataError
    from ..train import CheckpointError, NonFiniteLossError

    if isinstance(error, (DataError, CheckpointError, NonFiniteLossError, OSError)):
        return 1
    if type(error).__name__.startswith("NonFinite"):
        return 1  # a sampler or likelihood solve diverged: the model, not the command line
    return 2


@contextlib.contextmanager
def _user_errors():
    """Turn the library's one-line errors into ``error: ...`` and the exit status of :func:`_exit_code_of`."""
    from ..train import CheckpointError

    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, TypeError, CheckpointError, OSError) as error:
        _fail(_first_line(error), _exit_code_of(error))
    except RuntimeError as error:
        if not type(error).__name__.startswith("NonFinite"):
            raise
        _fail(_first_line(error), 1)


def _command(func: Callable) -> Callable:
    """A command body run under :func:`_user_errors`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _user_errors():
            return func(*args, **kwargs)

    return wrapper


def _set_threads(threads: Optional[int], model: Any = None, device: Any = None) -> int:
    """Apply ``--threads`` (``None``: :func:`flowdiff._utils.default_threads`; 0: leave torch's); returns it."""
    import torch

    from .._utils import check_int, default_threads

    if threads is None:
        threads = default_threads(model, device)
    threads = check_int("--threads", threads, 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return threads


def _progress(total: Optional[int], desc: str, unit: str) -> Any:
    from ..train.logs import Progress

    return Progress(total, desc, enabled=not _STATE["quiet"], unit=unit)


def _restore_inputs(source: str, seed: int, count: int, shape: tuple[int, ...]) -> "torch.Tensor":
    """The clean images ``flowdiff restore`` degrades: the first ``count`` of a ``.pt``/``.pth``/``.npy`` tensor
    (or a dict with ``'x'``) or of a dataset's held-out split; exits 2 with one line on a wrong shape or NaN/Inf."""
    import torch

    from ..data import available_datasets, load_dataset

    file = Path(source)
    if file.is_file() and file.suffix in (".pt", ".pth", ".npy"):
        import numpy as np

        truth = torch.as_tensor(np.load(file)) if file.suffix == ".npy" else torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(truth, dict):
            truth = truth.get("x")
        if not isinstance(truth, torch.Tensor):
            _fail(f"{file}: expected a tensor of images (N, C, H, W) (or a dict with 'x')", 2)
    else:
        _check_name("dataset", source, list(available_datasets()))
        truth = load_dataset(source, split="heldout", seed=seed).x
    truth = truth[:count].float()
    if tuple(truth.shape[1:]) != tuple(shape):
        _fail(f"the input images have shape {tuple(truth.shape[1:])} but the model was trained on {tuple(shape)}", 2)
    if not torch.isfinite(truth).all():
        _fail(f"{source}: the input images contain NaN or Inf", 2)
    return truth


def _check_name(kind: str, value: str, valid: list[str], allow_path: bool = False) -> None:
    if value in valid or (allow_path and Path(value).exists()):
        return
    extra = " (or an existing file/folder)" if allow_path else ""
    _fail(f"unknown {kind} {value!r}; valid: {', '.join(valid)}{extra}", 2)


def _valid_solvers() -> list[str]:
    from .. import solvers

    return list(solvers.available())


def _device_dtype(device: str, dtype: str) -> tuple[Any, Any, Any]:
    """``(device, weights dtype, autocast dtype)`` from ``--device``/``--dtype``; usage errors exit 2."""
    from ..pipeline import resolve_device, resolve_dtype

    try:
        dev = resolve_device(device)
        weights, autocast = resolve_dtype(dtype, dev)
    except ValueError as error:
        _fail(_first_line(error), 2)
    return dev, weights, autocast


def _checked_output(check: Any, path: Path, option: str) -> Path:
    """Run a pipeline output check before any work: exit 2 when the path is wrong (names a file),
    1 when it is not writable."""
    try:
        return check(path)
    except ValueError as error:
        _fail(f"{option}: {_first_line(error)}", 2)
    except OSError as error:
        _fail(f"{option}: {_first_line(error)}", 1)
    raise AssertionError  # unreachable


def _output_dir(folder: Path, option: str = "--output") -> Path:
    """Create and check an output folder before any work."""
    from ..pipeline import check_output_dir

    return _checked_output(check_output_dir, folder, option)


def _output_file(file: Path, option: str = "--output") -> Path:
    from ..pipeline import check_output_file

    return _checked_output(check_output_file, file, option)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

# Training-recipe options (docs/training.md) with their defaults; each is also a YAML key.
_RECIPE_DEFAULTS: dict[str, Any] = {
    "precondition": False, "sigma_data": None, "label_dropout": 0.0, "lr_schedule": "cosine",
    "warmup_steps": 100, "grad_clip": 1.0, "weight_decay": 0.0, "ema_sigma_rel": None, "coupling": None,
}

# What each option (and YAML key) must be: (kind, low, high, low_open); None bounds are open ends.
_OPTION_TYPES: dict[str, tuple] = {
    "steps": ("int", 1, None), "batch": ("int", 1, None), "seed": ("int", 0, None),
    "checkpoint_every": ("int", 1, None), "warmup_steps": ("int", 0, None), "threads": ("int?", 0, None),
    "lr": ("float", 0.0, None, True), "ema_decay": ("float", 0.0, 0.999999), "grad_clip": ("float", 0.0, None),
    "weight_decay": ("float", 0.0, None), "label_dropout": ("float", 0.0, 1.0),
    "sigma_data": ("float?", 0.0, None, True), "ema_sigma_rel": ("float?", 0.0, None, True),
    "precondition": ("bool",), "resume": ("bool",), "overwrite": ("bool",),
    "data": ("str",), "path": ("str",), "prediction": ("str",), "network": ("str",), "weighting": ("str",),
    "time_sampler": ("str",), "lr_schedule": ("str",), "coupling": ("str?",), "output": ("path",),
    "device": ("str",), "dtype": ("str",), "network_kwargs": ("dict?",),
}


def _check_option(key: str, value: Any, source: str) -> Any:
    """``value`` of option ``key`` checked against :data:`_OPTION_TYPES` (usage error otherwise)."""
    from .._utils import check_float, check_int

    spec = _OPTION_TYPES.get(key)
    if spec is None:
        return value
    kind, name = spec[0], f"{key} ({source})" if source != "command line" else "--" + key.replace("_", "-")
    if kind.endswith("?") and value is None:
        return None
    kind = kind.rstrip("?")
    try:
        if kind == "int":
            return check_int(name, value, spec[1], spec[2])
        if kind == "float":
            return check_float(name, value, spec[1], spec[2], low_open=len(spec) > 3 and spec[3])
    except ValueError as error:
        _fail(_first_line(error), 2)
    if kind == "bool" and not isinstance(value, bool):
        _fail(f"{name} must be true or false, got {value!r}", 2)
    if kind in ("str", "path") and not isinstance(value, (str, Path)):
        _fail(f"{name} must be a name or path (a string), got {value!r}", 2)
    if kind == "dict" and not isinstance(value, dict):
        _fail(f"{name} must be a mapping of network arguments (e.g. {{hidden: 128, depth: 3}}), got {value!r}", 2)
    return Path(value) if kind == "path" else value


def _check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that already holds files unless ``--resume`` or ``--overwrite`` (nothing is deleted here)."""
    if resume and overwrite:
        _fail("--resume and --overwrite exclude each other: continue the run in --output, or start it over", 2)
    if out.exists() and not out.is_dir():
        _fail(f"--output {str(out)!r} is a file; training writes a folder (checkpoints/, metrics.jsonl)", 2)
    if out.is_dir() and not resume and not overwrite:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            _fail(f"--output {str(out)!r} is not empty ({shown}); pass --resume to continue the run there, "
                  f"--overwrite to start it over (deletes its checkpoints and metrics.jsonl), or another --output", 2)
    _output_dir(out)


@contextlib.contextmanager
def _remove_if_left_empty(folder: Path, existed: bool):
    """Remove ``folder`` again if this command created it and a failure left it empty."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            if not existed and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _train_impl(opts: dict[str, Any]) -> Path:
    from ..data import available_datasets
    from ..losses import available_time_samplers, available_weightings
    from ..nn import available_networks
    from ..paths import available_paths
    from ..pipeline import DTYPES, train_run

    for key in list(opts):
        opts[key] = _check_option(key, opts[key], "command line")
    _check_name("dataset", opts["data"], list(available_datasets()), allow_path=True)
    _check_name("path", opts["path"], available_paths())
    _check_name("prediction", opts["prediction"], list(PREDICTIONS))
    _check_name("network", opts["network"], ["auto", *available_networks()])
    _check_name("weighting", opts["weighting"], list(available_weightings()))
    _check_name("time sampler", opts["time_sampler"], list(available_time_samplers()))
    _check_name("learning-rate schedule", opts.get("lr_schedule", "cosine"), ["cosine", "constant"])
    if opts.get("coupling") is not None:
        _check_name("coupling", opts["coupling"], ["independent", "ot"])
    device = opts.get("device", "cpu")
    dtype = opts.get("dtype", "float32")
    _check_name("dtype", dtype, list(DTYPES))
    dev, _, _ = _device_dtype(device, dtype)
    if dtype in ("bfloat16", "float16") and dev.type != "cuda":
        _fail(f"--dtype {dtype} (mixed-precision training) needs --device cuda; on {dev.type} use float32 or float64", 2)
    out = Path(opts["output"])
    existed = out.exists()
    _check_run_folder(out, bool(opts.get("resume")), bool(opts.get("overwrite")))
    t0 = time.perf_counter()
    with _user_errors(), _remove_if_left_empty(out, existed):
        summary = train_run(
            data=opts["data"], path=opts["path"], prediction=opts["prediction"], network=opts["network"],
            steps=opts["steps"], batch_size=opts["batch"], lr=opts["lr"], output_dir=out, seed=opts["seed"],
            weighting=opts["weighting"], time_sampler=opts["time_sampler"], ema_decay=opts["ema_decay"],
            resume=bool(opts.get("resume")), overwrite=bool(opts.get("overwrite")), progress=not _STATE["quiet"],
            checkpoint_every=opts["checkpoint_every"], network_kwargs=opts.get("network_kwargs"),
            device=str(dev), dtype=dtype, threads=opts.get("threads"),
            **{k: opts[k] for k in _RECIPE_DEFAULTS if k in opts},
        )
    elapsed = time.perf_counter() - t0
    if getattr(summary, "interrupted", False):
        import signal

        signum = summary.stop_signal or signal.SIGINT
        typer.echo(f"interrupted by {signal.Signals(signum).name} at step {summary.step} of {opts['steps']}; "
                   f"resumable checkpoint: {summary.checkpoint}; continue with the same command and --resume", err=True)
        raise typer.Exit(128 + int(signum))
    final = getattr(summary, "final_loss", None)
    start = getattr(summary, "start_step", 0)
    done = f"trained steps {start + 1}-{summary.step}" if start else f"trained {summary.step} steps"
    typer.echo(f"{done} in {elapsed:.1f} s" + (f", final loss {final:.4g}" if isinstance(final, float) else "")
               + f"; checkpoint: {summary.checkpoint}")
    return out


@app.command()
@_command
def train(
    ctx: typer.Context,
    data: str = typer.Option("checkerboard", "--data", help="Built-in dataset name (checkerboard, eight_gaussians, moons, spirals, pinwheel, rings, gmm, digits) or a path to a folder of images, a .npy or a .pt file."),
    path: str = typer.Option("linear", "--path", help="Gaussian path: vp, subvp, ve, edm, linear (rectified flow), trig, cosine, ddpm."),
    prediction: str = typer.Option("velocity", "--prediction", help="What the network predicts: noise, data, velocity, score or v."),
    network: str = typer.Option("auto", "--network", help="mlp (vectors), unet (images), gdss / transformer / ppgn (graphs, molecules) or auto (chosen from the data)."),
    steps: int = typer.Option(4000, "--steps", help="Number of optimizer updates (>= 1)."),
    batch: int = typer.Option(512, "--batch", help="Batch size per update (>= 1)."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate of AdamW (> 0; linear warm-up, cosine decay)."),
    output: Path = typer.Option(Path("runs/train"), "--output", "-o", help="Run folder for checkpoints/ and metrics.jsonl; must be empty or new unless --resume or --overwrite."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, data split, batches and noise: the same seed and options give bitwise the same model on the same machine."),
    weighting: str = typer.Option("none", "--weighting", help="Loss weighting: none, snr, min-snr, edm, likelihood."),
    time_sampler: str = typer.Option("uniform", "--time-sampler", help="Training time distribution: uniform, logit-normal or edm (EDM's log-normal noise levels)."),
    ema_decay: float = typer.Option(0.999, "--ema-decay", help="Decay of the EMA of the weights, in [0, 0.999999] (sampling uses the EMA)."),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", help="Save an (atomic) checkpoint every this many steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its newest checkpoint that verifies (a corrupt newer one is reported and skipped)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --output that holds a run: deletes its checkpoints (with EMS/grids stored in them) and metrics.jsonl."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64, or bfloat16/float16 mixed precision (CUDA only)."),
    precondition: bool = typer.Option(False, "--precondition/--no-precondition", help="Wrap the network in EDM's preconditioning (c_skip, c_out, c_in; Karras et al. 2022); works for every path and prediction."),
    sigma_data: Optional[float] = typer.Option(None, "--sigma-data", help="σ_data of the preconditioning and the edm weighting (default: the training data's standard deviation)."),
    label_dropout: float = typer.Option(0.0, "--label-dropout", help="Train class-conditional (labelled data) with this label-dropout probability in [0, 1], for classifier-free guidance."),
    lr_schedule: str = typer.Option("cosine", "--lr-schedule", help="Learning-rate schedule after the warm-up: cosine or constant."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", help="Linear learning-rate warm-up steps."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the global gradient norm to this value (0: no clipping)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW's decoupled weight decay."),
    coupling: Optional[str] = typer.Option(None, "--coupling", help="How noise and data are paired: independent (default) or ot (exact minibatch optimal transport)."),
    ema_sigma_rel: Optional[float] = typer.Option(None, "--ema-sigma-rel", help="Use EDM2's power-function EMA of this relative width (e.g. 0.1) instead of --ema-decay."),
    task: Optional[str] = typer.Option(None, "--task", help="What to train for where a data set allows several tasks: e.g. forecast (a time series .csv: --context, --horizon)."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length (time steps or frames) of a forecasting task."),
    horizon: Optional[int] = typer.Option(None, "--horizon", help="Forecast horizon (time steps or frames) of a forecasting task."),
    season: Optional[int] = typer.Option(None, "--season", help="Season length of a time series forecasting task (default: estimated from the series' autocorrelation)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file whose keys (the long option names with underscores: data, path, prediction, network, steps, batch, lr, output, seed, weighting, time_sampler, ema_decay, ema_sigma_rel, checkpoint_every, threads, device, dtype, precondition, sigma_data, label_dropout, lr_schedule, warmup_steps, grad_clip, weight_decay, coupling, network_kwargs) override the defaults; command-line options given explicitly win; an unknown key or a value of the wrong type is an error."),
) -> None:
    """Train a model and write checkpoints (safetensors + config.json) to --output.

    Ctrl-C (or SIGTERM) stops after the current update with a resumable checkpoint and exits
    130 (143); run the same command with --resume to continue it exactly."""
    opts = dict(data=data, path=path, prediction=prediction, network=network, steps=steps, batch=batch, lr=lr,
                output=output, seed=seed, weighting=weighting, time_sampler=time_sampler, ema_decay=ema_decay,
                checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, threads=threads,
                device=device, dtype=dtype, precondition=precondition,
                sigma_data=sigma_data, label_dropout=label_dropout, lr_schedule=lr_schedule,
                warmup_steps=warmup_steps, grad_clip=grad_clip, weight_decay=weight_decay, ema_sigma_rel=ema_sigma_rel,
                coupling=coupling)
    if config is not None:
        import yaml

        if not config.is_file():
            _fail(f"config file not found: {config}", 2)
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as error:
            _fail(f"{config} is not valid YAML: {_first_line(error)}", 2)
        if not isinstance(loaded, dict):
            _fail(f"{config} must hold a mapping of option names to values", 2)
        unknown = sorted(str(k) for k in set(loaded) - set(opts) - {"network_kwargs"})
        if unknown:
            _fail(f"unknown keys in {config}: {', '.join(unknown)}; valid: {', '.join(sorted(opts))}, network_kwargs", 2)
        given = {p.split("=")[0].lstrip("-").replace("-", "_") for p in sys.argv if p.startswith("--")}
        for key, value in loaded.items():
            if key not in given:
                opts[key] = _check_option(key, value, str(config))
    explicit = _explicit(ctx) | (set(loaded) if config is not None else set())
    handler = _claimed(TRAIN_HANDLERS, str(opts["data"]), task)
    if handler is not None:
        return handler({**opts, "task": task, "context": context, "horizon": horizon, "season": season}, explicit)
    if task is not None or context is not None or horizon is not None or season is not None:
        _fail(f"--task/--context/--horizon/--season apply to forecasting data (a time series .csv or nbody), not to --data {opts['data']}", 2)
    if not opts.get("grad_clip"):
        opts["grad_clip"] = None
    _train_impl(opts)


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def _load_field_or_exit(checkpoint: Path, device: Any = "cpu", dtype: Any = None, unlabeled: str = "mixture"):
    import torch

    from ..pipeline import load_field
    from ..train import CheckpointError

    try:
        return load_field(checkpoint, device=device, dtype=dtype or torch.float32, unlabeled=unlabeled)
    except CheckpointError as error:
        _fail(_first_line(error), 1)


def _parse_solver_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs of ``--solver-option`` (values read as YAML scalars: 1e-4, 3, true, name)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--solver-option {pair!r} must be KEY=VALUE (e.g. rtol=1e-4)", 2)
        for parse in (int, float, yaml.safe_load):  # 3, 1e-7 (YAML alone reads "1e-7" as a string), true, name
            try:
                options[key.strip().replace("-", "_")] = parse(value)
                break
            except (ValueError, yaml.YAMLError):
                options[key.strip().replace("-", "_")] = value
    return options


def _sample_options(field: Any, solver: str, nfe: Optional[int], ems: Optional[Path], grid: Optional[str]) -> dict:
    """Solver options from the command line: EMS statistics and a grid kind or tuned-grid file."""
    from ..solvers.grids import GRID_KINDS

    options: dict = {}
    if ems is not None:
        from ..solvers import EMS

        try:
            options["ems"] = EMS.load(ems)
        except ValueError as error:
            _fail(_first_line(error), 1)
    elif solver == "dpm-solver-v3":
        _fail("solver 'dpm-solver-v3' needs --ems FILE (make one with `flowdiff ems -c CHECKPOINT`)", 2)
    if grid is not None:
        if grid in GRID_KINDS:
            options["grid"] = grid
        elif Path(grid).is_file():
            from ..solvers import load_grid

            try:
                tuned = load_grid(grid)
                options.update(tuned.sample_kwargs(field, solver, nfe))
            except ValueError as error:
                _fail(_first_line(error), 2)
        else:
            _fail(f"unknown grid {grid!r}; valid: {', '.join(GRID_KINDS)} or a tuned-grid file", 2)
    return options


def _sample_impl(checkpoint: Path, solver: Optional[str], nfe: Optional[int], count: int, output: Path, seed: int,
                 ems: Optional[Path] = None, grid: Optional[str] = None, label: Optional[int] = None,
                 guidance_scale: Optional[float] = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 4096, threads: Optional[int] = None,
                 solver_options: Optional[dict] = None) -> tuple[Path, Path, Any]:
    from .._utils import check_int

    with _user_errors():
        count = check_int("--count", count, 1)
        batch_size = check_int("--batch-size", batch_size, 1)
        if nfe is not None:
            nfe = check_int("--nfe", nfe, 1)
    if solver is not None:
        _check_name("solver", solver, _valid_solvers())
    dev, weights, autocast = _device_dtype(device, dtype)
    existed = output.exists()
    _output_dir(output)
    with _remove_if_left_empty(output, existed):
        return _sample_body(checkpoint, solver, nfe, count, output, seed, ems, grid, label, guidance_scale, dev,
                            weights, autocast, dtype, batch_size, threads, solver_options)


def _sample_body(checkpoint: Path, solver: Optional[str], nfe: Optional[int], count: int, output: Path, seed: int,
                 ems: Optional[Path], grid: Optional[str], label: Optional[int], guidance_scale: Optional[float],
                 dev: Any, weights: Any, autocast: Any, dtype: str, batch_size: int, threads: Optional[int],
                 solver_options: Optional[dict]) -> tuple[Path, Path, Any]:
    import torch

    from ..pipeline import generate, save_samples_png
    from ..solvers import default_solver, get_solver

    field, cfg = _load_field_or_exit(checkpoint, dev, weights)
    _set_threads(threads, field.model, dev)
    shape = tuple(cfg["model"]["data_shape"])
    solver = default_solver(field, nfe if nfe is not None else 50) if solver is None else solver
    if nfe is None and not get_solver(solver).adaptive:
        nfe = 50  # fixed-step solvers: the default budget; adaptive ones (dopri5) choose their steps
    options = _sample_options(field, solver, nfe, ems, grid)
    options.update(solver_options or {})
    solver, nfe = options.pop("solver", solver), options.pop("nfe", nfe)
    t0 = time.perf_counter()
    with _user_errors(), _progress(count, "sample", "sample") as bar:
        x, used = generate(field, count, shape, solver=solver, nfe=nfe, seed=seed, label=label,
                           guidance_scale=guidance_scale, batch_size=batch_size, autocast=autocast, progress=bar,
                           **options)
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).sum())
        typer.echo(f"warning: {bad} of {count} samples are not finite (NaN/Inf): the solve diverged; "
                   f"try another --solver or more --nfe", err=True)
    tensors = output / "samples.pt"
    tmp = tensors.with_suffix(".pt.tmp")
    ckpt_dir = str(Path(cfg.get("checkpoint_dir", checkpoint)).resolve())
    torch.save({"x": x, "solver": solver, "nfe": used, "checkpoint": ckpt_dir, "label": label,
                "guidance_scale": guidance_scale, "seed": seed, "dtype": dtype, "device": str(dev)}, tmp)
    tmp.replace(tensors)
    reference = None
    data = (cfg.get("extra") or {}).get("dataset")
    if x.ndim == 2 and x.shape[1] == 2 and data:
        from ..data import load_dataset

        try:
            reference = load_dataset(data, split="heldout", seed=(cfg.get("extra") or {}).get("seed", 0)).x
        except ValueError:
            reference = None
    png = save_samples_png(x, output / "samples.png", reference=reference, title=f"{solver}, {used} NFE")
    typer.echo(f"{count} samples with {solver} at {used} model evaluations in {elapsed:.1f} s -> {tensors}, {png}")
    return tensors, png, cfg


@app.command()
@_command
def sample(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint folder or a training --output folder (its latest checkpoint)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="Solver name; `flowdiff solvers` lists them (default: the library's, fd.solvers.default_solver)."),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Budget of model evaluations, final denoise included (default 50; for the adaptive dopri5 a cap, default the library's)."),
    count: int = typer.Option(2000, "--count", "-n", help="Number of samples."),
    output: Path = typer.Option(Path("runs/samples"), "--output", "-o", help="Folder for samples.pt and samples.png."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the initial noise (and SDE noise)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64, or bfloat16 (CPU/CUDA) / float16 (CUDA, MPS) autocast of the model calls."),
    batch_size: int = typer.Option(4096, "--batch-size", help="Samples per solver run (bounds the memory)."),
    ems: Optional[Path] = typer.Option(None, "--ems", help="Empirical model statistics for dpm-solver-v3 (from `flowdiff ems`)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Time grid: uniform, logsnr, quadratic, karras, shifted, or a tuned-grid file from `flowdiff tune-grid`."),
    label: Optional[int] = typer.Option(None, "--class", help="Class to generate (a class-conditional model, trained with --label-dropout)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale w (1: conditional model, >1: sharper classes); needs --class."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance of the adaptive solver (dopri5)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance of the adaptive solver (dopri5)."),
    solver_option: list[str] = typer.Option([], "--solver-option", help="KEY=VALUE passed to the solver (repeatable), e.g. --solver-option order=3."),
) -> None:
    """Sample a trained model: writes samples.pt (tensors) and samples.png (graph runs: edge lists / SMILES and a drawing)."""
    handler = _claimed(SAMPLE_HANDLERS, checkpoint)
    if handler is not None:
        return handler(dict(ctx.params), _explicit(ctx))
    options = _parse_solver_options(solver_option)
    if rtol is not None:
        options["rtol"] = rtol
    if atol is not None:
        options["atol"] = atol
    _sample_impl(checkpoint, solver, nfe, count, output, seed, ems, grid, label, guidance_scale, device, dtype,
                 batch_size, threads, options)


# ---------------------------------------------------------------------------------------------
# eval, likelihood
# ---------------------------------------------------------------------------------------------


def _samples_blob(samples: Path) -> tuple[Path, Any]:
    import torch

    file = samples / "samples.pt" if samples.is_dir() else samples
    if not file.is_file():
        _fail(f"samples file not found: {file}", 1)
    try:
        blob = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged file
        _fail(f"cannot read samples file {file}: {_first_line(error)}", 1)
    x = blob["x"] if isinstance(blob, dict) else blob
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        _fail(f"{file} does not hold samples (a float tensor of shape (N, ...) under 'x')", 1)
    return file, blob


def _checkpoint_of_samples(blob: Any, file: Path) -> Optional[Path]:
    """The checkpoint a samples file came from: absolute, or (older files) relative to the cwd or the samples' folder."""
    if not isinstance(blob, dict) or not blob.get("checkpoint"):
        return None
    recorded = Path(blob["checkpoint"])
    for candidate in (recorded, *(parent / recorded for parent in file.resolve().parents)):
        if candidate.exists():
            return candidate
    return None


@app.command(name="eval")
@_command
def eval_(
    ctx: typer.Context,
    samples: Path = typer.Option(..., "--samples", "-s", help="A samples.pt written by `flowdiff sample`, or a folder holding one."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset to compare with (held-out split); default: the one the checkpoint was trained on."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the data split (use the training seed)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write metrics.json (default: beside the samples)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Metrics of samples against held-out data (sliced-W2, energy distance, MMD; digits Fréchet; graph MMDs), with the data-vs-data floor."""
    handler = _claimed(EVAL_HANDLERS, samples)
    if handler is not None:
        return handler(dict(ctx.params), _explicit(ctx))
    _set_threads(threads)
    _eval_impl(samples, data, seed, output)


def _eval_impl(samples: Path, data: Optional[str], seed: int, output: Optional[Path]) -> dict:
    from ..data import available_datasets
    from ..pipeline import evaluate_samples, write_json

    file, blob = _samples_blob(samples)
    x = blob["x"] if isinstance(blob, dict) else blob
    if data is None:
        ckpt = _checkpoint_of_samples(blob, file)
        if ckpt is not None:
            from ..train import CheckpointError, load_checkpoint

            try:
                _, _, cfg = load_checkpoint(ckpt)
                data = (cfg.get("extra") or {}).get("dataset")
            except CheckpointError:
                data = None
    if data is None:
        _fail("--data is required (the samples do not say which dataset they model)", 2)
    _check_name("dataset", data, list(available_datasets()), allow_path=True)
    target = (output or file.parent) / "metrics.json" if (output is None or output.suffix != ".json") else output
    target = _output_file(target)
    with _progress(None, "eval", "metric") as bar:
        metrics = evaluate_samples(x, data, seed=seed, progress=bar)
    out = write_json(metrics, target)
    for key in ("sliced_w2", "energy_distance", "mmd2", "digits_frechet"):
        if key in metrics:
            typer.echo(f"{key:>16}: {metrics[key]:.4g}   (data-vs-data floor {metrics[key + '_floor']:.4g}, n = {metrics['num_samples']})")
    typer.echo(f"metrics -> {out}")
    return metrics


@app.command()
@_command
def likelihood(
    checkpoint_arg: Optional[Path] = typer.Argument(None, metavar="CHECKPOINT", help="A checkpoint folder or a training --output folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="The same as the CHECKPOINT argument."),
    data: Optional[str] = typer.Option(None, "--data", help="A dataset name (its --split is used), a .npy/.npz/.pt file or a samples.pt from `flowdiff sample` (all rows); default: the checkpoint's dataset."),
    split: str = typer.Option("heldout", "--split", help="Split of a dataset name: heldout, train or all."),
    count: int = typer.Option(1000, "--count", "-n", help="Use at most this many data (the first of the split)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="ODE solver of the likelihood: adaptive (default; error controlled in nats, --atol), adams (default with --nfe), rk4, heun, midpoint, euler or dopri5."),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Model evaluations per solve of the fixed-step solvers (adams 48 if --solver adams); a cap for dopri5."),
    atol: Optional[float] = typer.Option(None, "--atol", help="adaptive: requested mean error per datum in nats (default 3e-4); dopri5: its absolute tolerance."),
    divergence: str = typer.Option("auto", "--divergence", help="exact, hutchinson, or auto (exact up to 32 dimensions)."),
    probes: int = typer.Option(8, "--probes", help="Hutchinson probes per datum."),
    batch_size: int = typer.Option(256, "--batch-size", help="Data per solve (memory)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the data split and the Hutchinson probes."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the result as JSON to this file."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64 (16-bit autocast is refused: it would swamp the log-determinant)."),
) -> None:
    """Negative log-likelihood of data under a trained model (probability-flow ODE, fd.log_likelihood),
    in nats per datum and bits per dimension, with a 95% confidence interval over the data."""
    import torch

    from .._utils import check_int
    from ..data import DataError, available_datasets, load_dataset
    from ..pipeline import likelihood_of_data, write_json

    ckpt = checkpoint_arg or checkpoint
    if ckpt is None:
        _fail("name the checkpoint: flowdiff likelihood CHECKPOINT (or -c CHECKPOINT)", 2)
    if checkpoint_arg is not None and checkpoint is not None and checkpoint_arg != checkpoint:
        _fail(f"two checkpoints given ({checkpoint_arg} and {checkpoint}); give one", 2)
    count = check_int("--count", count, 2)
    if dtype not in ("float32", "float64"):
        _fail(f"--dtype {dtype!r} is not allowed for likelihoods; valid: float32, float64", 2)
    _check_name("divergence", divergence, ["auto", "exact", "hutchinson"])
    _check_name("split", split, ["heldout", "train", "all", "test"])
    dev, weights, _ = _device_dtype(device, dtype)
    if output is not None:
        output = _output_file(output)
    # The likelihood of a class-conditional model without labels: the null-label network's density.
    field, cfg = _load_field_or_exit(ckpt, dev, weights, unlabeled="null")
    _set_threads(threads, field.model, dev)
    extra = cfg.get("extra") or {}
    source = data or extra.get("dataset")
    if not source:
        _fail("--data is required (the checkpoint does not name its dataset)", 2)
    file = Path(source)
    samples_file = file / "samples.pt" if file.is_dir() else file
    blob = None
    if samples_file.is_file() and samples_file.suffix in (".pt", ".pth"):
        try:
            blob = torch.load(samples_file, map_location="cpu", weights_only=True)
        except Exception:  # not a plain tensor file: the data loader says why
            blob = None
    if isinstance(blob, dict) and isinstance(blob.get("x"), torch.Tensor):  # a samples.pt of `flowdiff sample`
        x, what = blob["x"], f"{min(count, len(blob['x']))} rows of {samples_file}"
    elif file.exists():  # user data: every row
        x = load_dataset(source, split="all").x
        what = f"{min(count, len(x))} rows of {source}"
    else:
        _check_name("dataset", source, list(available_datasets()), allow_path=True)
        ds = load_dataset(source, split=split, seed=int(extra.get("seed", seed)))
        x, what = ds.x, f"{min(count, len(ds))} {split} data of {source!r}"
    x = x[:count]
    shape = tuple(cfg["model"]["data_shape"])
    if tuple(x.shape[1:]) != shape:
        _fail(f"the data have shape {tuple(x.shape[1:])} but the model was trained on {shape}", 2)
    if not torch.isfinite(x).all():
        raise DataError(f"{source}: the data contain NaN or Inf")
    t0 = time.perf_counter()
    with _progress(len(x), "likelihood", "datum") as bar:
        options = {} if atol is None else {"atol": atol}
        res = likelihood_of_data(field, x, solver=solver, nfe=nfe, divergence=divergence, probes=probes,
                                 batch_size=batch_size, seed=seed, progress=bar, **options)
    res.update(seconds=round(time.perf_counter() - t0, 3), checkpoint=cfg.get("checkpoint_dir"), data=str(source))
    lo, hi = res["nll_nats_ci"]
    blo, bhi = res["bits_per_dim_ci"]
    typer.echo(f"negative log-likelihood of {what} ({res['dims']} dims) under {cfg.get('checkpoint_dir')}:")
    typer.echo(f"  nats/datum : {res['nll_nats']:.4f}   (95% CI {lo:.4f} to {hi:.4f})")
    typer.echo(f"  bits/dim   : {res['bits_per_dim']:.4f}   (95% CI {blo:.4f} to {bhi:.4f}; continuous density, no dequantisation)")
    typer.echo(f"  {res['solver']}, {res['divergence']} divergence, {res['nfe']} model calls, {res['seconds']:.1f} s")
    if output is not None:
        typer.echo(f"result -> {write_json(res, output)}")


# ---------------------------------------------------------------------------------------------
# ems, tune-grid, solvers
# ---------------------------------------------------------------------------------------------


@app.command(name="ems")
@_command
def ems_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint folder or a training --output folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the statistics (default: <checkpoint>/ems.safetensors)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the data split and of the noise used for the estimate."),
    knots: Optional[int] = typer.Option(None, "--knots", min=2, help="Log-SNR knots the statistics are estimated at (default estimate_ems's 200; the cost is proportional)."),
    samples: Optional[int] = typer.Option(None, "--samples", min=2, help="Training points noised at every knot (default estimate_ems's 64, fresh at every knot; the cost is proportional)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Points per model call."),
    probes: int = typer.Option(1, "--probes", min=1, help="Hutchinson probes per point (for data of more than 32 dimensions)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64 (the statistics are accumulated in float64)."),
) -> None:
    """Estimate DPM-Solver-v3's empirical model statistics (Zheng et al. 2023) for a trained model.

    The cost, reported at the end, is about knots × samples / batch_size forward passes plus as
    many forward-mode JVPs (which cost 3–5 forward passes each on a CPU)."""
    from ..pipeline import ems_from_checkpoint

    if dtype not in ("float32", "float64"):
        _fail(f"--dtype {dtype!r} is not allowed for EMS; valid: float32, float64", 2)
    dev, weights, _ = _device_dtype(device, dtype)
    if output is not None:
        _output_file(output)
    _set_threads(threads, None, dev)
    sizes = {k: v for k, v in (("num_lambdas", knots), ("num_samples", samples)) if v is not None}
    if not _STATE["quiet"] and not sys.stderr.isatty():
        typer.echo(f"ems: estimating at {knots or 'the default'} knots × {samples or 'the default'} points ...", err=True)
    stats = ems_from_checkpoint(checkpoint, output, seed=seed, **sizes, batch_size=batch_size, probes=probes, device=dev, dtype=weights,
                                progress=not _STATE["quiet"] and sys.stderr.isatty())
    cost = stats.cost
    typer.echo(f"EMS -> {stats.settings.get('file')} ({stats}); {cost.get('seconds', float('nan')):.0f} s, "
               f"{cost.get('model_calls')} model calls ({cost.get('jvp_calls')} JVPs)")


@app.command(name="tune-grid")
@_command
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
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
) -> None:
    """Fit the step locations of a solver at a given NFE to a trained model (reuse with `sample --grid FILE`)."""
    from ..pipeline import tune_grid_from_checkpoint

    _check_name("solver", solver, _valid_solvers())
    if dtype not in ("float32", "float64"):
        _fail(f"--dtype {dtype!r} is not allowed for tune-grid; valid: float32, float64", 2)
    dev, weights, _ = _device_dtype(device, dtype)
    if output is not None:
        _output_file(output)
    _set_threads(threads, None, dev)
    tuned = tune_grid_from_checkpoint(checkpoint, solver, nfe, output, seed=seed, ems=ems, count=count,
                                      max_evals=max_evals, time_budget=time_budget, device=dev, dtype=weights,
                                      progress=not _STATE["quiet"])
    typer.echo(f"tuned grid for {solver} at {nfe} NFE: {[round(float(t), 5) for t in tuned.grid]} -> {tuned.settings.get('file')}")


@app.command()
@_command
def solvers() -> None:
    """List the solver names `flowdiff sample --solver` accepts."""
    for name in _valid_solvers():
        typer.echo(name)


# ---------------------------------------------------------------------------------------------
# finetune (RL toward a reward: fd.rl)
# ---------------------------------------------------------------------------------------------


def _fixed_label_model(network: Any, label: int) -> Any:
    """``network`` called with class ``label`` on every row, as an ``nn.Module`` whose state dict has the network's
    keys (its children and direct tensors are registered on the wrapper), so that the fine-tuned checkpoint
    loads like the pretrained one."""
    import torch

    class FixedLabel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "inner", network)
            for name, child in network.named_children():
                self.add_module(name, child)
            for name, param in network.named_parameters(recurse=False):
                self.register_parameter(name, param)
            for name, buf in network.named_buffers(recurse=False):
                self.register_buffer(name, buf)
            self.label = label

        def forward(self, x: Any, t: Any) -> Any:
            y = torch.full((x.shape[0],), self.label, dtype=torch.long, device=x.device)
            return self.inner(x, t, y=y)

    return FixedLabel()


@app.command()
@_command
def finetune(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="The pretrained run (a checkpoint folder or a training --output folder)."),
    reward: str = typer.Option(..., "--reward", help="Reward: 'gaussian:A=1,0;b=3;scale=1' (log-density of the region Ax≈b), 'classifier:label=3' (digits classifier log-probability), 'threshold:A=1,0;c=0.5' or 'threshold:c=0.5' (indicator/count of Ax > c)."),
    beta: float = typer.Option(0.04, "--beta", help="KL weight β > 0 (the temperature of the tilted target p·exp(r/β))."),
    method: str = typer.Option("g2rpo", "--method", help="g2rpo (default; the measured best, docs/rl.md), flow-grpo or dance-grpo."),
    output: Path = typer.Option(Path("runs/finetune"), "--output", "-o", help="Run folder of the fine-tuned model (checkpoints/, metrics.jsonl); sample it with `flowdiff sample -c`."),
    steps: int = typer.Option(200, "--steps", help="Optimizer updates (>= 1)."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (> 0)."),
    group_size: int = typer.Option(8, "--group-size", help="Rollouts per group (>= 2)."),
    groups: int = typer.Option(16, "--groups", help="Groups per rollout (>= 1)."),
    num_steps: int = typer.Option(10, "--num-steps", help="Sampling steps of a rollout."),
    updates_per_rollout: int = typer.Option(1, "--updates-per-rollout", help="Optimizer updates per rollout (PPO minibatches)."),
    kl: str = typer.Option("loss", "--kl", help="loss (closed-form Gaussian KL term, Flow-GRPO) or reward (path log-ratio in the reward)."),
    clip_range: float = typer.Option(0.2, "--clip-range", help="PPO clip ε (> 0)."),
    label: Optional[int] = typer.Option(None, "--class", help="Class a class-conditional model is fine-tuned for (required for such a model)."),
    ema_decay: float = typer.Option(0.99, "--ema-decay", help="EMA decay of the fine-tuned weights, in [0, 1)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Checkpoint every this many updates (exactly resumable)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the rollout noise and the minibatch order."),
    resume: bool = typer.Option(False, "--resume", help="Continue the fine-tuning run in --output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --output that holds a run."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
) -> None:
    """Fine-tune a trained model toward a reward with Flow-GRPO, DanceGRPO or G²RPO (fd.rl; docs/rl.md)."""
    from .. import rl
    from ..guidance import check_class_label, model_num_classes

    config = rl.GRPOConfig(method=method, beta=beta, group_size=group_size, groups=groups, num_steps=num_steps,
                           updates_per_rollout=updates_per_rollout, kl=kl, clip_range=clip_range, seed=seed)
    reward_fn = rl.reward_from_spec(reward)
    _check_run_folder(output, resume, overwrite)
    field, ckpt_config = _load_field_or_exit(checkpoint, device=device, unlabeled="null")
    network = field.model
    classes = model_num_classes(network)
    if classes is not None:
        if label is None:
            _fail(f"the checkpoint is class-conditional ({classes} classes): pass --class 0..{classes - 1}", 2)
        network = _fixed_label_model(network, check_class_label(label, classes))
    elif label is not None:
        check_class_label(label, None)
    model_spec = ckpt_config.get("model") or {}
    if "data_shape" not in model_spec:
        _fail(f"{ckpt_config['checkpoint_dir']}: config.json does not record the data shape of the model", 1)
    _set_threads(threads, network, device)
    extra = {**(ckpt_config.get("extra") or {}), "pretrained": str(ckpt_config["checkpoint_dir"]),
             "finetune_class": label}
    train = {"steps": steps, "lr": lr, "ema_decay": ema_decay, "checkpoint_every": checkpoint_every,
             "output_dir": str(output), "seed": seed, "device": device, "log_every": max(1, min(50, steps))}
    result = rl.finetune(network, field.path, field.prediction, reward_fn, config, train, resume=resume,
                         overwrite=overwrite, progress=not _STATE["quiet"], model_config=model_spec, extra_config=extra,
                         data_shape=tuple(model_spec["data_shape"]))
    first, last = result.history[0] if result.history else {}, result.history[-1] if result.history else {}
    typer.echo(f"fine-tuned {result.summary.step} updates ({method}, beta={beta}) in {result.summary.wall_time:.0f} s")
    if first:
        typer.echo(f"  reward (rollout mean): {first['reward']:.4g} -> {last['reward']:.4g}")
        typer.echo(f"  KL to the reference  : {first['kl']:.4g} -> {last['kl']:.4g}")
    typer.echo(f"  model   : {result.summary.checkpoint}")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@app.command()
@_command
def demo(
    data: str = typer.Option("checkerboard", "--data", help="2-D toy dataset to train on."),
    steps: int = typer.Option(11000, "--steps", min=1, help="Training steps (11000: about 65 CPU seconds on one core; measured in docs/training.md)."),
    output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Output folder: the run (checkpoints/, metrics.jsonl) and samples.pt, samples.png, metrics.json."),
    nfe: int = typer.Option(100, "--nfe", min=2, help="Model evaluations for sampling."),
    solver: Optional[str] = typer.Option("sde-dpm-solver++", "--solver", help="Solver for sampling: SDE-DPM-Solver++(2M) (Lu et al. 2022), whose fresh noise corrects the small network's errors (docs/training.md); any name of `flowdiff solvers`."),
    count: int = typer.Option(2000, "--count", min=10, help="Number of samples (the floor uses the same size)."),
    threads: Optional[int] = typer.Option(1, "--threads", help="CPU threads for torch (0: torch's default). The demo's network is so small that one thread is as fast as two and immune to a busy machine."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous demo in --output (its checkpoints and metrics)."),
) -> None:
    """The main job: train on a 2-D toy set, sample, write the PNG and the metrics, print where they are."""
    t0 = time.perf_counter()
    # Rectified flow with a small residual MLP: about a minute of training on one core. More steps
    # paid more than a wider net, a larger batch, EDM preconditioning or OT pairing; 64 random
    # Fourier features of the input (scale 3, Tancik et al. 2020) with lr 4e-3 sharpen the board's
    # edges (mass outside the black cells 11 % -> 6.5 % with the features alone; 20000-sample
    # sliced-W2 ratio 1.55 -> 1.23 on training seed 0) at the old demo's CPU cost
    # (benchmarks/demo_recipes.py, docs/training.md). Sampled with the stochastic SDE-DPM-Solver++(2M)
    # at 100 NFE: its fresh noise corrects errors of the learned field that an ODE carries to the
    # end (Karras et al. 2022, sec. 4); UniPC's ODE samples were 50 vs 100 NFE alike.
    opts = dict(data=data, path="linear", prediction="velocity", network="mlp", steps=steps, batch=256, lr=4e-3,
                output=output, seed=0, weighting="none", time_sampler="uniform", ema_decay=0.999,
                checkpoint_every=max(1, steps // 4), resume=False,
                network_kwargs={"hidden": 128, "depth": 3, "fourier_features": 64, "fourier_scale": 3.0})
    opts.update(overwrite=overwrite, threads=threads)
    ckpt = _train_impl(opts)
    tensors, png, _ = _sample_impl(ckpt, solver, nfe, count, output, seed=1, threads=threads)
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


# ---------------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------------


@app.command()
@_command
def restore(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint folder or a training --output folder (an image model); for --method mrs a `flowdiff restore-train` folder."),
    task: str = typer.Option("inpaint", "--task", help="inpaint (centre box), inpaint-random (half the pixels), superres (2x2 average), blur (3x3 Gaussian), mri (half the Fourier coefficients); --method mrs: denoise, deblur, inpaint (a random 4x4 square)."),
    method: str = typer.Option("pgdm", "--method", help="Posterior sampler: `python -c 'import flowdiff; print(flowdiff.inverse.available())'` lists them; or mrs (a mean-reverting model, MRS sampler, default 10 NFE, 1 sample)."),
    input: Optional[str] = typer.Option(None, "--input", help="Clean images to measure and restore: a .pt/.npy file of (N, C, H, W) or a dataset name (its held-out split). Default: the checkpoint's dataset."),
    output: Path = typer.Option(Path("runs/restore"), "--output", "-o", help="Folder for restore.pt, restore.png and metrics.json."),
    count: int = typer.Option(8, "--count", "-n", help="Number of images to restore."),
    samples: int = typer.Option(4, "--samples", help="Posterior samples per image."),
    nfe: int = typer.Option(200, "--nfe", help="Model evaluations per posterior sample."),
    sigma_y: float = typer.Option(0.05, "--sigma-y", help="Standard deviation of the measurement noise (>= 0; data in [-1, 1])."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the masks, the measurement noise and the samplers."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Restore measured images with a trained prior: writes restore.pt, a PNG grid (measurement, samples, truth), metrics.json."""
    import torch

    from .._utils import check_float, check_int
    from ..inverse import available
    from ..pipeline import RESTORE_TASKS, restore as restore_images, save_restore_png, write_json

    if method == "mrs":  # mean-reverting restoration model + MRS (flowdiff/cli/fewstep.py)
        from .fewstep import restore_mrs

        given = _explicit(ctx)
        return restore_mrs(checkpoint, task, input, output, count, samples if "samples" in given else 1,
                           nfe if "nfe" in given else 10, seed, threads)
    with _user_errors():
        count = check_int("--count", count, 1)
        samples = check_int("--samples", samples, 1)
        nfe = check_int("--nfe", nfe, 1)
        sigma_y = check_float("--sigma-y", sigma_y, 0.0)
    _check_name("task", task, list(RESTORE_TASKS))
    _check_name("method", method, available())
    # The prior of a class-conditional model without a class: its null-label (unconditional) network,
    # a proper density for every sampler (a per-row class would be moved between rows by resampling).
    field, cfg = _load_field_or_exit(checkpoint, "cpu", None, unlabeled="null")
    _set_threads(threads, field.model, "cpu")
    shape = tuple(cfg["model"]["data_shape"])
    if len(shape) != 3:
        _fail(f"restore needs an image model (data of shape (C, H, W)); this one models data of shape {shape}", 2)
    source = input or (cfg.get("extra") or {}).get("dataset")
    if not source:
        _fail("--input is required (the checkpoint does not name its dataset)", 2)
    truth = _restore_inputs(source, int((cfg.get("extra") or {}).get("seed", 0)), count, shape)
    existed = output.exists()
    _output_dir(output)
    with _remove_if_left_empty(output, existed):
        t0 = time.perf_counter()
        result = restore_images(field, truth, task, method=method, sigma_y=sigma_y, num_samples=samples, nfe=nfe, seed=seed)
        elapsed = time.perf_counter() - t0
        tensors = output / "restore.pt"
        blob = {k: result[k] for k in ("samples", "y", "truth", "pinv", "psnr_mean", "psnr_sample", "spread")}
        tmp = tensors.with_suffix(".pt.tmp")
        torch.save(blob, tmp)
        tmp.replace(tensors)
        png = save_restore_png(result, output / "restore.png")
        metrics = {"task": task, "method": method, "sigma_y": sigma_y, "count": len(truth), "samples": samples,
                   "nfe_per_sample": result["nfe"], "psnr_of_mean_db": float(result["psnr_mean"].mean()),
                   "psnr_of_sample_db": float(result["psnr_sample"].mean()), "spread": float(result["spread"].mean()),
                   "seconds": elapsed, "checkpoint": str(checkpoint)}
        write_json(metrics, output / "metrics.json")
    typer.echo(f"restored {len(truth)} images ({task}, {method}, {result['nfe']:.0f} evaluations per sample) in {elapsed:.0f} s")
    typer.echo(f"  PSNR of the posterior mean {metrics['psnr_of_mean_db']:.2f} dB, of one sample {metrics['psnr_of_sample_db']:.2f} dB, spread {metrics['spread']:.3f}")
    typer.echo(f"  samples : {tensors}")
    typer.echo(f"  picture : {png}")
    typer.echo(f"  metrics : {output / 'metrics.json'}")


# ---------------------------------------------------------------------------------------------
# forecast (time series and trajectory runs register their handlers)
# ---------------------------------------------------------------------------------------------


@app.command()
@_command
def forecast(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A forecasting run folder (`flowdiff train --task forecast` on a series, or --data nbody)."),
    context: Optional[Path] = typer.Option(None, "--context", help="The observed past: a .csv/.npy series (time series) or a .npy of shape (B, frames, particles, 3) (trajectories); default: the run's held-out data."),
    num_samples: int = typer.Option(100, "--num-samples", "-n", help="Sample paths per forecast (>= 1)."),
    output: Path = typer.Option(Path("runs/forecast"), "--output", "-o", help="Folder for the samples, quantiles and the PNG."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the sampling noise."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Forecast with a trained run: writes sample paths, quantiles and a PNG (fan chart or trajectory plot)."""
    handler = _claimed(FORECAST_HANDLERS, checkpoint)
    if handler is None:
        if not checkpoint.exists():
            _fail(f"checkpoint not found: {checkpoint}", 1)
        _fail(f"{checkpoint} is not a forecasting run (train one with `flowdiff train --data SERIES.csv --task forecast` "
              f"or `flowdiff train --data nbody`)", 2)
    handler(dict(ctx.params), _explicit(ctx))


# ---------------------------------------------------------------------------------------------
# global options and the entry point
# ---------------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        from ..train.logs import flowdiff_version

        import torch

        typer.echo(f"flowdiff {flowdiff_version()} (torch {torch.__version__}, python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def _global(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (results and errors still print). Also accepted after the command name."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (also FLOWDIFF_DEBUG=1). Also accepted after the command name."),
) -> None:
    """flowdiff: train generative models on paths and stochastic interpolants, sample them fast, evaluate them."""
    _STATE["quiet"] = _STATE["quiet"] or quiet
    _STATE["debug"] = _STATE["debug"] or debug


_GLOBAL_FLAGS = ("--quiet", "-q", "--debug")


def _is(error: BaseException, name: str) -> bool:
    """Whether ``error`` is a (click or typer-vendored click) exception of class ``name``."""
    return any(cls.__name__ == name for cls in type(error).__mro__)


def main(argv: Optional[list[str]] = None) -> None:
    """The ``flowdiff`` entry point: global flags anywhere, one-line errors, conventional exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:cut] if a in _GLOBAL_FLAGS]
    _STATE["quiet"] = any(a in ("--quiet", "-q") for a in flags)
    _STATE["debug"] = "--debug" in flags
    args = [a for a in args[:cut] if a not in _GLOBAL_FLAGS] + args[cut:]
    import warnings

    formatwarning = warnings.formatwarning
    if not _debug():
        # One line per warning ("warning: ..."), not the source line Python's default format adds.
        warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"  # type: ignore[assignment]
    try:
        code = _run(args)
    finally:  # main() may be called in-process (tests): leave no global state behind
        warnings.formatwarning = formatwarning
        _STATE.update(quiet=False, debug=False)
    sys.exit(code if isinstance(code, int) else 0)


def _run(args: list[str]) -> Any:
    """Run the command line ``args``; returns the exit status (errors printed in one line)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="flowdiff", standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    except Exception as error:
        if _is(error, "Exit"):
            code = getattr(error, "exit_code", 0)
        elif _is(error, "Abort"):  # Ctrl-C or EOF at a prompt
            typer.echo("interrupted", err=True)
            code = 130
        elif _is(error, "UsageError"):  # unknown option or command, a value that does not parse
            if _debug():
                traceback.print_exc()
            ctx = getattr(error, "ctx", None)
            where = ctx.command_path if ctx is not None else "flowdiff"
            typer.echo(f"error: {_first_line(Exception(error.format_message()))} (see '{where} --help')", err=True)
            code = 2
        elif _is(error, "ClickException"):
            typer.echo(f"error: {error.format_message()}", err=True)
            code = getattr(error, "exit_code", 1)
        else:  # a failure no command anticipated: still one line unless debugging
            if _debug():
                raise
            typer.echo(f"error: {type(error).__name__}: {_first_line(error)} (rerun with --debug or "
                       f"FLOWDIFF_DEBUG=1 for the traceback)", err=True)
            code = 1
    return code


# Commands of the other modalities register on ``app`` and in the handler lists above.
from . import certify, fewstep, graphs, pde, quant, timeseries, trajectories  # noqa: E402,F401
