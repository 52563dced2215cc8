"""RL fine-tuning of a trained 2-D flow toward the exact tilted target p(x) exp(r(x)/β)/Z (fd.rl).

Prior: a 3-mode Gaussian mixture (means (-3, 0), (3, 0), (0, 3), std 0.5, weights 0.5/0.3/0.2). A small MLP
(velocity prediction, rectified-flow path) is trained on 20 000 draws of it. Reward: the log-density of the region
x₀ ≈ 3, r(x) = -(x₀ - 3)²/2 (GaussianFeatureReward), so the KL-regularised optimum at temperature β is the mixture
``flowdiff.testing.tilted_mixture(prior, A, b, scale=1, temperature=β)``, which moves the weight onto the mode (3, 0)
(0.98 at β = 1; the prior gives it 0.3).

Recipes (flowdiff.rl.finetune, all through the Trainer): Flow-GRPO (Liu et al. 2025), DanceGRPO (Xue et al. 2025),
G²RPO (Zhou et al. 2025), each at β ∈ {0.3, 1, 3}; at equal updates = equal rollouts (16 groups of 8, 10 steps,
2 PPO updates per rollout, lr 1e-2, clip 0.2). G²RPO's rollout spends more model evaluations (branches finished on
three grids); a Flow-GRPO run with as many groups as make its model-evaluation rows equal to G²RPO's is the
equal-compute comparison. One "exact objective" run: Flow-GRPO with the memoryless (reverse-diffusion) SDE, KL in the
reward and no std normalisation, the setting whose optimum is exactly the tilted target.

Metrics every 20 updates, on 4000 ODE samples (Heun, 30 evaluations, fixed noise) of the trained weights: mode-weight
TV to the tilted target (flowdiff.testing.mode_weight_tv), sliced W2 to it, mean reward; and the path KL to the
frozen reference (closed-form Gaussian KL of the SDE steps, summed, mean over the last rollout). CPU seconds are
``time.process_time`` with one thread.

Run: ``OMP_NUM_THREADS=1 python benchmarks/rl_gmm.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import flowdiff as fd
from flowdiff.rl import GaussianFeatureReward, GRPOConfig, RolloutSource, finetune
from flowdiff.testing import GaussianMixture, mode_frequencies, mode_weight_tv, sliced_w2_to_mixture, tilted_mixture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

PATH = fd.paths.Linear()
PRIOR = GaussianMixture([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], scales=[[0.5, 0.5]] * 3, weights=[0.5, 0.3, 0.2],
                        path=PATH)
A, B, SCALE = [[1.0, 0.0]], [3.0], 1.0
BASE = {"group_size": 8, "groups": 16, "num_steps": 10, "updates_per_rollout": 2, "clip_range": 0.2}


def pretrain(steps: int, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fd.nn.build_network("mlp", (2,), hidden=128, depth=3)
    data = PRIOR.sample(20_000, generator=torch.Generator().manual_seed(1)).float()
    loss = fd.losses.GaussianPathLoss(PATH, prediction="velocity")
    config = fd.train.TrainConfig(steps=steps, batch_size=256, lr=2e-3, warmup_steps=100, lr_schedule="cosine",
                                  ema_decay=0.995, checkpoint_every=None, log_every=500, output_dir=str(folder))
    trainer = fd.train.Trainer(model, loss, data, config, overwrite=True, progress=False)
    trainer.fit()
    return copy.deepcopy(trainer.ema_model).requires_grad_(True)


def draw(model: torch.nn.Module, n: int = 4000) -> torch.Tensor:
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return fd.sample(fd.Field(model, PATH, "velocity"), x, solver="heun", nfe=30).x.double()


def log_density(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log p(x) of the model's probability-flow ODE (fixed-step RK4, 40 evaluations, exact divergence)."""
    field = fd.Field(model, PATH, "velocity")
    return fd.log_likelihood(field, x.float(), solver="rk4", nfe=40).log_prob.double()


