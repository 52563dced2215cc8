"""Reward steering on tilted Gaussian mixtures: every fd.steer method against the exact tilted target (issue 15).

For a mixture prior p and a reward Gaussian in a linear feature, the tilted law p·exp(r/β)/Z is a
mixture in closed form (``flowdiff.testing.tilted_mixture``). Each method runs on the exact VP
field (and, for one problem, on a small MLP trained on the prior) at several budgets of model
evaluations per returned sample; columns: mode-weight TV to the exact tilted target (and the
exact-sample floor at the same sample size), sliced W2 to the target, mean and max reward of the
returned samples (the target's mean reward E_p̃[r] is printed per problem), CPU seconds.

Problems: ``tilted_problem`` (one feature; the reward centred on a mode of prior weight 0.05)
in d = 2, 8, 16; and a harder one (``midpoint``): six anisotropic modes, the reward centred
between the two rarest modes in two features (the Tweedie twist is overconfident there).

Run: ``.venv/bin/python benchmarks/steer_gmm.py [--quick] [--part exact|trained|all]``. Writes
``benchmarks/results/steer_gmm.{md,json}`` (exact fields) and ``steer_gmm_trained.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.testing import GaussianMixture, mode_weight_tv, sliced_w2_to_mixture, tilted_mixture, tilted_problem

METHODS = ["smc", "bon", "beam", "rbf", "dps"]


def midpoint_problem(dim: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(100 + seed + 10 * dim)
    k = 6
    while True:
        means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 3.0
        if (torch.cdist(means, means) + 100 * torch.eye(k)).min() > 4.0:
            break
    scales = torch.exp(torch.empty(k, dim, dtype=torch.float64).uniform_(math.log(0.2), 0.0, generator=g))
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    w[0], w[1] = 0.03 * w.sum(), 0.06 * w.sum()
    prior = GaussianMixture(means, scales=scales, weights=w)
    A = torch.randn(2, dim, generator=g, dtype=torch.float64)
    b = A @ (0.5 * means[0] + 0.5 * means[1])
    return tilted_mixture(prior, A, b, scale=0.5 * float(A.norm(dim=1).mean()), temperature=1.0)


def train_mlp(prior: GaussianMixture, steps: int, seed: int = 0) -> fd.Field:
    """A small noise-prediction MLP trained on exact draws of ``prior`` (VP path)."""
    from flowdiff.nn import MLP

    torch.manual_seed(seed)
    path = prior.path
    net = MLP(prior.dim, hidden=128, depth=3, fourier_features=32, fourier_scale=0.3).double()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x1 = prior.sample(512, generator=g)
        t = torch.rand(512, generator=g, dtype=torch.float64) * (path.safe_interval[1] - 1e-4)
        eps = torch.randn(512, prior.dim, generator=g, dtype=torch.float64)
        xt = path.alpha(t)[:, None] * x1 + path.sigma(t)[:, None] * eps
        loss = ((net(xt, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return fd.Field(net, path, "noise")


def run(field, tilt, method, nfe, n, seed):
    t0, w0 = time.process_time(), time.perf_counter()
    res = fd.steer.sample(field, tilt.reward, method=method, num_samples=n, nfe=nfe, temperature=tilt.temperature,
                          generator=torch.Generator().manual_seed(seed), dtype=torch.float64, shape=(tilt.dim,))
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    x = res.x
    return {"method": method, "nfe": res.nfe, "tv": mode_weight_tv(x, tilt), "sw2": sliced_w2_to_mixture(x, tilt, 5000),
            "reward_mean": float(res.reward.mean()), "reward_max": float(res.reward.max()), "cpu_s": cpu,
            "wall_s": wall, "vjp": res.vjp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer budgets and samples")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--part", choices=["exact", "trained", "all"], default="all",
                        help="exact fields only (steer_gmm.*), the trained field only (steer_gmm_trained.*), or both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 200 if args.quick else args.samples
    budgets = [100, 1000] if args.quick else [100, 300, 1000]
    problems = [("d2 rare", tilted_problem(2, 4, seed=0, temperature=1.0)),
                ("d8 rare", tilted_problem(8, 4, seed=3, temperature=2.0)),
                ("d16 rare", tilted_problem(16, 4, seed=3, temperature=4.0)),
                ("d4 midpoint", midpoint_problem(4, 1))]
    payload = {"meta": run_metadata(samples=n, budgets=budgets), "rows": []}
    lines = ["# Reward steering on exact tilted Gaussian mixtures (fd.steer)", "", metadata_line(payload["meta"]), "",
             f"{n} returned samples per run; TV = mode-weight total variation to the exact tilted target; "
             "floor = TV of as many exact target draws; SW2 = sliced W2 to 5000 target draws.", ""]
    for name, tilt in (problems if args.part != "trained" else []):
        field = fd.Field(tilt.prior.model("noise"), tilt.prior.path, "noise")
        floor = mode_weight_tv(tilt.sample(n, generator=torch.Generator().manual_seed(7)), tilt)
        prior_tv = 0.5 * float((tilt.prior.weights - tilt.weights).abs().sum())
        head = (f"## {name} (exact field): prior weights {[round(v, 3) for v in tilt.prior.weights.tolist()]}, "
                f"tilted {[round(v, 3) for v in tilt.weights.tolist()]}; TV(prior, target) = {prior_tv:.3f}, "
                f"floor {floor:.3f}; E_target[r] = {tilt.expected_reward():.3f}, E_prior[r] = "
                f"{tilt.prior_expected_reward():.3f}")
        rows = []
        for nfe in budgets:
            for method in METHODS:
                r = run(field, tilt, method, nfe, n, seed=nfe)
                r.update(problem=name, field="exact", floor=floor)
                payload["rows"].append(r)
                rows.append([method, nfe, f"{r['tv']:.3f}", f"{r['sw2']:.3f}", f"{r['reward_mean']:.3f}",
                             f"{r['reward_max']:.2e}", f"{r['cpu_s']:.1f}"])
                print(name, rows[-1], flush=True)
        lines += [head, ""] + markdown_table(["method", "nfe/sample", "TV", "SW2", "mean r", "max r", "CPU s"], rows) + [""]
    if args.part != "trained":
        write_results("steer_gmm", "\n".join(lines), payload)
        print("\n".join(lines))
    if args.part == "exact":
        return
    payload = {"meta": payload["meta"], "rows": []}
    lines = ["# Reward steering with a trained 2-D field (fd.steer)", "", metadata_line(payload["meta"]), ""]
    # a small trained field on the 2-D problem
    tilt = problems[0][1]
    t0 = time.process_time()
    field = train_mlp(tilt.prior, 600 if args.quick else args.train_steps)
    train_cpu = time.process_time() - t0
    plain = fd.sample(field, field.path.prior_sample((4000, 2), generator=torch.Generator().manual_seed(1),
                                                     dtype=torch.float64), solver="dpm-solver++2m", nfe=50).x
    model_tv = mode_weight_tv(plain, tilt.prior)
    rows = []
    head = (f"## d2 rare, trained MLP ({args.train_steps if not args.quick else 600} Adam steps, {train_cpu:.0f} CPU s): "
            f"its plain samples' mode-weight TV to the prior = {model_tv:.3f} (the model's own error)")
    for method in ["smc", "bon", "rbf", "beam"]:
        r = run(field, tilt, method, 1000, n, seed=1)
        r.update(problem="d2 rare", field="trained MLP", model_prior_tv=model_tv)
        payload["rows"].append(r)
        rows.append([method, 1000, f"{r['tv']:.3f}", f"{r['sw2']:.3f}", f"{r['reward_mean']:.3f}",
                     f"{r['reward_max']:.2e}", f"{r['cpu_s']:.1f}"])
        print("trained", rows[-1], flush=True)
        part = lines + [head, ""] + markdown_table(["method", "nfe/sample", "TV", "SW2", "mean r", "max r", "CPU s"],
                                                   rows) + [""]
        write_results("steer_gmm_trained", "\n".join(part), payload)  # after every row
    lines += [head, ""] + markdown_table(["method", "nfe/sample", "TV", "SW2", "mean r", "max r", "CPU s"], rows) + [""]
    text = "\n".join(lines)
    print(text)
    write_results("steer_gmm_trained", text, payload)


if __name__ == "__main__":
    main()
