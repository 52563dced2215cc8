"""Training recipes at equal CPU budget: paths x predictions x weightings x networks (issue 13).

Every recipe is trained through the library's own road (``flowdiff.pipeline.train_run``: the
Trainer, its EMA, warm-up + cosine schedule and gradient clipping) on one thread, for as many
steps as its CPU budget buys: a short calibration measures the CPU seconds per step of the
recipe's network, and ``steps = budget / seconds_per_step``. Then 500 (digits) or 2000 (2-D toys)
samples are drawn with ``fd.sample``'s default solver at 20 model evaluations and compared with
held-out data:

* 2-D toys (``checkerboard``, ``eight_gaussians``): sliced-W2 to the held-out split over the
  data-vs-data floor at the same size (``evaluate_samples``);
* digits: the Fréchet distance in the features of the project's digits CNN (500 samples against
  the 359 held-out digits, floor: 500 training digits against the same 359, mean of 8 draws), and
  the same in three feature spaces that are *not* the project's: the penultimate layer of an
  independently trained MLP classifier (64-256-128-10, trained here), the 20 leading principal
  components of the raw pixels and the pooled output of an untrained, fixed-seed conv net; plus the share of samples that classifier labels with
  confidence >= 0.9 over the same share on held-out digits.

A ratio of 1 is the floor: a generator as good as fresh real data.

Run: ``.venv/bin/python benchmarks/training_recipes.py --quick`` (a small grid, short budgets;
about 15 CPU minutes) or without ``--quick`` (the full grid; hours on one core). ``--only A,B``
runs the recipes whose name contains A or B. Writes ``benchmarks/results/training_recipes[_quick].{json,md}``.

``--checkpoint RUN`` instead measures one trained class-conditional digits model (e.g. the
README's ``runs/digits``) the way the issue checks it, with no training: 500 samples drawn as
``flowdiff sample`` draws them without ``--class`` (the stratified class mixture, ``fd.sample``'s
default solver at 20 NFE), and 50 samples per class at each ``--scales`` guidance scale; FD ratios
in the four feature spaces, the independent classifier's confidence ratio and, per scale, the
share of samples both classifiers put in the requested class. ``--seeds`` noise seeds each.
Writes ``benchmarks/results/training_recipes_guidance.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff import metrics as fdm
from flowdiff.data import load_dataset
from flowdiff.pipeline import evaluate_samples, generate, load_field, train_run

NFE = 20


@dataclass
class Recipe:
    name: str
    data: str
    path: str = "linear"
    prediction: str = "velocity"
    weighting: str = "none"
    time_sampler: str = "uniform"
    precondition: bool = False
    network: str = "mlp"
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    batch_size: int = 256
    ema_sigma_rel: float | None = None
    ema_decay: float = 0.999
    label_dropout: float = 0.0


def _grid(quick: bool) -> list[Recipe]:
    toys = ["checkerboard", "eight_gaussians"]
    mlp2 = {"hidden": 128, "depth": 3}
    mlp64 = {"hidden": 512, "depth": 4}
    unet = {"channels": [32, 64], "num_res_blocks": 1}
    recipes: list[Recipe] = []
    for data in toys:
        base = dict(data=data, network_kwargs=mlp2, lr=2e-3)
        recipes += [
            Recipe(f"{data}/linear-velocity", **base),
            Recipe(f"{data}/linear-data-precond-edm-logitnormal", prediction="data", precondition=True,
                   weighting="edm", time_sampler="logit-normal", **base),
            Recipe(f"{data}/vp-noise-minsnr", path="vp", prediction="noise", weighting="min-snr", **base),
            Recipe(f"{data}/vp-noise-precond-edm-logitnormal", path="vp", prediction="noise", precondition=True,
                   weighting="edm", time_sampler="logit-normal", **base),
        ]
        if not quick:
            recipes += [
                Recipe(f"{data}/edm-data-precond-edm-edmtime", path="edm", prediction="data", precondition=True,
                       weighting="edm", time_sampler="edm", **base),
                Recipe(f"{data}/linear-velocity-logitnormal", time_sampler="logit-normal", **base),
                Recipe(f"{data}/vp-v-snr", path="vp", prediction="v", weighting="snr", **base),
            ]
    digits = dict(data="digits")
    if not quick:
        # configs/digits.yaml: class-conditional, sampled as the stratified class mixture (generate's default).
        recipes.append(Recipe("digits/unet-cond/linear-data-precond-edm-logitnormal", prediction="data",
                              precondition=True, weighting="edm", time_sampler="logit-normal", network="unet",
                              network_kwargs=unet, label_dropout=0.1, **digits))
    recipes += [
        Recipe("digits/mlp/linear-velocity", network_kwargs=mlp64, **digits),
        Recipe("digits/mlp/linear-data-precond-edm-logitnormal", prediction="data", precondition=True,
               weighting="edm", time_sampler="logit-normal", network_kwargs=mlp64, **digits),
        Recipe("digits/unet/linear-data-precond-edm-logitnormal", prediction="data", precondition=True,
               weighting="edm", time_sampler="logit-normal", network="unet", network_kwargs=unet, **digits),
    ]
    if not quick:
        recipes += [
            Recipe("digits/mlp/vp-noise-minsnr", path="vp", prediction="noise", weighting="min-snr",
                   network_kwargs=mlp64, **digits),
            Recipe("digits/mlp/edm-data-precond-edm-edmtime", path="edm", prediction="data", precondition=True,
                   weighting="edm", time_sampler="edm", network_kwargs=mlp64, **digits),
            Recipe("digits/unet/linear-velocity", network="unet", network_kwargs=unet, **digits),
        ]
    return recipes


# ----------------------------------------------------------------------------------------------
# An independent digits classifier (not the project's CNN): features and confidence
# ----------------------------------------------------------------------------------------------


class IndependentClassifier(torch.nn.Module):
    """64-256-128-10 MLP on raw pixels with input noise; penultimate layer = features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(256, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.reshape(len(x), 64)))

    @classmethod
    def trained(cls, seed: int = 123) -> IndependentClassifier:
        torch.manual_seed(seed)
        model = cls()
        train = load_dataset("digits", split="train")
        x, y = train.x.reshape(-1, 64).float(), train.y
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
        for _ in range(300):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 128):
                idx = perm[i:i + 128]
                xb = x[idx] + 0.1 * torch.randn(len(idx), 64, generator=g)
                loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()


