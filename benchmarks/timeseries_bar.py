r"""How often the *exact* predictive distribution meets issue 17's per-series bar (CRPS >= 5 % below psnaive).

For each synthetic generator of ``benchmarks/timeseries_heldout.py`` whose predictive distribution is known in
closed form, and each seed, the last 3 horizons are held out as in that benchmark and scored (CRPS = mean
weighted quantile loss over 9 quantiles, pooled over the 3 origins, 100 paths) for:

* the **oracle**: paths from the generator's exact conditional law given the history (``simulate`` returns
  what it needs: the true mean and noise
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
from timeseries_heldout import simulate  # noqa: E402

import flowdiff as fd  # noqa: E402

TS = fd.timeseries
PATHS = 100


def oracle(kind: str, values: np.ndarray, latent: dict, starts: list[int], horizon: int, seed: int) -> np.ndarray:
    """``(origins, PATHS, horizon)`` paths of the exact predictive at each origin (``latent``: :func:`simulate`)."""
    draw = np.random.default_rng(10_000 + seed)  # the oracle's own sampling noise
    out = []
    if kind in ("season7", "trend_season12"):
        out = [latent["mean"][o:o + horizon] + latent["sd"] * draw.standard_normal((PATHS, horizon)) for o in starts]
    elif kind == "ar_season7":
        phi, scale = latent["phi"], latent["scale"]
        for o in starts:
            state, paths = np.full(PATHS, latent["ar"][o - 1]), np.zeros((PATHS, horizon))
            for k in range(horizon):
                state = phi * state + draw.standard_normal(PATHS)
                paths[:, k] = latent["signal"][o + k] + scale * state
            out.append(paths)
    elif kind == "local_level":
        q, r = latent["q"], latent["r"]
        for o in starts:
            m, p = latent["level0"], 0.0  # Kalman filter of the local-level model on values[:o] (level_0 known)
            for y in values[:o]:
                p += q**2
                gain = p / (p + r**2)
                m, p = m + gain * (y - m), (1 - gain) * p
            level = m + np.sqrt(p) * draw.standard_normal(PATHS)
            paths = np.zeros((PATHS, horizon))
            for k in range(horizon):
                level = level + q * draw.standard_normal(PATHS)
                paths[:, k] = level + r * draw.standard_normal(PATHS)
            out.append(paths)
    elif kind in ("hourly", "hourly_long"):
        out = [np.clip(latent["mean"][o:o + horizon] + 0.1 * latent["level"] * draw.standard_normal((PATHS, horizon)), 0, None)
               for o in starts]
    else:
        raise ValueError(f"no oracle for {kind!r}")
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
            values, season, latent = simulate(kind, seed)
            horizon = season if season > 1 else 8
            _, starts = TS.holdout_split(values, horizon, 3)
            truth = np.stack([values[o:o + horizon] for o in starts])
            crps = {"oracle": TS.mean_weighted_quantile_loss(oracle(kind, values, latent, starts, horizon, seed), truth),
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
