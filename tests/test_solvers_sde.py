"""Tests of the SDE samplers (flowdiff.solvers.sde) against exact oracles.

Truth comes from the analytic Gaussian-mixture and interpolant oracles: exact samples of the
path's marginal at ``t_end`` (x_t = α x₁ + σ ε with x₁ drawn from the mixture), exact moments,
and the closed-form ε(t) of the reverse-diffusion SDE. Everything runs in float64 with one
thread (the oracles are small; threads only add contention on a 2-core machine).
"""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.metrics import sliced_wasserstein
from flowdiff.solvers import available, sample, sde

SDE_SOLVERS = ("euler-maruyama", "ddpm", "sde-dpm-solver++1", "sde-dpm-solver++2", "edm", "heun-churn", "pc")


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _marginal_samples(mix: fd.testing.GaussianMixture, n: int, t: float, seed: int) -> torch.Tensor:
    """Exact draws of x_t = α(t) x₁ + σ(t) ε."""
    g = _gen(seed)
    return mix.path.sample(mix.sample(n, g), t, generator=g)[0]


def _marginal_moments(mix: fd.testing.GaussianMixture, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = float(mix.path.alpha(t)), float(mix.path.sigma(t))
    return a * mix.mean(), a * a * mix.covariance() + s * s * torch.eye(mix.dim, dtype=torch.float64)


def _check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, bias: float) -> None:
    """Sample mean and covariance within 4.5 standard errors plus a step-size bias allowance.

    Standard errors for n draws: sd(mean_i) = sqrt(C_ii/n); sd(cov_ij) ≈ sqrt((C_ii C_jj + C_ij²)/n)
    (Gaussian fourth moments; the mixtures here are close enough for a 4.5σ bound).
    """
    n = x.shape[0]
    diag = torch.diagonal(cov)
    mean_tol = 4.5 * torch.sqrt(diag / n) + bias
    cov_tol = 4.5 * torch.sqrt((diag[:, None] * diag[None, :] + cov**2) / n) + bias
    dm = (x.mean(0) - mean).abs()
    dc = (torch.cov(x.T) - cov).abs()
    assert (dm <= mean_tol).all(), f"mean off by {dm.tolist()}, tolerance {mean_tol.tolist()}"
    assert (dc <= cov_tol).all(), f"covariance off by {dc.tolist()}, tolerance {cov_tol.tolist()}"


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


def test_registered_as_stochastic_sde_solvers():
    names = available("sde")
    for name in SDE_SOLVERS + ("sde-dpm-solver++",):
        assert name in names
        spec = fd.solvers.get_solver(name)
        assert spec.stochastic and spec.kind == "sde"
    assert fd.solvers.get_solver("heun-churn").alias_of == "edm"
    assert fd.solvers.get_solver("edm").evals_per_step == 2


# ---------------------------------------------------------------------------------------
# ε(t)
# ---------------------------------------------------------------------------------------


def test_reverse_diffusion_eps_is_half_g_squared():
    t = torch.linspace(0.0, 0.999, 11, dtype=torch.float64)
    vp = fd.paths.VP(beta_min=0.1, beta_max=20.0)
    beta = 0.1 + (1 - t) * (20.0 - 0.1)  # β(s) at s = 1 − t
    torch.testing.assert_close(sde.diffusion_schedule("reverse-diffusion", vp)(t), beta / 2, rtol=1e-12, atol=0)
    ve = fd.paths.VE(sigma_min=0.01, sigma_max=50.0)
    sig = 0.01 * (50.0 / 0.01) ** (1 - t)  # g² = dσ²/ds = 2σ² log(σmax/σmin)
    torch.testing.assert_close(
        sde.diffusion_schedule("reverse-diffusion", ve)(t), sig**2 * math.log(5000.0), rtol=1e-12, atol=0
    )
    lin = fd.paths.Linear()
    tl = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    # α = t, σ = 1 − t: σ²λ̇ = (1 − t)²/(t(1 − t)) = (1 − t)/t
    torch.testing.assert_close(sde.diffusion_schedule("reverse-diffusion", lin)(tl), (1 - tl) / tl, rtol=1e-12, atol=0)
    assert torch.equal(sde.diffusion_schedule("zero", vp)(t), torch.zeros_like(t))
    assert torch.equal(sde.diffusion_schedule(0.3)(t), torch.full_like(t, 0.3))


