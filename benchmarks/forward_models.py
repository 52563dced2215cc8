"""Learning a prior from indirect observations: clean-trained vs naive vs EM (flowdiff.forward_models).

Three priors with the same network, loss and number of training updates:

* **clean**: trained on the unseen clean data (the target);
* **naive**: trained on the observations placed in data space (zero-filled masked images,
  minimum-norm back-projections :math:`A_i^+ y_i`);
* **EM**: :func:`flowdiff.forward_models.train_from_observations` (Rozet et al. 2024).

Problems: (a) 8 Gaussians on a ring (2-D), each point seen through one random 1-D projection,
σ_y = 0.05; (b) a 4-D Gaussian mixture, half the coordinates missing per point; (c) 8x8 digits,
half the pixels missing per image (random mask per image, known), σ_y = 0.02.
Metrics: sliced-W2 as a ratio to the data-vs-data floor; digits Fréchet distance
(``fd.metrics.digits_frechet_distance``) of 359 samples against the 359 held-out digits, next to
the floor (359 training digits against the same, mean of 4 draws). CPU seconds are
``time.process_time`` with one thread.

Run: ``OMP_NUM_THREADS=1 python benchmarks/forward_models.py [--skip-digits]``.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import torch

import flowdiff as fd
from flowdiff import forward_models as fm

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402


def sliced(a, b):
    return float(fd.metrics.sliced_wasserstein(a.double(), b.double(), num_projections=256,
                                               generator=torch.Generator().manual_seed(0)))


def draw(model, path, shape, n, nfe=32, seed=7):
    x0 = path.prior_sample((n, *shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return fd.sample(fd.Field(model, path, "data"), x0, nfe=nfe).x


def baseline(make, loss, data, steps, seed=2):
    model = make()
    ema = copy.deepcopy(model).requires_grad_(False)
    clock = time.process_time()
    fm.train_denoiser(model, loss, data, steps, ema=ema, generator=torch.Generator().manual_seed(seed))
    return ema, time.process_time() - clock


def run_problem(name, x, obs, make, loss, path, evaluate, rounds, steps_per_round, first, posterior_steps, solver):
    total = first + rounds * steps_per_round
    rows, per_round = [], []
    clock = time.process_time()
    res = fm.train_from_observations(
        make(), loss, obs, rounds=rounds, steps_per_round=steps_per_round, first_round_steps=first,
        posterior_steps=posterior_steps, solver=solver,
        callback=lambda rec, r: per_round.append((rec["round"], evaluate(r.ema_model))))
    em_seconds = time.process_time() - clock
    for label, data in (("clean", x), ("naive", obs.naive())):
        model, seconds = baseline(make, loss, data, total)
        rows.append((label, total, round(seconds), evaluate(model)))
    rows.append(("EM", total, round(em_seconds), per_round[-1][1]))
    print(name, rows, per_round, flush=True)
    return rows, per_round


def main(skip_digits: bool = False) -> None:
    torch.set_num_threads(1)
    meta = run_metadata()
    lines = [f"# Learning a prior from indirect observations (benchmarks/forward_models.py)", "",
             metadata_line(meta), ""]
    payload = {"meta": meta}
    path = fd.paths.Linear()

    # (a) ring from 1-D projections
    ang = torch.arange(8) * 2 * math.pi / 8
    ring = fd.testing.GaussianMixture(torch.stack([2 * torch.cos(ang), 2 * torch.sin(ang)], 1),
                                      scales=torch.full((8, 2), 0.25))
    problems = [("ring 2-D, one random 1-D projection per point, σ_y = 0.05", ring,
                 lambda x: fm.ProjectedObservations.simulate(x, rows=1, sigma_y=0.05,
                                                             generator=torch.Generator().manual_seed(1)), 1.5),
                ("mixture 4-D (4 components), half the coordinates missing per point, σ_y = 0.05",
                 fd.testing.random_mixture(4, 4, seed=3),
                 lambda x: fm.MaskedObservations.simulate(x, missing=0.5, sigma_y=0.05,
                                                          generator=torch.Generator().manual_seed(1)), 1.0)]
    for title, gm, observe, sd in problems:
        x = gm.sample(2000, generator=torch.Generator().manual_seed(0)).float()
        obs = observe(x)
        ref = gm.sample(4000, generator=torch.Generator().manual_seed(5)).float()
        floor = sliced(gm.sample(4000, generator=torch.Generator().manual_seed(6)).float(), ref)
        loss = fd.losses.GaussianPathLoss(path, "data", weighting="edm", time_sampler="logit-normal", sigma_data=sd)

        def make(d=x.shape[1], sd=sd):
            torch.manual_seed(0)
            return fd.nn.Preconditioned(fd.nn.MLP(d, hidden=128, depth=3), path, "data", sigma_data=sd)

        evaluate = lambda m, d=x.shape[1], ref=ref, floor=floor: round(sliced(draw(m, path, (d,), 4000), ref) / floor, 2)  # noqa: E731
        rows, per_round = run_problem(title, x, obs, make, loss, path, evaluate, rounds=15, steps_per_round=200,
                                      first=600, posterior_steps=32, solver="sde-dpm-solver++2")
        lines += [f"## {title}", "", "2000 observations; MLP 128×3, preconditioned data prediction, linear path; "
                  "E-step: MMPS, 1 CG iteration, sde-dpm-solver++2 at 32 evaluations.", ""]
        lines += markdown_table(["prior", "training updates", "CPU s", "sliced-W2 / floor"], rows)
        lines += ["", "EM by round (sliced-W2 / floor): " + ", ".join(f"{k}: {v}" for k, v in per_round), ""]
        payload[title] = {"rows": rows, "per_round": per_round, "floor": floor}

    if not skip_digits:
        split = fd.metrics.load_digits_split()
        x = split.train_images.float()
        held = split.test_images.float()
        obs = fm.MaskedObservations.simulate(x, missing=0.5, sigma_y=0.02, generator=torch.Generator().manual_seed(1))
        sd = 0.75
        loss = fd.losses.GaussianPathLoss(path, "data", weighting="edm", time_sampler="logit-normal", sigma_data=sd)

        def make():
            torch.manual_seed(0)
            return fd.nn.Preconditioned(fd.nn.MLP(64, hidden=256, depth=4, sample_shape=(1, 8, 8)), path, "data",
                                        sigma_data=sd)

        g = torch.Generator().manual_seed(3)
        floors = [float(fd.metrics.digits_frechet_distance(x[torch.randperm(len(x), generator=g)[:359]], held))
                  for _ in range(4)]
        floor = sum(floors) / len(floors)

        def evaluate(m):
            xs = draw(m, path, (1, 8, 8), 359, nfe=20).clamp(-1, 1)
            return round(float(fd.metrics.digits_frechet_distance(xs, held)) / floor, 2)

        rows, per_round = run_problem("digits", x, obs, make, loss, path, evaluate, rounds=8, steps_per_round=300,
                                      first=1000, posterior_steps=16, solver="sde-dpm-solver++2")
        title = "8x8 digits, half the pixels missing per image (random known mask), σ_y = 0.02"
        lines += [f"## {title}", "",
                  f"1438 training images; MLP 256×4, preconditioned data prediction (σ_d = 0.75), linear path; "
                  f"E-step: MMPS, 1 CG iteration, sde-dpm-solver++2 at 16 evaluations. Digits Fréchet distance "
                  f"of 359 samples (20 evaluations, clamped to [-1, 1]) against the 359 held-out digits, as a "
                  f"ratio to the floor {floor:.1f} (359 training digits, mean of 4 draws).", ""]
        lines += markdown_table(["prior", "training updates", "CPU s", "digits FD / floor"], rows)
        lines += ["", "EM by round (FD / floor): " + ", ".join(f"{k}: {v}" for k, v in per_round), ""]
        payload["digits"] = {"rows": rows, "per_round": per_round, "floor": floor}
    write_results("forward_models", lines, payload)
    print("\n".join(lines))


if __name__ == "__main__":
    main(skip_digits="--skip-digits" in sys.argv)
