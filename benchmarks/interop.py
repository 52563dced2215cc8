"""flowdiff's solvers on a diffusers model against diffusers' own scheduler loops, side by side.

One randomly initialised ``UNet2DModel`` (weights do not matter: the question is whether the two
loops compute the same thing), the same initial noise, and for each prediction type
(``epsilon``, ``sample``, ``v_prediction``) and step count:

* ``DDIMScheduler`` (η = 0, ``timestep_spacing="leading"``, ``set_alpha_to_one``) against
  ``fd.sample(field, x, **fd.interop.sample_kwargs(scheduler))`` (solver ``ddim``);
* ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M), ``linspace``, ``final_sigmas_type="zero"``)
  against ``dpm-solver++2m``;
* ``FlowMatchEulerDiscreteScheduler`` (shift 3) against ``euler`` on the linear path (velocity
  model; one row, the prediction type does not apply).

Columns: the largest absolute difference of the final samples, the same relative to the
largest |sample| (float32 round-off is ~1e-7 per operation), the model calls of each, and the
wall time of one sampling loop (the minimum over ``--repeats`` runs, interleaved), model calls
included; then the loops' own cost per step, measured with a zero-cost network. Run: ``.venv/bin/python benchmarks/interop.py`` (about 30 s on one CPU thread);
writes ``benchmarks/results/interop.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402


def build_unet(diffusers, size: int):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


@torch.no_grad()
def diffusers_loop(unet, scheduler, x):
    calls = 0
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        calls += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, calls


@torch.no_grad()
def flowdiff_loop(field, kwargs, x):
    res = fd.sample(field, x, **kwargs)
    return res.x, res.nfe


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    unet = build_unet(diffusers, args.size)
    x0 = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    cases = []
    for prediction in ("epsilon", "sample", "v_prediction"):
        cases.append(("DDIM", prediction, lambda p=prediction: diffusers.DDIMScheduler(prediction_type=p, clip_sample=False)))
        cases.append(("DPM-Solver++(2M)", prediction,
                      lambda p=prediction: diffusers.DPMSolverMultistepScheduler(prediction_type=p)))
    cases.append(("FlowMatch Euler (shift 3)", "flow", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)))

    rows, records = [], []
    for name, prediction, make in cases:
        for steps in args.steps:
            scheduler = make()
            scheduler.set_timesteps(steps)
            field = fd.interop.from_diffusers(unet, scheduler)
            kwargs = fd.interop.sample_kwargs(scheduler)
            # interleave: diffusers, flowdiff, diffusers, ... (set_timesteps resets the multistep state)
            t_ref, t_fd = float("inf"), float("inf")
            for _ in range(args.repeats):
                scheduler.set_timesteps(steps)
                (ref, ref_calls), t = timed(lambda: diffusers_loop(unet, scheduler, x0.clone()), 1)
                t_ref = min(t_ref, t)
                (got, nfe), t = timed(lambda: flowdiff_loop(field, kwargs, x0.clone()), 1)
                t_fd = min(t_fd, t)
            abs_err = float((got - ref).abs().max())
            rel_err = abs_err / float(ref.abs().max())
            record = {"scheduler": name, "prediction": prediction, "steps": steps, "flowdiff_solver": kwargs["solver"],
                      "max_abs_diff": abs_err, "max_rel_diff": rel_err, "max_abs_sample": float(ref.abs().max()),
                      "diffusers_calls": ref_calls, "flowdiff_nfe": nfe, "diffusers_s": t_ref, "flowdiff_s": t_fd}
            records.append(record)
            rows.append([name, prediction, steps, kwargs["solver"], f"{abs_err:.2g}", f"{rel_err:.2g}",
                         f"{ref_calls} / {nfe}", f"{1e3 * t_ref:.1f}", f"{1e3 * t_fd:.1f}"])
            print(rows[-1], flush=True)

    # the loops' own cost: the same runs with a zero-cost network (it returns a fixed tensor)
    fixed = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))

    class ZeroCost(torch.nn.Module):
        def forward(self, x, t):
            return SimpleNamespace(sample=fixed)

    stub, overhead_rows, overhead = ZeroCost(), [], []
    steps = max(args.steps)
    for name, make in (("DDIM", lambda: diffusers.DDIMScheduler(clip_sample=False)),
                       ("DPM-Solver++(2M)", lambda: diffusers.DPMSolverMultistepScheduler()),
                       ("FlowMatch Euler (shift 3)", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))):
        scheduler = make()
        field = fd.interop.from_diffusers(stub, scheduler)
        kwargs = fd.interop.sample_kwargs(scheduler, steps)
        t_ref = t_fd = float("inf")
        for _ in range(10 * args.repeats):
            scheduler.set_timesteps(steps)
            t_ref = min(t_ref, timed(lambda: diffusers_loop(stub, scheduler, x0.clone()), 1)[1])
            t_fd = min(t_fd, timed(lambda: flowdiff_loop(field, kwargs, x0.clone()), 1)[1])
        overhead.append({"scheduler": name, "steps": steps, "diffusers_us_per_step": 1e6 * t_ref / steps,
                         "flowdiff_us_per_step": 1e6 * t_fd / steps})
        overhead_rows.append([name, steps, f"{1e6 * t_ref / steps:.0f}", f"{1e6 * t_fd / steps:.0f}"])
        print(overhead_rows[-1], flush=True)

    meta = run_metadata(batch=args.batch, size=args.size, repeats=args.repeats)
    lines = [
        "# flowdiff solvers on a diffusers UNet vs diffusers' scheduler loops",
        "",
        f"Random `UNet2DModel` (channels (16, 32), attention in the second block, {args.size}x{args.size}x3, "
        f"batch {args.batch}), float32, same initial noise. `fd.sample(fd.interop.from_diffusers(unet, scheduler), x, "
        "**fd.interop.sample_kwargs(scheduler))` against the scheduler's `set_timesteps` + `step` loop. "
        "Relative difference: max |flowdiff − diffusers| / max |diffusers sample|. Wall time: one whole loop, "
        f"minimum of {args.repeats} interleaved runs.",
        "",
        f"Run: {metadata_line(meta)}",
        "",
        *markdown_table(["scheduler", "prediction", "steps", "flowdiff solver", "max abs diff", "max rel diff",
                         "model calls (diffusers / flowdiff)", "diffusers ms", "flowdiff ms"], rows),
        "",
        "The loops' own cost per step (everything but the network: a zero-cost network returns a fixed tensor; "
        f"minimum of {10 * args.repeats} runs):",
        "",
        *markdown_table(["scheduler", "steps", "diffusers µs/step", "flowdiff µs/step"], overhead_rows),
    ]
    md, js = write_results("interop", lines, {"meta": meta, "rows": records, "overhead": overhead})
    print("\n".join(lines))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
