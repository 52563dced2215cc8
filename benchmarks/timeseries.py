r"""TSDiff forecasting benchmark (issue 17): CRPS (mean weighted quantile loss) and MASE on real series shipped
by statsmodels/statsforecast and on a synthetic seasonal panel, several seeds.

Kollovieh et al. (2023), "Predict, Refine, Synthesize: Self-Guiding Diffusion Models for Probabilistic Time
Series Forecasting": the claim checked here is that one unconditional model with observation self-guidance
is competitive with a diffusion model trained for the forecasting task (here
:class:`flowdiff.timeseries.ConditionalTSDiff`: same network, representation and budget, conditioned on the
context).

Protocol per series: the last ``origins × horizon`` values are held out; every model is fitted once on the
rest (TSDiff: the documented defaults) and forecasts each origin from the history before it, 100 sample
paths. Forecasters in the same run: TSDiff with quantile self-guidance (the default) and with mean-square
guidance, TSDiff LMC refinement of the probabilistic seasonal naive, the conditional diffusion model,
seasonal naive (point and probabilistic: plus Gaussian noise of the lag-season residual sd), Holt–Winters
ETS with simulated paths, statsforecast AutoETS/AutoARIMA (Gaussian intervals). CRPS pools each series'
origins (gluonts' mean_wQuantileLoss); the table's ratios are per-series CRPS divided by the probabilistic
seasonal naive's.

    python benchmarks/timeseries.py                       # all series, seeds 0,1,2
    python benchmarks/timeseries.py --series nile,co2 --seeds 0 --steps 500 --stem timeseries_smoke

CPU seconds (``time.process_time``) are reported next to wall time: the machine is shared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402

TS = fd.timeseries
METHODS = ("tsdiff_q", "tsdiff_ms", "tsdiff_refine", "conditional", "snaive", "psnaive", "holt_winters",
           "auto_ets", "auto_arima")
NUM_SAMPLES = 100


def _setting(name: str) -> tuple[np.ndarray, int, int, int]:
    """(values, season, context, horizon)."""
    if name.startswith("synthetic"):
        panel = TS.synthetic_panel(4, 8 * 24 + 24, seed=0)
        index = int(name.split("_")[-1])
        # the notes' hourly panel: daily season 24, context two days, horizon one day
        return panel[index], 24, 48, 24
    values, season = TS.load_series(name)
    if season > 1:
        return values, season, 3 * season, season
    return values, 1, 24, 8


def _forecast(method: str, model, cond, history: np.ndarray, horizon: int, season: int, seed: int) -> np.ndarray | None:
    if method == "tsdiff_q":
        return model.forecast(history, NUM_SAMPLES, guidance="quantile", seed=seed)
    if method == "tsdiff_ms":
        return model.forecast(history, NUM_SAMPLES, guidance="mean-square", seed=seed)
    if method == "tsdiff_refine":
        base = TS.probabilistic_seasonal_naive(history, horizon, season, NUM_SAMPLES, seed=seed)
        return model.refine(history, base, method="lmc", iterations=20, seed=seed)
    if method == "conditional":
        return cond.forecast(history, NUM_SAMPLES, seed=seed)
    if method == "snaive":
        return TS.seasonal_naive(history, horizon, season, NUM_SAMPLES)
    if method == "psnaive":
        return TS.probabilistic_seasonal_naive(history, horizon, season, NUM_SAMPLES, seed=seed)
    if method == "holt_winters":
        return TS.holt_winters(history, horizon, season, NUM_SAMPLES, seed=seed)
    name = {"auto_ets": "AutoETS", "auto_arima": "AutoARIMA"}[method]
    return TS.statsforecast_model(name, history, horizon, season, NUM_SAMPLES, seed=seed)


def run_series(name: str, seed: int, origins: int, steps: int | None, methods: tuple[str, ...]) -> dict:
    values, season, context, horizon = _setting(name)
    train, starts = TS.holdout_split(values, horizon, origins)
    options = {} if steps is None else {"train_steps": steps}
    timing = {}
    model = cond = None
    if any(m.startswith("tsdiff") for m in methods):
        cpu, wall = time.process_time(), time.perf_counter()
        model = TS.TSDiff(context, horizon, season, seed=seed, **options).fit(train)
        timing["tsdiff_fit_cpu_s"], timing["tsdiff_fit_wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
        timing["tsdiff_steps"] = model.steps_done
        # difference="auto": what fit's in-sample backtest chose, and its validation CRPS per candidate
        timing["tsdiff_difference"] = model.difference
        timing["tsdiff_guidance_scale"], timing["tsdiff_spread"] = model.guidance_scale, model.spread
        timing["tsdiff_selection"] = {str(k): v for k, v in model.selection.items()}
    if "conditional" in methods:
        cpu, wall = time.process_time(), time.perf_counter()
        cond = TS.ConditionalTSDiff(context, horizon, season, seed=seed, **options).fit(train)
        timing["conditional_fit_cpu_s"], timing["conditional_fit_wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
    result = {"series": name, "seed": seed, "season": season, "context": context, "horizon": horizon,
              "length": len(values), "train_length": len(train), **timing, "crps": {}, "mase": {}, "forecast_cpu_s": {}}
    targets = np.stack([values[o:o + horizon] for o in starts])
    for method in methods:
        cpu = time.process_time()
        samples = [_forecast(method, model, cond, values[:o], horizon, season, seed) for o in starts]
        if any(s is None for s in samples):
            continue
        stacked = np.stack(samples)
        result["crps"][method] = TS.mean_weighted_quantile_loss(stacked, targets)
        result["mase"][method] = float(np.mean([TS.mase(np.median(s, 0), y, values[:o], season)
                                                for s, y, o in zip(samples, targets, starts)]))
        result["forecast_cpu_s"][method] = time.process_time() - cpu
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", default="air_passengers,co2,sunspots,nile,elnino,synthetic_0,synthetic_1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--origins", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="TSDiff training steps (default: the model's)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--stem", default="timeseries")
    parser.add_argument("--merge", default="", help="comma-separated stems of earlier (partial) runs: write their rows as one table under --stem")
    args = parser.parse_args(argv)
    if args.merge:
        import json

        from _common import RESULTS

        rows, metas = [], []
        for stem in args.merge.split(","):
            blob = json.loads((RESULTS / f"{stem}.json").read_text())
            rows += blob["rows"]
            metas.append(blob["meta"])
        methods = tuple(m for m in METHODS if any(m in r["crps"] for r in rows))
        seeds = ",".join(sorted({str(r["seed"]) for r in rows}))
        _report(rows, methods, metas[0], seeds, args.stem, merged=args.merge)
        return
    torch.set_num_threads(1)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
    rows = []
    for name in args.series.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_series(name, seed, args.origins, args.steps, methods)
            rows.append(row)
            print(name, seed, {k: round(v, 4) for k, v in row["crps"].items()}, flush=True)
    meta = run_metadata(series=args.series, seeds=args.seeds, origins=args.origins, steps=args.steps)
    _report(rows, methods, meta, args.seeds, args.stem)


def _report(rows: list[dict], methods: tuple[str, ...], meta: dict, seeds: str, stem: str, merged: str = "") -> None:
    shown = [m for m in methods if any(m in r["crps"] for r in rows)]
    table = []
    for name in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == name]
        cells = [name]
        for m in shown:
            vals = [r["crps"][m] for r in mine if m in r["crps"]]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}")
        ratio = [r["crps"]["tsdiff_q"] / r["crps"]["psnaive"] for r in mine if "tsdiff_q" in r["crps"] and "psnaive" in r["crps"]]
        cells.append(f"{np.mean(ratio):.3f}" if ratio else "-")
        fit = [r.get("tsdiff_fit_cpu_s") for r in mine if r.get("tsdiff_fit_cpu_s") is not None]
        cells.append(f"{np.mean(fit):.0f}" if fit else "-")
        table.append(cells)
    header = ["series"] + shown + ["TSDiff-Q / psnaive", "fit CPU s"]
    lines = [f"# TSDiff forecasting: CRPS (mean wQL, lower is better), mean ± sd over seeds {seeds}", "",
             metadata_line(meta) + (f" Merged from {merged}." if merged else ""), "", *markdown_table(header, table), "",
             "MASE (median of the samples):", "",
             *markdown_table(["series"] + shown, [[name] + [f"{np.mean([r['mase'][m] for r in rows if r['series'] == name and m in r['mase']]):.3f}"
                                                         for m in shown] for name in dict.fromkeys(r["series"] for r in rows)])]
    print("\n".join(lines))
    write_results(stem, lines, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
