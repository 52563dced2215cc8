"""Time-series commands (TSDiff, issue 17): ``flowdiff train --data SERIES.csv --task forecast --context 48
--horizon 24 -o RUN`` and ``flowdiff forecast -c RUN [--context FILE] -n 100 -o OUT`` (docs/timeseries.md).

Registered in the handler lists of :mod:`flowdiff.cli`: ``train`` claims ``--task forecast`` with a ``.csv``,
``.npy`` or ``.txt`` series file; ``forecast`` claims a run folder holding ``tsdiff.pt``. The run folder gets
``tsdiff.pt`` (config and EMA weights, written atomically), ``run.json`` and ``series.npy`` (the training
series: the default context of ``forecast``). The season length is estimated from the series'
autocorrelation unless ``--season`` is given (or ``season_length`` in ``network_kwargs`` of a ``--config`` YAML file, with
the other :class:`~flowdiff.timeseries.TSDiff` arguments, e.g. ``train_steps``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from . import FORECAST_HANDLERS, TRAIN_HANDLERS, _fail, _first_line, _output_dir, _set_threads

SERIES_SUFFIXES = (".csv", ".npy", ".txt", ".tsv")
CHECKPOINT = "tsdiff.pt"


def _really_explicit(command: str, options: dict, explicit: set) -> set:
    """``explicit`` minus the options whose value equals the command's declared default."""
    from . import app

    cmd = typer.main.get_command(app).commands[command]
    defaults = {p.name: p.default for p in cmd.params}
    return {k for k in explicit if k not in defaults or options.get(k) != defaults[k]}


def _claims_train(data: str, task: Any = None) -> bool:
    return task == "forecast" and Path(str(data)).suffix.lower() in SERIES_SUFFIXES


def _read_series(path: Path, option: str):
    import numpy as np

    from ..timeseries import read_series_csv

    if not path.is_file():
        _fail(f"{option}: series file not found: {path}", 1)
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False).astype(np.float64)
        else:
            values = read_series_csv(path)
    except (ValueError, OSError) as error:
        _fail(f"{option}: cannot read {path}: {_first_line(error)}", 1)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2 and 1 in values.shape:
        values = values.reshape(-1)
    if values.ndim != 1:
        _fail(f"{option}: {path} must hold one series (a column), got shape {values.shape}", 1)
    return values


