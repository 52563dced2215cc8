"""The loop's hooks (fd.solvers.Hooks), its budget planner and its option vocabulary, against exact oracles.

* denoiser hook: adding the exact Gaussian-likelihood correction to the data prediction of a
  Gaussian prior is the exact posterior denoiser, so every solver run with the hook equals the same
  solver run on the posterior oracle, and the samples have the closed-form posterior moments;
* step hook: reindexing the particles mid-run (with the multistep history) gives the permuted
  run exactly; SMC with resampling on a linearly tilted mixture recovers the exact tilted weights;
* transition hook: each Gaussian transition's (mean, std) regenerate the draw from the seed, its
  log-density is the Gaussian one, and its mean is the solver's deterministic part, recomputed
  from the exact denoiser.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.solvers import Hooks, LoopState, sample

pytestmark = pytest.mark.usefixtures("one_thread")

VP = fd.paths.VP()
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
PRIOR = fd.testing.Gaussian(MEAN, COV, path=VP)
A = torch.tensor([[1.0, 0.5]], dtype=torch.float64)  # y = A x + N(0, R)
R = torch.tensor([[0.05]], dtype=torch.float64)
Y = torch.tensor([0.8], dtype=torch.float64)
C_POST = torch.linalg.inv(torch.linalg.inv(COV) + A.T @ torch.linalg.inv(R) @ A)
M_POST = C_POST @ (torch.linalg.inv(COV) @ MEAN + A.T @ torch.linalg.inv(R) @ Y)
POSTERIOR = fd.testing.Gaussian(M_POST, C_POST, path=VP)


def field(oracle: fd.testing.GaussianMixture = PRIOR) -> fd.Field:
    return fd.Field(oracle.model("noise"), VP, "noise")


def x_init(n: int, seed: int = 0) -> torch.Tensor:
    return VP.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def likelihood_guidance(x: torch.Tensor, t: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    r"""The exact posterior correction for a Gaussian prior: :math:`\hat x + (\sigma^2/\alpha)\nabla_x\log p(y|x_t)`,
    with :math:`x_1|x_t \sim N(\hat x, V_t)` and :math:`\partial\hat x/\partial x_t = \alpha C\Sigma_t^{-1}`."""
    a, s = float(VP.alpha(t[0].double())), float(VP.sigma(t[0].double()))
    sigma_t = a * a * COV + s * s * torch.eye(2, dtype=torch.float64)
    jac = a * COV @ torch.linalg.inv(sigma_t)  # symmetric: C Σ⁻¹ with Σ = α²C + σ²I
    v_t = COV - a * jac @ COV
    resid = (Y - denoised @ A.T) @ torch.linalg.inv(A @ v_t @ A.T + R)  # (B, m)
    grad = resid @ A @ jac  # (B, D): J^T A^T S^{-1} (y - A x̂)
    return denoised + (s * s / a) * grad


# ----- denoiser hook ----------------------------------------------------------------------------


def test_guidance_hook_is_the_exact_posterior_denoiser() -> None:
    x = x_init(16, 1)
    for t in (0.05, 0.5, 0.95):
        tb = torch.full((16,), t, dtype=torch.float64)
        torch.testing.assert_close(likelihood_guidance(x, tb, PRIOR.denoise(x, tb)), POSTERIOR.denoise(x, tb),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver,options", [
    ("dpm-solver++", {}), ("unipc", {}), ("dpm-solver-3s", {}), ("deis", {"order": 3}), ("heun", {}),
    ("heun", {"space": "sigma"}), ("rk4", {}), ("ddpm", {"eta": 0.5}), ("sde-dpm-solver++2", {}),
    ("euler-maruyama", {}), ("pc", {"n_corrector": 2}), ("edm", {"S_churn": 20.0}),
])
def test_denoiser_hook_turns_the_prior_sampler_into_the_posterior_sampler(solver: str, options: dict) -> None:
    x = x_init(32, 2)
    guided = sample(field(), x, solver=solver, nfe=13, generator=torch.Generator().manual_seed(3),
                    hooks=Hooks(denoiser=likelihood_guidance), **options)
    exact = sample(field(POSTERIOR), x, solver=solver, nfe=13, generator=torch.Generator().manual_seed(3), **options)
    assert guided.nfe == exact.nfe
    torch.testing.assert_close(guided.x, exact.x, rtol=1e-7, atol=1e-7)


def test_guided_samples_have_the_closed_form_posterior_moments() -> None:
    n = 6000
    out = sample(field(), x_init(n, 4), solver="unipc", nfe=40, hooks=Hooks(denoiser=likelihood_guidance)).x
    se = C_POST.diagonal().sqrt() / math.sqrt(n)
    assert ((out.mean(0) - M_POST).abs() < 5 * se + 2e-3).all(), (out.mean(0), M_POST)
    assert torch.allclose(torch.cov(out.T), C_POST, atol=0.01)


def test_denoiser_hook_needs_a_gaussian_path() -> None:
    si = fd.paths.StochasticInterpolant("linear", "brownian")
    oracle = fd.testing.InterpolantOracle(si, PRIOR, PRIOR)
    f = fd.InterpolantField(oracle.model("drift"), si)
    with pytest.raises(ValueError, match="denoiser hook needs a Gaussian path"):
        sample(f, x_init(4), solver="heun", nfe=5, hooks=Hooks(denoiser=likelihood_guidance))


# ----- step hook: reindexing and SMC -----------------------------------------------------------


@pytest.mark.parametrize("solver,options", [
    ("dpm-solver++3m", {}), ("unipc", {"order": 3}), ("deis", {"order": 4}), ("dpm-solver-2s", {}),
    ("dpm-solver-v3", {}), ("rk4", {"space": "sigma"}), ("heun", {}), ("edm", {"S_churn": 0.0}), ("ddim", {}),
])
@pytest.mark.parametrize("at", [3, -1])
def test_resampling_reindexes_the_multistep_history(solver: str, options: dict, at: int) -> None:
    """Permuting the particles after step 3, or after the last step (with the solver's history,
    and DPM-Solver-v3's own final denoise), gives the permuted plain run."""
    if solver == "dpm-solver-v3":
        options = {"ems": fd.solvers.EMS.degenerate(VP, (2,))}
    x = x_init(8, 5)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    plain = sample(field(), x, solver=solver, nfe=16, **options)
    step = at % plain.steps

    def permute(state: LoopState) -> LoopState | None:
        return state.resample(perm) if state.i == step else None

    moved = sample(field(), x, solver=solver, nfe=16, hooks=Hooks(step=permute), **options)
    torch.testing.assert_close(moved.x, plain.x[perm], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(moved.state, plain.state[perm], rtol=1e-10, atol=1e-10)
    assert torch.equal(moved.log_weights, torch.zeros(8, dtype=torch.float64))


def test_smc_with_resampling_matches_the_exact_tilted_mixture() -> None:
    r"""Target :math:`p(x)e^{w x}` for a two-component mixture: component weights
    :math:`\propto \pi_k e^{w\mu_k + w^2 c_k/2}`, means :math:`\mu_k + c_k w`. Twisted SMC with the
    potentials :math:`r(\hat x_i)` (telescoping increments), multinomial resampling below ESS 0.8 N,
    on a stochastic multistep solver whose history must follow the particles."""
    means, scales, w = torch.tensor([[-2.0], [2.0]]), torch.tensor([[0.5], [0.5]]), 0.4
    mix = fd.testing.GaussianMixture(means, scales=scales, path=VP)
    tilted = torch.softmax(torch.tensor([w * -2.0, w * 2.0]) + w * w * 0.25 / 2, 0)
    n = 3000
    gen = torch.Generator().manual_seed(11)
    prev = {"r": torch.zeros(n, dtype=torch.float64)}
    resamples = []

    def twist(state: LoopState) -> LoopState:
        r = w * state.denoised[:, 0]
        state.log_weights = state.log_weights + r - prev["r"]
        prev["r"] = r
        if state.ess() < 0.8 * n:
            state = state.resample(generator=gen)
            prev["r"] = prev["r"][state.ancestors]
            resamples.append(state.i)
        return state

    res = sample(fd.Field(mix.model("noise"), VP, "noise"), VP.prior_sample((n, 1), generator=gen, dtype=torch.float64),
                 solver="sde-dpm-solver++2", nfe=30, generator=gen, hooks=Hooks(step=twist))
    logw = res.log_weights + w * res.x[:, 0] - prev["r"]  # the last increment, to the final output
    weights = torch.softmax(logw, 0)
    assert resamples, "the test must exercise resampling"
    frac_right = float((weights * (res.x[:, 0] > 0)).sum())
    assert abs(frac_right - float(tilted[1])) < 0.04, (frac_right, tilted)
    right_mean = float((weights * res.x[:, 0] * (res.x[:, 0] > 0)).sum()) / frac_right
    assert abs(right_mean - (2.0 + 0.25 * w)) < 0.05


def test_step_hook_sees_every_step_with_time_and_denoised() -> None:
    seen = []
    res = sample(field(), x_init(4), solver="dpm-solver++", nfe=8,
                 hooks=Hooks(step=lambda s: seen.append((s.i, s.t, s.denoised is not None))))
    assert [s[0] for s in seen] == list(range(res.steps))
    assert [s[1] for s in seen] == res.grid[1:].tolist() and all(s[2] for s in seen)


# ----- transition hook -------------------------------------------------------------------------


def _mean_and_std(solver: str, tr, options: dict) -> tuple[torch.Tensor, float]:
    """The deterministic part and the noise scale, recomputed from the exact denoiser."""
    t = torch.tensor([tr.t, tr.t_next], dtype=torch.float64)
    tab = VP.table(t)
    a_s, a_t = float(tab.alpha[0]), float(tab.alpha[1])
    s_s, s_t = float(tab.sigma[0]), float(tab.sigma[1])
    h = float(tab.log_snr[1] - tab.log_snr[0])
    tb = torch.full((tr.x.shape[0],), tr.t, dtype=torch.float64)
    data = PRIOR.denoise(tr.x, tb)
    if solver == "euler-maruyama":
        eps = s_s**2 * float(tab.d_log_snr[0])
        dt = tr.t_next - tr.t
        return tr.x + dt * (PRIOR.velocity(tr.x, tb) + eps * PRIOR.score(tr.x, tb)), math.sqrt(2 * eps * dt)
    eta = options.get("eta", 1.0)
    c = eta * s_t * math.sqrt(1 - math.exp(-2 * h))
    noise = (tr.x - a_s * data) / s_s
    return a_t * data + math.sqrt(s_t**2 - c**2) * noise, c


@pytest.mark.parametrize("solver,options", [
    ("ddpm", {"eta": 0.5}), ("ddpm", {}), ("sde-dpm-solver++1", {}), ("euler-maruyama", {}),
])
def test_transitions_are_the_solvers_gaussian_steps(solver: str, options: dict) -> None:
    x = x_init(16, 6)
    seen = []
    res = sample(field(), x, solver=solver, nfe=11, generator=torch.Generator().manual_seed(7),
                 hooks=Hooks(transition=seen.append, record_transitions=True), **options)
    plain = sample(field(), x, solver=solver, nfe=11, generator=torch.Generator().manual_seed(7), **options)
    torch.testing.assert_close(res.x, plain.x, rtol=0, atol=0)  # watching does not change the run
    assert len(seen) == res.steps and res.transitions is not None and len(res.transitions) == res.steps
    replay = torch.Generator().manual_seed(7)
    for tr in seen:
        z = torch.randn(tr.x.shape, generator=replay, dtype=torch.float64)
        torch.testing.assert_close(tr.x_next, tr.mean + tr.std * z, rtol=1e-12, atol=1e-12)
        exact = torch.distributions.Normal(tr.mean, torch.full_like(tr.mean, tr.std)).log_prob(tr.x_next).sum(1)
        torch.testing.assert_close(tr.log_prob(), exact, rtol=1e-10, atol=1e-10)
        mean, std = _mean_and_std(solver, tr, options)
        torch.testing.assert_close(tr.mean, mean, rtol=1e-9, atol=1e-9)
        assert math.isclose(tr.std, std, rel_tol=1e-9)


@pytest.mark.parametrize("solver,options,per_step", [
    ("pc", {"n_corrector": 2}, 3), ("edm", {"S_churn": 40.0, "S_tmin": 0.0, "S_tmax": 1e9}, 1),
    ("sde-dpm-solver++2", {}, 1), ("ddim", {}, 0), ("ddpm", {"eta": 0.0}, 0),
])
def test_every_stochastic_move_is_reported(solver: str, options: dict, per_step: int) -> None:
    seen = []
    res = sample(field(), x_init(8, 8), solver=solver, nfe=13, generator=torch.Generator().manual_seed(1),
                 hooks=Hooks(transition=seen.append), **options)
    if solver == "edm":  # no churn on the first step: it starts at the cap, the noise level of t_min
        assert len(seen) == res.steps - 1 and all(tr.t_next < tr.t for tr in seen)
    else:
        assert len(seen) == per_step * res.steps
    for tr in seen:
        torch.testing.assert_close(tr.log_prob(), torch.distributions.Normal(
            tr.mean, torch.as_tensor(tr.std, dtype=torch.float64).expand_as(tr.mean)).log_prob(tr.x_next).sum(1))


# ----- budget planner and option vocabulary ----------------------------------------------------


def test_planner_sees_the_options() -> None:
    f = field()
    assert sample(f, x_init(4), solver="pc", nfe=21, n_corrector=3, generator=torch.Generator()).steps == 5
    assert sample(f, x_init(4), solver="pc", nfe=11, n_corrector=0, generator=torch.Generator()).nfe == 11
    si = fd.paths.StochasticInterpolant("linear", "brownian")
    oracle = fd.testing.InterpolantOracle(si, PRIOR, PRIOR)
    fi = fd.InterpolantField(oracle.model("drift"), si, "drift", oracle.model("score"), "score")
    x = PRIOR.sample(4, generator=torch.Generator().manual_seed(0))
    res = sample(fi, x, solver="euler-maruyama", nfe=9, eps=0.0)  # no score calls: 8 steps, not 4
    assert res.nfe == 9 and res.steps == 8
    assert sample(fi, x, solver="euler-maruyama", nfe=9, eps=0.5, generator=torch.Generator()).steps == 4
    for nfe, steps in ((2, 1), (3, 1), (4, 1), (5, 1), (6, 2)):  # rk4 with fewer than 4 calls: one lower-order step
        res = sample(f, x_init(4), solver="rk4", nfe=nfe)
        assert (res.nfe, res.steps) == (nfe, steps)
    with pytest.raises(ValueError, match="nfe=1 is too small for solver 'rk4'.*needs nfe >= 2"):
        sample(f, x_init(4), solver="rk4", nfe=1)


def test_unknown_and_fixed_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown option 'ordr' for solver 'unipc'; valid: order, variant, prediction"):
        sample(field(), x_init(4), solver="unipc", nfe=8, ordr=2)
    with pytest.raises(ValueError, match="solver 'ddim' fixes eta=0.0"):
        sample(field(), x_init(4), solver="ddim", nfe=8, eta=0.3)
    assert set(fd.solvers.get_solver("ddpm").options) == {"eta"}
    with pytest.raises(TypeError, match="hooks must be a fd.solvers.Hooks"):
        sample(field(), x_init(4), solver="ddim", nfe=8, hooks=lambda *a: None)


def test_a_new_solver_is_one_step() -> None:
    """The extension point: a Solver subclass with a step and its options, registered under a name,
    runs in the loop with its budget, options check and hooks (here DDIM written as x̂/ε̂ recombination)."""
    from flowdiff.solvers import Solver, base, register_solver

    class Recombine(Solver):
        options = {"scale": 1.0}

        def step(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            data, noise = self.run.evaluate(x, i)
            return self.run.alpha[i + 1] * data + self.opts["scale"] * self.run.sigma[i + 1] * noise, data

    register_solver("test-recombine", Recombine, kind="exponential", requires_gaussian_path=True, default_grid="logsnr")
    try:
        x = x_init(8, 9)
        mine = sample(field(), x, solver="test-recombine", nfe=9)
        ddim = sample(field(), x, solver="ddim", nfe=9)
        assert mine.nfe == ddim.nfe == 9
        torch.testing.assert_close(mine.x, ddim.x, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="unknown option 'scal' for solver 'test-recombine'; valid: scale"):
            sample(field(), x, solver="test-recombine", nfe=9, scal=2.0)
        guided = sample(field(), x, solver="test-recombine", nfe=9, hooks=Hooks(denoiser=likelihood_guidance))
        exact = sample(field(POSTERIOR), x, solver="test-recombine", nfe=9)
        torch.testing.assert_close(guided.x, exact.x, rtol=1e-7, atol=1e-7)
    finally:
        del base._REGISTRY["test-recombine"]


def test_sampling_builds_no_graph_unless_asked_and_then_gradients_are_right():
    """A model with trainable parameters: fd.sample runs under no_grad by default (no graph over the
    steps, as diffusers' pipelines); differentiable=True back-propagates through the whole solve,
    checked against a finite difference."""
    path = fd.paths.VP()
    scale = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def model(x, t):
        return scale * x  # a noise prediction linear in the state

    field = fd.Field(model, path, "noise")
    x = path.prior_sample((8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = fd.sample(field, x, solver="dpm-solver++2m", nfe=8)
    assert not plain.x.requires_grad and plain.x.grad_fn is None
    res = fd.sample(field, x, solver="dpm-solver++2m", nfe=8, differentiable=True)
    torch.testing.assert_close(res.x.detach(), plain.x, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(res.x.sum(), scale)
    eps = 1e-6
    with torch.no_grad():
        scale += eps
        up = fd.sample(field, x, solver="dpm-solver++2m", nfe=8).x.sum()
        scale -= 2 * eps
        down = fd.sample(field, x, solver="dpm-solver++2m", nfe=8).x.sum()
        scale += eps
    assert abs(float(grad) - float(up - down) / (2 * eps)) < 1e-6 * max(1.0, abs(float(grad)))
