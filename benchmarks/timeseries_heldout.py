r"""TSDiff with its defaults on series outside benchmarks/timeseries.py (issue 17's external check, locally).

For each series: the last 3 horizons are held out (3 origins); ``fd.timeseries.TSDiff(context, horizon,
season).fit(train)`` with the defaults (``--steps`` overrides ``train_steps``), then 100 paths per origin;
CRPS (mean weighted quantile loss, 9 quantiles, pooled over the origins) against the probabilistic seasonal
naive and Holt–Winters ETS (simulated paths); also the CRPS of the model's own spread (``spread=1``), the
MAE of the sample median and the mean per-step sd. Settings: season > 1: context 3 seasons (hourly: 2),
horizon one season; no season: context 24, horizon 8. The synthetic generators below use seeds never used to
tune the model (Kollovieh et al. 2023, TSDiff; docs/timeseries.md has the table).

    python benchmarks/timeseries_heldout.py real:nile 0 --steps 1000
    python benchmarks/timeseries_heldout.py season7 777
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import flowdiff as fd
from flowdiff.timeseries.model import widen

SPREADS = tuple(float(f"{0.5 * 2 ** (i / 4):.3f}") for i in range(13))  # 0.5 … 4, scored on the test (diagnostic)

TS = fd.timeseries


def simulate(kind: str, seed: int) -> tuple[np.ndarray, int, dict]:
    """(values, season, latent) of a named synthetic generator whose predictive law is known in closed form;
    ``latent`` holds what that law needs (``benchmarks/timeseries_bar.py`` samples it): ``mean`` (the noiseless
    signal) and ``sd`` of iid Gaussian noise; for ``ar_season7`` the ``signal``, the AR(1) state ``ar``, its
    coefficient ``phi`` and ``scale``; for ``local_level`` the start ``level0`` and the level and observation sds
    ``q``, ``r``; for the hourly panels ``mean`` and ``level`` (noise ``0.1 · level``, clipped at 0)."""
    rng = np.random.default_rng(seed)
    if kind == "trend_season12":
        t = np.arange(240)
        mean = 50 + 0.2 * t + 10 * np.sin(2 * np.pi * t / 12 + rng.uniform(0, 6))
        return mean + 3 * rng.standard_normal(240), 12, {"mean": mean, "sd": 3.0}
    if kind == "season7":
        t = np.arange(200)
        mean = 20 + 4 * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 6)) + 2 * np.cos(4 * np.pi * t / 7)
        return mean + 2.0 * rng.standard_normal(200), 7, {"mean": mean, "sd": 2.0}
    if kind == "ar_season7":  # fresh check 2026-12-07 (never used to tune): AR(1) noise on a weekly cycle
        t, e = np.arange(210), rng.standard_normal(210)
        ar = np.zeros(210)
        for i in range(1, 210):
            ar[i] = 0.7 * ar[i - 1] + e[i]
        signal = 50 + 5 * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 6))
        return signal + 2 * ar, 7, {"signal": signal, "ar": ar, "phi": 0.7, "scale": 2.0}
    if kind == "local_level":
        q, r = 40.0, 120.0
        return 1000 + np.cumsum(q * rng.standard_normal(100)) + r * rng.standard_normal(100), 1, {"level0": 1000.0, "q": q, "r": r}
    if kind in ("hourly", "hourly_long"):  # hourly_long: the notes' panel length (8 weeks + 1 day), session 34
        length = 216 if kind == "hourly" else 8 * 168 + 24
        mean, level = TS.data.synthetic_panel_mean(1, length, seed=seed)
        return TS.synthetic_panel(1, length, seed=seed)[0], 24, {"mean": mean[0], "level": float(level[0, 0])}
    raise ValueError(f"no closed-form generator {kind!r}")


SIMULATED = ("trend_season12", "season7", "ar_season7", "local_level", "hourly", "hourly_long")


def window(season: int) -> tuple[int, int]:
    """(context, horizon) of the held-out runs: 3 seasons (hourly: 2) and one season; no season: 24 and 8."""
    return ((3 * season if season < 24 else 2 * season), season) if season > 1 else (24, 8)


def generate(kind: str, seed: int) -> tuple[np.ndarray, int]:
    """(values, season) of a named synthetic generator or ``real:<name>`` (fd.timeseries.load_series)."""
    if kind in SIMULATED:
        return simulate(kind, seed)[:2]
    if kind == "walk_season7":  # session 38 (never used to tune): a random-walk level under a weekly cycle
        rng = np.random.default_rng(seed)
        t = np.arange(210)
        level = 30 + np.cumsum(rng.standard_normal(210))
        return level + 4 * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 6)) + rng.standard_normal(210), 7
    if kind == "synth0":  # benchmarks/timeseries.py's synthetic_0
        return TS.synthetic_panel(4, 8 * 24 + 24, seed=0)[0], 24
    if kind.startswith("sm:"):  # statsmodels series in no benchmark and no tuning run (held out 2026-12-06)
        from statsmodels.datasets import interest_inflation, macrodata

        name = kind[3:]
        if name in ("unemp", "tbilrate", "infl"):  # infl: fresh check 2026-12-07 (never used to tune)
            return macrodata.load_pandas().data[name].to_numpy(dtype=np.float64), (4 if name == "unemp" else 1)
        if name in ("realgdp", "realinv", "m1", "realcons", "realdpi", "realgovt"):  # fresh checks: sessions 35 and 38 (the last three)
            return macrodata.load_pandas().data[name].to_numpy(dtype=np.float64), 4
        if name == "dp":
            return interest_inflation.load_pandas().data["Dp"].to_numpy(dtype=np.float64), 4
        raise ValueError(f"unknown statsmodels series {name!r}")
    if kind.startswith("sk:"):  # CSVs bundled with sktime (fresh checks, session 36; needs sktime installed)
        import importlib.util

        import pandas as pd

        files = {"seatbelts": ("seatbelts/seatbelts.csv", "KSI", 12),
                 "lynx": ("Lynx/Lynx.csv", "0", 1), "uschange": ("Uschange/Uschange.csv", "Consumption", 1)}
        if kind[3:] not in files:
            raise ValueError(f"unknown sktime series {kind[3:]!r}; one of {', '.join(files)}")
        spec = importlib.util.find_spec("sktime")
        if spec is None:
            raise ImportError(f"{kind} needs sktime installed (its bundled CSVs are read, sktime is not imported)")
        path, column, season = files[kind[3:]]
        data = pd.read_csv(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / path)
        return data[column].to_numpy(dtype=np.float64), season
    if kind.startswith("real:"):
        return TS.load_series(kind[5:])
    raise ValueError(f"unknown series kind {kind!r}")


def table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows (one per series and seed) with the means of CRPS and ratios."""
    head = ("| series | seed | chosen (diff., scale, spread[, mirrored][, refined base]) | TSDiff | spread 1 | psnaive | Holt–Winters | TSDiff / psnaive "
            "| TSDiff / HW | MAE of median TSDiff / psnaive / HW | fit CPU s |\n" + "|---" * 11 + "|")
    lines = [head]
    for r in rows:
        c, m, ch = r["crps"], r["mae_of_median"], r["chosen"]
        bad = r["ratio_psnaive"] > 0.95
        mirror = "" if "reflect" not in ch else (", yes" if ch["reflect"] else ", no")
        if ch.get("base"):  # refinement of a base forecaster chosen by the backtest (the scale is then unused)
            mirror += f", refined {'snaive' if ch['base'] == 'seasonal_naive' else 'HW'}"
        # the history's seasonal profile (no differencing) shows as "profile"; rows before it: the difference
        rep = "profile" if ch.get("profile") == "history" or (
            "profile" not in ch and r.get("selection") and min(r["selection"], key=lambda k: k[-1])[0] == "profile"
            and not ch.get("base")) else ch["difference"]
        lines.append(f"| {r['series']} | {r['seed']} | {rep}, {ch['scale']:g}, {ch['spread']:g}{mirror} | {c['tsdiff']:.4f} "
                     f"| {c['tsdiff_spread1']:.4f} | {c['psnaive']:.4f} | {c['holt_winters']:.4f} "
                     f"| {'**' if bad else ''}{r['ratio_psnaive']:.2f}{'**' if bad else ''} | {r['ratio_hw']:.2f} "
                     f"| {m['tsdiff']:.3g} / {m['psnaive']:.3g} / {m['holt_winters']:.3g} | {r['fit_cpu_s']} |")
    mean = {k: float(np.mean([r["crps"][k] for r in rows])) for k in ("tsdiff", "tsdiff_spread1", "psnaive", "holt_winters")}
    lines.append(f"| **mean** ({len(rows)}) | | | {mean['tsdiff']:.4f} | {mean['tsdiff_spread1']:.4f} | {mean['psnaive']:.4f} "
                 f"| {mean['holt_winters']:.4f} | {np.mean([r['ratio_psnaive'] for r in rows]):.2f} "
                 f"| {np.mean([r['ratio_hw'] for r in rows]):.2f} | | |")
    passed = sum(r["ratio_psnaive"] <= 0.95 for r in rows)
    lines.append(f"\n{passed} of {len(rows)} series >= 5 % below psnaive; mean CRPS TSDiff / Holt-Winters = "
                 f"{mean['tsdiff'] / mean['holt_winters']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", nargs="?")
    parser.add_argument("seed", type=int, nargs="?", default=0)
    parser.add_argument("--table", default=None, help="print a markdown table of the rows in this .jsonl file and exit")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--base", default=None, choices=["auto", "none"],
                        help="TSDiff's base (default: the model's default); none: self-guidance only")
    parser.add_argument("--profile", default=None, choices=["auto", "none"],
                        help="TSDiff's profile (default: the model's default, 'auto'); none: no history-profile candidate "
                        "(the default before session 34)")
    parser.add_argument("--context", type=int, default=None, help="context length (default: 3 seasons, hourly 2; no season 24)")
    parser.add_argument("--cap", action="store_true", help="keep the default max_seconds (480 s wall for the whole fit); "
                        "without it the cap is lifted so machine load cannot cut training")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "timeseries_heldout_rows.jsonl"))
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in open(args.table) if line.strip()]))
        return
    if args.kind is None:
        parser.error("kind is required (or --table)")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    values, season = generate(args.kind, args.seed)
    context, horizon = window(season)
    if args.context is not None:
        context = args.context
    train, starts = TS.holdout_split(values, horizon, 3)
    kwargs = {} if args.cap else {"max_seconds": 1e5}
    if args.steps is not None:
        kwargs["train_steps"] = args.steps
    if args.base is not None:
        kwargs["base"] = None if args.base == "none" else "auto"
    if args.profile is not None:
        kwargs["profile"] = False if args.profile == "none" else "auto"
    cpu, wall = time.process_time(), time.perf_counter()
    model = TS.TSDiff(context, horizon, season, **kwargs).fit(train)
    fit_cpu, fit_wall = time.process_time() - cpu, time.perf_counter() - wall
    truth = np.stack([values[o:o + horizon] for o in starts])
    own = np.stack([model.forecast(values[:o], 100, spread=1.0) for o in starts])
    paths = {"tsdiff": widen(own, model.spread or 1.0), "tsdiff_spread1": own,
             "psnaive": np.stack([TS.probabilistic_seasonal_naive(values[:o], horizon, season, 100) for o in starts]),
             "holt_winters": np.stack([TS.holt_winters(values[:o], horizon, season, 100) for o in starts])}
    crps = {k: TS.mean_weighted_quantile_loss(v, truth) for k, v in paths.items()}
    row = {"series": args.kind, "seed": args.seed, "context": context, "profile_option": args.profile or "auto", "steps": model.steps_done, "fit_cpu_s": round(fit_cpu), "fit_wall_s": round(fit_wall), "capped": bool(args.cap),
           "chosen": {"difference": model.difference, "profile": model.profile, "scale": model.guidance_scale, "spread": model.spread,
                      "reflect": model.reflect, "base": model.base, "validated_spread": model.validated_spread,
                      "spread_ratio": model.spread_ratio, "spread_widths": model.spread_widths},
           "crps": crps, "ratio_psnaive": crps["tsdiff"] / crps["psnaive"], "ratio_hw": crps["tsdiff"] / crps["holt_winters"],
           "mae_of_median": {k: float(np.abs(np.median(v, 1) - truth).mean()) for k, v in paths.items()},
           "mean_sd": {k: float(v.std(1).mean()) for k, v in paths.items()},
           # share of outcomes inside the central 80 % interval of the paths, per horizon step (pooled over origins)
           "coverage80": {k: [float(x) for x in ((np.quantile(v, 0.1, 1) <= truth) & (truth <= np.quantile(v, 0.9, 1))).mean(0)]
                          for k, v in paths.items()},
           "selection": [[*k, v] for k, v in model.selection.items()],
           "refine_selection": [[*k, v] for k, v in model.refine_selection.items()],
           "spread_scores_on_test": {f: TS.mean_weighted_quantile_loss(widen(own, f), truth) for f in SPREADS}}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
