"""``flowdiff pde fit|infer``: Random Grid Neural Processes on the built-in PDE problems (issue 21, docs/pde.md).

* ``flowdiff pde fit --problem poisson|burgers|cavity -o RUN [--family diag|lowrank|deterministic]
  [--grid random|fixed]`` trains an RGNP (``--grid fixed``: the fixed-grid PDDLVM baseline) on the physics only,
  calibrates its std, and writes ``RUN/model.pt``, ``RUN/metrics.json`` and ``RUN/forward.png`` (mean ± 2σ against the reference
  solver for a few draws).
* ``flowdiff pde infer -c RUN --sensors FILE.csv --noise S [--w W ...]`` reads sensor rows ``x[,y[,t]],value``
  (the cavity: ``x,y,t,u,v,p``; one case; a header line is allowed), samples the posterior of z and writes ``posterior.csv`` and
  ``posterior.png`` next to the run (or into ``-o``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from . import THREADS_HELP, _command, _fail, _output_dir, _progress, _set_threads, app

pde_app = typer.Typer(help="PDE solution fields: Random Grid Neural Processes (fit, infer).", no_args_is_help=True)
app.add_typer(pde_app, name="pde")

PROBLEMS = ("poisson", "burgers", "cavity")


@pde_app.command("fit")
@_command
def fit_cmd(
    problem: str = typer.Option("poisson", "--problem", help="Built-in problem: poisson, burgers or cavity."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder to write (model.pt, metrics.json, forward.png)."),
    family: str = typer.Option("diag", help="Variational family: diag, lowrank or deterministic (PINN-style)."),
    grid: str = typer.Option("random", help="Collocation grid: random (RGNP, fresh points per instance and step) or "
                             "fixed (the PDDLVM baseline: one evenly spaced grid for every instance and step)."),
    points: Optional[int] = typer.Option(None, help="Collocation points per instance (default: 32 random, 64 for the "
                                         "cavity; fixed: 30 in 1-D, 6 x 6 in 2-D, 4^3 in 3-D)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (default: the model's, 6000)."),
    calibration: int = typer.Option(64, help="Instances solved to calibrate the std (0: none; at most 16 for "
                                    "burgers and cavity, whose reference solver runs here)."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, help="Replace a run already in the folder."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Train an RGNP on a built-in problem (physics only) and plot mean ± 2σ against the reference solver."""
    import torch

    from .. import pde

    if problem not in PROBLEMS:
        _fail(f"unknown problem {problem!r}; valid: {', '.join(PROBLEMS)}", 2)
    if family not in ("diag", "lowrank", "deterministic"):
        _fail(f"unknown family {family!r}; valid: diag, lowrank, deterministic", 2)
    if grid not in ("random", "fixed"):
        _fail(f"unknown grid {grid!r}; valid: random, fixed", 2)
    if steps is not None and steps < 1:
        _fail(f"--steps must be >= 1, got {steps}", 2)
    if points is not None and points < 2:
        _fail(f"--points must be >= 2, got {points}", 2)
    out = _output_dir(output)
    if (out / "model.pt").exists() and not overwrite:
        _fail(f"{out} already holds a run (model.pt); pass --overwrite or another --output", 2)
    _set_threads(threads)
    prob = pde.get(problem)
    options = {} if problem == "poisson" else {"calibration": min(calibration, 16)}
    kwargs = dict(family=family, calibration=options.get("calibration", calibration), steps=steps or 6000)
    if problem == "cavity":  # ~0.3 CPU s per step at batch 16 with 64 points (docs/pde.md)
        kwargs.update(batch=16)
    if grid == "fixed":
        model = pde.PDDLVM(prob, points=points or {1: 30, 2: 36}.get(prob.dim, 64), **kwargs)
    else:
        model = pde.RGNP(prob, points=points or (64 if problem == "cavity" else 32), **kwargs)
    total = model.config["steps"]
    with _progress(total, "pde fit", "step") as bar:
        model.fit(seed=seed, progress=lambda i, n, info: bar.update(1, residual=f"{info['residual_ms']:.2e}"))
    model.save(out / "model.pt")
    metrics = _forward_check(prob, model, out / "forward.png", seed)
    metrics.update(problem=problem, family=family, grid=grid, points=model.config["points"], steps=total, seed=seed,
                   train_cpu_seconds=model.history.get("train_cpu_seconds"),
                   calibration=model.history.get("calibration"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    typer.echo(f"wrote {out / 'model.pt'}: forward rel-L2 median {metrics['rel_l2_median']:.4f}, "
               f"95% coverage {metrics['coverage_95']:.3f} on {metrics['cases']} draws")


def _forward_check(prob, model, png: Path, seed: int, cases: int = 8) -> dict:
    """Relative L2 and coverage against the reference solver for ``cases`` draws, and the plot of 3 of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    z, w = prob.sample_params(cases, gen)
    if prob.dim == 1:
        lo, hi = prob.domain[0]
        x = torch.linspace(lo, hi, 201)[1:-1].reshape(1, -1, 1).expand(cases, -1, 1).contiguous()
    else:
        x = prob.uniform_points(cases, 400, gen, margin=0.02)
    truth = prob.reference(z, w, x).float()
    mean, std = model.predict(z, w, x)
    if truth.ndim == 3:
        truth, mean, std = truth[..., 0], mean[..., 0], std[..., 0]
    rel = ((mean - truth).norm(dim=1) / truth.norm(dim=1).clamp_min(1e-12))
    cover = float(((mean - truth).abs() <= 1.96 * std).float().mean())
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for i, ax in enumerate(axes):
        if prob.dim == 1:
            xs = x[i, :, 0]
            ax.plot(xs, truth[i], "k-", lw=1, label="reference")
            ax.plot(xs, mean[i], "C0--", lw=1, label="RGNP mean")
            ax.fill_between(xs, mean[i] - 2 * std[i], mean[i] + 2 * std[i], color="C0", alpha=0.3, label="±2σ")
            ax.set_xlabel("x")
        else:
            order = torch.argsort(truth[i])
            ax.plot(truth[i][order], "k-", lw=1, label="reference (sorted)")
            ax.plot(mean[i][order], "C0.", ms=2, label="RGNP mean")
            ax.fill_between(range(len(order)), (mean[i] - 2 * std[i])[order], (mean[i] + 2 * std[i])[order],
                            color="C0", alpha=0.3, label="±2σ")
            ax.set_xlabel("point (sorted by the reference)")
        ax.set_title(f"draw {i}: rel-L2 {float(rel[i]):.3g}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"cases": cases, "rel_l2_median": float(rel.median()), "rel_l2_mean": float(rel.mean()),
            "coverage_95": cover}


@pde_app.command("infer")
@_command
def infer_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder written by 'flowdiff pde fit'."),
    sensors: Path = typer.Option(..., "--sensors", help="CSV of sensor rows: coordinates then the reading (one per "
                                 "field: x,y,t,u,v,p for the cavity)."),
    noise: float = typer.Option(..., "--noise", help="Sensor noise standard deviation (> 0)."),
    w: List[float] = typer.Option([], "--w", help="Known inputs w (repeat for each; default: their prior mean)."),
    samples: int = typer.Option(256, help="Posterior samples."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for posterior.csv/png (default: the run)."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Posterior samples of z from noisy sensors with a fitted RGNP."""
    import numpy as np
    import torch

    from .. import pde

    model_file = checkpoint / "model.pt" if checkpoint.is_dir() else checkpoint
    if not model_file.is_file():
        _fail(f"no model at {model_file}; run 'flowdiff pde fit -o RUN' first", 1)
    if not (math.isfinite(noise) and noise > 0):
        _fail(f"--noise must be a finite number > 0, got {noise}", 2)
    if samples < 1:
        _fail(f"--samples must be >= 1, got {samples}", 2)
    _set_threads(threads)
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=False)
        prob = pde.get(state["problem"])
    except Exception as error:  # a corrupt or foreign file
        _fail(f"cannot read the model {model_file}: {str(error).splitlines()[0] if str(error) else type(error).__name__}", 1)
    model = pde.RGNP.load(model_file, prob)
    try:
        rows = np.genfromtxt(sensors, delimiter=",", comments="#")
    except OSError as error:
        _fail(f"cannot read --sensors {sensors}: {error}", 1)
    if rows.ndim == 1:
        rows = rows[None]
    rows = rows[~np.isnan(rows).all(1)]  # a header line reads as NaN
    fields = model.fields
    if rows.ndim != 2 or rows.shape[1] != prob.dim + fields or len(rows) == 0:
        readings = "one reading" if fields == 1 else f"{fields} readings (one per field)"
        _fail(f"--sensors must hold rows of {prob.dim} coordinate(s) and {readings}, got shape {rows.shape}", 1)
    if not np.isfinite(rows).all():
        _fail("--sensors holds non-finite values", 1)
    if w:
        if len(w) != prob.dw:
            _fail(f"--w must be given {prob.dw} time(s) for {prob.name}, got {len(w)}", 2)
        w_t = torch.tensor([w], dtype=torch.float32)
    else:
        w_t = model.cond_mean[prob.dz:].reshape(1, -1).float()
    x = torch.tensor(rows[None, :, :prob.dim], dtype=torch.float32)
    y = torch.tensor(rows[None, :, prob.dim:], dtype=torch.float32)
    y = y[..., 0] if fields == 1 else y
    out = _output_dir(output or (checkpoint if checkpoint.is_dir() else checkpoint.parent))
    with _progress(None, "pde infer", "case") as bar:
        zs = model.posterior(x, y, w_t, noise=noise, n=samples, generator=torch.Generator().manual_seed(seed))
        bar.update(1)
    zs = zs[:, 0].numpy()
    header = ",".join(f"z{i}" for i in range(zs.shape[1]))
    np.savetxt(out / "posterior.csv", zs, delimiter=",", header=header, comments="")
    _plot_posterior(zs, out / "posterior.png")
    mean, std = zs.mean(0), zs.std(0)
    typer.echo(f"wrote {out / 'posterior.csv'} ({samples} samples); mean {np.round(mean, 3).tolist()}, "
               f"std {np.round(std, 3).tolist()}")


def _plot_posterior(zs, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = zs.shape[1]
    fig, axes = plt.subplots(1, d, figsize=(2.4 * d, 2.4), squeeze=False)
    for i in range(d):
        axes[0, i].hist(zs[:, i], bins=30, color="C0", alpha=0.8)
        axes[0, i].set_title(f"z{i}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
