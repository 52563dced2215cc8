r"""N-body forecasting and generation with GeoTDM (Han et al., NeurIPS 2024, *Geometric Trajectory Diffusion
Models*) against constant velocity and a deterministic EGNN/EGTN, on freshly simulated charged particles.

Protocol (modalities notes §3.5, the GeoTDM charged setup): 5 charged particles in 3-D, 30 frames
(10 context, 20 forecast), ``--train`` training and ``--test`` test systems from disjoint seeds. Metrics:
minADE/minFDE over K = 5 samples and the sample means (aveADE/aveFDE). Baselines in the same run: constant
velocity (from the last two context frames), copy-last-frame, the learned prior of the GeoTDM fit alone, and
:class:`~flowdiff.trajectories.DeterministicEGTN` (the same network trained by regression, with GeoTDM's
default time budget). Equivariance of the trained model: the largest deviation between the forecast of a
rotated (reflected) and translated context and the rotated/translated forecast, in float64, same seed.

Unconditional generation (``--generation``): GeoTDM with ``context_frames=0`` on 20-frame windows; the
marginal score and a logistic-regression classification score (test accuracy; 0.5 = indistinguishable)
against held-out simulations, with a second independent simulation (the floor) and free particles (straight
lines, no interaction) as references.

Times are CPU seconds (``time.process_time``) and wall seconds; the machine is shared, so wall time is
an upper bound. Run: ``python benchmarks/trajectories.py [--train 3000] [--test 500] [--generation]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import flowdiff as fd  # noqa: E402
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

T = fd.trajectories


def _timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def _equivariance_error(model, context: np.ndarray) -> float:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q[:, 0] = -q[:, 0] if torch.det(q) > 0 else q[:, 0]  # a reflection too
    b = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    state = model.state_dict()
    state["dtype"] = "float64"
    m64 = type(model).from_state(state)
    ctx = torch.from_numpy(context)
    f1 = m64.forecast(ctx, 5, seed=3)
    f2 = m64.forecast(ctx @ q.T + b, 5, seed=3)
    return float((f2 - (f1 @ q.T + b)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generation", action="store_true", help="also the unconditional generation table")
    parser.add_argument("--stem", default="trajectories")
    parser.add_argument("--steps", type=int, default=None, help="fixed updates (implies no time limit)")
    parser.add_argument("--load-geotdm", default=None,
                        help="a GeoTDM checkpoint fit on the same training set (seed) instead of fitting here")
    parser.add_argument("--load-det", default=None, help="the same for the deterministic EGTN")
    parser.add_argument("--fit-note", default="", help="how the loaded checkpoints were fit (for the table)")
    parser.add_argument("--test-seeds", type=int, default=1, help="independent test sets (ratio per set)")
    parser.add_argument("--no-det", action="store_true", help="skip the deterministic EGTN")
    parser.add_argument("--test-seed", type=int, default=None,
                        help="seed of the first test set (default seed + 1000003); set k uses test-seed + 7919 k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit_kw = {} if args.steps is None else {"steps": args.steps, "time_limit": None}
    train = T.simulate_charged(args.train, 30, seed=args.seed)
    test_seed = args.seed + 1_000_003 if args.test_seed is None else args.test_seed
    test = T.simulate_charged(args.test, 30, seed=test_seed)
    ctx, fut = test[:, :10], test[:, 10:]
    rows, payload = [], {"train": args.train, "test": args.test, "seed": args.seed}

    def add(name, metrics, cpu=None, wall=None, note=""):
        rows.append([name, f"{metrics['min_ade']:.3f}", f"{metrics['min_fde']:.3f}", f"{metrics['mean_ade']:.3f}",
                     f"{metrics['mean_fde']:.3f}", "" if cpu is None else f"{cpu:.0f} / {wall:.0f}", note])
        payload[name] = {**metrics, "cpu_s": cpu, "wall_s": wall, "note": note}
        print(rows[-1], flush=True)

    cv = T.ade_fde(T.constant_velocity(ctx, 20), fut)
    add("constant velocity", cv)
    add("last frame", T.ade_fde(T.last_frame(ctx, 20), fut))

    if args.load_geotdm:
        geo, cpu, wall = T.GeoTDM.load(args.load_geotdm), None, None
        geo.steps_done = args.fit_note or "loaded"
    else:
        geo, cpu, wall = _timed(lambda: T.GeoTDM(seed=args.seed, **fit_kw).fit(train, context_frames=10))
    add("GeoTDM prior alone", T.ade_fde(geo.prior_mean(ctx), fut), note="learned equivariant prior mean")
    samples, scpu, swall = _timed(lambda: geo.forecast(ctx, 5))
    m = T.ade_fde(samples, fut)
    chosen = "" if geo.temperature_scores is None else \
        f" (chosen in fit from {geo.temperature_source}; tried {sorted(geo.temperature_scores)})"
    add("GeoTDM (K=5)", m, cpu, wall, f"{geo.steps_done} steps, temperature {geo.forecast_temperature}{chosen}; "
                                      f"sampling {scpu:.0f} CPU s for {len(ctx)}x5")
    payload["temperature"] = {"used": geo.forecast_temperature, "source": geo.temperature_source,
                              "heldout_scores": None if geo.temperature_scores is None else
                              {str(k): v for k, v in geo.temperature_scores.items()}}
    payload["geotdm_vs_cv"] = {"ade_ratio": m["min_ade"] / cv["min_ade"], "fde_ratio": m["min_fde"] / cv["min_fde"]}
    payload["equivariance_max_error_float64"] = _equivariance_error(geo, ctx[:10])

    if not args.no_det:
        if args.load_det:
            det, dcpu, dwall = T.GeoTDM.load(args.load_det), None, None
            det.steps_done = args.fit_note or "loaded"
        else:
            det, dcpu, dwall = _timed(lambda: T.DeterministicEGTN(seed=args.seed, **fit_kw).fit(train, context_frames=10))
        add("deterministic EGTN", T.ade_fde(det.forecast(ctx, 1), fut), dcpu, dwall, f"{det.steps_done} steps")

    payload["test_seed"] = test_seed
    seed_rows = []
    for k in range(1, args.test_seeds):  # further independent test sets: the ratio to constant velocity
        other = T.simulate_charged(args.test, 30, seed=test_seed + 7919 * k)
        cvk = T.ade_fde(T.constant_velocity(other[:, :10], 20), other[:, 10:])
        mk = T.ade_fde(geo.forecast(other[:, :10], 5, seed=k), other[:, 10:])
        seed_rows.append([str(k), f"{cvk['min_ade']:.3f} / {cvk['min_fde']:.3f}", f"{mk['min_ade']:.3f} / {mk['min_fde']:.3f}",
                          f"{mk['min_ade'] / cvk['min_ade']:.3f} / {mk['min_fde'] / cvk['min_fde']:.3f}"])
        payload[f"test_set_{k}"] = {"cv": cvk, "geotdm": mk}
        print(seed_rows[-1], flush=True)

    lines = [f"# N-body forecasting (charged particles, 10 -> 20 frames)", "",
             f"Command: `python benchmarks/trajectories.py {' '.join(sys.argv[1:])}`", "",
             f"{args.train} training / {args.test} test systems (fresh seeds). "
             f"minADE/minFDE over K = 5 samples, ave = mean over samples. "
             f"GeoTDM/CV ratio: ADE {payload['geotdm_vs_cv']['ade_ratio']:.3f}, "
             f"FDE {payload['geotdm_vs_cv']['fde_ratio']:.3f}. Largest float64 deviation of a forecast of a "
             f"rotated+reflected+translated context from the transformed forecast (same seed): "
             f"{payload['equivariance_max_error_float64']:.2e}.", ""]
    lines += markdown_table(["method", "minADE", "minFDE", "aveADE", "aveFDE", "fit CPU s / wall s", "note"], rows)
    if seed_rows:
        lines += ["", "Further independent test sets (same model):", ""]
        lines += markdown_table(["test set", "constant velocity ADE / FDE", "GeoTDM minADE / minFDE",
                                 "ratio ADE / FDE"], seed_rows)

    if args.generation:
        gen_train = train[:, 10:]
        real = T.simulate_charged(args.test, 20, seed=args.seed + 2_000_003)
        floor = T.simulate_charged(args.test, 20, seed=args.seed + 3_000_003)
        free = floor[:, :1] + (floor[:, 1:2] - floor[:, :1]) * np.arange(20)[None, :, None, None]
        gmodel, gcpu, gwall = _timed(lambda: T.GeoTDM(seed=args.seed).fit(gen_train, context_frames=0))
        generated = gmodel.generate(args.test, seed=1)
        grows = []
        for name, other, note in [("second simulation (floor)", floor, ""),
                                  ("free particles (no forces)", free, ""),
                                  ("GeoTDM unconditional", generated, f"{gmodel.steps_done} steps, fit {gcpu:.0f} CPU s")]:
            ms = T.marginal_score(real, other)
            cs = T.classification_score(real, other)
            grows.append([name, f"{ms:.4f}", f"{cs['accuracy']:.3f}", f"{cs['bce']:.3f}", note])
            payload["generation_" + name] = {"marginal": ms, **cs}
            print(grows[-1], flush=True)
        lines += ["", "## Unconditional generation (20 frames)", "",
                  "Marginal score (lower is better) and a logistic-regression classifier on sorted pairwise "
                  "distances (accuracy 0.5 and BCE 0.693: indistinguishable from held-out simulations).", ""]
        lines += markdown_table(["generator", "marginal", "C2ST accuracy", "C2ST BCE", "note"], grows)

    meta = run_metadata(threads=args.threads)
    lines += ["", metadata_line(meta)]
    payload["meta"] = meta
    md, js = write_results(args.stem, lines, payload)
    print("\n".join(lines))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
