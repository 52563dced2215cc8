"""Conversions (issue 15 item 1): marginal-preserving SDEs of a field's ODE and exact path changes.

Truth: the exact Gaussian-mixture fields of flowdiff.testing on every path.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.paths import (
    RBF, DanceGRPO, FlowGRPO, ReverseDiffusion, Window, available_diffusions, diffusion_coefficient, time_change,
)
from flowdiff.testing import GaussianMixture

MEANS = [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]]
SCALES = [[0.3, 0.5], [0.4, 0.4], [0.6, 0.2]]
WEIGHTS = [0.55, 0.3, 0.15]


def mixture(path):
    return GaussianMixture(MEANS, scales=SCALES, weights=WEIGHTS, path=path)


# ----- path (interpolant) conversion ------------------------------------------------------------------


@pytest.mark.parametrize("source,target,prediction", [
    (fd.paths.Linear(), fd.paths.VP(), "velocity"),
    (fd.paths.Linear(), fd.paths.VP(), "noise"),
    (fd.paths.VP(), fd.paths.Linear(), "data"),
    (fd.paths.Trig(), fd.paths.Cosine(), "v"),
    (fd.paths.Linear(), fd.paths.Shifted(fd.paths.Linear(), 3.0), "score"),
])
def test_with_path_equals_the_oracle_of_the_other_path(source, target, prediction):
    torch.manual_seed(0)
    field = fd.Field(mixture(source).model(prediction), source, prediction)
    converted = field.with_path(target)
    oracle = mixture(target)
    x = 2.0 * torch.randn(128, 2, dtype=torch.float64)
    lo, hi = target.t_min, target.t_max
    # The Linear source reaches log-SNR ±6.9 on its safe interval: stay where the target's log-SNR is inside it.
    lam_lo, lam_hi = float(source.log_snr(source.t_min)), float(source.log_snr(source.t_max))
    times = [t for t in torch.linspace(lo, hi, 9, dtype=torch.float64).tolist()
             if lam_lo <= float(target.log_snr(t)) <= lam_hi]
    assert len(times) >= 5
    for t in times:
        tb = torch.full((128,), t, dtype=torch.float64)
        for name in ("denoise", "noise", "velocity", "score"):
            got, want = getattr(converted, name)(x, tb), getattr(oracle, name)(x, tb)
            err = float((got - want).abs().max() / (1 + want.abs().max()))
            assert err < 1e-10, (name, t, err)


def test_time_change_matches_log_snr_and_scales_the_state():
    source, target = fd.paths.Linear(), fd.paths.VP()
    t = torch.linspace(0.0, target.t_max, 50, dtype=torch.float64)
    change = time_change(source, target, t)
    assert torch.allclose(source.log_snr(change.s), target.log_snr(t), atol=1e-12)
    # x̄ = c x for the same (x1, ε): both α and σ scale by c
    assert torch.allclose(change.scale * source.alpha(change.s), target.alpha(t), atol=1e-13)
    assert torch.allclose(change.scale * source.sigma(change.s), target.sigma(t), atol=1e-13)


def test_time_change_refuses_times_the_source_never_reaches():
    # VP reaches log-SNR ≈ 4.6 at its t_max; Linear's t = 0.9999 asks for 9.2.
    with pytest.raises(ValueError, match="outside what the source path"):
        time_change(fd.paths.VP(), fd.paths.Linear(t_max=0.99999), 0.9999)
    with pytest.raises(TypeError, match="GaussianPath"):
        time_change("linear", fd.paths.VP(), 0.5)
    with pytest.raises(TypeError, match="GaussianPath"):
        fd.Field(mixture(fd.paths.VP()).model("noise"), fd.paths.VP()).with_path("vp")


# ----- diffusion coefficients ----------------------------------------------------------------------------


def test_coefficients_formulas_and_errors():
    t = torch.tensor([0.01, 0.25, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(FlowGRPO(0.7, t_floor=0.05)(t), 0.7 * torch.sqrt((1 - t) / t.clamp(min=0.05)))
    assert torch.allclose(DanceGRPO()(t), torch.full_like(t, 0.3))
    assert torch.allclose(RBF()(t), 3 * (1 - t) ** 2)
    w = Window(1.5, 0.2, 0.6)(t)
    assert w.tolist() == [0.0, 1.5, 1.5, 0.0]
    # the memoryless coefficient of the linear path is Flow-GRPO's with a = √2
    assert torch.allclose(ReverseDiffusion(fd.paths.Linear())(t[1:]), FlowGRPO(math.sqrt(2), 1e-9)(t[1:]))
    assert torch.allclose(RBF().eps(t), 0.5 * RBF()(t) ** 2)
    for g in (FlowGRPO(), DanceGRPO(0.5), RBF(2.0), Window(FlowGRPO(), 0.1, 0.3)):
        assert diffusion_coefficient(g.config()).config() == g.config()
    assert set(available_diffusions()) >= {"flow-grpo", "dance-grpo", "rbf", "window", "reverse-diffusion"}
    with pytest.raises(ValueError, match="unknown diffusion coefficient"):
        diffusion_coefficient("sde")
    with pytest.raises(ValueError, match="a must be >= 0"):
        FlowGRPO(a=-1.0)
    with pytest.raises(ValueError, match="t_start"):
        Window(1.0, 0.6, 0.2)
    with pytest.raises(ValueError, match="t must lie"):
        RBF()(1.5)


def _normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _exact_marginal_facts(gm: GaussianMixture, t: float):
    """Mean, covariance and P(x_0 > 0.5), P(x_1 > 0.5) of p_t (diagonal components)."""
    a, s = float(gm.path.alpha(t)), float(gm.path.sigma(t))
    w, m, var = gm.weights, gm.means, gm.eigvals
    mean = a * (w[:, None] * m).sum(0)
    comp_var = a * a * var + s * s
    second = (w[:, None] * (comp_var + (a * m) ** 2)).sum(0)
    cov_diag = second - mean**2
    tail = (w[:, None] * (1 - _normal_cdf((0.5 - a * m) / comp_var.sqrt()))).sum(0)
    return mean, cov_diag, tail


@pytest.mark.parametrize("name,g,path", [
    ("flow-grpo", FlowGRPO(), fd.paths.Linear()),
    ("dance-grpo", DanceGRPO(), fd.paths.Linear()),
    ("rbf-on-vp", RBF(), fd.paths.VP()),
    ("window", Window(2.0, 0.3, 0.6), fd.paths.Linear()),
    ("reverse", ReverseDiffusion(fd.paths.Linear(), g_max=8.0), fd.paths.Linear()),
])
def test_sde_samples_have_the_ode_marginals(name, g, path):
    """Euler–Maruyama on dx = [u + g²/2 s]dt + g dW from exact p_{t_min} samples: at several t the sample mean,
    variance and tail probabilities match the exact mixture marginal within 4.5 standard errors. The RBF case
    runs a *linear* model converted to VP (the RBF recipe)."""
    gen = torch.Generator().manual_seed(1)
    linear = fd.paths.Linear()
    field = fd.Field(mixture(linear).model("velocity"), linear, "velocity")
    if not isinstance(path, fd.paths.Linear):
        field = field.with_path(path)
    gm = mixture(path)
    n, steps = 6000, 240
    t0, t1 = 0.02 if name == "rbf-on-vp" else path.t_min, 0.98
    x1 = gm.sample(n, generator=gen)
    x0 = float(path.alpha(t0)) * x1 + float(path.sigma(t0)) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    res = fd.sample(field, x0, solver="euler-maruyama", grid=grid, eps=g.eps, generator=gen,
                    return_trajectory=True, denoise_final=False)
    for k in (steps // 4, steps // 2, 3 * steps // 4, steps):
        t = float(grid[k])
        x = res.trajectory[k]
        mean, var, tail = _exact_marginal_facts(gm, t)
        se_mean = (var / n).sqrt()
        assert ((x.mean(0) - mean).abs() < 4.5 * se_mean + 0.01).all(), (name, t, x.mean(0), mean)
        se_var = var * math.sqrt(2.0 / n) * 2  # mixture kurtosis: twice the Gaussian standard error
        assert ((x.var(0) - var).abs() < 4.5 * se_var + 0.02).all(), (name, t, x.var(0), var)
        frac = (x > 0.5).double().mean(0)
        se_tail = (tail * (1 - tail) / n).sqrt()
        assert ((frac - tail).abs() < 4.5 * se_tail + 0.01).all(), (name, t, frac, tail)


def test_a_wrong_drift_fails_the_marginal_check():
    """The check above can fail: the drift u + g² s (twice the correction) misses the marginals."""
    gen = torch.Generator().manual_seed(2)
    path = fd.paths.Linear()
    gm = mixture(path)
    field = fd.Field(gm.model("velocity"), path, "velocity")
    n, steps, eta = 6000, 200, 1.0
    x = float(path.sigma(path.t_min)) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    grid = torch.linspace(path.t_min, 0.98, steps + 1, dtype=torch.float64)
    for k in range(steps):
        t, h = float(grid[k]), float(grid[k + 1] - grid[k])
        drift = field.velocity(x, t) + eta**2 * field.score(x, t)
        x = x + h * drift + eta * math.sqrt(h) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    mean, var, _ = _exact_marginal_facts(gm, float(grid[-1]))
    assert ((x.var(0) - var).abs() > 0.1 * var).any()
