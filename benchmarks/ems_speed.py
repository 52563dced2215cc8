"""EMS time / quality on the trained digits UNet (issue 12 item 3).

``estimate``: time ``estimate_ems`` (CPU seconds by ``time.process_time``, run with
OMP_NUM_THREADS=1) with given settings and save the statistics; ``evaluate``: the v3 error at
NFE 5/6/8/10 of each saved EMS — 256 points from the same noise, error = median over samples of
the per-sample RMS distance to a 200-call third-order DPM-Solver++ reference; ``table``: write
benchmarks/results/ems_speed.{md,json} from the collected records.

``collect``: one estimate that also stores every point's rows (A, B, C and the σ·diag estimate
at every knot, common points); ``refit``: statistics from subsets of those rows (fewer points,
points cycling over disjoint blocks from knot to knot to imitate fresh points, other fits)
evaluated like ``evaluate``, without a model call for the statistics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flowdiff as fd
from flowdiff.pipeline import load_field

CKPT = "/tmp/runs/digits/checkpoints/step_00002000"
RESULTS = Path(__file__).parent / "results"
NFES = (5, 6, 8, 10)


def _field_and_data(ckpt: str, labels: str = "data"):
    """The field and its training data: the data set with its labels (``labels="data"``) or the
    images alone (``"none"``: what ``flowdiff ems`` passes today, so a class-conditional network
    gets stratified random labels)."""
    from flowdiff.pipeline import load_dataset as _ld

    field, config = load_field(ckpt)
    name = (config.get("extra") or {}).get("dataset")
    ds = _ld(name, split="train", seed=int((config.get("extra") or {}).get("seed", 0))).to(dtype=torch.float32)
    return field, (ds if labels == "data" else ds.x)


def estimate(args) -> None:
    from flowdiff.solvers import estimate_ems

    field, data = _field_and_data(args.checkpoint, args.labels)
    opts = json.loads(args.options)
    c0, w0 = time.process_time(), time.perf_counter()
    ems = estimate_ems(field, data, generator=torch.Generator().manual_seed(args.seed), progress=False, **opts)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    ems.save(args.out)
    rec = {"label": args.label, "options": opts, "labels": args.labels, "cpu_s": cpu, "wall_s": wall, "file": args.out,
           "cost": ems.cost, "error_estimate": ems.settings.get("error_estimate"), "quality": ems.settings.get("quality")}
    with open(args.log, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def evaluate(args) -> None:
    from flowdiff.solvers import EMS

    field, _ = _field_and_data(args.checkpoint)
    shape = (1, 8, 8)
    x0 = torch.randn((256, *shape), generator=torch.Generator().manual_seed(1234))
    ref_file = Path(args.ref)
    if ref_file.exists():
        ref = torch.load(ref_file)
    else:
        ref = fd.sample(field, x0, solver="dpm-solver++3m", nfe=200).x
        torch.save(ref, ref_file)
    out = {}
    for f in args.files:
        ems = EMS.load(f)
        errs = {}
        for nfe in NFES:
            x = fd.sample(field, x0, solver="dpm-solver-v3", nfe=nfe, ems=ems).x
            rms = (x - ref).flatten(1).pow(2).mean(1).sqrt()
            errs[nfe] = float(rms.median())
        out[f] = errs
        print(f, json.dumps(errs), flush=True)
        with open(args.log, "a") as fh:
            fh.write(json.dumps({"file": f, "errors": errs}) + "\n")


def collect(args) -> None:
    from flowdiff.solvers import estimate_ems

    field, data = _field_and_data(args.checkpoint, args.labels)
    k, n = args.knots, args.samples
    store = {c: torch.zeros(k, n, 64) for c in "ABCL"}

    def record(i, lo, *rows):
        for c, v in zip("ABCL", rows):
            store[c][i, lo : lo + v.shape[0]] = v.float()

    c0, w0 = time.process_time(), time.perf_counter()
    ems = estimate_ems(field, data, num_lambdas=k, num_samples=n, points="common", bandwidth=0.0, progress=False,
                       generator=torch.Generator().manual_seed(args.seed), record=record, max_error=None)
    rec = {"label": f"common {k}x{n} (collect)", "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
           "file": args.out + ".safetensors", "cost": ems.cost, "error_estimate": ems.settings["error_estimate"],
           "quality": ems.settings["quality"]}
    ems.save(args.out + ".safetensors")
    torch.save({"lam": ems.lambdas, **store}, args.out + ".rows.pt")
    with open(args.log, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def refit(args) -> None:
    """v3 errors of statistics refitted from stored rows (``collect``): args.specs are
    ``label:knot_step:points:mode:bandwidth:degree`` with mode ``common`` or ``cycle``."""
    from flowdiff.solvers import EMS
    from flowdiff.solvers.ems import _pooled_statistics, _statistics

    field, _ = _field_and_data(args.checkpoint)
    rows = torch.load(args.rows)
    base = EMS.load(args.rows.replace(".rows.pt", ".safetensors"))
    x0 = torch.randn((256, 1, 8, 8), generator=torch.Generator().manual_seed(1234))
    ref = torch.load(args.ref)
    total_k, total_n = rows["A"].shape[:2]
    for spec in args.specs:
        label, step, n, mode, bw, degree = spec.split(":")
        step, n, bw, degree = int(step), int(n), float(bw), int(degree)
        knots = list(range(0, total_k, step))
        knots += [] if knots[-1] == total_k - 1 else [total_k - 1]
        moments = {key: torch.zeros(len(knots), 64, dtype=torch.float64) for key in ("A", "B", "C", "AA", "BB", "CC", "AB", "AC", "BC")}
        shift = {c: torch.zeros(len(knots), 64, dtype=torch.float64) for c in "ABC"}
        l_sum = torch.zeros(len(knots), 64, dtype=torch.float64)
        for i, k in enumerate(knots):
            idx = torch.arange(n) + (n * (i % (total_n // n)) if mode == "cycle" else 0)
            v = {c: rows[c][k, idx].double() for c in "ABCL"}
            l_sum[i] = v["L"].sum(0)
            for c in "ABC":
                shift[c][i] = v[c].mean(0)
                v[c] = v[c] - shift[c][i]
            for key in moments:
                moments[key][i] = (v[key[0]] * v[key[1]]).sum(0) if len(key) == 2 else v[key].sum(0)
        lam = rows["lam"][knots]
        if bw > 0:
            stats = _pooled_statistics(l_sum, moments, shift, float(n), lam, bw, degree)
        else:
            stats = _statistics(l_sum, moments, shift, float(n), lam, 0, False)
        ems = EMS(lam, *(s.reshape(-1, 1, 8, 8) for s in stats), base.settings)
        errs = {}
        for nfe in NFES:
            x = fd.sample(field, x0, solver="dpm-solver-v3", nfe=nfe, ems=ems).x
            errs[nfe] = float((x - ref).flatten(1).pow(2).mean(1).sqrt().median())
        rec = {"label": f"refit {label}", "spec": spec, "errors": errs}
        print(json.dumps(rec), flush=True)
        with open(args.log, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def table(args) -> None:
    """benchmarks/results/ems_speed.{md,json} from the estimate and evaluate logs."""
    est = [json.loads(x) for x in open(args.log)]
    ev = {}
    for path in args.evals:
        for x in open(path):
            r = json.loads(x)
            ev[r["file"]] = r["errors"]
    rows = []
    for r in est:
        rows.append({**r, "errors": ev.get(r["file"])})
    for f, e in ev.items():
        if not any(r["file"] == f for r in est):
            rows.append({"label": Path(f).stem, "file": f, "errors": e, "note": "derived from another EMS file"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ems_speed.json").write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=1))
    lines = ["| EMS | CPU s | solver error est. | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|---|---|" + "---|" * len(NFES)]
    for r in rows:
        e = r.get("errors") or {}
        err = (r.get("error_estimate") or {}).get("solver")
        lines.append(f"| {r['label']} | {r['cpu_s']:.1f} | {err} | " if "cpu_s" in r else f"| {r['label']} | | | ")
        lines[-1] += " | ".join(f"{e[str(n)]:.3g}" if str(n) in e else "" for n in NFES) + " |"
    (RESULTS / "ems_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate")
    e.add_argument("--label", required=True)
    e.add_argument("--options", default="{}")
    e.add_argument("--out", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--labels", choices=("data", "none"), default="data")
    e.add_argument("--log", default="/tmp/ems_speed/log.jsonl")
    e.add_argument("--checkpoint", default=CKPT)
    v = sub.add_parser("evaluate")
    v.add_argument("files", nargs="+")
    v.add_argument("--ref", default="/tmp/ems_speed/ref.pt")
    v.add_argument("--log", default="/tmp/ems_speed/eval.jsonl")
    v.add_argument("--checkpoint", default=CKPT)
    c = sub.add_parser("collect")
    c.add_argument("--knots", type=int, default=200)
    c.add_argument("--samples", type=int, default=512)
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--labels", choices=("data", "none"), default="data")
    c.add_argument("--log", default="/tmp/ems_speed/log.jsonl")
    c.add_argument("--checkpoint", default=CKPT)
    r = sub.add_parser("refit")
    r.add_argument("specs", nargs="+")
    r.add_argument("--rows", required=True)
    r.add_argument("--ref", default="/tmp/ems_speed/ref.pt")
    r.add_argument("--log", default="/tmp/ems_speed/refit.jsonl")
    r.add_argument("--checkpoint", default=CKPT)
    t = sub.add_parser("table")
    t.add_argument("--log", default="/tmp/ems_speed/log.jsonl")
    t.add_argument("--evals", nargs="+", default=["/tmp/ems_speed/eval.jsonl"])
    t.add_argument("--checkpoint", default=CKPT)
    a = p.parse_args()
    {"estimate": estimate, "evaluate": evaluate, "collect": collect, "refit": refit, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
