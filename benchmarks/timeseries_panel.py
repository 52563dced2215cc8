r"""TSDiff on the notes' synthetic hourly panel (modalities.md §2.6), fit on the whole panel at once.

``fd.timeseries.synthetic_panel(series, length, seed)``: the last 3 days of every series are held out (3 origins
of 24 hours each); ``fd.timeseries.TSDiff(context, 24, 24).fit(list of the training parts)`` with the defaults
(the whole fit, backtest included, is timed), then 100 paths per origin and series. CRPS (mean weighted quantile
loss over the 9 quantiles, pooled over every series and origin) against the probabilistic seasonal naive,
Holt–Winters ETS (simulated paths) and the **oracle**: the generator's own predictive distribution (the
noiseless daily + weekly cycle plus N(0, (0.1 level)²), clipped at 0), which no forecaster can beat on average.
Kollovieh et al. (NeurIPS 2023), TSDiff; docs/timeseries.md has the table.

    python benchmarks/timeseries_panel.py --series 16 --seed 5 --context 168
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import flowdiff as fd

TS = fd.timeseries


def oracle_paths(series: int, length: int, seed: int, noise: float, starts: list[int], horizon: int, paths: int) -> np.ndarray:
    """Samples of the generator's predictive distribution ``(series, origins, paths, horizon)``
    (:func:`flowdiff.timeseries.data.synthetic_panel_mean`: the same parameter draws as the panel)."""
    mean, level = TS.data.synthetic_panel_mean(series, length, seed)
    draw = np.random.default_rng(seed + 1)
    out = np.empty((series, len(starts), paths, horizon))
    for k, o in enumerate(starts):
        m = mean[:, None, o:o + horizon]
        out[:, k] = np.clip(m + noise * level[:, :, None] * draw.standard_normal((series, paths, horizon)), 0, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=16)
    parser.add_argument("--length", type=int, default=8 * 168 + 24, help="values per series (default: 8 weeks + 1 day)")
    parser.add_argument("--seed", type=int, default=5, help="panel seed (the notes' reference numbers use 0)")
    parser.add_argument("--context", type=int, default=168)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--paths", type=int, default=100, help="forecast paths per series and origin")
    parser.add_argument("--cap", action="store_true", help="keep the default max_seconds (480 s wall for the whole fit); "
                        "without it the cap is lifted so machine load cannot cut training")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "timeseries_panel.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    horizon, season = 24, 24
    panel = TS.synthetic_panel(args.series, args.length, seed=args.seed)
    train, starts = TS.holdout_split(panel[0], horizon, 3)
    kwargs = {} if args.cap else {"max_seconds": 1e5}
    if args.steps is not None:
        kwargs["train_steps"] = args.steps
    cpu, wall = time.process_time(), time.perf_counter()
    model = TS.TSDiff(args.context, horizon, season, **kwargs).fit([s[:starts[0]] for s in panel])
    fit_cpu, fit_wall = time.process_time() - cpu, time.perf_counter() - wall
    truth = np.stack([[s[o:o + horizon] for o in starts] for s in panel])          # (series, origins, horizon)
    wall2 = time.perf_counter()
    tsdiff = np.stack([model.forecast([s[:o] for s in panel], args.paths) for o in starts], 1)  # (series, origins, 100, horizon)
    forecast_wall = time.perf_counter() - wall2
    paths = {"tsdiff": tsdiff,
             "psnaive": np.stack([[TS.probabilistic_seasonal_naive(s[:o], horizon, season, 100) for o in starts] for s in panel]),
             "holt_winters": np.stack([[TS.holt_winters(s[:o], horizon, season, 100) for o in starts] for s in panel]),
             "oracle": oracle_paths(args.series, args.length, args.seed, 0.1, starts, horizon, 100)}
    flat = truth.reshape(-1, horizon)
    crps = {k: float(TS.mean_weighted_quantile_loss(v.reshape(-1, v.shape[2], horizon), flat)) for k, v in paths.items()}
    per_series = {k: [float(TS.mean_weighted_quantile_loss(v[i], truth[i])) for i in range(args.series)] for k, v in paths.items()}
    wins = sum(t <= 0.95 * p for t, p in zip(per_series["tsdiff"], per_series["psnaive"]))
    row = {"series": args.series, "length": args.length, "seed": args.seed, "context": args.context, "capped": bool(args.cap),
           "paths": args.paths, "steps": model.steps_done, "fit_cpu_s": round(fit_cpu), "fit_wall_s": round(fit_wall), "forecast_wall_s": round(forecast_wall),
           "chosen": {"difference": model.difference, "profile": model.profile, "scale": model.guidance_scale,
                      "spread": model.spread, "reflect": model.reflect, "base": model.base},
           "crps": crps, "ratio_psnaive": crps["tsdiff"] / crps["psnaive"], "ratio_hw": crps["tsdiff"] / crps["holt_winters"],
           "series_5pct_below_psnaive": wins, "per_series": per_series,
           "selection": [[*k, v] for k, v in model.selection.items()]}
    print(json.dumps({k: v for k, v in row.items() if k not in ("per_series", "selection")}), flush=True)
    print(f"TSDiff {crps['tsdiff']:.4f}  psnaive {crps['psnaive']:.4f}  Holt-Winters {crps['holt_winters']:.4f}  "
          f"oracle {crps['oracle']:.4f}  | TSDiff/psnaive {row['ratio_psnaive']:.2f}, {wins} of {args.series} series "
          f">= 5 % below psnaive | fit {fit_wall:.0f} s wall")
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
