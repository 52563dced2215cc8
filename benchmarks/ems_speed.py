"""EMS time / quality on the trained digits UNet (issue 12 item 3).

``estimate``: time ``estimate_ems`` (CPU seconds by ``time.process_time``, run with
OMP_NUM_THREADS=1) with given settings and save the statistics; ``evaluate``: the v3 error at
NFE 5/6/8/10 of each saved EMS — 256 points from the same noise, error = median over samples of
the per-sample RMS distance to a 200-call third-order DPM-Solver++ reference; ``table``: write
benchmarks/results/ems_speed.{md,json} from the collected records.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flowdiff as fd
from flowdiff.pipeline import load_field

CKPT = "/tmp/d/runs/digits_unet/checkpoints/step_00002000"
RESULTS = Path(__file__).parent / "results"
NFES = (5, 6, 8, 10)


def _field_and_data(ckpt: str):
    from flowdiff.pipeline import load_dataset as _ld

    field, config = load_field(ckpt)
    name = (config.get("extra") or {}).get("dataset")
    ds = _ld(name, split="train", seed=int((config.get("extra") or {}).get("seed", 0)))
    return field, ds.x.to(torch.float32)


def estimate(args) -> None:
    from flowdiff.solvers import estimate_ems

    field, data = _field_and_data(args.checkpoint)
    opts = json.loads(args.options)
    c0, w0 = time.process_time(), time.perf_counter()
    ems = estimate_ems(field, data, generator=torch.Generator().manual_seed(args.seed), progress=False, **opts)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    ems.save(args.out)
    rec = {"label": args.label, "options": opts, "cpu_s": cpu, "wall_s": wall, "file": args.out,
           "cost": ems.cost, "error_estimate": ems.settings.get("error_estimate")}
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
    e.add_argument("--log", default="/tmp/ems_speed/log.jsonl")
    e.add_argument("--checkpoint", default=CKPT)
    v = sub.add_parser("evaluate")
    v.add_argument("files", nargs="+")
    v.add_argument("--ref", default="/tmp/ems_speed/ref.pt")
    v.add_argument("--log", default="/tmp/ems_speed/eval.jsonl")
    v.add_argument("--checkpoint", default=CKPT)
    t = sub.add_parser("table")
    t.add_argument("--log", default="/tmp/ems_speed/log.jsonl")
    t.add_argument("--evals", nargs="+", default=["/tmp/ems_speed/eval.jsonl"])
    t.add_argument("--checkpoint", default=CKPT)
    a = p.parse_args()
    {"estimate": estimate, "evaluate": evaluate, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
