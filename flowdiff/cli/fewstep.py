"""Few-step and restoration commands of issue 18 (docs/flowmaps.md, docs/mean_reverting.md):

* ``flowdiff distill -c RUN -o OUT``: distil a trained run into a flow map (two-time, default) or a
  consistency model (``--method cd|ct``); writes ``OUT/flowmap.pt`` (:func:`flowdiff.flowmaps.save_flow_map`);
* ``flowdiff sample -c OUT --nfe 1|2|4``: samples such a folder with that many network calls (a
  ``SAMPLE_HANDLERS`` entry: :func:`flowdiff.flowmaps.sample`);
* ``flowdiff restore-train --data digits -o OUT``: trains a mean-reverting (IR-SDE) restoration model
  (:func:`flowdiff.mean_reverting.train_restoration`);
* ``flowdiff restore --method mrs -c OUT --task denoise|deblur|inpaint``: restores degraded images with MRS
  (:func:`flowdiff.mean_reverting.mrs_sample`; called by ``restore`` for ``--method mrs``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from . import (
    SAMPLE_HANDLERS, THREADS_HELP, _command, _fail, _load_field_or_exit, _output_dir, _remove_if_left_empty,
    _restore_inputs, _set_threads, _user_errors, app,
)

#: ``flowdiff distill --method`` values.
DISTILL_METHODS = ("flow-map", "cd", "ct")


def _training_data(cfg: dict, data: Optional[str]) -> tuple[Any, Any, str]:
    from ..data import load_dataset

    extra = cfg.get("extra") or {}
    source = data or extra.get("dataset")
    if not source:
        _fail("--data is required (the checkpoint does not name its dataset)", 2)
    with _user_errors():
        ds = load_dataset(source, split="train", seed=int(extra.get("seed", 0)))
    return ds.x.float(), ds.y, str(source)


@app.command(name="distill")
@_command
def distill_command(
    checkpoint_arg: Optional[Path] = typer.Argument(None, metavar="CHECKPOINT", help="The teacher: a checkpoint folder or a training --output folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="The same as the CHECKPOINT argument."),
    output: Path = typer.Option(Path("runs/distilled"), "--output", "-o", help="Folder for flowmap.pt, flowmap.json and samples.png."),
    method: str = typer.Option("flow-map", "--method", help="flow-map (two-time X_{s->t}, sampled deterministically), cd (consistency distillation) or ct (consistency training, no teacher)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="flow-map only: direct (default: each jump regressed on the teacher's solve) or self-consistency (halves composed)."),
    student: Optional[Path] = typer.Option(None, "--student", help="Start the student from another run's network (same data shape and path) instead of a copy of the teacher."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data (default: the teacher's dataset, its training split)."),
    steps: int = typer.Option(500, "--steps", help="Training updates."),
    batch_size: int = typer.Option(64, "--batch-size", help="Batch size."),
    lr: float = typer.Option(2e-4, "--lr", help="Adam learning rate (cosine decay)."),
    bins: int = typer.Option(16, "--bins", help="Intervals of the training grid (a power of two: 1-, 2-, 4-step sampling land on its nodes)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="The teacher's ODE solver for the distillation targets (`flowdiff solvers`; default unipc for --objective direct, heun otherwise)."),
    substeps: Optional[int] = typer.Option(None, "--substeps", help="Teacher solver steps per grid interval (default: direct chooses them by a convergence check of the teacher's solve; 1 otherwise)."),
    count: int = typer.Option(64, "--count", "-n", help="Preview samples written to OUT/samples.png (2 network calls; 0: none)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the training draws and the preview."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Distil a trained run into a 1-4-step flow map or consistency model (sample it with `flowdiff sample -c OUT --nfe 2`)."""
    import torch

    from .. import flowmaps
    from .._utils import check_float, check_int
    from ..solvers import available

    ckpt = checkpoint_arg or checkpoint
    if ckpt is None:
        _fail("name the teacher: flowdiff distill CHECKPOINT (or -c CHECKPOINT)", 2)
    if method not in DISTILL_METHODS:
        _fail(f"unknown --method {method!r}; valid: {', '.join(DISTILL_METHODS)}", 2)
    if objective is not None and objective not in flowmaps.OBJECTIVES:
        _fail(f"unknown --objective {objective!r}; valid: {', '.join(flowmaps.OBJECTIVES)}", 2)
    if objective is not None and method != "flow-map":
        _fail(f"--objective {objective} is for --method flow-map, not {method}", 2)
    if objective is None and method == "flow-map":
        objective = "direct"
    direct = method == "flow-map" and objective == "direct"
    if solver is None and not direct:
        solver = "heun"
    if solver is not None and solver not in available():
        _fail(f"unknown solver {solver!r}; valid: {', '.join(available())}", 2)
    steps = check_int("--steps", steps, 1)
    batch_size = check_int("--batch-size", batch_size, 2)
    lr = check_float("--lr", lr, 0.0, low_open=True)
    bins = check_int("--bins", bins, 1)
    if substeps is None and not direct:
        substeps = 1
    substeps = None if substeps is None else check_int("--substeps", substeps, 1)
    count = check_int("--count", count, 0)
    teacher, cfg = _load_field_or_exit(ckpt, "cpu", None, unlabeled="null")
    _set_threads(threads, teacher.model, "cpu")
    shape = tuple(cfg["model"]["data_shape"])
    two_time = method == "flow-map"
    if student is not None:
        init, init_cfg = _load_field_or_exit(student, "cpu", None, unlabeled="null")
        if type(init.path) is not type(teacher.path) or repr(init.path) != repr(teacher.path):
            _fail(f"--student {student}: its path {init.path!r} differs from the teacher's {teacher.path!r}", 2)
        model = flowmaps.student_from_teacher(init, two_time=two_time)
    else:
        model = flowmaps.student_from_teacher(teacher, two_time=two_time)
    x, y, source = _training_data(cfg, data)
    if tuple(x.shape[1:]) != shape:
        _fail(f"the data {source!r} has samples of shape {tuple(x.shape[1:])} but the teacher models {shape}", 2)
    from ..guidance import model_num_classes

    num_classes = model_num_classes(teacher.model)
    labels = y if num_classes is not None and y is not None else None
    existed = output.exists()
    _output_dir(output)
    common = dict(labels=labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with _remove_if_left_empty(output, existed):
        t0 = time.perf_counter()
        if method == "flow-map":
            fit = flowmaps.flow_map_distillation(teacher, model, x, bins=bins, solver=solver, substeps=substeps,
                                                 objective=objective, **common)
        elif method == "cd":
            fit = flowmaps.consistency_distillation(teacher, model, x, bins=bins, solver=solver, substeps=substeps,
                                                    **common)
        else:
            fit = flowmaps.consistency_training(model, x, **common)
        elapsed = time.perf_counter() - t0
        info = {"method": method, "objective": objective if two_time else None, "data": source,
                "data_shape": list(shape), "num_classes": num_classes, "steps": steps, "batch_size": batch_size,
                "lr": lr, "bins": bins, "solver": fit.options.get("solver", solver) if method != "ct" else None,
                "substeps": fit.options.get("substeps", substeps),
                "student_init": str(student) if student is not None else "teacher", "seed": seed,
                "train_cpu_s": fit.cpu_seconds, "train_wall_s": elapsed, "teacher_nfe": fit.teacher_nfe,
                "final_loss": sum(fit.losses[-20:]) / max(1, len(fit.losses[-20:]))}
        teacher_dir = cfg.get("checkpoint_dir", ckpt)
        file = flowmaps.save_flow_map(model, output, teacher_dir, **info)
        if count:
            xs = _flow_map_samples(model, shape, num_classes, count, 2, seed, None)
            from ..pipeline import save_samples_png

            save_samples_png(xs, output / "samples.png", title=f"{method}, 2 network calls")
    typer.echo(f"distilled {ckpt} -> {file} ({method}, {steps} updates, {fit.teacher_nfe} teacher calls, "
               f"{fit.cpu_seconds:.0f} CPU s)")
    typer.echo(f"  sample it: flowdiff sample -c {output} --nfe 2   (1, 2, 4, ... network calls)")


def _flow_map_samples(model: Any, shape: tuple, num_classes: Optional[int], count: int, steps: int, seed: int,
                      label: Optional[int]) -> Any:
    import torch

    from .. import flowmaps

    g = torch.Generator().manual_seed(int(seed))
    noise = model.path.prior_sample((count, *shape), generator=g, dtype=torch.float32)
    cond = None
    if num_classes is not None:
        if label is not None:
            if not 0 <= label < num_classes:
                _fail(f"--class must be in [0, {num_classes}), got {label}", 2)
            cond = {"y": torch.full((count,), int(label), dtype=torch.long)}
        else:
            from ..guidance import stratified_labels

            cond = {"y": stratified_labels(count, num_classes, generator=g)}
    elif label is not None:
        _fail("--class needs a class-conditional model; this one is unconditional", 2)
    return flowmaps.sample(model, noise, steps=steps, cond=cond).x


def _claims_flow_map(checkpoint: Path) -> bool:
    from ..flowmaps import is_flow_map_folder

    return is_flow_map_folder(checkpoint)


def _sample_flow_map(options: dict, explicit: set) -> None:
    import torch

    from .._utils import check_int
    from ..flowmaps import load_flow_map
    from ..pipeline import save_samples_png

    for name in ("solver", "ems", "grid", "guidance_scale", "rtol", "atol"):
        if name in explicit:
            _fail(f"--{name.replace('_', '-')} does not apply to a distilled flow map (it takes --nfe network calls)", 2)
    if options.get("solver_option"):
        _fail("--solver-option does not apply to a distilled flow map", 2)
    steps = check_int("--nfe", options.get("nfe") or 2, 1)
    count = check_int("--count", options["count"], 1)
    output = Path(options["output"])
    with _user_errors():
        model, meta = load_flow_map(options["checkpoint"])
    _set_threads(options.get("threads"), model, "cpu")
    existed = output.exists()
    _output_dir(output)
    with _remove_if_left_empty(output, existed):
        t0 = time.perf_counter()
        x = _flow_map_samples(model, tuple(meta["data_shape"]), meta.get("num_classes"), count, steps,
                              options["seed"], options.get("label"))
        elapsed = time.perf_counter() - t0
        tensors = output / "samples.pt"
        tmp = tensors.with_suffix(".pt.tmp")
        kind = "flow-map" if model.two_time else "consistency"
        torch.save({"x": x, "solver": kind, "nfe": steps, "checkpoint": meta["teacher"], "flow_map": str(options["checkpoint"]),
                    "label": options.get("label"), "seed": options["seed"]}, tmp)
        tmp.replace(tensors)
        png = save_samples_png(x, output / "samples.png", title=f"{kind}, {steps} network calls")
    typer.echo(f"{count} samples of the distilled {kind} model with {steps} network calls in {elapsed:.1f} s -> {tensors}, {png}")


SAMPLE_HANDLERS.append((_claims_flow_map, _sample_flow_map))


# ---------------------------------------------------------------------------------------------
# mean-reverting restoration (MRS)
# ---------------------------------------------------------------------------------------------


@app.command(name="restore-train")
@_command
def restore_train_command(
    data: str = typer.Option("digits", "--data", help="Clean training images: a dataset name or a .pt/.npy/image folder of (N, C, H, W) in [-1, 1]."),
    output: Path = typer.Option(Path("runs/restoration"), "--output", "-o", help="Folder for mean_reverting.pt/.json."),
    tasks: str = typer.Option("denoise,deblur,inpaint", "--tasks", help="Comma-separated degradations the model learns (denoise, deblur, inpaint)."),
    steps: int = typer.Option(2000, "--steps", help="Training updates."),
    batch_size: int = typer.Option(128, "--batch-size", help="Batch size."),
    lr: float = typer.Option(2e-3, "--lr", help="Adam learning rate (warm-up, cosine decay)."),
    stationary_std: float = typer.Option(0.5, "--stationary-std", help="λ, the IR-SDE's stationary standard deviation."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the split, the initialisation and the draws."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Train a mean-reverting (IR-SDE) restoration model for `flowdiff restore --method mrs`."""
    from ..data import load_dataset
    from ..mean_reverting import DEGRADATIONS, save_restoration_model, train_restoration

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    bad = [t for t in names if t not in DEGRADATIONS]
    if not names or bad:
        _fail(f"unknown --tasks {', '.join(bad) or tasks!r}; valid: {', '.join(DEGRADATIONS)}", 2)
    images = load_dataset(data, split="train", seed=seed).x.float()
    if images.ndim != 4:
        _fail(f"restore-train needs images (N, C, H, W); {data!r} has samples of shape {tuple(images.shape[1:])}", 2)
    _set_threads(threads, None, "cpu")
    existed = output.exists()
    _output_dir(output)
    with _remove_if_left_empty(output, existed), _progress_bar(steps) as bar:
        model, meta = train_restoration(images, tasks=names, steps=steps, batch_size=batch_size, lr=lr,
                                        stationary_std=stationary_std, seed=seed,
                                        callback=lambda k, loss: bar.update(1))
        meta.update({"data": data})
        file = save_restoration_model(model, output, meta)
    typer.echo(f"trained a restoration model ({', '.join(names)}; {steps} steps, final loss {meta['final_loss']:.4f}, "
               f"{meta['cpu_s']:.0f} CPU s) -> {file}")
    typer.echo(f"  restore with: flowdiff restore --method mrs -c {output} --task {names[0]}")


def _progress_bar(total: int) -> Any:
    from . import _progress

    return _progress(total, "train", "step")


def restore_mrs(checkpoint: Path, task: str, input: Optional[str], output: Path, count: int, samples: int, nfe: int,
                seed: int, threads: Optional[int]) -> None:
    """``flowdiff restore --method mrs``: degrade ``count`` clean images with ``task``, restore each with
    ``samples`` MRS draws of ``nfe`` evaluations (the default MRS: UniPC through the shift on ``mrs_grid``)."""
    import torch

    from .._utils import check_int
    from ..mean_reverting import DEGRADATIONS, degrade, is_restoration_folder, load_restoration_model, mrs_sample
    from ..pipeline import save_samples_png, write_json

    count = check_int("--count", count, 1)
    samples = check_int("--samples", samples, 1)
    nfe = check_int("--nfe", nfe, 1)
    if task not in DEGRADATIONS:
        _fail(f"unknown task {task!r} for --method mrs; valid: {', '.join(DEGRADATIONS)}", 2)
    if not is_restoration_folder(checkpoint):
        _fail(f"--method mrs needs a mean-reverting restoration model; {checkpoint} has no mean_reverting.pt "
              f"(train one with `flowdiff restore-train -o FOLDER`)", 2)
    with _user_errors():
        model, path, meta = load_restoration_model(checkpoint)
    if task not in meta.get("tasks", DEGRADATIONS):
        typer.echo(f"warning: the model was trained on {', '.join(meta['tasks'])}, not {task}", err=True)
    _set_threads(threads, model, "cpu")
    shape = tuple(meta["data_shape"])
    source = input or meta.get("data")
    if not source:
        _fail("--input is required (the model does not name its dataset)", 2)
    truth = _restore_inputs(source, int(meta.get("seed", 0)), count, shape)
    existed = output.exists()
    _output_dir(output)
    with _remove_if_left_empty(output, existed):
        g = torch.Generator().manual_seed(int(seed))
        with _user_errors():
            mu = degrade(truth, task, g)  # inpaint: one random square per image
        t0 = time.perf_counter()
        draws = []
        with torch.no_grad():
            for _ in range(samples):
                res = mrs_sample(model, mu, path, meta.get("prediction", "noise"), nfe=nfe, generator=g)
                draws.append(res.x.clamp(-1, 1))
        elapsed = time.perf_counter() - t0
        xs = torch.stack(draws, 1)  # (count, samples, C, H, W)

        def psnr(x: torch.Tensor) -> torch.Tensor:
            mse = (x - truth).pow(2).reshape(len(truth), -1).mean(1)
            return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))

        psnr_sample = torch.stack([psnr(xs[:, k]) for k in range(samples)], 1)
        tensors = output / "restore.pt"
        tmp = tensors.with_suffix(".pt.tmp")
        torch.save({"samples": xs, "mu": mu, "truth": truth, "psnr_sample": psnr_sample, "psnr_mu": psnr(mu.clamp(-1, 1)),
                    "nfe": nfe, "task": task, "method": "mrs"}, tmp)
        tmp.replace(tensors)
        rows = [mu.clamp(-1, 1)] + [xs[:, k] for k in range(samples)] + [truth]
        grid = torch.stack(rows, 0).transpose(0, 1).reshape(-1, *shape)  # per image: degraded, samples, truth
        png = save_samples_png(grid, output / "restore.png", title=f"MRS {task}, {nfe} NFE: degraded | restored | truth")
        metrics = {"task": task, "method": "mrs", "solver": "default MRS (unipc on mrs_grid)", "count": len(truth),
                   "samples": samples, "nfe_per_sample": nfe, "psnr_of_sample_db": float(psnr_sample.mean()),
                   "psnr_of_degraded_db": float(psnr(mu.clamp(-1, 1)).mean()),
                   "psnr_of_mean_db": float(psnr(xs.mean(1)).mean()), "seconds": elapsed, "checkpoint": str(checkpoint)}
        write_json(metrics, output / "metrics.json")
    typer.echo(f"restored {len(truth)} images ({task}, mrs, {nfe} evaluations per sample) in {elapsed:.1f} s")
    typer.echo(f"  PSNR of one sample {metrics['psnr_of_sample_db']:.2f} dB (degraded input {metrics['psnr_of_degraded_db']:.2f} dB)")
    typer.echo(f"  samples : {tensors}")
    typer.echo(f"  picture : {png}")
    typer.echo(f"  metrics : {output / 'metrics.json'}")

