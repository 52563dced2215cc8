r"""GDSS on molecules (issue 16): a QM9-like model trained on CPU, ≥ 500 sampled molecules, GDSS's molecule metrics.

Jo, Lee & Hwang (2022), "Score-based Generative Modeling of Graphs via the System of Stochastic Differential
Equations", §4.2. The data set is **qm9-like** (flowdiff.graphs.molecules: ≈ 420 distinct molecules with ≤ 9
heavy atoms over C, N, O, F taken from the molecule files RDKit ships; 80 % train / 20 % held out), *not* QM9
(134 k molecules): the paper's QM9 figures (validity w/o correction 95.72 %, FCD 2.900, NSPDK 0.003) are shown
only as context. FCD and NSPDK MMD² are against the held-out molecules, next to the real-vs-real floor (a
training subset of the held-out set's size vs the held-out set): with ≈ 84 reference molecules both are far
from zero even for real data.

    python benchmarks/molecules.py --train RUN [--steps 6000]   # train (timed), then evaluate
    python benchmarks/molecules.py --run RUN                     # evaluate an existing run

Rows: the default sampler (DPM-Solver++(2M) probability-flow ODE, 100 NFE) on the raw and on the EMA weights,
and GDSS's S4 (log-SNR grid, no corrector, 200 steps) on the better weights; validity with and without valency
correction. Writes benchmarks/results/molecules.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff.graphs as fg  # noqa: E402
from flowdiff.graphs import molecules as fm  # noqa: E402

PAPER_QM9 = {"validity_wo_correction": 0.9572, "fcd": 2.900, "nspdk": 0.003, "uniqueness": 0.9846,
             "novelty": 0.8627}


def fmt(v, pct=False):
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if pct else f"{v:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path)
    ap.add_argument("--train", type=Path)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-s4", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # denormal weights halve CPU speed (flowdiff.graphs.molecules.train_molecules)
    train_info = {}
    if args.train is not None:
        cfg = fm.MoleculeTrainConfig(data="qm9-like")
        if args.steps:
            cfg.steps = args.steps
        cpu0, wall0 = time.process_time(), time.time()
        fm.train_molecules(args.train, cfg, log=print)
        train_info = {"steps": cfg.steps, "train_cpu_s": time.process_time() - cpu0,
                      "train_wall_s": time.time() - wall0}
        run = args.train
    elif args.run is not None:
        run = args.run
        log = run / "metrics.jsonl"
        if log.is_file():  # the run's own record of its training (CPU seconds; wall time is not logged)
            import json

            last = json.loads(log.read_text().strip().splitlines()[-1])
            train_info = {"steps": last["step"], "train_cpu_s": last["cpu_s"], "train_wall_s": None}
    else:
        ap.error("give --run or --train")
    train = (run / "train_smiles.txt").read_text().split()
    test = (run / "test_smiles.txt").read_text().split()
    rows, payload = [], {"run": str(run), "train": train_info, "num_train": len(train), "num_test": len(test),
                         "results": []}
    settings = [("model", "dpm-solver++2m", 100, {}), ("ema", "dpm-solver++2m", 100, {})]
    if not args.skip_s4:
        settings.append(("model", "s4", 200, {"grid": "log_snr", "snr": 0.0}))
    for weights, solver, nfe, opts in settings:
        field = fg.load_graph_field(run, which=weights)
        cpu0, wall0 = time.process_time(), time.time()
        label = f"{solver}{' (log-SNR, no corrector)' if solver == 's4' else ' ODE'}, {nfe} NFE"
        try:
            samples = fm.generate_molecules(field, args.num, generator=args.seed, solver=solver, steps=nfe, **opts)
        except Exception as error:  # noqa: BLE001 - a diverging sampler is a result, recorded as such
            print(f"{weights} {solver}: failed: {error}")
            payload["results"].append({"weights": weights, "solver": solver, "nfe": nfe, "error": str(error)})
            rows.append([f"flowdiff GDSS, qm9-like, {weights} weights", label, f"failed: {type(error).__name__}"]
                        + ["—"] * 6)
            continue
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
        m = fm.molecule_metrics(samples, train, test, seed=args.seed)
        m.update({"weights": weights, "solver": solver, "nfe": nfe, "options": opts, "sample_cpu_s": cpu,
                  "sample_wall_s": wall, "examples": [s for s in samples.smiles if s][:20]})
        print({k: v for k, v in m.items() if k != "examples"})
        payload["results"].append(m)
        rows.append([f"flowdiff GDSS, qm9-like, {weights} weights", label,
                     f"{fmt(m['validity_wo_correction'], True)} / {fmt(m.get('validity_wo_correction_neutral'), True)}"
                     f" / {fmt(m.get('valid_connected_wo_correction'), True)}",
                     fmt(m["validity"], True), fmt(m["uniqueness"], True), fmt(m["novelty"], True), fmt(m.get("fcd")),
                     fmt(m.get("nspdk")), f"{1000 * cpu / args.num:.1f}"])
    floor = next((r for r in payload["results"] if "fcd_floor" in r or "nspdk_floor" in r), {})
    rows.append(["real vs real (train subset vs held-out, qm9-like)", "—", "—", "—", "—", "—",
                 fmt(floor.get("fcd_floor")), fmt(floor.get("nspdk_floor")), "—"])
    rows.append(["GDSS paper, **QM9** (different data set: 134 k molecules)", "S4 + corrector",
                 fmt(PAPER_QM9["validity_wo_correction"], True), "—", fmt(PAPER_QM9["uniqueness"], True),
                 fmt(PAPER_QM9["novelty"], True), fmt(PAPER_QM9["fcd"]), fmt(PAPER_QM9["nspdk"]), "—"])
    meta = run_metadata()
    payload["meta"] = meta
    header = ["model", "sampler", "valid w/o corr. (GDSS rule / no cations / connected)", "valid", "unique", "novel", "FCD ↓", "NSPDK MMD² ↓",
              "sampling CPU ms / molecule"]
    lines = ["# GDSS molecules (qm9-like)", "",
             f"{args.num} generated molecules per row (seed {args.seed}) vs {len(test)} held-out qm9-like molecules "
             f"(training set {len(train)}). Validity without correction: GDSS's rule (an N/O/S one bond over its valence "
             "becomes a cation), without that rule, and GDSS's rule with one fragment only. Novelty vs the training "
             "set. The last row is the paper's QM9 result, "
             "a **different, much larger data set**, shown as context only.", ""]
    if train_info:
        wall = f" ({train_info['train_wall_s']:.0f} s wall)" if train_info.get("train_wall_s") else ""
        lines += [f"Training: {train_info['steps']} steps, {train_info['train_cpu_s']:.0f} CPU s{wall}.", ""]
    lines += markdown_table(header, rows) + ["", metadata_line(meta)]
    write_results("molecules", lines, payload)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
