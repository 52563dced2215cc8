r"""How well does TSDiff's backtest choose? Validation and test samples of every candidate, for offline rules.

``run KIND SEED OUT.pkl``: fits ``fd.timeseries.TSDiff`` with its defaults on a series of
benchmarks/timeseries_heldout.py (same split: the last 3 horizons held out), except that the backtest scores
the quantile guidance scales it searched until session 37 (4, 2, 8, 1). It records

* the backtest's validation paths of every trial model (difference, profile, reflect) at every scale, and its
  validation targets;
* for every trial configuration, a final model trained on the whole training series with the same number of
  steps as the fit's own final model (the fit's final model is reused for its chosen configuration), and its
  100 paths on each of the 3 test origins at the scales 0.25 … 8 (spread 1);
* the width probes (the trial and final models' mean per-step sd at the forecast origin after the training
  series) that fit's spread calibration uses.

``--analyze DIR``: for every recorded series, the test CRPS (ratio to the probabilistic seasonal naive) that a
selection rule would have given — the fit's own rule (lowest pooled validation CRPS over (configuration,
scale, spread), spread rescaled by the width ratio), the same at one fixed scale, a one-SE rule on the scale,
a scale chosen on the mean over candidates, a wider spread grid — and the best any recorded configuration
reaches on the test ("oracle"). Writes a markdown table and a JSON summary next to DIR.

The rolling-origin backtest: Tashman (2000), "Out-of-sample tests of forecasting accuracy"; TSDiff and its
guidance scale: Kollovieh et al. (2023), "Predict, Refine, Synthesize". One series takes about 10 minutes on
one thread.

    python benchmarks/timeseries_selection_study.py run sk:lynx 0 study/sk:lynx_0.pkl
    python benchmarks/timeseries_selection_study.py --analyze study
"""

from __future__ import annotations

import argparse
import glob
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flowdiff as fd  # noqa: E402
from flowdiff.timeseries import metrics as MET  # noqa: E402
from flowdiff.timeseries import model as M  # noqa: E402
from flowdiff.timeseries.metrics import mean_weighted_quantile_loss as mwql, quantile_losses  # noqa: E402
from flowdiff.timeseries.model import SPREAD_LIMITS, SPREADS, widen  # noqa: E402

TS = fd.timeseries
#: the quantile guidance scales the backtest searched until session 37, in its order (default 4 first)
OLD_SCALES = (4.0, 2.0, 8.0, 1.0)
TEST_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
WIDE_SPREADS = tuple(float(f"{2 ** (i / 4):.3f}") for i in range(-2, 7))  # 1/√2 … 2.83


