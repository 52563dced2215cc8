r"""How often the *exact* predictive distribution meets issue 17's per-series bar (CRPS >= 5 % below psnaive).

For each synthetic generator of ``benchmarks/timeseries_heldout.py`` whose predictive distribution is known in
closed form, and each seed, the last 3 horizons are held out as in that benchmark and scored (CRPS = mean
weighted quantile loss over 9 quantiles, pooled over the 3 origins, 100 paths) for:

* the **oracle**: paths from the generator's exact conditional law given the history (the true mean and noise
  of the deterministic-signal generators; the AR(1) state propagated; the Kalman filter of the local-level
  model with its true variances);
* the probabilistic seasonal naive (psnaive) and Holt–Winters ETS (simulated paths).

It prints, per generator, the share of seeds on which the oracle is at least 5 % below psnaive, and the
median ratios. No forecaster can meet a per-series bar more often than the truth does; where the oracle's
share is below 1, a failure on one series is evidence about the draw as much as about the model.

    python benchmarks/timeseries_bar.py --seeds 40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timeseries_heldout import generate  # noqa: E402

import flowdiff as fd  # noqa: E402

TS = fd.timeseries
PATHS = 100


def oracle(kind: str, seed: int, starts: list[int], horizon: int) -> np.ndarray:
    """``(origins, PATHS, horizon)`` paths of the exact predictive at each origin (replays the generator's draws)."""
    rng = np.random.default_rng(seed)
    draw = np.random.default_rng(10_000 + seed)  # the oracle's own sampling noise
    out = []
    if kind == "season7":
        t = np.arange(200)
        phase = rng.uniform(0, 6)
        mean = 20 + 4 * np.sin(2 * np.pi * t / 7 + phase) + 2 * np.cos(4 * np.pi * t / 7)
        noise = 2.0 * rng.standard_normal(200)
        check = mean + noise
        out = [mean[o:o + horizon] + 2.0 * draw.standard_normal((PATHS, horizon)) for o in starts]
    elif kind == "trend_season12":
        t = np.arange(240)
        phase = rng.uniform(0, 6)
        mean = 50 + 0.2 * t + 10 * np.sin(2 * np.pi * t / 12 + phase)
        check = mean + 3 * rng.standard_normal(240)
        out = [mean[o:o + horizon] + 3.0 * draw.standard_normal((PATHS, horizon)) for o in starts]
    elif kind == "ar_season7":
        t, e = np.arange(210), rng.standard_normal(210)
        ar = np.zeros(210)
        for i in range(1, 210):
            ar[i] = 0.7 * ar[i - 1] + e[i]
        phase = rng.uniform(0, 6)
        check = 50 + 5 * np.sin(2 * np.pi * t / 7 + phase) + 2 * ar
        for o in starts:
            state, paths = np.full(PATHS, ar[o - 1]), np.zeros((PATHS, horizon))
            for k in range(horizon):
                state = 0.7 * state + draw.standard_normal(PATHS)
                paths[:, k] = 50 + 5 * np.sin(2 * np.pi * (o + k) / 7 + phase) + 2 * state
            out.append(paths)
    elif kind == "local_level":
        q, r = 40.0, 120.0  # level and observation noise sd; level_0 = 1000 exactly
        check = 1000 + np.cumsum(q * rng.standard_normal(100)) + r * rng.standard_normal(100)
        for o in starts:
            m, p = 1000.0, 0.0  # Kalman filter of the local-level model on check[:o]
            for y in check[:o]:
                p += q**2
                gain = p / (p + r**2)
                m, p = m + gain * (y - m), (1 - gain) * p
            level = m + np.sqrt(p) * draw.standard_normal(PATHS)
            paths = np.zeros((PATHS, horizon))
            for k in range(horizon):
                level = level + q * draw.standard_normal(PATHS)
                paths[:, k] = level + r * draw.standard_normal(PATHS)
            out.append(paths)
    elif kind in ("hourly", "hourly_long"):  # 9 days, or the notes' 8 weeks + 1 day
        length = 216 if kind == "hourly" else 8 * 168 + 24
        mean, level = TS.data.synthetic_panel_mean(1, length, seed=seed)
        check = TS.synthetic_panel(1, length, seed=seed)[0]
        out = [np.clip(mean[0, o:o + horizon] + 0.1 * level[0, 0] * draw.standard_normal((PATHS, horizon)), 0, None)
               for o in starts]
    else:
        raise ValueError(f"no oracle for {kind!r}")
    values, _ = generate(kind, seed)
    if not np.allclose(values, check):
        raise AssertionError(f"the oracle's replay of {kind} seed {seed} differs from the generator")
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--kinds", default="season7,trend_season12,ar_season7,local_level,hourly,hourly_long")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "timeseries_bar.json"))
    args = parser.parse_args()
    rows, lines = {}, ["| generator | seeds | oracle >= 5 % below psnaive | median oracle / psnaive | median HW / psnaive "
                       "| HW >= 5 % below psnaive |", "|---|---|---|---|---|---|"]
    for kind in args.kinds.split(","):
        ratios = []
        for seed in range(args.seeds):
            values, season = generate(kind, seed)
            horizon = season if season > 1 else 8
            _, starts = TS.holdout_split(values, horizon, 3)
            truth = np.stack([values[o:o + horizon] for o in starts])
            crps = {"oracle": TS.mean_weighted_quantile_loss(oracle(kind, seed, starts, horizon), truth),
                    "psnaive": TS.mean_weighted_quantile_loss(np.stack(
                        [TS.probabilistic_seasonal_naive(values[:o], horizon, season, PATHS) for o in starts]), truth),
                    "holt_winters": TS.mean_weighted_quantile_loss(np.stack(
                        [TS.holt_winters(values[:o], horizon, season, PATHS) for o in starts]), truth)}
            ratios.append((crps["oracle"] / crps["psnaive"], crps["holt_winters"] / crps["psnaive"]))
        r = np.array(ratios)
        rows[kind] = {"seeds": args.seeds, "oracle_over_psnaive": r[:, 0].tolist(), "hw_over_psnaive": r[:, 1].tolist()}
        lines.append(f"| {kind} | {args.seeds} | {np.mean(r[:, 0] <= 0.95):.0%} | {np.median(r[:, 0]):.2f} "
                     f"| {np.median(r[:, 1]):.2f} | {np.mean(r[:, 1] <= 0.95):.0%} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
