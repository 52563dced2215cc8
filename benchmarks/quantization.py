"""Post-training quantisation of the digits UNet and a 2-D model (PTQ4DM, Shang et al. 2023; Q-Diffusion, Li et al. 2023).

For the trained digits UNet (``--run``, data prediction, linear path) and the 2-D checkerboard MLP
(``--run2d``, velocity prediction), sampled with deterministic DDIM at ``--nfe`` steps:

* per-call relative error of the quantised prediction along fresh full-precision trajectories (the
  model's own output and the noise prediction), worst and mean over calls;
* same-noise deviation of the deterministic samples, RMS(x_q - x_fp);
* sample quality over ``--seeds`` noise seeds: the digits Fréchet distance (the metrics' CNN
  features, ``--samples`` samples against the 359 held-out images) or the sliced-W2 to the
  held-out 2-D points; full precision's seed-to-seed spread is the yardstick;

for full precision, W8A8 single-step (the middle call), W8A8 PTQ4DM (NDTC, mu = sigma = 0.4),
W8A8 uniform, W4A8 uniform without and with block reconstruction (BRECQ/AdaRound/QDrop, split
shortcuts). Calibration: ``--calib`` trajectories, one pair each. Then the W8A8 NDTC model on
PyTorch's int8 kernels: file size (integer codes vs float32 checkpoint), in-memory state size,
CPU latency of one forward pass on a batch against float32 and fake quantisation, and the int8
model's own Fréchet/sliced-W2.

    python benchmarks/quantization.py [--run /tmp/runs/digits] [--run2d runs/demo]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402
from flowdiff.data import load_dataset  # noqa: E402
from flowdiff.metrics import sliced_wasserstein  # noqa: E402
from flowdiff.metrics.frechet import DigitsFeatureExtractor, digits_frechet_distance, load_digits_split  # noqa: E402
from flowdiff.pipeline import load_field  # noqa: E402

CONFIGS = {
    "W8A8 single": {"bits": 8, "calibration": "single"},
    "W8A8 ndtc": {"bits": 8, "calibration": "ndtc"},
    "W8A8 uniform": {"bits": 8, "calibration": "uniform"},
    "W4A8 uniform": {"bits": 4, "calibration": "uniform", "reconstruction": False},
    "W4A8 uniform+recon": {"bits": 4, "calibration": "uniform", "reconstruction": True},
}


def sample(field, shape, count, seed, nfe):
    device = torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = field.path.prior_sample((count, *shape), generator=generator, dtype=torch.float32, device=device)
    with torch.no_grad():
        return fd.sample(field, noise, solver="ddim", nfe=nfe).x


def latency(model, x, t, repeats=20):
    with torch.no_grad():
        model(x, t)
        start = time.process_time()
        for _ in range(repeats):
            model(x, t)
    return (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/runs/digits")
    parser.add_argument("--run2d", default=str(Path(__file__).resolve().parents[1] / "runs" / "demo"))
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--recon-iters", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--stem", default="quantization")
    args = parser.parse_args()
    torch.set_num_threads(1)

    extractor = DigitsFeatureExtractor.load_or_train()
    held_digits = load_digits_split().test_images
    held_2d = load_dataset("checkerboard", split="heldout", seed=0).x.float()

    def quality(name, samples):
        if name == "digits":
            return float(digits_frechet_distance(samples.float(), held_digits, extractor=extractor))
        return float(sliced_wasserstein(samples.double(), held_2d.double(), num_projections=512,
                                        generator=torch.Generator().manual_seed(0)))

    problems = {"digits": (args.run, (1, 8, 8), "digits Fréchet"), "2d": (args.run2d, (2,), "sliced-W2")}
    meta = run_metadata(nfe=args.nfe, samples=args.samples, seeds=args.seeds, calib=args.calib)
    payload, rows, int8_rows = {"meta": meta, "results": [], "int8": []}, [], []
    for problem, (run, shape, metric) in problems.items():
        if args.only and problem not in args.only:
            continue
        field, _ = load_field(run)
        fp_quality = [quality(problem, sample(field, shape, args.samples, seed, args.nfe)) for seed in args.seeds]
        fp_mean = sum(fp_quality) / len(fp_quality)
        fp_spread = (max(fp_quality) - min(fp_quality))
        record = {"problem": problem, "config": "FP32", "quality": fp_quality, "metric": metric}
        payload["results"].append(record)
        rows.append([problem, "FP32", "-", "-", "-", "-", "-",
                     f"{fp_mean:.4g} (range {min(fp_quality):.4g}-{max(fp_quality):.4g})", "-"])
        print(rows[-1], flush=True)
        quantized_fields = {}
        for name, config in CONFIGS.items():
            cpu = time.process_time()
            qfield = fd.quant.quantize(field, config["bits"], calibration=config["calibration"], shape=shape,
                                       num_samples=args.calib, solver="ddim", nfe=args.nfe,
                                       reconstruction=config.get("reconstruction"), reconstruction_iters=args.recon_iters)
            cpu = time.process_time() - cpu
            quantized_fields[name] = qfield
            report = fd.quant.quantization_report(field, qfield, shape, num_samples=128, solver="ddim", nfe=args.nfe)
            q_quality = [quality(problem, sample(qfield, shape, args.samples, seed, args.nfe)) for seed in args.seeds]
            q_mean = sum(q_quality) / len(q_quality)
            record = {"problem": problem, "config": name, "calibration_cpu_s": cpu, "quality": q_quality, "metric": metric,
                      **{k: v for k, v in report.items()}}
            payload["results"].append(record)
            rows.append([problem, name, f"{report['worst_relative_error_prediction']:.2e}",
                         f"{report['mean_relative_error_prediction']:.2e}", f"{report['worst_relative_error']:.2e}",
                         f"{report['mean_relative_error']:.2e}", f"{report['sample_rms_deviation']:.4f}",
                         f"{q_mean:.4g} (range {min(q_quality):.4g}-{max(q_quality):.4g}; vs FP {q_mean - fp_mean:+.3g})",
                         f"{cpu:.1f}"])
            print(rows[-1], flush=True)

        # Real int8 inference of the W8A8 NDTC model.
        qfield = quantized_fields["W8A8 ndtc"]
        int8_model, info = fd.quant.to_int8(qfield.model)
        int8_field = fd.Field(int8_model, field.path, field.prediction)
        batch = 256
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(5))
        t = torch.full((batch,), 0.5)
        with tempfile.TemporaryDirectory() as folder:
            fp_file, q_file = Path(folder) / "fp.pt", Path(folder) / "q.pt"
            torch.save(field.model.state_dict(), fp_file)
            fd.quant.save_quantized(qfield.model, q_file)
            fp_size, q_size = fp_file.stat().st_size, q_file.stat().st_size
        with torch.no_grad():
            deviation = float(((int8_model(x, t) - qfield.model(x, t)).pow(2).mean() / qfield.model(x, t).pow(2).mean()).sqrt())
        int8_quality = quality(problem, sample(int8_field, shape, args.samples, args.seeds[0], args.nfe))
        timing = {"fp32": latency(field.model, x, t), "fake-quant": latency(qfield.model, x, t),
                  "int8": latency(int8_model, x, t)}
        entry = {"problem": problem, "converted_layers": info["converted"], "kept_fake": info["kept_fake"],
                 "engine": info["engine"], "fp32_file_bytes": fp_size, "quantized_file_bytes": q_size,
                 "fp32_state_bytes": fd.quant.model_bytes(field.model), "int8_state_bytes": fd.quant.model_bytes(int8_model),
                 "latency_cpu_s": timing, "int8_vs_fake_relative_rms": deviation, "int8_quality": int8_quality,
                 "batch": batch}
        payload["int8"].append(entry)
        int8_rows.append([problem, f"{info['converted']}/{info['converted'] + len(info['kept_fake'])}", info["engine"],
                          f"{fp_size / 1e3:.0f} kB", f"{q_size / 1e3:.0f} kB", f"{entry['int8_state_bytes'] / 1e3:.0f} kB",
                          f"{timing['fp32'] * 1e3:.1f}", f"{timing['fake-quant'] * 1e3:.1f}", f"{timing['int8'] * 1e3:.1f}",
                          f"{deviation:.3f}", f"{int8_quality:.4g}"])
        print(int8_rows[-1], flush=True)

    header = ["model", "config", "worst rel. err (own pred.)", "mean rel. err (own pred.)", "worst rel. err (noise)",
              "mean rel. err (noise)", "same-noise RMS dev.", "quality: digits Fréchet / 2-D sliced-W2 (mean over seeds)",
              "calibration CPU s"]
    int8_header = ["model", "int8 layers", "engine", "FP32 file", "quantised file (codes)", "int8 state",
                   f"FP32 ms/batch", "fake-quant ms/batch", "int8 ms/batch", "int8 vs fake rel. RMS", "int8 quality (seed 0)"]
    lines = ["# Post-training quantisation (DDIM, {} steps; {} samples x seeds {}; {} calibration trajectories)".format(
                 args.nfe, args.samples, args.seeds, args.calib),
             "", metadata_line(meta), "", *markdown_table(header, rows), "",
             f"## Real int8 inference of W8A8 NDTC (PyTorch quantised kernels; CPU ms per forward of a batch of 256)", "",
             *markdown_table(int8_header, int8_rows)]
    print("\n".join(lines))
    write_results(args.stem, lines, payload)


if __name__ == "__main__":
    main()