def random_conv_features(seed: int = 321) -> torch.nn.Module:
    """An untrained conv net (fixed seed): 8x8 -> 64 channels at 4x4 -> 256 pooled features.

    Random convolutional features carry no knowledge of digits at all, so a generator cannot have
    been tuned towards them; they still see local strokes and their arrangement.
    """
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    return net.eval().requires_grad_(False)


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(fdm.frechet_distance_from_features(a.double(), b.double()))


def digits_report(samples: torch.Tensor, classifier: IndependentClassifier, labels: torch.Tensor | None = None,
                  seed: int = 0) -> dict[str, float]:
    """FD ratios in four feature spaces, confidence ratio (and class agreement when ``labels``)."""
    fdm.frechet.DigitsFeatureExtractor.load_or_train(None)  # trains outside no_grad on first use
    samples = samples.float().clamp(-1, 1)
    train, held = load_dataset("digits", split="train"), load_dataset("digits", split="heldout")
    reference = held.x.float()
    n = len(samples)
    g = torch.Generator().manual_seed(seed + 7)
    draws = [train.x.float()[torch.randperm(len(train.x), generator=g)[:n]] for _ in range(8)]
    real = torch.cat([train.x, held.x]).reshape(-1, 64).double()
    mean = real.mean(0)
    components = torch.linalg.svd(real - mean, full_matrices=False)[2][:20].T
    rconv = random_conv_features()
    spaces = {
        "cnn": fdm.digits_frechet_distance,
        "mlp": lambda a, b: _fd(classifier.body(a.reshape(len(a), 64)), classifier.body(b.reshape(len(b), 64))),
        "pca": lambda a, b: _fd((a.reshape(len(a), 64).double() - mean) @ components,
                                (b.reshape(len(b), 64).double() - mean) @ components),
        "rconv": lambda a, b: _fd(rconv(a.reshape(len(a), 1, 8, 8).float()), rconv(b.reshape(len(b), 1, 8, 8).float())),
    }
    out: dict[str, float] = {"num_samples": float(n)}
    with torch.no_grad():
        for name, distance in spaces.items():
            value = float(distance(samples, reference))
            floor = float(np.mean([float(distance(d, reference)) for d in draws]))
            out[f"{name}_fd"], out[f"{name}_floor"], out[f"{name}_ratio"] = value, floor, value / floor

        def confident(z: torch.Tensor) -> float:
            return float((torch.softmax(classifier(z), -1).max(-1).values >= 0.9).float().mean())

        out["confident_samples"], out["confident_heldout"] = confident(samples), confident(reference)
        out["confidence_ratio"] = out["confident_samples"] / out["confident_heldout"]
        if labels is not None:
            out["class_agreement_independent"] = float((classifier(samples).argmax(-1) == labels).float().mean())
            cnn = fdm.frechet.DigitsFeatureExtractor.load_or_train(None)
            out["class_agreement_cnn"] = float((cnn(samples).argmax(-1) == labels).float().mean())
    return out


