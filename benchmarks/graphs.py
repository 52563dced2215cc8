r"""GDSS on generic graphs (issue 16): 100 generated vs 100 fresh reference graphs, several seeds.

Jo, Lee & Hwang (2022), "Score-based Generative Modeling of Graphs via the System of Stochastic
Differential Equations". Degree / clustering / orbit MMD² with the GDSS kernels (flowdiff.graphs.metrics),
next to the real-vs-real floor (two independent fresh reference sets) and an Erdős–Rényi baseline with
matched node counts and densities, mean ± sd over seeds; the default sampler (DPM-Solver++(2M) ODE), S4,
Euler–Maruyama and the library's SDE-DPM-Solver++(2M) at equal NFE; training and sampling time (CPU seconds next to wall time: the machine
is shared).

    python benchmarks/graphs.py --run RUN               # a run of `flowdiff train --data community_small`
    python benchmarks/graphs.py --train RUN             # train with the defaults first (timed)
    python benchmarks/graphs.py --baselines-only        # floors and ER baselines of all generators

Writes benchmarks/results/graphs.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff.graphs as fg  # noqa: E402


def stats(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}"


def baselines(name: str, seeds: list[int], num: int) -> dict:
    floor, er = [], []
    for s in seeds:
        ref = fg.make_graphs(name, num, seed=10_000 + s)
        other = fg.make_graphs(name, num, seed=20_000 + s)
        floor.append(fg.graph_mmd(ref, other))
        er.append(fg.graph_mmd(ref, fg.erdos_renyi_like(other, seed=s)))
    return {"floor": floor, "erdos_renyi": er}


def sample_scores(field: fg.GraphField, name: str, seeds: list[int], num: int, solver: str, nfe: int,
                  **kw) -> dict:
    scores, cpu, wall = [], [], []
    for s in seeds:
        ref = fg.make_graphs(name, num, seed=10_000 + s)
        c0, w0 = time.process_time(), time.time()
        gen = fg.generate(field, num, generator=s, solver=solver, steps=nfe, **kw)
        cpu.append(time.process_time() - c0)
        wall.append(time.time() - w0)
        scores.append(fg.graph_mmd(ref, gen))
    return {"scores": scores, "cpu_s": cpu, "wall_s": wall}


def _one(run: str, weights: str, name: str, seed: int, num: int, solver: str, nfe: int, kw: dict) -> dict:
    """One (sampler, seed) cell in a worker process (1 torch thread)."""
    torch.set_num_threads(1)
    field = fg.load_graph_field(run, which=weights)
    return sample_scores(field, name, [seed], num, solver, nfe, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained GDSS run (of --data)")
    ap.add_argument("--data", default="community_small", help="the generator the run was trained on (reference graphs)")
    ap.add_argument("--train", type=Path, help="train a default run into this folder first")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--nfe", type=int, nargs="*", default=[200, 1000])
    ap.add_argument("--baselines-only", action="store_true")
    ap.add_argument("--datasets", nargs="*", default=["community_small", "ego_like", "grid"],
                    help="generators whose floor / ER baselines are tabulated")
    ap.add_argument("--solvers", nargs="*", default=["s4-uniform", "s4-logsnr", "euler-maruyama", "sde-dpm"],
                    help="samplers compared with the default at each --nfe")
    ap.add_argument("--stem", default="graphs")
    ap.add_argument("--weights", choices=["model", "ema"], default=None,
                    help="which weights of the run (default: fg.model.DEFAULT_WEIGHTS)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for the (sampler, seed) cells")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    meta = run_metadata()
    payload: dict = {"meta": meta, "seeds": seeds, "num": args.num}
    lines = ["# GDSS graph generation (benchmarks/graphs.py)", "", metadata_line(meta), "",
             f"{args.num} generated vs {args.num} fresh reference graphs, seeds {seeds} (mean ± sd); MMD² with "
             "the GDSS kernels (biased). Floor: two independent fresh reference sets. ER: Erdős–Rényi with the "
             "node counts and densities of the second reference set.", ""]
    rows = []

    def add_baselines() -> None:
        for name in args.datasets:
            num = 20 if name == "grid" and args.num > 20 else args.num  # grid: 100-361 nodes, slow statistics
            b = baselines(name, seeds, num)
            payload[f"{name}_baselines"] = b
            for label, key in (("real vs real (floor)", "floor"), ("Erdős–Rényi", "erdos_renyi")):
                rows.append([name if num == args.num else f"{name} ({num} vs {num})", label,
                             *(stats([r[m] for r in b[key]]) for m in ("degree", "clustering", "orbit", "average")),
                             "", ""])

    run = args.run
    if args.train is not None and not args.baselines_only:
        c0, w0 = time.process_time(), time.time()
        fg.train_gdss(args.train, fg.GraphTrainConfig())
        payload["train"] = {"cpu_s": time.process_time() - c0, "wall_s": time.time() - w0}
        run = args.train
    if run is not None and not args.baselines_only:
        metrics_file = Path(run) / "metrics.jsonl"
        if not metrics_file.is_file():  # a checkpoint folder RUN/checkpoints/step_N: the run's log up to step N
            metrics_file = Path(run).resolve().parent.parent / "metrics.jsonl"
        if metrics_file.is_file():
            log = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
            cfg = json.loads((Path(run) / "config.json").read_text()) if (Path(run) / "config.json").is_file() else {}
            upto = [x for x in log if "step" not in cfg or x["step"] <= cfg["step"]]
            payload["train_log_last"] = (upto or log)[-1]
        weights = args.weights or fg.model.DEFAULT_WEIGHTS
        payload["weights"] = weights
        rs = fg.model.DEFAULT_RESTART
        restart_nfe = rs["repeats"] * rs["restart_nfe"]
        configs = [(f"default: DPM-Solver++(2M) ODE, {fg.model.DEFAULT_STEPS} NFE + Restart ({rs['repeats']} x "
                    f"{rs['restart_nfe']} NFE, half log-SNR {rs['log_snr'][1]} -> {rs['log_snr'][0]}), {weights} weights",
                    fg.model.DEFAULT_SOLVER, fg.model.DEFAULT_STEPS, {}),
                   (f"DPM-Solver++(2M) ODE without restarts, {fg.model.DEFAULT_STEPS} NFE", fg.model.DEFAULT_SOLVER,
                    fg.model.DEFAULT_STEPS, {"restart": None}),
                   (f"DPM-Solver++(2M) ODE without restarts, {fg.model.DEFAULT_STEPS + restart_nfe} NFE (the default's "
                    "total)", fg.model.DEFAULT_SOLVER, fg.model.DEFAULT_STEPS + restart_nfe, {"restart": None})]
        for nfe in args.nfe:
            for key, label, solver, kw in (
                    ("s4-uniform", f"S4 (uniform t, snr 0.15), {nfe} NFE", "s4", {"grid": "uniform"}),
                    ("s4-logsnr", f"S4 (log-SNR grid, snr 0.15), {nfe} NFE", "s4", {"grid": "log_snr"}),
                    ("s4-logsnr-nocorr", f"S4 (log-SNR grid, no corrector), {nfe} NFE", "s4",
                     {"grid": "log_snr", "snr": 0.0}),
                    ("euler-maruyama", f"Euler–Maruyama, {nfe} NFE", "euler-maruyama", {}),
                    ("sde-dpm", f"SDE-DPM-Solver++(2M), {nfe} NFE", "sde-dpm-solver++2", {})):
                if key in args.solvers:
                    configs.append((label, solver, nfe, kw))
        from concurrent.futures import ProcessPoolExecutor

        cells = [(i, sd) for i in range(len(configs)) for sd in seeds]
        results: dict = {}
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {(i, sd): pool.submit(_one, str(run), weights, args.data, sd, args.num,
                                            configs[i][1], configs[i][2], configs[i][3]) for i, sd in cells}
            add_baselines()  # in the main process while the workers sample
            for c, fut in futures.items():
                try:
                    results[c] = fut.result()
                except Exception as error:  # a diverging solver is a result too
                    results[c] = error
        for i, (label, solver, nfe, kw) in enumerate(configs):
            got = [results[(i, sd)] for sd in seeds]
            bad = [g for g in got if isinstance(g, Exception)]
            if bad:
                rows.append([args.data, label, f"failed: {type(bad[0]).__name__}", "", "", "", "", ""])
                continue
            r = {k: sum((g[k] for g in got), []) for k in ("scores", "cpu_s", "wall_s")}
            payload[label] = r
            rows.append([args.data, label,
                         *(stats([s[m] for s in r["scores"]]) for m in ("degree", "clustering", "orbit", "average")),
                         f"{np.mean(r['cpu_s']) / args.num * 1000:.1f}", f"{np.mean(r['wall_s']) / args.num * 1000:.1f}"])
            print(rows[-1], flush=True)
    else:
        add_baselines()
    lines += markdown_table(["data", "generator", "degree", "clustering", "orbit", "average",
                             "CPU ms / graph", "wall ms / graph"], rows)
    if "train" in payload:
        lines += ["", f"Training (defaults): {payload['train']['cpu_s']:.0f} CPU s, {payload['train']['wall_s']:.0f} s wall."]
    if "train_log_last" in payload:
        lines += ["", f"Run: {run}, {payload.get('weights')} weights. Training log, last line: "
                  f"{json.dumps(payload['train_log_last'])}"]
    md, js = write_results(args.stem, lines, payload)
    print("\n".join(lines))
    print(f"-> {md}, {js}")


if __name__ == "__main__":
    main()