def evaluate(model: torch.nn.Module, tilt, reference: torch.nn.Module | None = None) -> dict[str, float]:
    x = draw(model)
    out = {"tv": mode_weight_tv(x, tilt), "sw2": sliced_w2_to_mixture(x, tilt, num_reference=4000, num_projections=64),
           "reward": float(tilt.reward(x).mean()), "w_target": float(mode_frequencies(x, tilt)[1])}
    if reference is not None:
        # KL(model || reference) and KL(model || tilted target) on 1000 of the ODE samples, with the model's and the
        # reference's ODE log-densities; the target's is exact.
        y = x[:1000]
        log_model = log_density(model, y)
        out["kl_ref"] = float((log_model - log_density(reference, y)).mean())
        out["kl_target"] = float((log_model - tilt.log_prob(y)).mean())
    return out


def model_rows(source: RolloutSource) -> int:
    """Model-evaluation rows (network calls × batch rows) of one rollout, policy and reference."""
    c = source.config
    n = c.groups * c.group_size
    if c.method != "g2rpo":
        sde = len(source._sde_steps())
        return n * c.num_steps + n * sde + n  # policy steps, reference on SDE steps, final denoise
    rows = c.groups * (c.num_steps - 1)
    for k in range(c.branches()):
        rows += 2 * n
        for stride in c.granularities:
            grid = list(range(k + 1, c.num_steps + 1, stride))
            if grid[-1] != c.num_steps:
                grid.append(c.num_steps)
            rows += n * len(grid)  # the ODE steps of the completion and its final denoise
    return rows


def run_one(name: str, pretrained: torch.nn.Module, beta: float, steps: int, every: int, folder: Path,
            **config) -> dict:
    tilt = tilted_mixture(PRIOR, torch.tensor(A), torch.tensor(B), scale=SCALE, temperature=beta)
    model = copy.deepcopy(pretrained)
    curve = [{"step": 0, **evaluate(model, tilt, pretrained), "kl": 0.0}]

    def callback(trainer, record):
        history = trainer.sampler.history
        last = record["step"] == steps
        curve.append({"step": record["step"], **evaluate(trainer.model, tilt, pretrained if last else None),
                      "kl": history[-1]["kl"]})

    cfg = GRPOConfig(**{**BASE, **config, "beta": beta})
    train = {"steps": steps, "lr": 1e-2, "ema_decay": 0.9, "checkpoint_every": None, "log_every": every,
             "output_dir": str(folder / f"{name}-{beta}"), "seed": 0}
    cpu, wall = time.process_time(), time.perf_counter()
    result = finetune(model, PATH, "velocity", GaussianFeatureReward(A, B, SCALE), cfg, train, data_shape=(2,),
                      overwrite=True, callbacks=(callback,))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    source = result.trainer.sampler
    rollouts = len(result.history)
    out = {"name": name, "method": cfg.method, "beta": beta, "curve": curve, "cpu_s": cpu, "wall_s": wall,
           "rollouts": rollouts, "reward_evals": rollouts * _reward_evals(cfg),
           "model_rows": rollouts * model_rows(source), "tilted_weight": float(tilt.weights[1]),
           "config": cfg.to_dict()}
    last = curve[-1]
    print(f"{name:<22} beta={beta:<4} TV {curve[0]['tv']:.3f} -> {last['tv']:.3f}  reward {last['reward']:.3f}  "
          f"KL {last['kl']:.3f}  w(3,0) {last['w_target']:.3f}/{tilt.weights[1]:.3f}  cpu {cpu:.0f}s", flush=True)
    return out


def _reward_evals(cfg: GRPOConfig) -> int:
    if cfg.method == "g2rpo":
        return cfg.groups * cfg.branches() * cfg.group_size * len(cfg.granularities)
    return cfg.groups * cfg.group_size



