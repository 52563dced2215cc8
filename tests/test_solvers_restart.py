"""Restart sampling (fd.solvers.restart_sample, Xu et al. 2023) against exact oracles.

The forward re-noising kernel must leave the path's marginal exact, so with an exact field every restart
preserves the law: the output's moments must match the mixture's, and (a sharper check) the kernel applied to
exact draws at ``t_hi`` must give exact draws at ``t_lo``.
"""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.metrics import sliced_wasserstein
from flowdiff.solvers import renoise, restart_sample, sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _moments_at(mix, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = float(mix.path.alpha(t)), float(mix.path.sigma(t))
    return a * mix.mean(), a * a * mix.covariance() + s * s * torch.eye(mix.dim, dtype=torch.float64)


@pytest.mark.parametrize("path", [fd.paths.VP(), fd.paths.Linear()], ids=["vp", "linear"])
def test_renoise_kernel_maps_exact_marginal_to_exact_marginal(path):
    mix = fd.testing.random_mixture(2, 3, seed=3, anisotropic=True, path=path)
    t_hi = float(path.t_of_log_snr(torch.tensor([2.0], dtype=torch.float64))[0])
    t_lo = float(path.t_of_log_snr(torch.tensor([0.0], dtype=torch.float64))[0])
    g = _gen(0)
    n = 20000
    x_hi = path.sample(mix.sample(n, g), t_hi, generator=g)[0]
    x_lo = renoise(path, x_hi, t_hi, t_lo, generator=g)
    mean, cov = _moments_at(mix, t_lo)
    assert torch.allclose(x_lo.mean(0), mean, atol=4.5 * float(cov.diagonal().max() / n) ** 0.5)
    assert torch.allclose(torch.cov(x_lo.T), cov, atol=0.03)
    # a wrong kernel (no rescaling of the state) is detected by the same check
    wrong = x_hi + float(path.sigma(t_lo)) * torch.randn(x_hi.shape, generator=g, dtype=x_hi.dtype)
    assert not torch.allclose(torch.cov(wrong.T), cov, atol=0.03)
    with pytest.raises(ValueError, match="toward noise"):
        renoise(path, x_hi, t_lo, t_hi)


def test_restart_with_exact_field_preserves_the_law():
    n, dim = 3000, 3
    mix = fd.testing.random_mixture(dim, 3, seed=11, anisotropic=True, path=fd.paths.VP())
    field = fd.Field(mix.model("noise"), mix.path, "noise")
    g = _gen(1)
    x0 = mix.path.sample(mix.sample(n, g), mix.path.t_min, generator=g)[0]
    res = restart_sample(field, x0, solver="dpm-solver++2m", nfe=60, log_snr=(0.0, 2.0), repeats=4, restart_nfe=15,
                         generator=_gen(2), denoise_final=False)
    assert res.solver.startswith("restart(") and res.nfe <= 60 + 4 * 15
    ref = mix.path.sample(mix.sample(n, _gen(3)), mix.path.t_max, generator=_gen(4))[0]
    floor = float(sliced_wasserstein(ref, mix.path.sample(mix.sample(n, _gen(5)), mix.path.t_max,
                                                          generator=_gen(6))[0], generator=_gen(0)))
    dist = float(sliced_wasserstein(res.x, ref, generator=_gen(0)))
    assert dist <= 1.6 * floor + 0.01, f"sliced W2 {dist:.4f} vs floor {floor:.4f}"
    # repeats=0 is the plain ODE split at t_hi: close to one uninterrupted solve
    plain = sample(field, x0, solver="dpm-solver++2m", nfe=60, denoise_final=False).x
    split = restart_sample(field, x0, solver="dpm-solver++2m", nfe=60, log_snr=(0.0, 2.0), repeats=0,
                           denoise_final=False).x
    assert (plain - split).abs().max() < 0.05
    # two intervals (the main pass stops at each t_hi): the law is kept too, and repeats=0 is again the plain ODE
    res2 = restart_sample(field, x0, solver="dpm-solver++2m", nfe=60, log_snr=[(-1.0, 0.5), (0.5, 2.0)],
                          repeats=[3, 3], restart_nfe=15, generator=_gen(2), denoise_final=False)
    assert res2.nfe <= 60 + 6 * 15 and res2.nfe_budget == 60 + 6 * 15
    dist2 = float(sliced_wasserstein(res2.x, ref, generator=_gen(0)))
    assert dist2 <= 1.6 * floor + 0.01, f"sliced W2 {dist2:.4f} vs floor {floor:.4f}"
    split2 = restart_sample(field, x0, solver="dpm-solver++2m", nfe=60, log_snr=[(-1.0, 0.5), (0.5, 2.0)], repeats=0,
                            denoise_final=False).x
    # (three ODE pieces with their own step grids: a few trajectories near a mode boundary part ways)
    assert torch.quantile((plain - split2).abs().flatten(), 0.99) < 0.05


def test_restart_bad_input():
    mix = fd.testing.random_mixture(2, 2, seed=0, path=fd.paths.VP())
    field = fd.Field(mix.model("noise"), mix.path, "noise")
    x0 = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="log_snr must satisfy"):
        restart_sample(field, x0, log_snr=(2.0, 1.0))
    with pytest.raises(ValueError, match="repeats must be"):
        restart_sample(field, x0, repeats=-1)
    with pytest.raises(ValueError, match="restart_nfe must be"):
        restart_sample(field, x0, restart_nfe=1)
    with pytest.raises(ValueError, match="increasing lambda_hi"):
        restart_sample(field, x0, log_snr=[(0.0, 2.0), (0.5, 1.0)])
    with pytest.raises(ValueError, match="one per interval"):
        restart_sample(field, x0, log_snr=[(0.0, 1.0), (1.0, 2.0)], repeats=[1, 2, 3])
    with pytest.raises(ValueError, match="sequence of pairs"):
        restart_sample(field, x0, log_snr="wide")