def test_zero_eps_is_the_euler_ode_exactly():
    mix = fd.testing.random_mixture(3, 3, seed=5, path=fd.paths.VP())
    field = fd.Field(mix.model("noise"), mix.path, "noise")
    x0 = _marginal_samples(mix, 256, 0.0, seed=1)
    grid = torch.linspace(0.0, 0.999, 13, dtype=torch.float64)
    out = sample(field, x0, solver="euler-maruyama", grid=grid, eps="zero", denoise_final=False, generator=_gen(3))
    # the deterministic Euler method on the probability-flow ODE, written out
    x = x0.clone()
    for i in range(12):
        x = x + float(grid[i + 1] - grid[i]) * field.velocity(x, float(grid[i]))
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)
    again = sample(field, x0, solver="euler-maruyama", grid=grid, eps=0.0, denoise_final=False, generator=_gen(99))
    assert torch.equal(out.x, again.x)
    if "euler" in available():
        ode = sample(field, x0, solver="euler", grid=grid, denoise_final=False)
        torch.testing.assert_close(out.x, ode.x, rtol=1e-12, atol=1e-12)


def test_ddpm_eta_zero_is_deterministic_and_eta_one_is_sde_dpm_solver_pp1():
    mix = fd.testing.random_mixture(2, 2, seed=6, path=fd.paths.VP())
    field = fd.Field(mix.model("data"), mix.path, "data")
    x0 = _marginal_samples(mix, 128, 0.0, seed=2)
    a = sample(field, x0, solver="ddpm", nfe=11, eta=0.0, generator=_gen(1))
    b = sample(field, x0, solver="ddpm", nfe=11, eta=0.0, generator=_gen(2))
    assert torch.equal(a.x, b.x)
    # DDIM-η (η = 1) and the exponential-integrator form are the same posterior step, written two ways
    c = sample(field, x0, solver="ddpm", nfe=11, grid="logsnr", eta=1.0, generator=_gen(4))
    d = sample(field, x0, solver="sde-dpm-solver++1", nfe=11, grid="logsnr", generator=_gen(4))
    torch.testing.assert_close(c.x, d.x, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# distribution-level correctness on the exact mixture oracle
# ---------------------------------------------------------------------------------------

# solver -> (nfe, options, grid); sized so that the step-size bias is below the allowance
CASES = {
    "euler-maruyama": (101, {}, None),
    "ddpm": (151, {}, None),
    "sde-dpm-solver++1": (101, {}, None),
    "sde-dpm-solver++2": (61, {}, None),
    "edm": (101, {"S_churn": 20.0, "S_tmin": 0.0, "S_tmax": 1e3}, None),
    "pc": (121, {"snr": 0.16}, None),
}


@pytest.mark.parametrize("solver", sorted(CASES))
def test_sde_samples_match_the_exact_marginal(solver):
    n, dim = 3000, 3
    mix = fd.testing.random_mixture(dim, 3, seed=11, anisotropic=True, path=fd.paths.VP())
    field = fd.Field(mix.model("noise"), mix.path, "noise")
    path = mix.path
    x0 = _marginal_samples(mix, n, path.t_min, seed=21)
    nfe, options, grid = CASES[solver]
    res = sample(field, x0, solver=solver, nfe=nfe, grid=grid, denoise_final=False, generator=_gen(31), **options)
    assert res.nfe <= nfe
    mean, cov = _marginal_moments(mix, path.t_max)
    _check_moments(res.x, mean, cov, bias=0.03)
    # sliced W2 to an exact sample, against the two-sample floor of the same size
    ref = _marginal_samples(mix, n, path.t_max, seed=41)
    floor = float(sliced_wasserstein(ref, _marginal_samples(mix, n, path.t_max, seed=51), generator=_gen(0)))
    dist = float(sliced_wasserstein(res.x, ref, generator=_gen(0)))
    assert dist <= 1.6 * floor + 0.01, f"{solver}: sliced W2 {dist:.4f} vs floor {floor:.4f}"


def test_gaussian_exact_marginal_for_every_solver_float32_and_noise_free_shortcut():
    # a full-covariance Gaussian on a Linear (rectified-flow) path, in float32, v-prediction
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    path = fd.paths.Linear()
    gauss = fd.testing.Gaussian(mean, cov, path=path)
    field = fd.Field(gauss.model("v"), path, "v")
    n = 3000
    x0 = _marginal_samples(gauss, n, path.t_min, seed=3).float()
    m_true, c_true = _marginal_moments(gauss, path.t_max)
    for solver, options in [
        ("euler-maruyama", {"eps": 0.5}),
        ("ddpm", {"eta": 0.5}),
        ("sde-dpm-solver++2", {"solver_type": "heun"}),
        ("edm", {"S_churn": 10.0, "S_tmin": 0.0, "S_tmax": 1e4}),
        ("pc", {"n_corrector": 2}),
    ]:
        res = sample(field, x0, solver=solver, nfe=91, denoise_final=False, generator=_gen(8), **options)
        assert res.x.dtype == torch.float32
        _check_moments(res.x.double(), m_true, c_true, bias=0.04)


def test_euler_maruyama_weak_order_one():
    # N(1, 0.25) on VP, reverse-diffusion SDE: the error of the mean at t_max falls like 1/N
    path = fd.paths.VP()
    gauss = fd.testing.Gaussian([1.0], [[0.25]], path=path)
    field = fd.Field(gauss.model("noise"), path, "noise")
    n = 60000
    x0 = _marginal_samples(gauss, n, path.t_min, seed=4)
    true_mean = float(path.alpha(path.t_max))
    steps = (8, 16, 32)
    errors = []
    for k, n_steps in enumerate(steps):
        res = sample(field, x0, solver="euler-maruyama", nfe=n_steps + 1, denoise_final=False, generator=_gen(k))
        errors.append(abs(float(res.x.mean()) - true_mean))
    # Monte Carlo error of each mean is ~0.5/sqrt(n) = 2e-3, far below the errors measured here
    assert errors[0] > errors[1] > errors[2]
    slope = math.log(errors[0] / errors[-1]) / math.log(steps[-1] / steps[0])
    assert 0.7 <= slope <= 1.3, f"weak order {slope:.2f}, errors {errors}"


def test_interpolant_euler_maruyama_same_marginals_for_every_eps():
    si = fd.paths.StochasticInterpolant("linear", gamma="brownian")
    base = fd.testing.random_mixture(2, 2, seed=3)
    target = fd.testing.random_mixture(2, 2, seed=4)
    oracle = fd.testing.InterpolantOracle(si, base, target)
    field = fd.InterpolantField(
        oracle.model("drift"), si, "drift", score_model=oracle.model("score"), score_prediction="score"
    )
    n = 2500
    g = _gen(5)
    x0 = si.sample(base.sample(n, g), target.sample(n, g), si.t_min, generator=g).x_t
    # exact moments of x_{t_max} = a0 x0 + a1 x1 + γ z (independent x0, x1, z)
    a0, a1, _, _ = (float(v) for v in si.coefficients(si.t_max))
    gam = float(si.gamma(si.t_max))
    m_true = a0 * base.mean() + a1 * target.mean()
    c_true = a0**2 * base.covariance() + a1**2 * target.covariance() + gam**2 * torch.eye(2, dtype=torch.float64)
    for k, eps in enumerate((0.25, 1.0, 3.0)):
        res = sample(field, x0, solver="euler-maruyama", nfe=121, eps=eps, denoise_final=False, generator=_gen(k))
        assert res.nfe == 120  # drift + score model per step
        _check_moments(res.x, m_true, c_true, bias=0.05)
    # the predictor–corrector runs on interpolants too
    res = sample(field, x0, solver="pc", nfe=121, eps=0.5, denoise_final=False, generator=_gen(7))
    _check_moments(res.x, m_true, c_true, bias=0.05)


# ---------------------------------------------------------------------------------------
# seeds, budgets, errors
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_field():
    mix = fd.testing.random_mixture(2, 2, seed=9, path=fd.paths.VP())
    field = fd.Field(mix.model("noise"), mix.path, "noise")
    return field, _marginal_samples(mix, 64, 0.0, seed=0)


@pytest.mark.parametrize("solver", SDE_SOLVERS)
def test_seed_reproducible(small_field, solver):
    field, x0 = small_field
    a = sample(field, x0, solver=solver, nfe=9, generator=_gen(123))
    b = sample(field, x0, solver=solver, nfe=9, generator=_gen(123))
    c = sample(field, x0, solver=solver, nfe=9, generator=_gen(124))
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("solver", SDE_SOLVERS)
@pytest.mark.parametrize("nfe", [3, 6, 10])
def test_nfe_budget_respected(small_field, solver, nfe):
    field, x0 = small_field
    res = sample(field, x0, solver=solver, nfe=nfe, generator=_gen(0))
    if solver in ("edm", "heun-churn"):
        # Heun steps, the last one Euler when the budget is odd: every call is spent
        assert res.nfe == nfe and res.steps == nfe // 2
    else:
        per_step = 2 if solver == "pc" else 1
        # one call is the final denoise, the rest whole steps
        assert res.nfe == 1 + per_step * ((nfe - 1) // per_step)
    assert res.nfe <= nfe


def test_pc_with_more_correctors_stays_in_budget(small_field):
    field, x0 = small_field
    res = sample(field, x0, solver="pc", nfe=21, n_corrector=3, generator=_gen(0))
    assert res.nfe == 21 and res.steps == 5  # 5 steps × (1 predictor + 3 correctors) + 1
    res = sample(field, x0, solver="pc", nfe=20, n_corrector=0, generator=_gen(0))
    assert res.nfe <= 20


def test_an_explicit_grid_over_budget_is_refused_before_any_call(small_field):
    field, x0 = small_field
    grid = torch.linspace(0.0, 0.999, 11, dtype=torch.float64)
    before = field.nfe
    with pytest.raises(ValueError, match="needs 21 model calls.*more than nfe=19"):
        sample(field, x0, solver="edm", grid=grid, nfe=19)  # 10 Heun steps + the final denoise
    with pytest.raises(ValueError, match="needs 11 model calls.*more than nfe=10"):
        sample(field, x0, solver="ddpm", grid=grid, nfe=10)
    assert field.nfe == before  # nothing spent


@pytest.mark.parametrize(
    "solver, options, match",
    [
        ("ddpm", {"eta": 1.5}, "eta=1.5"),
        ("ddpm", {"eta": -0.1}, "eta=-0.1"),
        ("euler-maruyama", {"eps": "bogus"}, "'bogus'.*reverse-diffusion"),
        ("euler-maruyama", {"eps": -1.0}, "eps=-1.0"),
        ("euler-maruyama", {"eps": lambda t: -t}, "eps\\(t\\) must be finite and >= 0"),
        ("pc", {"snr": 0.0}, "snr=0.0"),
        ("pc", {"n_corrector": -1}, "n_corrector=-1"),
        ("pc", {"eps": "nope"}, "'nope'"),
        ("sde-dpm-solver++2", {"solver_type": "rk4"}, "'rk4'.*midpoint, heun"),
        ("edm", {"S_churn": -1.0}, "S_churn=-1.0"),
        ("edm", {"S_noise": float("nan")}, "S_noise=nan"),
        ("edm", {"S_tmin": 5.0, "S_tmax": 1.0}, "S_tmin=5.0"),
    ],
)
def test_bad_options_raise_value_error(small_field, solver, options, match):
    field, x0 = small_field
    with pytest.raises(ValueError, match=match):
        sample(field, x0, solver=solver, nfe=5, **options)


def test_gaussian_only_solvers_reject_interpolants():
    si = fd.paths.StochasticInterpolant("linear", gamma="brownian")
    mix = fd.testing.random_mixture(2, 1, seed=0)
    oracle = fd.testing.InterpolantOracle(si, mix, mix)
    field = fd.InterpolantField(
        oracle.model("drift"), si, "drift", score_model=oracle.model("score"), score_prediction="score"
    )
    x0 = torch.randn(8, 2, dtype=torch.float64)
    for solver in ("ddpm", "sde-dpm-solver++1", "sde-dpm-solver++2", "edm"):
        with pytest.raises((TypeError, ValueError), match="Gaussian path"):
            sample(field, x0, solver=solver, nfe=5)
    with pytest.raises(ValueError, match="reverse-diffusion"):
        sample(field, x0, solver="euler-maruyama", nfe=5, eps="reverse-diffusion")


def test_callback_sees_every_step(small_field):
    field, x0 = small_field
    seen = []
    res = sample(
        field, x0, solver="sde-dpm-solver++2", nfe=8, generator=_gen(0), callback=lambda i, t, x, d: seen.append((i, t))
    )
    assert [i for i, _ in seen] == list(range(res.steps))
    assert seen[-1][1] == pytest.approx(field.path.t_max)


@pytest.mark.parametrize("steps, solver_type", [(8, "heun"), (10, "midpoint"), (20, "heun")])
def test_sde_dpm_solver_pp_2m_matches_diffusers(steps, solver_type):
    """Same σ grid, same Brownian increments: diffusers' sde-dpmsolver++ (order 2) agrees to float32 round-off."""
    diffusers = pytest.importorskip("diffusers")
    path = fd.paths.Discrete.linear()  # diffusers' default linear β table, made continuous
    mix = fd.testing.random_mixture(3, 3, seed=2, path=path)
    field = fd.Field(mix.model("noise"), path, "noise")
    sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type, final_sigmas_type="sigma_min"
    )
    sched.set_timesteps(steps)
    # diffusers' timestep k has ᾱ_k = Π_{i≤k}(1 − β_i), which is t = 1 − (k + 1)/1000 here;
    # "sigma_min" ends at timestep 0, i.e. t_max = 0.999.
    times = [1 - (int(k) + 1) / 1000 for k in sched.timesteps]
    grid = torch.tensor(times + [path.t_max], dtype=torch.float64)
    x0 = torch.randn(256, 3, generator=_gen(0), dtype=torch.float64)
    x, noise_gen = x0.clone(), _gen(7)
    for k, t in zip(sched.timesteps, times):
        z = torch.randn(x.shape, generator=noise_gen, dtype=x.dtype)  # the draw our solver makes at this step
        x = sched.step(field.noise(x, t), k, x, variance_noise=z).prev_sample.double()
    ours = sample(
        field,
        x0,
        solver="sde-dpm-solver++2",
        grid=grid,
        solver_type=solver_type,
        lower_order_final=steps < 15,  # diffusers' gate
        denoise_final=False,
        generator=_gen(7),
    )
    # diffusers steps in float32
    torch.testing.assert_close(ours.x, x, rtol=0, atol=5e-5 * float(x.abs().max()))


def test_pc_survives_a_field_with_zero_score():
    # an untrained network that outputs 0 noise: the Langevin step has no direction and is skipped
    field = fd.Field(lambda x, t: torch.zeros_like(x), fd.paths.VP(), "noise")
    x0 = torch.randn(32, 2, dtype=torch.float64, generator=_gen(0))
    res = sample(field, x0, solver="pc", nfe=9, generator=_gen(1))
    assert torch.isfinite(res.x).all()