# ---------------------------------------------------------------------------------------------
# digits: the classifier's log-probability of a class as the reward
# ---------------------------------------------------------------------------------------------


class NullLabel(torch.nn.Module):
    """The class-conditional digits network with its null label (the unconditional model, 10 % label dropout)."""

    def __init__(self, network: torch.nn.Module, null: int):
        super().__init__()
        self.network, self.null = network, null

    def forward(self, x, t):
        return self.network(x, t, y=torch.full((x.shape[0],), self.null, dtype=torch.long, device=x.device))


def digits_part(run: Path, steps: int, every: int, folder: Path, label: int = 3) -> tuple[list[str], list[dict]]:
    """Fine-tune the digits model's unconditional (null-label) network toward r = log p(label | x): at β = 1 the
    tilted target p(x) p(label | x) / p(label) is the class-``label`` distribution itself."""
    from flowdiff.metrics import DigitsFeatureExtractor, digits_frechet_distance, load_digits_split
    from flowdiff.pipeline import load_field
    from flowdiff.rl import ClassifierReward

    field, _ = load_field(run, unlabeled="null")
    classifier = DigitsFeatureExtractor.load_or_train()
    split = load_digits_split()
    threes = split.train_images[split.train_labels == label]
    reward = ClassifierReward(classifier, label=label)
    floor = float(digits_frechet_distance(split.test_images[split.test_labels == label], threes, extractor=classifier))

    def evaluate(model):
        noise = torch.randn(359, 1, 8, 8, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            x = fd.sample(fd.Field(model, field.path, field.prediction), noise, nfe=20).x.clamp(-1, 1)
            logits = classifier(x)
        return {"reward": float(torch.log_softmax(logits, -1)[:, label].mean()),
                "fraction": float((logits.argmax(-1) == label).double().mean()),
                "frechet_all": float(digits_frechet_distance(x, split.test_images, extractor=classifier)),
                "frechet_class": float(digits_frechet_distance(x, threes, extractor=classifier))}

    results = []
    for name, config in (("flow-grpo", {"method": "flow-grpo"}), ("g2rpo", {"method": "g2rpo", "branch_steps": 3}),
                         ("exact-objective", {"method": "flow-grpo", "kl": "reward", "normalize_std": False,
                                              "diffusion": fd.paths.ReverseDiffusion(field.path, 5.0).config()})):
        network = copy.deepcopy(field.model)
        model = NullLabel(network, network.num_classes if hasattr(network, "num_classes") else
                          network.network.num_classes)
        curve = [{"step": 0, **evaluate(model), "kl": 0.0}]

        def callback(trainer, record):
            curve.append({"step": record["step"], **evaluate(trainer.model), "kl": trainer.sampler.history[-1]["kl"]})

        cfg = GRPOConfig(**{"group_size": 4, "groups": 8, "num_steps": 8, "updates_per_rollout": 1, "beta": 1.0,
                            **config})
        train = {"steps": steps, "lr": 1e-4, "ema_decay": None, "checkpoint_every": None, "log_every": every,
                 "output_dir": str(folder / f"digits-{name}"), "seed": 0}
        cpu = time.process_time()
        finetune(model, field.path, field.prediction, reward, cfg, train, data_shape=(1, 8, 8), overwrite=True,
                 callbacks=(callback,))
        cpu = time.process_time() - cpu
        results.append({"name": name, "curve": curve, "cpu_s": cpu, "config": cfg.to_dict()})
        print(f"digits {name:<16} reward {curve[0]['reward']:.3f} -> {curve[-1]['reward']:.3f}  class-{label} "
              f"fraction {curve[0]['fraction']:.2f} -> {curve[-1]['fraction']:.2f}  Frechet(all) "
              f"{curve[0]['frechet_all']:.1f} -> {curve[-1]['frechet_all']:.1f}  Frechet({label}s) "
              f"{curve[0]['frechet_class']:.1f} -> {curve[-1]['frechet_class']:.1f}  cpu {cpu:.0f}s", flush=True)
    lines = ["", f"## Digits: reward log p({label} | x) from the digits classifier, beta = 1", "",
             f"The run {run} (class-conditional UNet, 10 % label dropout) sampled with its null label (unconditional); "
             f"at beta = 1 the tilted target p(x) p({label}|x)/p({label}) is the class-{label} distribution. "
             f"359 samples (20 evaluations) every {every} updates; Frechet distances in the classifier's features to "
             f"the 359 held-out digits (all classes) and to the {len(threes)} training {label}s (floor: the held-out "
             f"{label}s against them, {floor:.1f}). Rollouts of 8 groups of 4, 8 steps, lr 1e-4.", ""]
    header = ["recipe", "update", "reward", f"fraction of {label}s", "Frechet (all digits)", f"Frechet ({label}s)",
              "path KL"]
    rows = [[r["name"], p["step"], f"{p['reward']:.3f}", f"{p['fraction']:.2f}", f"{p['frechet_all']:.1f}",
             f"{p['frechet_class']:.1f}", f"{p['kl']:.3f}"] for r in results for p in r["curve"]]
    lines += markdown_table(header, rows)
    lines += ["", "CPU seconds: " + ", ".join(f"{r['name']} {r['cpu_s']:.0f}" for r in results) + "."]
    return lines, results

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates and runs (a smoke test)")
    parser.add_argument("--digits", type=Path, default=None,
                        help="also (only) fine-tune the digits run in this folder with the classifier reward")
    parser.add_argument("--digits-steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, every = (20, 10) if args.quick else (100, 20)
    betas = (1.0,) if args.quick else (0.3, 1.0, 3.0)
    folder = Path(tempfile.mkdtemp(prefix="rl_gmm-"))
    if args.digits is not None:
        meta = run_metadata(benchmark="rl_gmm --digits", steps=args.digits_steps)
        lines, results = digits_part(args.digits, args.digits_steps, max(1, args.digits_steps // 4), folder)
        lines = ["# RL fine-tuning of the digits model (benchmarks/rl_gmm.py --digits)", "", metadata_line(meta), *lines]
        md, js = write_results("rl_digits", lines, {"meta": meta, "runs": results})
        print("\n".join(lines))
        print(f"wrote {md} and {js}")
        return
    cpu0 = time.process_time()
    pretrained = pretrain(600 if args.quick else 4000, folder / "pretrain")
    pre_x = draw(pretrained)
    pre_cpu = time.process_time() - cpu0
    pre_tv_prior = mode_weight_tv(pre_x, PRIOR)
    print(f"pretrained: mode-weight TV to the prior {pre_tv_prior:.3f} ({pre_cpu:.0f} CPU s)", flush=True)

    runs = []
    for beta in betas:
        for method in ("flow-grpo", "dance-grpo", "g2rpo"):
            runs.append(run_one(method, pretrained, beta, steps, every, folder, method=method))
    # equal model-evaluation rows: Flow-GRPO with as many groups as G²RPO's rollouts cost
    probe = {m: RolloutSource(pretrained, pretrained, PATH, "velocity", GaussianFeatureReward(A, B),
                              GRPOConfig(**{**BASE, "method": m}), data_shape=(2,)) for m in ("flow-grpo", "g2rpo")}
    factor = model_rows(probe["g2rpo"]) / model_rows(probe["flow-grpo"])
    groups = int(round(BASE["groups"] * factor / 4) * 4)
    runs.append(run_one("flow-grpo-equal-compute", pretrained, 1.0, steps, every, folder, method="flow-grpo",
                        groups=groups))
    memoryless = fd.paths.ReverseDiffusion(PATH, g_max=5.0).config()
    runs.append(run_one("flow-grpo-memoryless", pretrained, 1.0, steps, every, folder, method="flow-grpo",
                        diffusion=memoryless))
    for beta in betas:
        runs.append(run_one("exact-objective", pretrained, beta, steps, every, folder, method="flow-grpo",
                            kl="reward", normalize_std=False, diffusion=memoryless))
    total_cpu = time.process_time() - cpu0

    meta = run_metadata(benchmark="rl_gmm", steps=steps, cpu_seconds=total_cpu)
    lines = ["# RL fine-tuning toward the exact tilted target (benchmarks/rl_gmm.py)", "",
             metadata_line(meta), "",
             f"Pretrained flow: mode-weight TV {pre_tv_prior:.3f} to its prior (MLP 128x3, 4000 updates). "
             f"Reward r(x) = -(x0 - 3)^2/2; tilted weight of the mode (3, 0) per beta: "
             + ", ".join(f"beta={b:g}: {float(tilted_mixture(PRIOR, torch.tensor(A), torch.tensor(B), scale=SCALE, temperature=b).weights[1]):.3f}"
                         for b in betas) + " (prior 0.3).", "",
             "The optimum of each beta (the exact tilted target): "
             + "; ".join(f"beta={b:g}: E[r] = {t.expected_reward():.3f}, KL(target || prior) = {t.kl_to_prior():.3f}"
                         for b in betas
                         for t in [tilted_mixture(PRIOR, torch.tensor(A), torch.tensor(B), scale=SCALE, temperature=b)])
             + f". Pretrained E[r] = {float(tilted_mixture(PRIOR, torch.tensor(A), torch.tensor(B), scale=SCALE).reward(pre_x).mean()):.3f}.",
             "", f"## After {steps} updates ({steps // BASE['updates_per_rollout']} rollouts)", ""]
    header = ["recipe", "beta", "TV before", "TV after", "sliced W2", "reward", "KL(model‖ref)", "KL(model‖target) before → after",
              "rollout KL", "w(3,0) / tilted", "reward evals", "model rows", "CPU s"]
    rows = []
    for r in runs:
        first, last = r["curve"][0], r["curve"][-1]
        rows.append([r["name"], f"{r['beta']:g}", f"{first['tv']:.3f}", f"{last['tv']:.3f}", f"{last['sw2']:.3f}",
                     f"{last['reward']:.3f}", f"{last['kl_ref']:.3f}",
                     f"{first['kl_target']:.3f} → {last['kl_target']:.3f}", f"{last['kl']:.3f}",
                     f"{last['w_target']:.3f} / {r['tilted_weight']:.3f}",
                     r["reward_evals"], r["model_rows"], f"{r['cpu_s']:.0f}"])
    lines += markdown_table(header, rows)
    lines += ["", "## Mode-weight TV to the tilted target against updates", ""]
    steps_seen = [p["step"] for p in runs[0]["curve"]]
    lines += markdown_table(["recipe", "beta", *[str(s) for s in steps_seen]],
                            [[r["name"], f"{r['beta']:g}", *[f"{p['tv']:.3f}" for p in r["curve"]]] for r in runs])
    lines += ["", "## Rollout KL to the reference against updates", "",
              "Closed-form Gaussian KL of the policy's SDE steps to the reference's at the rollout's states, summed "
              "over the steps (Flow-GRPO, DanceGRPO) or of G²RPO's single branch step (mean over branch steps): what "
              "each recipe's KL penalty sees; the terminal KL(model‖ref) above is the comparable number.", ""]
    lines += markdown_table(["recipe", "beta", *[str(s) for s in steps_seen]],
                            [[r["name"], f"{r['beta']:g}", *[f"{p['kl']:.3f}" for p in r["curve"]]] for r in runs])
    lines += ["", f"Total {total_cpu:.0f} CPU s."]
    md, js = write_results("rl_gmm" + ("_quick" if args.quick else ""), lines, {"meta": meta, "runs": runs,
                                                                                 "pretrained_tv_prior": pre_tv_prior})
    print("\n".join(lines))
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
