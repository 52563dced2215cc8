r"""Where TSDiff's gap to the exact predictive comes from: the conditional sampler or the learned model (session 40).

One generator whose predictive law is known in closed form (``ar``: AR(1), phi 0.7, on a weekly sine; ``walk``: a
random-walk level under a weekly sine plus unit noise, whose predictive is the Kalman filter's), ``N`` training
values, then 30 test origins (one week apart, horizon 7, context 21). One TSDiff model (difference 0 for ``ar``, 1
for ``walk``; mirrored windows, spread 1, 2000 steps, uncapped) is sampled by several conditional samplers:

* ``q1``: quantile self-guidance at scale 1 (the default), ``ms2``/``ms8``: mean-square guidance at scale 2 and 8;
* ``replace``: no guidance; at every step the context positions are replaced by the observations noised to that
  step (RePaint without resampling; Lugmayr et al. 2022), ``replace+q1``: both;
* ``conditional``: :class:`flowdiff.timeseries.ConditionalTSDiff` trained on the same values (mirrored windows).

CRPS (mean weighted quantile loss, 100 paths, pooled over the 30 origins) divided by the probabilistic seasonal
naive's; ``oracle`` samples the exact predictive. ``bestspread``: the best of the spread factors 0.7 … 2 on the
test (a bound on what calibration could add).

    python benchmarks/timeseries_sampler_gap.py ar 0
    python benchmarks/timeseries_sampler_gap.py walk 3 --length 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import flowdiff as fd
from flowdiff.timeseries.model import widen

TS = fd.timeseries
ORIGINS, HORIZON, CONTEXT = 30, 7, 21


def simulate(kind: str, seed: int, length: int) -> tuple[np.ndarray, list[int], np.ndarray, int]:
    """(values, test origins, oracle paths ``(origins, 100, 7)``, difference the model uses)."""
    rng, draw = np.random.default_rng(seed), np.random.default_rng(1)
    total = length + ORIGINS * HORIZON + CONTEXT
    t, e = np.arange(total), rng.standard_normal(total)
    starts = [length + HORIZON * j for j in range(ORIGINS)]
    oracle = []
    if kind == "ar":
        ar = np.zeros(total)
        for i in range(1, total):
            ar[i] = 0.7 * ar[i - 1] + e[i]
        signal = 50 + 5 * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 6))
        for o in starts:
            paths, a = np.zeros((100, HORIZON)), np.full(100, ar[o - 1])
            for h in range(HORIZON):
                a = 0.7 * a + draw.standard_normal(100)
                paths[:, h] = signal[o + h] + 2 * a
            oracle.append(paths)
        return signal + 2 * ar, starts, np.stack(oracle), 0
    if kind == "walk":
        season = 4 * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 6))
        values = 30 + np.cumsum(e) + season + rng.standard_normal(total)
        for o in starts:  # Kalman filter of the level (random-walk variance 1, observation variance 1)
            y = values[:o] - season[:o]
            m, p = y[0], 1.0
            for i in range(1, o):
                p += 1
                gain = p / (p + 1)
                m, p = m + gain * (y[i] - m), (1 - gain) * p
            sd = np.sqrt(p + np.arange(1, HORIZON + 1) + 1)
            oracle.append(season[o:o + HORIZON] + m + sd * draw.standard_normal((100, HORIZON)))
        return values, starts, np.stack(oracle), 1
    raise ValueError(f"kind must be 'ar' or 'walk', got {kind!r}")


class ReplacementTSDiff(TS.TSDiff):
    """TSDiff whose sampler also replaces the context positions by the noised observations at every step."""

    def _sample(self, target, mask, levels, guidance, scale, generator):
        betas, abar = self._betas.to(self.dtype), self._alpha_bar.to(self.dtype)
        x = torch.randn(target.shape, generator=generator, dtype=self.dtype)
        guided = guidance != "none" and scale > 0
        for k in range(self.diffusion_steps - 1, -1, -1):
            t = torch.full((x.shape[0],), 1 - (k + 1) / self.diffusion_steps, dtype=self.dtype)
            ab, beta = abar[k], betas[k]
            ab_prev = abar[k - 1] if k > 0 else torch.ones((), dtype=self.dtype)
            if guided:
                eps, grad = self._guidance_gradient(x, t, ab, guidance, target, mask, levels)
            else:
                with torch.no_grad():
                    eps = self.ema(x, t, self._features())
            mean = (x - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
            var = beta * (1 - ab_prev) / (1 - ab)
            if guided:
                mean = mean - (scale * var * grad).clamp(-1.0, 1.0)
            known = target
            if k > 0:
                mean = mean + var.sqrt() * torch.randn(x.shape, generator=generator, dtype=self.dtype)
                known = ab_prev.sqrt() * target + (1 - ab_prev).sqrt() * torch.randn(x.shape, generator=generator, dtype=self.dtype)
            x = mask * known + (1 - mask) * mean
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["ar", "walk"])
    parser.add_argument("seed", type=int)
    parser.add_argument("--length", type=int, default=189, help="training values (189: the held-out runs' length)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "timeseries_sampler_gap.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    values, starts, oracle, difference = simulate(args.kind, args.seed, args.length)
    truth = np.stack([values[o:o + HORIZON] for o in starts])
    psnaive = np.stack([TS.probabilistic_seasonal_naive(values[:o], HORIZON, 7, 100) for o in starts])

    def crps(paths):
        return TS.mean_weighted_quantile_loss(paths, truth) / TS.mean_weighted_quantile_loss(psnaive, truth)

    row = {"kind": args.kind, "seed": args.seed, "length": args.length, "oracle": round(crps(oracle), 3)}
    options = dict(difference=difference, reflect=True, spread=1.0, max_seconds=1e5, seed=args.seed)
    model = TS.TSDiff(CONTEXT, HORIZON, 7, guidance_scale=1.0, **options).fit(values[:args.length])
    replacing = ReplacementTSDiff(**model.config())
    replacing.net, replacing.ema = model.net, model.ema
    conditional = TS.ConditionalTSDiff(CONTEXT, HORIZON, 7, **options).fit(values[:args.length])
    samplers = {"q1": (model, {}), "ms2": (model, {"guidance": "mean-square", "guidance_scale": 2.0}),
                "ms8": (model, {"guidance": "mean-square", "guidance_scale": 8.0}),
                "replace": (replacing, {"guidance": "none", "guidance_scale": 0.0}), "replace+q1": (replacing, {}),
                "conditional": (conditional, {})}
    for name, (forecaster, kwargs) in samplers.items():
        paths = np.stack([forecaster.forecast(values[:o], 100, **kwargs) for o in starts])
        row[name] = round(crps(paths), 3)
        row[name + " bestspread"] = round(min(crps(widen(paths, f)) for f in (0.7, 0.85, 1, 1.2, 1.4, 1.7, 2)), 3)
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
