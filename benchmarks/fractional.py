"""MA-fBM checks (Daems et al., ICLR 2024, "Variational Inference for SDEs Driven by Fractional Noise").

(a) fOU bridge: prior dX = σ dB̂^H (θ = 0, type I, K = 5, γ_max = 20, ω on T = 6), X(0) = 0, one observation
    X(2) = 0 with noise 0.1 (the paper's bridge). The variational posterior with a plain control network
    (tanh MLP on (sin t, cos t, x, y), learned initial Y(0) law) is trained by the ELBO; its posterior std at
    t = 0.5, 1, 1.5 (2000 paths) is compared with the analytic GP posterior of the MA-fBM-driven process (exact
    for the model) and of true fBM. The ELBO-optimal guided control (no training) is shown beside it.
(b) Hurst recovery: P simulated fOU paths (θ = 1, σ = 1, exact fGn), observed at N times with noise 0.1; a
    FractionalSDE with learnable H, σ, θ (type I, K = 8, γ_max = 200) fitted by the ELBO (guided posterior,
    graded grid), started at H = 0.5; beside it the exact-likelihood (Kalman) fit of the same model and the
    variogram estimate on the noise-free paths.

Run: python benchmarks/fractional.py [--quick]. Writes benchmarks/results/fractional.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import flowdiff as fd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, metadata_line, run_metadata, write_results  # noqa: E402

F = fd.fractional
D64 = torch.float64
HURSTS = (0.3, 0.5, 0.7)


def bridge(hurst: float, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sde = F.FractionalSDE(hurst).double()
    times, obs = torch.tensor([2.0], dtype=D64), torch.zeros(1, 1, dtype=D64)
    q = torch.tensor([0.5, 1.0, 1.5], dtype=D64)
    _, std_model = F.gp_posterior(sde.fbm().covariance, times, q, 0.1)
    _, std_fbm = F.gp_posterior(lambda s, t: F.fbm_covariance(s, t, hurst), times, q, 0.1)
    exact = float(F.log_likelihood(sde, times, obs, 0.1, dt=0.02))

    def measure(post):
        with torch.no_grad():
            res = F.elbo(sde, post, times, obs, 0.1, num_samples=2000, dt=0.02, return_paths=True, generator=gen)
        idx = [int((res.times - v).abs().argmin()) for v in q]
        return res.paths[:, 0, idx, 0].std(0), float(res.elbo)

    net = F.VariationalPosterior(sde, hidden=64, depth=2).double()
    start = time.process_time()
    hist = F.fit(sde, net, times, obs, 0.1, steps=steps, lr=3e-3, num_samples=32, dt=0.02, generator=gen)
    cpu = time.process_time() - start
    std_net, elbo_net = measure(net)
    std_guide, elbo_guide = measure(F.VariationalPosterior(sde, control=None, guide=True))
    both = F.VariationalPosterior(sde, hidden=64, depth=2, guide=True).double()  # network residual on the guide
    start = time.process_time()
    F.fit(sde, both, times, obs, 0.1, steps=steps, lr=3e-3, num_samples=32, dt=0.02, generator=gen)
    cpu_both = time.process_time() - start
    std_both, elbo_both = measure(both)
    return {
        "hurst": hurst, "query": q.tolist(), "std_gp_mafbm": std_model.tolist(), "std_gp_fbm": std_fbm.tolist(),
        "std_network": std_net.tolist(), "std_guided": std_guide.tolist(), "std_guided_network": std_both.tolist(),
        "rel_err_guided_network": (std_both / std_model - 1).tolist(), "elbo_guided_network": elbo_both,
        "train_cpu_s_guided_network": cpu_both,
        "rel_err_network": (std_net / std_model - 1).tolist(), "rel_err_guided": (std_guide / std_model - 1).tolist(),
        "elbo_network": elbo_net, "elbo_guided": elbo_guide, "log_likelihood": exact, "train_cpu_s": cpu,
        "train_steps": steps, "final_train_elbo": hist.elbo[-1],
    }


def hurst_fit(hurst: float, steps: int, seed: int, paths: int, num_obs: int, t_end: float, init: str = "0.5") -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    grid, x = F.simulate_fou(paths, num_obs, t_end, hurst, theta=1.0, sigma=1.0, generator=gen)
    obs = (x[:, 1:] + 0.1 * torch.randn(paths, num_obs, dtype=D64, generator=gen))[..., None]
    times = grid[1:]
    variogram = F.estimate_hurst(x, max_lag=3)

    h0 = variogram if init == "variogram" else float(init)

    def model():
        return F.FractionalSDE(h0, theta=0.5, num_processes=8, gamma_max=200.0, horizon=t_end,
                               learn_hurst=True, learn_sigma=True, learn_theta=True).double()

    sde = model()
    post = F.VariationalPosterior(sde, control=None, guide=True)
    hist = F.fit(sde, post, times, obs, 0.1, steps=steps, lr=0.05, num_samples=4, dt=0.05, refine=0.1, generator=gen)
    tail = hist.hurst[-max(1, steps // 4):]
    h_elbo = sum(tail) / len(tail)  # average of the last quarter of the iterates (Polyak)

    mle = model()
    opt = torch.optim.Adam([p for p in mle.parameters() if p.requires_grad], lr=0.05)
    start = time.process_time()
    for _ in range(150):
        loss = -F.log_likelihood(mle, times, obs, 0.1, dt=0.05).sum() / obs.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mle_cpu = time.process_time() - start
    return {
        "hurst": hurst, "h_init": h0, "h_elbo": h_elbo, "h_elbo_last": hist.hurst[-1], "h_mle": float(mle.hurst.detach()),
        "h_variogram": variogram, "sigma_elbo": float(sde.sigma.detach()), "theta_elbo": float(sde.theta.detach()),
        "sigma_mle": float(mle.sigma.detach()), "theta_mle": float(mle.theta.detach()),
        "elbo_cpu_s": hist.cpu_seconds, "mle_cpu_s": mle_cpu, "steps": steps, "trace": hist.hurst[:: max(1, steps // 20)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (smoke run)")
    parser.add_argument("--bridge-steps", type=int, default=300)
    parser.add_argument("--hurst-steps", type=int, default=150)
    parser.add_argument("--paths", type=int, default=16)
    parser.add_argument("--num-obs", type=int, default=20)
    parser.add_argument("--t-end", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default="0.5", help="initial Hurst index of the fits: a number or 'variogram'")
    parser.add_argument("--part", choices=["all", "bridge", "hurst", "entry"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.bridge_steps, args.hurst_steps = 20, 10
    meta = run_metadata(args=vars(args))
    lines = ["# MA-fBM: bridge posterior and Hurst recovery", "", metadata_line(meta), ""]
    payload: dict = {"meta": meta}
    if args.part in ("all", "bridge"):
        rows, runs = [], []
        for h in HURSTS:
            r = bridge(h, args.bridge_steps, args.seed)
            runs.append(r)
            print(f"bridge H={h}: rel err network {['%.3f' % v for v in r['rel_err_network']]}, "
                  f"guided+network {['%.3f' % v for v in r['rel_err_guided_network']]}, "
                  f"guided {['%.3f' % v for v in r['rel_err_guided']]}, cpu {r['train_cpu_s']:.0f}s", flush=True)
            for i, t in enumerate(r["query"]):
                rows.append([h, t, f"{r['std_gp_mafbm'][i]:.4f}", f"{r['std_gp_fbm'][i]:.4f}", f"{r['std_network'][i]:.4f}",
                             f"{100 * r['rel_err_network'][i]:+.1f}%", f"{r['std_guided_network'][i]:.4f}",
                             f"{100 * r['rel_err_guided_network'][i]:+.1f}%", f"{r['std_guided'][i]:.4f}",
                             f"{100 * r['rel_err_guided'][i]:+.1f}%"])
        lines += ["## (a) Bridge posterior std (2000 paths) vs the analytic GP posterior", ""]
        lines += markdown_table(["H", "t", "GP (MA-fBM)", "GP (true fBM)", "network", "err", "guided + network", "err",
                                 "guided (untrained)", "err"], rows)
        lines += ["", "| H | ELBO network | ELBO guided + network | ELBO guided | exact log p | train CPU s (steps) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['hurst']} | {r['elbo_network']:.3f} | {r['elbo_guided_network']:.3f} | {r['elbo_guided']:.3f} | "
                  f"{r['log_likelihood']:.3f} | {r['train_cpu_s']:.0f} / {r['train_cpu_s_guided_network']:.0f} "
                  f"({r['train_steps']}) |" for r in runs]
        payload["bridge"] = runs
    if args.part in ("all", "hurst"):
        rows, runs = [], []
        for h in HURSTS:
            r = hurst_fit(h, args.hurst_steps, args.seed, args.paths, args.num_obs, args.t_end, args.init)
            runs.append(r)
            print(f"hurst H={h}: elbo {r['h_elbo']:.3f} mle {r['h_mle']:.3f} variogram {r['h_variogram']:.3f} "
                  f"cpu {r['elbo_cpu_s']:.0f}s", flush=True)
            rows.append([h, f"{r['h_init']:.3f}", f"{r['h_elbo']:.3f}", f"{r['h_elbo'] - h:+.3f}", f"{r['h_mle']:.3f}", f"{r['h_variogram']:.3f}",
                         f"{r['sigma_elbo']:.2f} / {r['theta_elbo']:.2f}", f"{r['sigma_mle']:.2f} / {r['theta_mle']:.2f}",
                         f"{r['elbo_cpu_s']:.0f} / {r['mle_cpu_s']:.0f}"])
        lines += ["", f"## (b) Hurst recovery: {args.paths} fOU paths, {args.num_obs} observations on [0, {args.t_end:g}], "
                  f"noise 0.1, θ = σ = 1, {args.hurst_steps} Adam steps (lr 0.05) from the start value", ""]
        lines += markdown_table(["H", "start", "Ĥ (ELBO)", "error", "Ĥ (exact likelihood)", "Ĥ (variogram)", "σ/θ ELBO",
                                 "σ/θ likelihood", "CPU s ELBO / likelihood"], rows)
        payload["hurst"] = runs
    if args.part in ("all", "entry"):  # the documented entry point, F.fit_hurst with its defaults, on the same data
        rows, runs = [], []
        for h in HURSTS:
            torch.manual_seed(args.seed)
            gen = torch.Generator().manual_seed(args.seed)
            grid, x = F.simulate_fou(args.paths, args.num_obs, args.t_end, h, theta=1.0, sigma=1.0, generator=gen)
            obs = x[:, 1:] + 0.1 * torch.randn(args.paths, args.num_obs, dtype=D64, generator=gen)
            fit = F.fit_hurst(grid[1:], obs, 0.1)
            runs.append({"hurst": h, "h_hat": fit.hurst, "sigma": float(fit.sde.sigma.detach()),
                         "theta": float(fit.sde.theta.detach()), "cpu_s": fit.cpu_seconds, "method": fit.method})
            print(f"fit_hurst H={h}: {fit.hurst:.3f} cpu {fit.cpu_seconds:.0f}s", flush=True)
            rows.append([h, f"{fit.hurst:.3f}", f"{fit.hurst - h:+.3f}", f"{runs[-1]['sigma']:.2f} / {runs[-1]['theta']:.2f}",
                         f"{fit.cpu_seconds:.0f}"])
        lines += ["", f"## (c) The entry point `F.fit_hurst(times, obs, 0.1)` (defaults: exact likelihood, K = 8, γ_max = 200, "
                  f"150 Adam steps from H = 0.5), the data of (b)", ""]
        lines += markdown_table(["H", "Ĥ", "error", "σ / θ", "CPU s"], rows)
        payload["entry"] = runs
    print("\n".join(lines))
    stem = "fractional" + ("_quick" if args.quick else "") + ("" if args.part == "all" else f"_{args.part}")
    stem += "" if args.init == "0.5" else f"_init_{args.init}"
    write_results(stem, lines, payload)


if __name__ == "__main__":
    main()
