"""Certified accuracy of smoothed digit classifiers (Cohen et al. 2019; Carlini et al. 2023; rRCM-style).

Held-out scikit-learn digits (the metrics' split: 359 held-out images), in ``[0, 1]`` units (the
model's ``[-1, 1]`` is ``2u - 1``, so smoothing noise sigma is 2 sigma in model units), certified with
CERTIFY at n0 = 100, n = --n (default 1000), alpha = 0.001 for sigma in {0.25, 0.5}:

* clean: the metrics' digits CNN (flowdiff.metrics.frechet.DigitsFeatureExtractor), no noise in training;
* gauss-aug: the same architecture trained on x + sigma eps (Cohen et al.'s baseline);
* dds: the clean CNN after the flowdiff digits model's one-shot denoiser at t*(sigma) (Carlini et al.);
* rrcm: the rRCM-style encoder (contrastive + consistency pre-training, noisy fine-tuning).

Certified accuracy at radii 0, 0.25, 0.5, 0.75, 1.0 (capped at sigma * Phi^-1(alpha^(1/n)): 0.61 for
sigma 0.25 and 1.23 for 0.5 at n = 1000), noisy classifier queries per second (wall, and per CPU second).

    python benchmarks/certify.py [--points 100] [--n 1000] [--run /tmp/runs/digits]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd  # noqa: E402
from flowdiff.metrics.frechet import DigitsFeatureExtractor, load_digits_split  # noqa: E402
from flowdiff.pipeline import load_field  # noqa: E402

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--run", default="/tmp/runs/digits")
    parser.add_argument("--stem", default="certify")
    args = parser.parse_args()
    torch.set_num_threads(1)

    split = load_digits_split()
    train_u, train_y = (split.train_images + 1) / 2, split.train_labels
    test_u, test_y = (split.test_images[: args.points] + 1) / 2, split.test_labels[: args.points]
    clean_net = DigitsFeatureExtractor.load_or_train()

    def in_unit_space(net):
        return lambda u: net(2 * u - 1)

    field, _ = load_field(args.run)
    rows, payload = [], {"meta": run_metadata(points=args.points, n=args.n, n0=args.n0, alpha=args.alpha), "results": []}
    for sigma in args.sigmas:
        t0 = time.process_time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            aug_net = DigitsFeatureExtractor()
        fd.certify.train_gaussian_augmentation(aug_net, split.train_images, train_y, 2 * sigma, epochs=30, seed=0)
        aug_cpu = time.process_time() - t0
        t0 = time.process_time()
        encoder = fd.certify.train_rrcm(train_u, train_y, sigma, pretrain_epochs=20, finetune_epochs=20, seed=0)
        rrcm_cpu = time.process_time() - t0
        methods = {
            "clean": (in_unit_space(clean_net), 0.0),
            "gauss-aug": (in_unit_space(aug_net), aug_cpu),
            "dds": (fd.certify.DenoisedClassifier(field, in_unit_space(clean_net), sigma, data_scale=2.0, data_shift=-1.0), 0.0),
            "rrcm": (encoder.classifier(sigma), rrcm_cpu),
        }
        for name, (classifier, train_cpu) in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            prediction, radius = fd.certify.certify(classifier, test_u, sigma=sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                                                    num_classes=10, generator=torch.Generator().manual_seed(0))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            accuracy = fd.certify.certified_accuracy(prediction, radius, test_y, RADII).tolist()
            queries = args.points * (args.n0 + args.n)
            result = {"sigma": sigma, "method": name, "certified_accuracy": dict(zip(map(str, RADII), accuracy)),
                      "abstain": float((prediction < 0).double().mean()), "queries_per_s": queries / wall,
                      "queries_per_cpu_s": queries / cpu, "wall_s": wall, "cpu_s": cpu, "train_cpu_s": train_cpu,
                      "radius_cap": fd.certify.radius_cap(sigma, args.n, args.alpha)}
            payload["results"].append(result)
            rows.append([sigma, name, *(f"{a:.3f}" for a in accuracy), f"{result['abstain']:.2f}",
                         f"{result['queries_per_s']:.0f}", f"{result['queries_per_cpu_s']:.0f}", f"{train_cpu:.0f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)

    header = ["sigma", "method", *(f"r={r}" for r in RADII), "abstain", "queries/s", "queries/CPU s", "train CPU s"]
    lines = [f"# Certified accuracy on held-out digits ({args.points} points, n0={args.n0}, n={args.n}, alpha={args.alpha})",
             "", metadata_line(payload["meta"]), "",
             "Inputs in [0, 1]; radii in the same units. Radius cap sigma*Phi^-1(alpha^(1/n)): "
             + ", ".join(f"{fd.certify.radius_cap(s, args.n, args.alpha):.2f} (sigma {s})" for s in args.sigmas) + ".", "",
             *markdown_table(header, rows)]
    print("\n".join(lines))
    write_results(args.stem, lines, payload)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.sigmas), figsize=(5 * len(args.sigmas), 3.5), squeeze=False)
        for ax, sigma in zip(axes[0], args.sigmas):
            for result in payload["results"]:
                if result["sigma"] == sigma:
                    ax.plot(RADII, list(result["certified_accuracy"].values()), marker="o", label=result["method"])
            ax.set_title(f"sigma = {sigma}")
            ax.set_xlabel("L2 radius")
            ax.set_ylabel("certified accuracy")
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{args.stem}.png", dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