# ----------------------------------------------------------------------------------------------


def _steps_for_budget(recipe: Recipe, budget_s: float, workdir: Path) -> tuple[int, float]:
    """CPU seconds per step of the recipe (a 30-step run after a 10-step warm-up), and the steps the budget buys."""
    kwargs = _train_kwargs(recipe)
    train_run(**kwargs, steps=10, output_dir=workdir / "calibrate-warm", checkpoint_every=None, progress=False)
    start = time.process_time()
    train_run(**kwargs, steps=40, output_dir=workdir / "calibrate", checkpoint_every=None, progress=False)
    per_step = (time.process_time() - start) / 40
    return max(50, int(budget_s / per_step)), per_step


def _train_kwargs(recipe: Recipe) -> dict[str, Any]:
    return dict(data=recipe.data, path=recipe.path, prediction=recipe.prediction, network=recipe.network,
                network_kwargs=recipe.network_kwargs, weighting=recipe.weighting, time_sampler=recipe.time_sampler,
                precondition=recipe.precondition, lr=recipe.lr, batch_size=recipe.batch_size,
                ema_decay=recipe.ema_decay, ema_sigma_rel=recipe.ema_sigma_rel, warmup_steps=100,
                label_dropout=recipe.label_dropout, overwrite=True)


def run_recipe(recipe: Recipe, budget_s: float, classifier: IndependentClassifier | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        steps, per_step = _steps_for_budget(recipe, budget_s, workdir)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        train_run(**_train_kwargs(recipe), steps=steps, output_dir=workdir / "run", checkpoint_every=None, progress=False)
        train_cpu, train_wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
        field_, config = load_field(workdir / "run")
        shape = tuple(config["model"]["data_shape"])
        count = 500 if recipe.data == "digits" else 2000
        samples, nfe = generate(field_, count, shape, solver=None, nfe=NFE, seed=1)
    row: dict[str, Any] = {**asdict(recipe), "steps": steps, "cpu_s_per_step": per_step, "train_cpu_s": train_cpu,
                           "train_wall_s": train_wall, "nfe": nfe, "solver": fd.solvers.default_solver(field_, NFE)}
    if recipe.data == "digits":
        assert classifier is not None
        row.update(digits_report(samples, classifier))
    else:
        metrics = evaluate_samples(samples, recipe.data)
        row.update(sliced_w2=metrics["sliced_w2"], sliced_w2_floor=metrics["sliced_w2_floor"],
                   sliced_w2_ratio=metrics["sliced_w2_ratio_to_floor"])
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| recipe | steps | train CPU s | sliced-W2 ratio | FD ratio (our CNN) | FD ratio (indep. MLP) | FD ratio (pixel PCA) | FD ratio (random conv) | confidence ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['name']} | {r['steps']} | {r['train_cpu_s']:.0f} | {fmt(r, 'sliced_w2_ratio')} | "
                     f"{fmt(r, 'cnn_ratio')} | {fmt(r, 'mlp_ratio')} | {fmt(r, 'pca_ratio')} | {fmt(r, 'rconv_ratio')} | "
                     f"{fmt(r, 'confidence_ratio')} |")
    return "\n".join(lines)


def evaluate_checkpoint(run: Path, scales: list[float], seeds: list[int],
                        classifier: IndependentClassifier) -> list[dict[str, Any]]:
    """The issue's checks on a trained class-conditional digits model (see the module docstring)."""
    field_, config = load_field(run)
    shape = tuple(config["model"]["data_shape"])
    num_classes = fd.guidance.model_num_classes(field_.model)
    if num_classes is None:
        raise SystemExit(f"{run} is an unconditional model; --checkpoint needs a class-conditional one")
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        cpu = time.process_time()
        samples, nfe = generate(field_, 500, shape, solver=None, nfe=NFE, seed=seed)
        rows.append({"run": str(run), "guidance_scale": None, "seed": seed, "nfe": nfe, "sample_cpu_s": time.process_time() - cpu,
                     **digits_report(samples, classifier, seed=seed)})
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
        for scale in scales:
            cpu = time.process_time()
            per_class = [generate(field_, 50, shape, solver=None, nfe=NFE, seed=1000 * seed + k, label=k,
                                  guidance_scale=scale)[0] for k in range(num_classes)]
            labels = torch.arange(num_classes).repeat_interleave(50)
            rows.append({"run": str(run), "guidance_scale": scale, "seed": seed, "nfe": nfe,
                         "sample_cpu_s": time.process_time() - cpu,
                         **digits_report(torch.cat(per_class), classifier, labels=labels, seed=seed)})
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
    return rows