def _run_train(options: dict, explicit: set) -> None:
    from ..timeseries import TSDiff
    from ..timeseries.data import estimate_season_length

    explicit = _really_explicit("train", options, explicit)
    context, horizon = options.get("context"), options.get("horizon")
    if context is None or horizon is None:
        _fail("--task forecast needs --context and --horizon (time steps), e.g. --context 48 --horizon 24", 2)
    if context < 2 or horizon < 1:
        _fail(f"--context must be >= 2 and --horizon >= 1, got {context} and {horizon}", 2)
    output = Path(options["output"])
    if (output / CHECKPOINT).exists() and not options.get("overwrite"):
        _fail(f"--output {output} already holds a forecasting run; pass --overwrite or another folder", 2)
    if options.get("resume"):
        _fail("--resume is not supported for forecasting runs (a fit takes minutes); start over with --overwrite", 2)
    _output_dir(output)
    values = _read_series(Path(options["data"]), "--data")
    import numpy as np

    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if nan or inf:
        _fail(f"--data {options['data']}: {nan} missing and {inf} infinite values; fill or drop them first", 1)
    if values.size < context + horizon:
        _fail(f"--data {options['data']} has {values.size} values; --context {context} + --horizon {horizon} "
              f"needs at least {context + horizon}", 1)
    kwargs = dict(options.get("network_kwargs") or {})
    season = kwargs.pop("season_length", None)
    if options.get("season") is not None:  # --season beats the config file and the estimate
        season = options["season"]
        if isinstance(season, bool) or not isinstance(season, int) or season < 1:
            _fail(f"--season must be an integer >= 1, got {season!r}", 2)
    if season is None:
        season = estimate_season_length(values, max_lag=min(context // 2, values.size // 3))
    if "steps" in explicit:
        kwargs["train_steps"] = options["steps"]
    if "lr" in explicit:
        kwargs["lr"] = options["lr"]
    if "batch" in explicit:
        kwargs["batch_size"] = options["batch"]
    kwargs.setdefault("seed", options.get("seed", 0))
    _set_threads(options.get("threads"))
    try:
        model = TSDiff(context, horizon, season, device=options.get("device", "cpu"), **kwargs)
    except TypeError as error:
        _fail(f"network_kwargs: {_first_line(error)}", 2)
    started = time.process_time()
    model.fit(values)
    np.save(output / "series.npy", values)
    model.save(output / CHECKPOINT)
    info = {"data": str(options["data"]), "context_length": context, "prediction_length": horizon,
            "season_length": season, "train_steps_done": model.steps_done, "fit_seconds": model.fit_seconds,
            "cpu_seconds": time.process_time() - started, "final_loss": float(np.mean(model.history[-100:])),
            # what fit's backtest chose (docs/timeseries.md)
            "chosen": {"difference": model.difference, "profile": model.profile, "reflect": model.reflect,
                       "guidance_scale": model.guidance_scale, "spread": model.spread, "base": model.base}}
    (output / "run.json").write_text(json.dumps(info, indent=2))
    chosen = ", ".join(f"{k} {v}" for k, v in info["chosen"].items() if v not in (None, False) or k == "difference")
    typer.echo(f"trained TSDiff (context {context}, horizon {horizon}, season {season}) for {model.steps_done} steps "
               f"in {model.fit_seconds:.0f} s ({chosen}); run in {output}")


def _claims_forecast(checkpoint: Path) -> bool:
    p = Path(checkpoint)
    return (p / CHECKPOINT).is_file() or (p.is_file() and p.name == CHECKPOINT)


def _run_forecast(options: dict, explicit: set) -> None:
    import numpy as np

    from ..timeseries import TSDiff

    checkpoint = Path(options["checkpoint"])
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    num_samples = options.get("num_samples", 100)
    if num_samples < 1:
        _fail(f"--num-samples must be >= 1, got {num_samples}", 2)
    output = _output_dir(Path(options["output"]))
    try:
        model = TSDiff.load(folder / CHECKPOINT)
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        _fail(f"cannot load {folder / CHECKPOINT}: {_first_line(error)}", 1)
    if options.get("context") is not None:
        context = _read_series(Path(options["context"]), "--context")
    else:
        context = np.load(folder / "series.npy")
    _set_threads(options.get("threads"))
    try:
        samples = model.forecast(context, num_samples, seed=options.get("seed", 0))
    except ValueError as error:
        _fail(f"--context: {_first_line(error)}", 1)
    levels = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    quantiles = np.quantile(samples, levels, axis=0)
    np.savez(output / "forecast.npz", samples=samples, quantiles=quantiles, levels=levels,
             context=np.asarray(context[-model.context_length:]), mean=samples.mean(0))
    np.savetxt(output / "samples.csv", samples, delimiter=",",
               header=",".join(f"h{i + 1}" for i in range(samples.shape[1])), comments="")
    table = np.column_stack([np.arange(1, samples.shape[1] + 1), samples.mean(0), quantiles.T])
    np.savetxt(output / "quantiles.csv", table, delimiter=",", comments="",
               header="step,mean," + ",".join(f"q{level:g}" for level in levels), fmt=["%d"] + ["%.8g"] * (table.shape[1] - 1))
    _fan_chart(np.asarray(context[-3 * model.context_length:]), samples, output / "forecast.png")
    typer.echo(f"{num_samples} forecasts of {model.prediction_length} steps written to {output} "
               f"(forecast.npz, samples.csv, quantiles.csv, forecast.png)")


def _fan_chart(context, samples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n, h = len(context), samples.shape[1]
    past, future = np.arange(n), np.arange(n, n + h)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(past, context, color="black", lw=1, label="context")
    for lo, hi, alpha in ((0.05, 0.95, 0.2), (0.1, 0.9, 0.3), (0.25, 0.75, 0.45)):
        ax.fill_between(future, np.quantile(samples, lo, 0), np.quantile(samples, hi, 0), color="C0", alpha=alpha,
                        lw=0, label=f"{int(lo * 100)}-{int(hi * 100)} %")
    ax.plot(future, np.median(samples, 0), color="C0", lw=1.5, label="median")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_xlabel("time step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TRAIN_HANDLERS.append((_claims_train, _run_train))
FORECAST_HANDLERS.append((_claims_forecast, _run_forecast))
