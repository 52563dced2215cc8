r"""How reachable is issue 17's per-series bar (CRPS >= 5 % below the probabilistic seasonal naive)?

For the synthetic generators of ``benchmarks/timeseries_heldout.py`` the exact predictive distribution is
known; this script scores it with the held-out protocol (last 3 horizons, 100 paths, mean weighted quantile
loss pooled over the origins) against the probabilistic seasonal naive, over many seeds:

* ``local_level`` (random walk sd 40 + noise sd 120): the Kalman filter with the true parameters (mean = the
  filtered level, variance P + h·σ²_η + σ²_ε; Harvey 1989) — the optimal forecast, spread growing like √h;
* ``season7`` and ``trend_season12``: the true mean plus the true Gaussian noise.

    python benchmarks/timeseries_oracle.py      # numpy only, a few seconds
"""

from __future__ import annotations

import numpy as np

import flowdiff as fd
from timeseries_heldout import generate

TS = fd.timeseries


def ratio(values: np.ndarray, season: int, horizon: int, predictive, seed: int) -> float:
    """CRPS of ``predictive(origin) -> (100, horizon)`` over 3 held-out origins, divided by psnaive's."""
    _, starts = TS.holdout_split(values, horizon, 3)
    truth = np.stack([values[o:o + horizon] for o in starts])
    oracle = np.stack([predictive(o) for o in starts])
    naive = np.stack([TS.probabilistic_seasonal_naive(values[:o], horizon, season, 100) for o in starts])
    return TS.mean_weighted_quantile_loss(oracle, truth) / TS.mean_weighted_quantile_loss(naive, truth)


def local_level(seed: int, sd_level: float = 40.0, sd_noise: float = 120.0, horizon: int = 8) -> float:
    values, _ = generate("local_level", seed)
    rng = np.random.default_rng(seed)

    def kalman(origin: int) -> np.ndarray:
        m, p = values[0], sd_noise**2
        for y in values[1:origin]:
            p += sd_level**2
            gain = p / (p + sd_noise**2)
            m, p = m + gain * (y - m), (1 - gain) * p
        sd = np.sqrt(p + sd_level**2 * np.arange(1, horizon + 1) + sd_noise**2)
        return m + sd * rng.standard_normal((100, horizon))

    return ratio(values, 1, horizon, kalman, seed)


def seasonal(kind: str, seed: int) -> float:
    values, season = generate(kind, seed)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6)  # the generators' first draw
    t = np.arange(values.size)
    if kind == "season7":
        mean, sd = 20 + 4 * np.sin(2 * np.pi * t / 7 + phase) + 2 * np.cos(4 * np.pi * t / 7), 2.0
    else:
        mean, sd = 50 + 0.2 * t + 10 * np.sin(2 * np.pi * t / 12 + phase), 3.0
    assert np.std(values - mean) < 1.5 * sd  # the same realisation as generate()
    return ratio(values, season, season, lambda o: mean[o:o + season] + sd * rng.standard_normal((100, season)), seed)


def main() -> None:
    for name, score, seeds, shown in (("local_level", local_level, 200, (42, 5)),
                                      ("season7", lambda s: seasonal("season7", s), 100, (777,)),
                                      ("trend_season12", lambda s: seasonal("trend_season12", s), 100, (99,))):
        r = np.array([score(s) for s in range(seeds)])
        extra = ", ".join(f"seed {s}: {score(s):.3f}" for s in shown)
        print(f"{name}: exact predictive / psnaive CRPS over {seeds} seeds: median {np.median(r):.3f}, "
              f"> 0.95 on {100 * (r > 0.95).mean():.0f} %; {extra}")


if __name__ == "__main__":
    main()