def _guidance_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| samples | noise seeds | FD ratio (our CNN) | FD ratio (indep. MLP) | FD ratio (pixel PCA) | FD ratio (random conv) "
             "| confidence ratio | class agreement (our CNN) | class agreement (indep. MLP) |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = ["cnn_ratio", "mlp_ratio", "pca_ratio", "rconv_ratio", "confidence_ratio", "class_agreement_cnn",
            "class_agreement_independent"]
    for scale in dict.fromkeys(r["guidance_scale"] for r in rows):
        group = [r for r in rows if r["guidance_scale"] == scale]
        cells = []
        for key in keys:
            values = [r[key] for r in group if key in r]
            if not values:
                cells.append("—")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        what = "500, class mixture (no --class)" if scale is None else f"50 per class, guidance scale {scale:g}"
        lines.append(f"| {what} | {','.join(str(r['seed']) for r in group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="measure this trained class-conditional digits run (no training; see the module docstring)")
    parser.add_argument("--scales", default="1,2,4", help="guidance scales for --checkpoint")
    parser.add_argument("--seeds", default="0", help="noise seeds for --checkpoint")
    parser.add_argument("--quick", action="store_true", help="small grid, short budgets")
    parser.add_argument("--toy-budget", type=float, default=None, help="CPU seconds of training per 2-D toy recipe")
    parser.add_argument("--digits-budget", type=float, default=None, help="CPU seconds of training per digits recipe")
    parser.add_argument("--only", default=None, help="run only the recipes whose name contains one of these comma-separated strings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checkpoint is not None:
        scales = [float(w) for w in args.scales.split(",") if w]
        seeds = [int(w) for w in args.seeds.split(",") if w]
        rows = evaluate_checkpoint(args.checkpoint, scales, seeds, IndependentClassifier.trained())
        meta = run_metadata(checkpoint=str(args.checkpoint), nfe=NFE)
        table = _guidance_table(rows)
        write_results("training_recipes_guidance",
                      f"# A trained class-conditional digits model, measured as issue 13 checks it\n\n"
                      f"Run `{args.checkpoint}`; `fd.sample`'s default solver at {NFE} NFE; FD ratios to the "
                      f"real-vs-real floor (500 training digits vs the 359 held-out, mean of 8 draws); confidence "
                      f"ratio: share of samples the independent classifier labels with max-softmax >= 0.9 over the "
                      f"same share on held-out digits. Run on {metadata_line(meta)}\n\n" + table + "\n",
                      {"meta": meta, "rows": rows}, indent=2)
        print(table)
        return
    toy_budget = args.toy_budget or (20.0 if args.quick else 60.0)
    digits_budget = args.digits_budget or (120.0 if args.quick else 600.0)
    wanted = None if args.only is None else [w for w in args.only.split(",") if w]
    recipes = [r for r in _grid(args.quick) if wanted is None or any(w in r.name for w in wanted)]
    classifier = IndependentClassifier.trained() if any(r.data == "digits" for r in recipes) else None
    suffix = "_quick" if args.quick else ""
    rows: list[dict[str, Any]] = []
    for recipe in recipes:
        budget = digits_budget if recipe.data == "digits" else toy_budget
        row = run_recipe(recipe, budget, classifier)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("network_kwargs",)}), flush=True)
        meta = run_metadata(budget_cpu_s={"toys": toy_budget, "digits": digits_budget}, nfe=NFE)
        write_results(
            f"training_recipes{suffix}",
            f"# Training recipes at equal CPU budget ({'quick' if args.quick else 'full'} grid)\n\n"
            f"Budget per recipe: {toy_budget:.0f} CPU s (2-D toys), {digits_budget:.0f} CPU s (digits), one thread; "
            f"`fd.sample` default solver at {NFE} NFE; ratios are to the data-vs-data floor at the same size "
            f"(1 = as good as fresh real data). Run on {metadata_line(meta)}\n\n" + _table(rows) + "\n",
            {"meta": meta, "rows": rows},
            indent=2,
        )
    print(_table(rows))


if __name__ == "__main__":
    main()