def run(kind: str, seed: int, out: str) -> None:
    from timeseries_heldout import generate, window

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    values, season = generate(kind, seed)
    context, horizon = window(season)
    train, starts = TS.holdout_split(values, horizon, 3)
    # record what the backtest trains and samples (trial models, their validation paths, the targets)
    trained, calls, targets = [], [], {}
    fit_fixed, forecast, score = M.TSDiff._fit_fixed, M.TSDiff.forecast, MET.mean_weighted_quantile_loss

    def recording_fit_fixed(self, *args, **kwargs):
        result = fit_fixed(self, *args, **kwargs)
        trained.append(self)
        return result

    def recording_forecast(self, ctx, num_samples=100, **kwargs):
        result = forecast(self, ctx, num_samples, **kwargs)
        if isinstance(ctx, list) and "base" not in kwargs:  # the backtest's scored sets (probes pass base=None)
            calls.append((self, kwargs.get("guidance_scale"), result))
        return result

    def recording_score(samples, target, *args, **kwargs):
        targets["validation"] = np.asarray(target)
        return score(samples, target, *args, **kwargs)

    old_factors = dict(M.BACKTEST_SCALE_FACTORS)
    M.BACKTEST_SCALE_FACTORS["quantile"] = tuple(s / M.DEFAULT_SCALES["quantile"] for s in OLD_SCALES)
    M.TSDiff._fit_fixed, M.TSDiff.forecast, MET.mean_weighted_quantile_loss = recording_fit_fixed, recording_forecast, recording_score
    began = time.perf_counter()
    try:
        model = TS.TSDiff(context, horizon, season).fit(train)
    finally:
        M.TSDiff._fit_fixed, M.TSDiff.forecast, MET.mean_weighted_quantile_loss = fit_fixed, forecast, score
        M.BACKTEST_SCALE_FACTORS.update(old_factors)
    fit_wall = time.perf_counter() - began

    def config(m):
        return (m.difference, m.profile, m.reflect)

    trials = trained[:-1]
    truth = np.stack([values[o:o + horizon] for o in starts])
    record = {"kind": kind, "seed": seed, "season": season, "context": context, "fit_wall": fit_wall, "steps": model.steps_done,
              "chosen": {"cfg": config(model), "scale": model.guidance_scale, "spread": model.spread,
                         "validated_spread": model.validated_spread, "spread_widths": model.spread_widths},
              "selection": model.selection, "val": {(config(m), s): paths for m, s, paths in calls},
              "val_targets": targets.get("validation"), "truth": truth,
              "psnaive": np.stack([TS.probabilistic_seasonal_naive(values[:o], horizon, season, 100) for o in starts]),
              "hw": np.stack([TS.holt_winters(values[:o], horizon, season, 100) for o in starts]),
              "test": {}, "width_final": {}, "width_trial": {}}
    finals = {config(model): model}
    for t in trials:
        if config(t) not in finals:
            final = TS.TSDiff(context, horizon, season, difference=t.difference, profile=t.profile or False,
                              reflect=t.reflect, guidance_scale=1.0, spread=1.0, train_steps=model.steps_done, max_seconds=1e5)
            finals[config(t)] = final._fit_fixed([train], model.steps_done, False)
    validated = sorted({s for (_, s) in record["val"]})
    for c, final in finals.items():
        for s in TEST_SCALES:
            record["test"][(c, s)] = np.stack([final.forecast(values[:o], 100, guidance_scale=s, spread=1.0) for o in starts])
        for s in validated:
            record["width_final"][(c, s)] = model._probe_width(final, [train], s)
    for t in trials:
        for s in validated:
            record["width_trial"][(config(t), s)] = model._probe_width(t, [train], s)
    record["total_wall"] = time.perf_counter() - began
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as handle:
        pickle.dump(record, handle)
    ps = mwql(record["psnaive"], truth)
    print(kind, seed, f"fit {fit_wall:.0f} s, chosen {config(model)} scale {model.guidance_scale};",
          {f"{c}@{s}": round(mwql(x, truth) / ps, 3) for (c, s), x in record["test"].items()}, flush=True)


