"""Flow maps and consistency models (issue 18): one-, two- and four-step quality against the teacher's solvers.

**Exact GMM** (``--part gmm``): a 2-D anisotropic Gaussian mixture (``random_mixture(2, 4, seed=0)``,
component scales 0.1-1, rectified-flow path) whose closed-form denoiser is the teacher. Reference: the
probability-flow ODE from the same noise (2000 draws, float64) by DPM-Solver++(3M) at 400 NFE on a
log-SNR grid (state at t_end = 0.999). Error = RMS over draws of the Euclidean distance to the reference.
Students (preconditioned residual MLPs, 128 wide, 3 blocks; EDM preconditioning so that the network
starts as a denoiser):

* ``CD``: consistency distillation (one-time), teacher step Heun with 2 substeps per interval, N = 16 log-SNR bins;
* ``CT``: consistency training (one-time, no teacher), N doubling 10 -> 80, pseudo-Huber;
* ``FM-distill``: two-time flow map by self-consistency, single intervals from the teacher's Heun steps, N = 16;
* ``FM-direct``: two-time flow map, every aligned jump (2N - 1 maps) regressed on the teacher's Heun solve over
  it (2 substeps per interval; ``objective="direct"``), N = 16;
* ``FM-train``: the same without a teacher (the model's own diagonal denoiser, shortcut-style);
* ``FM-default``: ``flow_map_distillation(teacher, student, data)`` with its defaults (direct, every aligned jump of
  N = 16 on the teacher's UniPC solve, steps per interval from the convergence check ``direct_target_substeps``).

Consistency models sample with deterministic re-noising (so that the result is a function of the
noise and comparable with the ODE solution). Teacher rows: every deterministic solver of the library
at 1/2/4/10 NFE (final denoise included in the NFE; the best of with and without it), on their default
grids, plus ``tuned-multistep`` fitted at that NFE and DPM-Solver-v3 with EMS estimated on the exact field.

**Digits** (``--part digits``): the trained class-conditional UNet of ``/tmp/runs/digits`` (read-only,
``flowdiff.pipeline.load_field``) is the teacher; students are copies of its network
(``fd.flowmaps.student_from_teacher``), trained on the 1438 training digits with their labels. Metric:
Fréchet distance in the digits classifier's features (``fd.metrics.digits_frechet_distance``) of
``--count`` samples (classes in exact proportions) against the 359 held-out digits, next to the
real-vs-real floor and the teacher at the same NFE and at 10 and 20 NFE.

Run: ``.venv/bin/python benchmarks/flow_maps.py --part gmm`` (about 10 CPU minutes) and
``--part digits --checkpoint /tmp/runs/digits`` (longer). Writes ``benchmarks/results/flow_maps.{md,json}``
(the parts not run are kept from the previous results file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402
from flowdiff.testing import random_mixture  # noqa: E402

STEPS = (1, 2, 4)
TEACHER_SOLVERS = ["ddim", "dpm-solver++2m", "dpm-solver++3m", "unipc", "deis", "heun", "dpm-solver-2s",
                   "dpm-solver-3s"]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).flatten(1).sum(1).mean().sqrt())


def teacher_errors(field: fd.Field, x0: torch.Tensor, ref: torch.Tensor, nfe: int, ems=None, tune: bool = True) -> dict:
    """Error of every deterministic teacher solver at ``nfe`` (best of with/without the final denoise)."""
    out = {}
    for name in TEACHER_SOLVERS + (["dpm-solver-v3"] if ems is not None else []):
        best = float("inf")
        for final in (True, False):
            try:
                opts = {"ems": ems} if name == "dpm-solver-v3" else {}
                best = min(best, rms(fd.sample(field, x0, solver=name, nfe=nfe, denoise_final=final, **opts).x, ref))
            except ValueError:
                pass
        if best < float("inf"):
            out[name] = best
    if tune and nfe >= 2:
        pilot = field.path.prior_sample((256, *x0.shape[1:]), generator=torch.Generator().manual_seed(11), dtype=x0.dtype)
        try:
            tuned = fd.solvers.tune_solver(field, nfe, pilot, time_budget=60.0)
            out["tuned-multistep (fitted)"] = rms(fd.sample(field, x0, grid=tuned).x, ref)
        except (ValueError, RuntimeError) as error:
            print("tune_solver failed:", error, flush=True)
    return out


def gmm_part(args: argparse.Namespace, save=lambda part: None) -> dict:
    path = fd.paths.Linear()
    gm = random_mixture(2, 4, seed=0, path=path)
    teacher = fd.Field(gm.model("data"), path, "data")
    data = gm.sample(50_000, generator=torch.Generator().manual_seed(1)).float()
    x0 = path.prior_sample((2000, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = fd.sample(teacher, x0, solver="dpm-solver++3m", nfe=400, grid="logsnr", denoise_final=False).state
    ref_check = rms(fd.sample(teacher, x0, solver="unipc", nfe=400, grid="logsnr", denoise_final=False).state, ref)
    teachers, ems_cpu = {}, float("nan")
    for nfe in () if args.no_teacher else (1, 2, 4, 10):
        if nfe == 1:
            t0 = time.process_time()
            ems = fd.solvers.estimate_ems(teacher, data[:4096].double(), progress=False,
                                          generator=torch.Generator().manual_seed(3))
            ems_cpu = time.process_time() - t0
        teachers[nfe] = teacher_errors(teacher, x0, ref, nfe, ems=ems)
        print("teacher", nfe, {k: round(v, 4) for k, v in teachers[nfe].items()}, flush=True)

    sigma_data = float(data.std())

    def student(two_time: bool, seed: int) -> fd.flowmaps.FlowMap:
        torch.manual_seed(seed)
        net = fd.nn.Preconditioned(fd.nn.MLP(2, hidden=args.gmm_hidden, depth=3), path, "data", sigma_data=sigma_data)
        return fd.flowmaps.FlowMap(fd.flowmaps.TwoTimeNetwork(net) if two_time else net, path, "data", two_time=two_time)

    n = args.gmm_steps
    common = dict(steps=n, batch_size=256, lr=1e-3)
    recipes = {
        "CD": lambda m: fd.flowmaps.consistency_distillation(teacher, m, data, bins=16, solver="heun", substeps=2,
                                                             **common),
        "CT": lambda m: fd.flowmaps.consistency_training(m, data, bins=(10, 80), target_ema=0.95, **common),
        "FM-distill": lambda m: fd.flowmaps.flow_map_distillation(teacher, m, data, bins=16, solver="heun",
                                                                  substeps=2, objective="self-consistency", **common),
        "FM-direct": lambda m: fd.flowmaps.flow_map_distillation(teacher, m, data, bins=16, solver="heun", substeps=2,
                                                                 objective="direct", **common),
        "FM-train": lambda m: fd.flowmaps.flow_map_distillation(None, m, data, bins=16, **common),
        # the defaults (objective "direct", UniPC targets with substeps from the convergence check)
        "FM-default": lambda m: fd.flowmaps.flow_map_distillation(teacher, m, data, **common),
    }
    students = {}
    for name, train in recipes.items():
        if args.only and name not in args.only:
            continue
        model = student(name.startswith("FM"), seed=0)
        res = train(model)
        errs = {k: rms(fd.flowmaps.sample(model, x0.float(), steps=k).x, ref) for k in STEPS}
        students[name] = {"errors": errs, "cpu_s": res.cpu_seconds, "hidden": args.gmm_hidden, "wall_s": res.wall_seconds,
                          "teacher_nfe": res.teacher_nfe, "final_loss": sum(res.losses[-100:]) / len(res.losses[-100:])}
        students[name]["steps"] = n
        print(name, {k: round(v, 4) for k, v in errs.items()}, f"cpu {res.cpu_seconds:.0f}s", flush=True)
        save({"reference_check": ref_check, "ems_cpu_s": ems_cpu, "teachers": teachers, "students": students,
              "training_steps": n})
    return {"reference_check": ref_check, "ems_cpu_s": ems_cpu, "teachers": teachers, "students": students,
            "training_steps": n}


def digits_part(args: argparse.Namespace, save=lambda part: None) -> dict:
    from flowdiff.metrics import DigitsFeatureExtractor, digits_frechet_distance, load_digits_split
    from flowdiff.pipeline import load_field

    teacher, cfg = load_field(args.checkpoint)
    shape = tuple(cfg["data"]["shape"])
    split = load_digits_split()
    data, labels = split.train_images, split.train_labels
    held = split.test_images
    clf = DigitsFeatureExtractor.load_or_train()
    count = args.count
    x0 = teacher.path.prior_sample((count, *shape), generator=torch.Generator().manual_seed(0))
    floor = float(digits_frechet_distance(data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]],
                                          held, clf))

    def fid(x: torch.Tensor) -> float:
        return float(digits_frechet_distance(x.clamp(-1, 1), held, clf))

    teachers = {}
    for nfe in () if args.no_teacher else (1, 2, 4, 10, 20):
        row = {}
        for name in ["ddim", "dpm-solver++2m", "dpm-solver++3m", "unipc", "heun"]:
            try:
                row[name] = fid(fd.sample(teacher, x0, solver=name, nfe=nfe).x)
            except ValueError:
                pass
        teachers[nfe] = row
        print("teacher", nfe, {k: round(v, 2) for k, v in row.items()}, flush=True)
    n = args.digits_steps
    common = dict(labels=labels, steps=n, batch_size=args.digits_batch, lr=2e-4)
    recipes = {
        "CD": (False, lambda m: fd.flowmaps.consistency_distillation(teacher, m, data, bins=16, solver="heun", **common)),
        "FM-distill": (True, lambda m: fd.flowmaps.flow_map_distillation(teacher, m, data, bins=16, solver="heun",
                                                                        objective="self-consistency", **common)),
        "FM-default": (True, lambda m: fd.flowmaps.flow_map_distillation(teacher, m, data, **common)),
        "CT": (False, lambda m: fd.flowmaps.consistency_training(m, data, bins=(10, 40), target_ema=0.95, **common)),
    }
    students = {}
    for name, (two_time, train) in recipes.items():
        if args.only and name not in args.only:
            continue
        model = fd.flowmaps.student_from_teacher(teacher, two_time=two_time)
        init = {k: fid(fd.flowmaps.sample(model, x0, steps=k).x) for k in STEPS}
        res = train(model)
        model.eval()
        scores = {k: fid(fd.flowmaps.sample(model, x0, steps=k).x) for k in STEPS}
        students[name] = {"frechet": scores, "frechet_at_init": init, "cpu_s": res.cpu_seconds,
                          "wall_s": res.wall_seconds, "teacher_nfe": res.teacher_nfe}
        students[name]["steps"] = n
        print(name, "init", {k: round(v, 2) for k, v in init.items()}, "trained",
              {k: round(v, 2) for k, v in scores.items()}, f"cpu {res.cpu_seconds:.0f}s", flush=True)
        save({"floor": floor, "count": count, "teachers": teachers, "students": students, "training_steps": n,
              "batch": args.digits_batch, "checkpoint": str(args.checkpoint)})
    return {"floor": floor, "count": count, "teachers": teachers, "students": students, "training_steps": n,
            "batch": args.digits_batch, "checkpoint": str(args.checkpoint)}


def render(payload: dict) -> list[str]:
    lines = ["# Flow maps and consistency models: few-step quality against the teacher's solvers", ""]
    gmm = payload.get("gmm")
    if gmm:
        lines += [metadata_line(gmm["meta"]), "",
                  f"## Exact GMM (2-D, 4 anisotropic components): RMS error to the reference ODE solution "
                  f"(same noise, 2000 draws; reference vs UniPC-400: {gmm['reference_check']:.1e}); "
                  f"students trained {gmm['training_steps']} steps", ""]
        rows = []
        for name, s in gmm["students"].items():
            rows.append([name, *(f"{s['errors'][str(k)] if str(k) in s['errors'] else s['errors'][k]:.4f}" for k in STEPS),
                         s.get("steps", gmm["training_steps"]), f"{s['cpu_s']:.0f}", s["teacher_nfe"]])
        for nfe in STEPS if gmm["teachers"] else ():
            t = gmm["teachers"][str(nfe)] if str(nfe) in gmm["teachers"] else gmm["teachers"][nfe]
            best = min(t, key=t.get)
            cells = ["-"] * len(STEPS)
            cells[STEPS.index(nfe)] = f"{t[best]:.4f}"
            rows.append([f"teacher best at {nfe} NFE ({best})", *cells, "-", "-", "-"])
        t10 = gmm["teachers"].get("10", gmm["teachers"].get(10))
        if t10:
            best10 = min(t10, key=t10.get)
            rows.append([f"teacher best at 10 NFE ({best10}): {t10[best10]:.4f}", "", "", "", "-", "-", "-"])
        lines += markdown_table(["model", "1 step", "2 steps", "4 steps", "updates", "train CPU s", "teacher calls"], rows)
        for nfe in (2, 4, 10) if gmm["teachers"] else ():
            t = gmm["teachers"].get(str(nfe), gmm["teachers"].get(nfe))
            lines += ["", f"Teacher solvers at {nfe} NFE: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(t.items(), key=lambda kv: kv[1]))]
        lines += ["", f"DPM-Solver-v3 uses EMS estimated on the exact field ({gmm['ems_cpu_s']:.0f} CPU s).", ""]
    dig = payload.get("digits")
    if dig:
        lines += [metadata_line(dig["meta"]), "",
                  f"## Digits (teacher {dig['checkpoint']}): Fréchet distance of {dig['count']} samples to the 359 held-out "
                  f"digits (real-vs-real floor {dig['floor']:.1f}); students trained {dig['training_steps']} steps, "
                  f"batch {dig['batch']}", ""]
        rows = []
        for name, s in dig["students"].items():
            fr, init = s["frechet"], s["frechet_at_init"]
            rows.append([name, *(f"{fr.get(str(k), fr.get(k)):.1f} (init {init.get(str(k), init.get(k)):.1f})" for k in STEPS),
                         s.get("steps", dig["training_steps"]), f"{s['cpu_s']:.0f}", s["teacher_nfe"]])
        for nfe in (1, 2, 4, 10, 20) if dig["teachers"] else ():
            t = dig["teachers"].get(str(nfe), dig["teachers"].get(nfe))
            if t:
                best = min(t, key=t.get)
                rows.append([f"teacher best at {nfe} NFE ({best})", f"{t[best]:.1f}", "", "", "-", "-", "-"])
        lines += markdown_table(["model", "1 step", "2 steps", "4 steps", "updates", "train CPU s", "teacher calls"], rows)
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["gmm", "digits", "all"], default="gmm")
    parser.add_argument("--gmm-steps", type=int, default=3000)
    parser.add_argument("--gmm-hidden", type=int, default=128, help="width of the GMM students' MLP")
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--digits-batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=359)
    parser.add_argument("--checkpoint", default="/tmp/runs/digits")
    parser.add_argument("--only", nargs="*", help="student recipes to run (default all)")
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher rows (run them in another process)")
    parser.add_argument("--stem", default="flow_maps", help="results file stem (partial runs in parallel)")
    parser.add_argument("--merge", nargs="*", help="merge these results stems into flow_maps.{md,json} and exit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        payload = {}
        for stem in args.merge:
            part = json.loads((RESULTS / f"{stem}.json").read_text())
            for key, value in part.items():
                mine = payload.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, dict) and k == "students":  # a wider student is its own row
                        mine.setdefault(k, {}).update({(f"{n} (width {r['hidden']})" if r.get("hidden", 128) != 128 else n): r
                                                       for n, r in v.items()})
                    elif isinstance(v, dict) and k == "teachers":
                        mine.setdefault(k, {}).update(v)
                    elif k not in mine or k == "meta" and not mine.get("teachers"):
                        mine[k] = v
        text = render(payload)
        print("\n".join(text))
        write_results("flow_maps", text, payload)
        return
    old = RESULTS / f"{args.stem}.json"
    payload = json.loads(old.read_text()) if old.exists() else {}
    def saver(key: str, meta: dict):
        def save(part: dict) -> None:  # after every student: an interrupted run keeps its rows
            payload[key] = {"meta": meta, **part}
            write_results(args.stem, render(json.loads(json.dumps(payload, default=float))), payload)
        return save

    if args.part in ("gmm", "all"):
        meta = run_metadata(part="gmm", steps=args.gmm_steps)
        payload["gmm"] = {"meta": meta, **gmm_part(args, saver("gmm", meta))}
        write_results(args.stem, render(json.loads(json.dumps(payload, default=float))), payload)
    if args.part in ("digits", "all"):
        meta = run_metadata(part="digits", steps=args.digits_steps)
        payload["digits"] = {"meta": meta, **digits_part(args, saver("digits", meta))}
    payload = json.loads(json.dumps(payload, default=float))
    text = render(payload)
    print("\n".join(text))
    write_results(args.stem, text, payload)


if __name__ == "__main__":
    main()
