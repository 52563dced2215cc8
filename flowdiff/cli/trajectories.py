"""`flowdiff` commands for trajectories (registered on flowdiff.cli.app and its handler lists).

* ``flowdiff train --data nbody -o RUN [--context 10] [--horizon 20] [--steps N]``: simulate charged-particle
  systems (``--data nbody`` or ``nbody-charged``; ``nbody-springs`` for springs) or read a ``.npy`` of shape
  ``(N, frames, particles, 3)`` with ``--task trajectories``, fit :class:`flowdiff.trajectories.GeoTDM`, write
  ``RUN/geotdm.pt`` (atomically), ``RUN/trajectories.json`` (the marker this module claims runs by) and
  ``RUN/heldout.npy`` (held-out trajectories: the default context of ``forecast`` and its check).
* ``flowdiff forecast -c RUN [--context ctx.npy] -n 5 -o OUT``: ``OUT/samples.npy`` ``(B, n, horizon,
  particles, 3)``, ``OUT/context.npy``, ``OUT/trajectories.png`` and, for the held-out data,
  ``OUT/metrics.json`` (minADE/minFDE against constant velocity).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import FORECAST_HANDLERS, TRAIN_HANDLERS, _fail, _output_dir, _set_threads

MARKER = "trajectories.json"
_SIMULATED = {"nbody": "charged", "nbody-charged": "charged", "nbody-springs": "springs"}
#: ``train`` options that mean nothing for a GeoTDM run: refused when the user sets them.
_UNUSED = {"path": "linear", "prediction": "velocity", "network": "auto", "weighting": "none",
           "time_sampler": "uniform", "precondition": False, "sigma_data": None, "label_dropout": 0.0,
           "coupling": None, "ema_sigma_rel": None, "resume": False, "dtype": "float32"}


def _claims_train(data: str, task: str | None) -> bool:
    return data in _SIMULATED or (task == "trajectories")


def _load_npy(file: Path, what: str):
    import numpy as np

    if not file.is_file():
        _fail(f"{what} file not found: {file}", 1)
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        _fail(f"cannot read {what} {file}: {error}", 1)


def _train(options: dict, explicit: set) -> None:
    import numpy as np

    from ..trajectories import GeoTDM, ade_fde, constant_velocity, simulate_charged, simulate_springs

    bad = sorted(name for name, default in _UNUSED.items() if options.get(name, default) != default)
    if bad:
        _fail(f"--{bad[0].replace('_', '-')} does not apply to trajectory training (--data {options['data']})", 2)
    if options.get("task") not in (None, "trajectories", "forecast"):
        _fail(f"--task {options['task']!r} does not apply to trajectories; valid: trajectories, forecast", 2)
    context = 10 if options.get("context") is None else options["context"]
    horizon = 20 if options.get("horizon") is None else options["horizon"]
    if not isinstance(context, int) or context < 0:
        _fail(f"--context must be an integer >= 0 (0: unconditional generation), got {context!r}", 2)
    if not isinstance(horizon, int) or horizon < 1:
        _fail(f"--horizon must be an integer >= 1, got {horizon!r}", 2)
    out = Path(options["output"])
    if (out / MARKER).exists() and not options.get("overwrite"):
        _fail(f"{out} already holds a trajectory run; choose a new --output or pass --overwrite", 2)
    _output_dir(out)
    seed = int(options.get("seed") or 0)
    data = str(options["data"])
    if data in _SIMULATED:
        simulate = simulate_charged if _SIMULATED[data] == "charged" else simulate_springs
        train = simulate(3000, context + horizon, seed=seed)
        heldout = simulate(200, context + horizon, seed=seed + 10_000)
        source = f"simulated {_SIMULATED[data]} particles (3000 train, 200 held out, seed {seed})"
    else:
        arr = _load_npy(Path(data), "trajectory data")
        if arr.ndim != 4 or arr.shape[-1] != 3:
            _fail(f"{data} must hold an array (N, frames, particles, 3), got shape {arr.shape}", 1)
        if arr.shape[1] < context + horizon:
            _fail(f"{data} has {arr.shape[1]} frames, fewer than --context {context} + --horizon {horizon}", 1)
        if not np.isfinite(arr).all():
            _fail(f"{data} holds NaN or Inf values", 1)
        n_held = max(1, min(200, arr.shape[0] // 10)) if arr.shape[0] > 1 else 0
        order = np.random.default_rng(seed).permutation(arr.shape[0])
        heldout, train = arr[order[:n_held]], arr[order[n_held:]] if n_held else arr
        source = f"{data} ({len(train)} train, {n_held} held out)"
    kwargs = {"seed": seed, "device": options.get("device") or "cpu"}
    if "steps" in explicit:
        kwargs["steps"] = options["steps"]
    if "batch" in explicit:
        kwargs["batch_size"] = options["batch"]
    if "lr" in explicit:
        kwargs["lr"] = options["lr"]
    if "ema_decay" in explicit:
        kwargs["ema_decay"] = options["ema_decay"]
    extra = options.get("network_kwargs") or {}
    _set_threads(options.get("threads"))
    start = time.perf_counter()
    try:
        model = GeoTDM(**kwargs, **extra).fit(train, context_frames=context, future_frames=horizon)
    except ValueError as error:
        _fail(str(error).splitlines()[0], 1)
    model.save(out / "geotdm.pt")
    np.save(out / "heldout.npy", np.asarray(heldout)[:, :context + horizon])
    info = {"kind": "geotdm", "context": context, "horizon": horizon, "particles": model.particles,
            "data": source, "steps": model.steps_done, "seconds": round(time.perf_counter() - start, 1)}
    if context >= 2 and len(heldout):
        held = np.asarray(heldout, dtype=np.float64)[:, :context + horizon]
        samples = model.forecast(held[:, :context], 5)
        info["heldout_geotdm_k5"] = ade_fde(samples, held[:, context:])
        info["heldout_constant_velocity"] = ade_fde(constant_velocity(held[:, :context], horizon), held[:, context:])
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(out / MARKER)
    line = f"trained GeoTDM ({model.steps_done} steps, {info['seconds']} s) on {source}; checkpoint: {out / 'geotdm.pt'}"
    if "heldout_geotdm_k5" in info:
        g, c = info["heldout_geotdm_k5"], info["heldout_constant_velocity"]
        line += (f"\nheld out: minADE/minFDE (K=5) {g['min_ade']:.3f}/{g['min_fde']:.3f}; "
                 f"constant velocity {c['min_ade']:.3f}/{c['min_fde']:.3f}")
    print(line)


def _claims_forecast(checkpoint: Path) -> bool:
    return (Path(checkpoint) / MARKER).is_file()


def _plot(context, samples, truth, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(3, context.shape[0])
    fig, axes = plt.subplots(1, shown, figsize=(4.5 * shown, 4.5), squeeze=False)
    colours = plt.cm.tab10.colors
    for b in range(shown):
        ax = axes[0, b]
        for i in range(context.shape[2]):
            c = colours[i % 10]
            ax.plot(context[b, :, i, 0], context[b, :, i, 1], "-", color=c, lw=2)
            for k in range(samples.shape[1]):
                path = samples[b, k, :, i]
                ax.plot(path[:, 0], path[:, 1], "-", color=c, lw=0.8, alpha=0.45)
            if truth is not None:
                ax.plot(truth[b, :, i, 0], truth[b, :, i, 1], "--", color="k", lw=1)
        ax.set_title(f"system {b}: context (thick), {samples.shape[1]} samples" + (", truth (dashed)" if truth is not None else ""),
                     fontsize=8)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def _forecast(options: dict, explicit: set) -> None:
    import numpy as np

    from ..trajectories import GeoTDM, ade_fde, constant_velocity

    run = Path(options["checkpoint"])
    info = json.loads((run / MARKER).read_text())
    out = _output_dir(Path(options["output"]))
    _set_threads(options.get("threads"))
    if not (run / "geotdm.pt").is_file():
        _fail(f"{run} has no geotdm.pt checkpoint", 1)
    try:
        model = GeoTDM.load(run / "geotdm.pt")
    except (ValueError, OSError, RuntimeError) as error:
        _fail(f"cannot load {run / 'geotdm.pt'}: {str(error).splitlines()[0]}", 1)
    n = options.get("num_samples") or 5
    if n < 1:
        _fail(f"--num-samples must be >= 1, got {n}", 2)
    c = int(info["context"])
    if c == 0:
        samples = model.generate(n, seed=options.get("seed") or 0)
        np.save(out / "samples.npy", samples)
        print(f"generated {n} trajectories {samples.shape[1:]} (unconditional run); samples: {out / 'samples.npy'}")
        return
    truth = None
    if options.get("context") is not None:
        context = _load_npy(Path(options["context"]), "context")
        if context.ndim == 3:
            context = context[None]
    else:
        held = np.load(run / "heldout.npy")
        context, truth = held[:, :c], held[:, c:]
    try:
        samples = model.forecast(np.asarray(context, dtype=np.float64), n, seed=options.get("seed") or 0)
    except ValueError as error:
        _fail(str(error).splitlines()[0], 1)
    np.save(out / "samples.npy", samples)
    np.save(out / "context.npy", context)
    _plot(np.asarray(context), samples, truth, out / "trajectories.png")
    line = f"forecast {samples.shape[0]} systems x {n} samples x {samples.shape[2]} frames; samples: {out / 'samples.npy'}; plot: {out / 'trajectories.png'}"
    if truth is not None:
        metrics = {"geotdm": ade_fde(samples, truth)}
        if c >= 2:
            metrics["constant_velocity"] = ade_fde(constant_velocity(context, truth.shape[1]), truth)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        g = metrics["geotdm"]
        line += f"\nheld out: minADE/minFDE (K={n}) {g['min_ade']:.3f}/{g['min_fde']:.3f}"
        if "constant_velocity" in metrics:
            cv = metrics["constant_velocity"]
            line += f"; constant velocity {cv['min_ade']:.3f}/{cv['min_fde']:.3f}"
    print(line)


TRAIN_HANDLERS.append((_claims_train, _train))
FORECAST_HANDLERS.append((_claims_forecast, _forecast))