# ---------------------------------------------------------------------------------------------- offline rules
def per_origin(samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each origin's share of the pooled weighted quantile loss (they sum to mean_weighted_quantile_loss)."""
    denominator = np.abs(target).sum()
    return np.array([quantile_losses(samples[i:i + 1], target[i:i + 1]).mean() / denominator for i in range(len(target))])


def validation_scores(record: dict, spreads) -> dict:
    y = record["val_targets"]
    return {(c, s, f): per_origin(widen(x, f), y) for (c, s), x in record["val"].items() for f in spreads}


def test_ratio(record: dict, c, s: float, f: float) -> float:
    return mwql(widen(record["test"][(c, s)], f), record["truth"]) / record["ps"]


def calibrated(record: dict, c, s: float, f: float) -> float:
    """fit's spread: the validated factor times the trial/final width ratio, clipped to SPREAD_LIMITS."""
    trial, final = record["width_trial"].get((c, s)), record["width_final"].get((c, s))
    return float(np.clip(f * trial / final, *SPREAD_LIMITS)) if trial and final else f


def lowest(record: dict, scores: dict, keep=lambda k: True) -> tuple:
    k = min((k for k in scores if keep(k)), key=lambda k: scores[k].sum())
    return k[0], k[1], calibrated(record, *k)


def one_se_lowest_scale(record: dict, scores: dict) -> tuple:
    """The smallest scale (same configuration) whose paired excess over the best is within one standard error."""
    best = min(scores, key=lambda k: scores[k].sum())
    near = []
    for k in scores:
        if k[0] == best[0]:
            d = scores[k] - scores[best]
            if d.sum() <= (d.std(ddof=1) * np.sqrt(len(d)) if len(d) > 1 else 0.0):
                near.append(k)
    k = min(near, key=lambda k: (k[1], scores[k].sum()))
    return k[0], k[1], calibrated(record, *k)


def scale_by_mean_over_candidates(record: dict, scores: dict) -> tuple:
    configs, scales = {k[0] for k in scores}, {k[1] for k in scores}

    def mean_best(s):
        per = [min(scores[k].sum() for k in scores if k[0] == c and k[1] == s)
               for c in configs if any(k[0] == c and k[1] == s for k in scores)]
        return np.mean(per) if len(per) == len(configs) else np.inf

    s = min(scales, key=mean_best)
    return lowest(record, scores, lambda k: k[1] == s)


RULES = {
    "fit's rule (scales 1-8)": lambda r, v, w: lowest(r, v),
    "scale 1": lambda r, v, w: lowest(r, v, lambda k: k[1] == 1.0),
    "scale 2": lambda r, v, w: lowest(r, v, lambda k: k[1] == 2.0),
    "scale 4": lambda r, v, w: lowest(r, v, lambda k: k[1] == 4.0),
    "scales 1-2": lambda r, v, w: lowest(r, v, lambda k: k[1] <= 2.0),
    "1-SE smallest scale": lambda r, v, w: one_se_lowest_scale(r, v),
    "scale by mean over candidates": lambda r, v, w: scale_by_mean_over_candidates(r, v),
    "scale 1, spreads to 2.83": lambda r, v, w: lowest(r, w, lambda k: k[1] == 1.0),
}


def analyze(folder: str) -> None:
    rows = []
    for path in sorted(glob.glob(str(Path(folder) / "*.pkl"))):
        with open(path, "rb") as handle:
            record = pickle.load(handle)
        record["ps"] = mwql(record["psnaive"], record["truth"])
        hw = mwql(record["hw"], record["truth"])
        scores, wide = validation_scores(record, SPREADS), validation_scores(record, WIDE_SPREADS)
        row = {"series": f"{record['kind']} {record['seed']}", "psnaive": record["ps"], "holt_winters": hw / record["ps"],
               "chosen": [str(record["chosen"]["cfg"]), record["chosen"]["scale"]]}
        for name, rule in RULES.items():
            row[name] = test_ratio(record, *rule(record, scores, wide))
        row["oracle"] = min(test_ratio(record, c, s, f) for (c, s) in record["test"] for f in WIDE_SPREADS)
        rows.append(row)
    names = [*RULES, "oracle", "holt_winters"]
    lines = ["| series | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {r['series']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |" for r in rows]
    lines.append("| mean ratio | " + " | ".join(f"{np.mean([r[n] for r in rows]):.3f}" for n in names) + " |")
    lines.append("| ≥ 5 % below psnaive | " + " | ".join(f"{sum(r[n] <= 0.95 for r in rows)} / {len(rows)}" for n in names) + " |")
    # the external check's average: mean CRPS over the series against Holt–Winters' (CRPS is already normalised)
    hw_mean = np.mean([r["holt_winters"] * r["psnaive"] for r in rows])
    lines.append("| mean CRPS / HW's | " + " | ".join(f"{np.mean([r[n] * r['psnaive'] for r in rows]) / hw_mean:.3f}" for n in names) + " |")
    table = "\n".join(lines)
    print(f"Test CRPS / probabilistic seasonal naive, per selection rule ({len(rows)} series)\n\n{table}")
    Path(folder).with_suffix(".md").write_text(table + "\n")
    Path(folder).with_suffix(".json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--analyze", metavar="DIR", help="compare the selection rules on every record in DIR")
    parser.add_argument("args", nargs="*", help="run KIND SEED OUT.pkl")
    args = parser.parse_args()
    if args.analyze:
        analyze(args.analyze)
    elif len(args.args) == 4 and args.args[0] == "run":
        run(args.args[1], int(args.args[2]), args.args[3])
    else:
        parser.error("use: run KIND SEED OUT.pkl, or --analyze DIR")


if __name__ == "__main__":
    main()
