"""Tests of flowdiff.losses against truth: exact oracles, closed-form weights, exact distributions."""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.couplings import MinibatchOT
from flowdiff.losses import (
    OBJECTIVES,
    TIME_SAMPLERS,
    WEIGHTINGS,
    CustomWeighting,
    EDMTime,
    GaussianPathLoss,
    ImportanceTime,
    InterpolantLoss,
    LogitNormalTime,
    LossOutput,
    UniformTime,
    available_interpolant_targets,
    available_objectives,
    available_predictions,
    available_time_samplers,
    available_weightings,
    make_weighting,
)
from flowdiff.paths import (
    EDM,
    VE,
    VP,
    Cosine,
    Linear,
    StochasticInterpolant,
    SubVP,
    Trig,
)

PREDICTIONS = ("noise", "data", "velocity", "score", "v")
PATHS = [VP(), SubVP(), VE(), EDM(), Linear(), Trig(), Cosine()]


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """sup |F_n - F| for the empirical CDF of ``samples``."""
    x, _ = torch.sort(samples.to(torch.float64))
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def dkw_tolerance(n: int, failure_probability: float = 1e-6) -> float:
    """Dvoretzky–Kiefer–Wolfowitz: P(sup|F_n - F| > eps) <= 2 exp(-2 n eps^2)."""
    return math.sqrt(math.log(2 / failure_probability) / (2 * n))


def noise_model_with_error(oracle: fd.testing.GaussianMixture):
    """A noise predictor = exact + a smooth, x- and t-dependent error."""
    exact = oracle.model("noise")

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return exact(x, t) + 0.3 * torch.sin(2 * x + 3 * t[:, None]) + 0.1

    return model


def converted_model(noise_model, path, prediction: str):
    """The same model, seen as ``prediction`` through Field.convert (exact algebra, no new error)."""
    field = fd.Field(noise_model, path, "noise")

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return field.convert(noise_model(x, t), x, t, "noise", prediction)

    return model


# =================================================================================================
# Gaussian-path loss: targets and weights
# =================================================================================================


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_and_none_weighting_are_the_plain_mse_to_path_target(prediction: str) -> None:
    path = VP()
    x1 = torch.randn(16, 3, generator=gen(0), dtype=torch.float64)
    noise = torch.randn(16, 3, generator=gen(1), dtype=torch.float64)
    t = torch.rand(16, generator=gen(2), dtype=torch.float64) * 0.9 + 0.05
    out = GaussianPathLoss(path, prediction, "none")(lambda x, tt: torch.zeros_like(x), x1, x0=noise, t=t)
    expected = path.target(prediction, x1, noise, t).pow(2).mean(1)
    torch.testing.assert_close(out.per_sample, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-12, atol=0)


def test_flow_matching_velocity_loss_by_hand() -> None:
    # Rectified flow: x_t = t x1 + (1 - t) eps, target x1 - eps (Lipman et al. 2023; Liu et al. 2023).
    x1 = torch.randn(8, 2, generator=gen(3), dtype=torch.float64)
    eps = torch.randn(8, 2, generator=gen(4), dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return 2 * x

    out = GaussianPathLoss(Linear(), "velocity")(model, x1, x0=eps, t=t)
    xt = t[:, None] * x1 + (1 - t[:, None]) * eps
    torch.testing.assert_close(seen["x"], xt)
    torch.testing.assert_close(out.per_sample, (2 * xt - (x1 - eps)).pow(2).mean(1))
    torch.testing.assert_close(out.t, t)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("weighting", ["snr", "min-snr", "edm", "likelihood", "callable"])
def test_weighting_is_prediction_invariant_for_the_same_error(path, weighting) -> None:
    """One model error, written in five parametrisations, costs exactly the same."""
    oracle = fd.testing.random_mixture(2, 3, seed=1, path=path)
    noise_model = noise_model_with_error(oracle)
    x1 = oracle.sample(64, gen(5))
    eps = torch.randn(64, 2, generator=gen(6), dtype=torch.float64)
    w = (lambda t: 1 + torch.cos(3 * t)) if weighting == "callable" else weighting
    values = {}
    for prediction in PREDICTIONS:
        loss = GaussianPathLoss(path, prediction, w, time_sampler="uniform")
        out = loss(converted_model(noise_model, path, prediction), x1, x0=eps, generator=gen(7))
        values[prediction] = out.per_sample
    for prediction in PREDICTIONS[1:]:
        torch.testing.assert_close(values[prediction], values["noise"], rtol=1e-10, atol=0)
    assert torch.all(values["noise"] > 0)


def test_custom_weighting_reference_and_own_mse() -> None:
    path = VP()
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    alpha, sigma = path.alpha(t), path.sigma(t)
    snr = (alpha / sigma) ** 2
    # Unit weight on the noise MSE = SNR weight on the data MSE.
    on_noise = CustomWeighting(lambda tt: torch.ones_like(tt), reference="noise")
    torch.testing.assert_close(on_noise.weight(path, t, "data"), snr)
    torch.testing.assert_close(on_noise.weight(path, t, "noise"), torch.ones_like(t))
    own = CustomWeighting(lambda tt: 2 * tt, reference=None)
    for prediction in PREDICTIONS:
        torch.testing.assert_close(own.weight(path, t, prediction), 2 * t)


def test_named_weights_match_published_closed_forms() -> None:
    t = torch.linspace(0.02, 0.98, 11, dtype=torch.float64)
    vp = VP()
    alpha, sigma = vp.alpha(t), vp.sigma(t)
    snr = (alpha / sigma) ** 2
    gamma = 5.0
    # Hang et al. 2023 / diffusers: ε-prediction min(SNR, γ)/SNR, v-prediction min(SNR, γ)/(SNR + 1).
    torch.testing.assert_close(GaussianPathLoss(vp, "noise", "min-snr").weight(t), torch.clamp(snr, max=gamma) / snr)
    torch.testing.assert_close(GaussianPathLoss(vp, "v", "min-snr").weight(t), torch.clamp(snr, max=gamma) / (snr + 1))
    torch.testing.assert_close(GaussianPathLoss(vp, "data", "min-snr", gamma=2.0).weight(t), torch.clamp(snr, max=2.0))
    # SNR weighting = Ho et al.'s unweighted ε-loss.
    torch.testing.assert_close(GaussianPathLoss(vp, "noise", "snr").weight(t), torch.ones_like(t))
    torch.testing.assert_close(GaussianPathLoss(vp, "data", "snr").weight(t), snr)
    # Song et al. 2021: likelihood weight on the score MSE is g² = β(s), s = 1 - t, for VP.
    beta = vp.beta_min + (1 - t) * (vp.beta_max - vp.beta_min)
    torch.testing.assert_close(GaussianPathLoss(vp, "score", "likelihood").weight(t), beta)
    # VE: g² = dσ²/ds = 2σ² log(σ_max/σ_min).
    ve = VE(0.01, 50.0)
    log_ratio = math.log(50.0 / 0.01)
    torch.testing.assert_close(GaussianPathLoss(ve, "score", "likelihood").weight(t), 2 * ve.sigma(t) ** 2 * log_ratio)
    torch.testing.assert_close(GaussianPathLoss(ve, "noise", "likelihood").weight(t), torch.full_like(t, 2 * log_ratio))
    # Karras et al. 2022: λ(σ) = (σ² + σ_d²)/(σ σ_d)² on the denoiser loss; EDM path has α = 1, σ_d from the path.
    edm = EDM(sigma_data=0.7)
    sig = edm.sigma(t)
    torch.testing.assert_close(GaussianPathLoss(edm, "data", "edm").weight(t), (sig**2 + 0.49) / (sig * 0.7) ** 2)
    torch.testing.assert_close(GaussianPathLoss(vp, "data", "edm", sigma_data=0.5).weight(t),
                               ((sigma / alpha) ** 2 + 0.25) / ((sigma / alpha) * 0.5) ** 2)
    # Linear path: SNR weighting on the velocity MSE is t² (‖Δε‖² = t² ‖Δu‖²).
    torch.testing.assert_close(GaussianPathLoss(Linear(), "velocity", "snr").weight(t), t**2)


@pytest.mark.parametrize("weighting", ["snr", "min-snr", "edm", "likelihood"])
def test_float32_loss_reads_the_float64_schedule_once(weighting) -> None:
    """A float32 batch gets the float64 weights and coefficients of the path's public table,
    rounded once: the per-sample loss equals the float64 formula to float32 precision."""
    path = VP()
    weight = make_weighting(weighting)
    t = torch.linspace(0.05, 0.95, 16, dtype=torch.float64)
    for prediction in PREDICTIONS:
        from_table = weight.weight_from_table(path.table(t), prediction)
        torch.testing.assert_close(from_table, weight.weight(path, t, prediction), rtol=1e-12, atol=0)
        assert weight.weight(path, t.float(), prediction).dtype == torch.float32
    x1, eps = torch.randn(16, 3, generator=gen(1)), torch.randn(16, 3, generator=gen(2))
    model = lambda x, tt: torch.sin(x) * tt[:, None]  # noqa: E731
    out = GaussianPathLoss(path, "velocity", weighting)(model, x1, x0=eps, t=t.float())
    assert out.per_sample.dtype == torch.float32
    t64 = t.float().double()  # the float32 times the loss saw
    a, s = path.alpha(t64)[:, None], path.sigma(t64)[:, None]
    x_t = a * x1.double() + s * eps.double()
    target = path.d_alpha(t64)[:, None] * x1.double() + path.d_sigma(t64)[:, None] * eps.double()
    expected = weight.weight(path, t64, "velocity") * ((model(x_t, t64) - target) ** 2).mean(1)
    torch.testing.assert_close(out.per_sample.double(), expected, rtol=1e-5, atol=1e-7)


def test_likelihood_weighting_is_the_elbo_weight_on_the_data_mse() -> None:
    # Kingma et al. 2021: the continuous-time ELBO weighs ‖x - x̂‖² by ½ dSNR/dt; ours is dSNR/dt (no ½).
    path = Cosine()
    t = torch.linspace(0.1, 0.9, 9, dtype=torch.float64, requires_grad=True)
    snr = (path._alpha(t) / path._sigma(t)) ** 2  # unchecked forms: t carries a graph here
    (dsnr,) = torch.autograd.grad(snr.sum(), t)
    weight = GaussianPathLoss(path, "data", "likelihood").weight(t.detach())
    torch.testing.assert_close(weight, dsnr, rtol=1e-9, atol=0)


# =================================================================================================
# Gaussian-path loss: the exact field is the minimiser
# =================================================================================================


CASES = [
    (VP(), "noise", "none"),
    (VP(), "v", "min-snr"),
    (VP(), "score", "likelihood"),
    (EDM(), "data", "edm"),
    (Linear(), "velocity", "none"),
    (Linear(), "velocity", "snr"),
    (Cosine(), "data", "snr"),
    (Trig(), "noise", "likelihood"),
]


@pytest.mark.parametrize("path,prediction,weighting", CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_exact_oracle_minimises_the_loss(path, prediction, weighting) -> None:
    """E[ℓ(f* + δ)] - E[ℓ(f*)] = E[w]|δ|²/D > 0: the cross term vanishes because f* = E[target | x_t]."""
    n, dim = 8192, 2
    oracle = fd.testing.random_mixture(dim, 3, seed=2, path=path)
    exact = oracle.model(prediction)
    delta = torch.tensor([0.3, -0.4], dtype=torch.float64)

    def perturbed(x, t):
        return exact(x, t) + delta

    loss = GaussianPathLoss(path, prediction, weighting, time_sampler="uniform")
    x1 = oracle.sample(n, gen(10))
    eps = torch.randn(n, dim, generator=gen(11), dtype=torch.float64)
    # Common random numbers: same x1, noise and times for both models.
    base = loss(exact, x1, x0=eps, generator=gen(12))
    pert = loss(perturbed, x1, x0=eps, generator=gen(12))
    diff = pert.per_sample - base.per_sample
    standard_error = float(diff.std()) / math.sqrt(n)
    assert float(diff.mean()) > 5 * standard_error
    # The excess is exactly the weighted |δ|² in expectation (within 5 standard errors).
    expected = float(loss.weight(base.t).mean()) * float(delta.pow(2).mean())
    assert abs(float(diff.mean()) - expected) < 5 * standard_error + 1e-12


def test_loss_gradient_flows_and_per_sample_is_detached() -> None:
    net = torch.nn.Linear(3, 2).double()
    model = lambda x, t: net(torch.cat([x, t[:, None]], 1))
    x1 = torch.randn(8, 2, generator=gen(13), dtype=torch.float64)
    out = GaussianPathLoss(VP(), "noise", "min-snr")(model, x1, generator=gen(14))
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0 and out.loss.requires_grad and not out.per_sample.requires_grad
    assert out.per_sample.shape == (8,) and out.t.shape == (8,)
    out.loss.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_per_sample_losses_do_not_depend_on_the_rest_of_the_batch() -> None:
    oracle = fd.testing.random_mixture(2, 2, seed=3, path=VP())
    model = noise_model_with_error(oracle)
    x1 = oracle.sample(10, gen(15))
    eps = torch.randn(10, 2, generator=gen(16), dtype=torch.float64)
    t = torch.rand(10, generator=gen(17), dtype=torch.float64)
    loss = GaussianPathLoss(VP(), "noise", "edm")
    full = loss(model, x1, x0=eps, t=t).per_sample
    half = loss(model, x1[:4], x0=eps[:4], t=t[:4]).per_sample
    torch.testing.assert_close(full[:4], half, rtol=1e-14, atol=0)


def test_labels_are_passed_only_when_given_and_follow_the_coupling() -> None:
    calls = []

    def model(x, t, **cond):
        calls.append(cond)
        return torch.zeros_like(x)

    x1 = torch.randn(6, 2, generator=gen(18), dtype=torch.float64)
    loss = GaussianPathLoss(Linear(), "velocity")
    loss(model, x1, generator=gen(19))
    assert calls[-1] == {}
    y = torch.arange(6)
    loss(model, x1, y=y, generator=gen(19))
    assert torch.equal(calls[-1]["y"], y)

    # Minibatch OT: x_t is built from the OT-paired noise; x1 and y keep their order (a permutation).
    seen = {}

    def recorder(x, t, y=None):
        seen["x"], seen["y"] = x, y
        return torch.zeros_like(x)

    eps = torch.randn(6, 2, generator=gen(20), dtype=torch.float64)
    t = torch.full((6,), 0.5, dtype=torch.float64)
    GaussianPathLoss(Linear(), "velocity", coupling=MinibatchOT())(recorder, x1, y=y, x0=eps, t=t)
    paired_eps, _, _ = MinibatchOT().pair(eps, x1)
    torch.testing.assert_close(seen["x"], 0.5 * x1 + 0.5 * paired_eps)
    assert torch.equal(seen["y"], y)


def test_times_are_clipped_into_the_safe_interval_and_dtype_is_followed() -> None:
    x1 = torch.randn(4096, 2, generator=gen(21))
    out = GaussianPathLoss(Linear(), "velocity", time_sampler=UniformTime(0.0, 1.0))(
        lambda x, t: torch.zeros_like(x), x1, generator=gen(22))
    assert out.t.dtype == torch.float32 and out.loss.dtype == torch.float32
    ulp = 1e-7  # float32 rounding of the interval ends
    assert float(out.t.min()) >= Linear().t_min - ulp and float(out.t.max()) <= Linear().t_max + ulp
    assert float(out.t.min()) < 0.002 and float(out.t.max()) > 0.998  # clipped, not resampled
    vp = VP()
    out = GaussianPathLoss(vp, "noise", time_sampler="logit-normal")(lambda x, t: torch.zeros_like(x), x1, generator=gen(23))
    assert float(out.t.max()) <= vp.t_max + ulp and torch.isfinite(out.per_sample).all()


def test_importance_weights_multiply_the_per_sample_loss() -> None:
    path = VP()
    oracle = fd.testing.random_mixture(2, 2, seed=4, path=path)
    model = noise_model_with_error(oracle)
    x1 = oracle.sample(32, gen(24))
    eps = torch.randn(32, 2, generator=gen(25), dtype=torch.float64)
    sampler = ImportanceTime(lambda t: 0.2 + t**2, t_min=path.t_min, t_max=path.t_max)
    importance = GaussianPathLoss(path, "noise", "none", time_sampler=sampler)(model, x1, x0=eps, generator=gen(26))
    fixed = GaussianPathLoss(path, "noise", "none")(model, x1, x0=eps, t=importance.t)
    q = 0.2 + importance.t**2
    q = q / (path.t_max - path.t_min) / (0.2 + (path.t_max**3 - path.t_min**3) / 3 / (path.t_max - path.t_min))
    weight = 1 / ((path.t_max - path.t_min) * q)
    torch.testing.assert_close(importance.per_sample, weight * fixed.per_sample, rtol=1e-5, atol=0)


# =================================================================================================
# Time samplers
# =================================================================================================


N_TIMES = 40000


def test_uniform_time_distribution() -> None:
    t, w = UniformTime(0.1, 0.7).sample(N_TIMES, gen(30), torch.float64)
    assert torch.all(w == 1) and t.min() >= 0.1 and t.max() <= 0.7
    assert ks_statistic(t, lambda x: (x - 0.1) / 0.6) < dkw_tolerance(N_TIMES)


def test_logit_normal_time_distribution_and_the_test_has_power() -> None:
    mean, std = 0.5, 0.8
    t, w = LogitNormalTime(mean, std).sample(N_TIMES, gen(31), torch.float64)
    assert torch.all(w == 1)
    cdf = lambda x: normal_cdf((torch.log(x) - torch.log1p(-x) - mean) / std)
    assert ks_statistic(t, cdf) < dkw_tolerance(N_TIMES)
    # The same statistic rejects a wrong distribution (here: uniform).
    assert ks_statistic(t, lambda x: x) > 5 * dkw_tolerance(N_TIMES)


def test_edm_time_distribution_is_log_normal_in_sigma() -> None:
    path = EDM()
    t, w = EDMTime(path, p_mean=-1.2, p_std=1.2).sample(N_TIMES, gen(32), torch.float64)
    assert torch.all(w == 1)
    # P(T <= t) = P(ln σ̃ >= -λ(t)) = 1 - Φ((-λ(t) - P_mean)/P_std).
    cdf = lambda x: 1 - normal_cdf((-path.log_snr(x) + 1.2) / 1.2)
    assert ks_statistic(t, cdf) < dkw_tolerance(N_TIMES)
    # On VP the same noise levels are used: σ/α of the sampled times is log-normal.
    vp_t, _ = EDMTime(VP(), -1.2, 1.2).sample(N_TIMES, gen(33), torch.float64)
    log_sigma = -VP().log_snr(vp_t)
    assert ks_statistic(log_sigma, lambda x: normal_cdf((x + 1.2) / 1.2)) < dkw_tolerance(N_TIMES) + 1e-4


def test_importance_time_from_callable_density() -> None:
    sampler = ImportanceTime(lambda t: 1 + 3 * t**2)  # normalised: (1 + 3t²)/2, CDF (t + t³)/2
    t, w = sampler.sample(N_TIMES, gen(34), torch.float64)
    assert ks_statistic(t, lambda x: (x + x**3) / 2) < dkw_tolerance(N_TIMES)
    # Weights are the likelihood ratio uniform/q.
    torch.testing.assert_close(w, 2 / (1 + 3 * t**2), rtol=1e-5, atol=0)
    torch.testing.assert_close(sampler.density(t), (1 + 3 * t**2) / 2, rtol=1e-5, atol=0)


def test_importance_time_from_a_table_is_exactly_piecewise_linear() -> None:
    # Density values 1, 3 at 0.2, 0.5, then 3, 2 at 0.5, 0.8 (linear in between), on [0.2, 0.8].
    sampler = ImportanceTime([1.0, 3.0, 2.0], t_min=0.2, t_max=0.8)
    total = 0.3 * (1 + 3) / 2 + 0.3 * (3 + 2) / 2

    def cdf(x):
        u1 = torch.clamp(x - 0.2, 0, 0.3)
        u2 = torch.clamp(x - 0.5, 0, 0.3)
        first = 1 * u1 + 0.5 * (2 / 0.3) * u1**2
        second = 3 * u2 + 0.5 * (-1 / 0.3) * u2**2
        return (first + second) / total

    t, w = sampler.sample(N_TIMES, gen(35), torch.float64)
    assert t.min() >= 0.2 and t.max() <= 0.8
    assert ks_statistic(t, cdf) < dkw_tolerance(N_TIMES)
    density = torch.where(t < 0.5, 1 + (2 / 0.3) * (t - 0.2), 3 - (1 / 0.3) * (t - 0.5)) / total
    torch.testing.assert_close(w, 1 / (0.6 * density), rtol=1e-9, atol=0)
    grid = torch.linspace(0.2, 0.8, 13, dtype=torch.float64)
    torch.testing.assert_close(sampler.cdf(grid), cdf(grid), rtol=0, atol=1e-12)


def test_importance_weights_make_the_uniform_objective_unbiased() -> None:
    sampler = ImportanceTime(lambda t: torch.exp(3 * t), t_min=0.1, t_max=0.9)
    t, w = sampler.sample(N_TIMES, gen(36), torch.float64)
    f = torch.cos(4 * t) + t  # any integrand
    estimate = w * f
    exact = ((math.sin(3.6) - math.sin(0.4)) / 4 + (0.81 - 0.01) / 2) / 0.8  # (1/0.8) ∫ cos(4t) + t dt
    standard_error = float(estimate.std()) / math.sqrt(N_TIMES)
    assert abs(float(estimate.mean()) - exact) < 5 * standard_error
    assert abs(float(w.mean()) - 1) < 5 * float(w.std()) / math.sqrt(N_TIMES)
    # Without the weights the estimate is biased (the test can fail).
    assert abs(float(f.mean()) - exact) > 20 * standard_error


def test_time_sampler_errors() -> None:
    with pytest.raises(ValueError, match=r"t_min < t_max"):
        UniformTime(0.5, 0.2)
    with pytest.raises(ValueError, match=r"std must be a finite number > 0, got std=0.0"):
        LogitNormalTime(0.0, 0.0)
    with pytest.raises(ValueError, match="finite and > 0"):
        ImportanceTime(lambda t: t)  # zero at t = 0
    with pytest.raises(ValueError, match="at least 2"):
        ImportanceTime([1.0])
    with pytest.raises(ValueError, match="n must be an integer >= 1, got n=0"):
        UniformTime().sample(0)


# =================================================================================================
# Interpolant loss
# =================================================================================================


def mixtures(dim: int = 2):
    base = fd.testing.GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), scales=torch.full((2, 2), 0.6))
    target = fd.testing.random_mixture(dim, 3, seed=5)
    return base, target


INTERPOLANT_CASES = [
    ("linear", "brownian", "drift"),
    ("linear", "brownian", "velocity"),
    ("linear", "brownian", "score"),
    ("linear", "brownian", "denoiser"),
    ("trig", "bsquared", "drift"),
    ("encoder-decoder", "sinesquared", "score"),
    ("one-sided-linear", "zero", "drift"),
    ("one-sided-trig", "zero", "score"),
    ("mirror", "brownian", "drift"),
    ("mirror", "brownian", "denoiser"),
]


@pytest.mark.parametrize("kind,gamma,target", INTERPOLANT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_exact_interpolant_fields_minimise_the_loss(kind, gamma, target, objective) -> None:
    n = 4096
    interpolant = StochasticInterpolant(kind, gamma, a=0.5 if kind == "trig" else 1.0, t_min=0.02, t_max=0.98)
    base, data = mixtures()
    oracle = fd.testing.InterpolantOracle(interpolant, None if (interpolant.one_sided or interpolant.is_mirror) else base, data)
    exact = oracle.model(target)
    delta = torch.tensor([0.3, -0.4], dtype=torch.float64)
    loss = InterpolantLoss(interpolant, target, antithetic=True, objective=objective)
    x1 = data.sample(n, gen(40))
    x0 = None if (interpolant.one_sided or interpolant.is_mirror) else base.sample(n, gen(41))
    if interpolant.one_sided:
        x0 = torch.randn(n, 2, generator=gen(41), dtype=torch.float64)
    base_out = loss(exact, x1, x0=x0, generator=gen(42))
    pert_out = loss(lambda x, t: exact(x, t) + delta, x1, x0=x0, generator=gen(42))
    diff = pert_out.per_sample - base_out.per_sample
    standard_error = float(diff.std()) / math.sqrt(n)
    # Excess = |δ|²/D for the MSE, half of it for the quadratic form.
    expected = float(delta.pow(2).mean()) * (1.0 if objective == "mse" else 0.5)
    assert float(diff.mean()) > 5 * standard_error
    assert abs(float(diff.mean()) - expected) < 5 * standard_error + 1e-12


def test_one_sided_interpolant_loss_equals_the_gaussian_path_loss() -> None:
    # one-sided-linear is the Linear path: same x_t, same velocity target x1 - x0, same score target -x0/(1-t).
    x1 = torch.randn(32, 3, generator=gen(43), dtype=torch.float64)
    x0 = torch.randn(32, 3, generator=gen(44), dtype=torch.float64)
    t = torch.rand(32, generator=gen(45), dtype=torch.float64) * 0.9 + 0.05
    model = lambda x, tt: torch.sin(x) * tt[:, None]
    interpolant = StochasticInterpolant("one-sided-linear")
    for target, prediction in (("velocity", "velocity"), ("drift", "velocity"), ("score", "score")):
        a = InterpolantLoss(interpolant, target, antithetic=False)(model, x1, x0=x0, t=t)
        b = GaussianPathLoss(Linear(), prediction, "none")(model, x1, x0=x0, t=t)
        torch.testing.assert_close(a.per_sample, b.per_sample, rtol=1e-12, atol=0)


def test_mse_gradient_is_twice_the_quadratic_gradient() -> None:
    interpolant = StochasticInterpolant("linear", "brownian")
    base, data = mixtures()
    x1, x0 = data.sample(64, gen(46)), base.sample(64, gen(47))
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    model = lambda x, t: torch.tanh(x) * theta + t[:, None] * theta.flip(0)
    for target in ("drift", "score"):
        grads = {}
        for objective in OBJECTIVES:
            out = InterpolantLoss(interpolant, target, objective=objective)(model, x1, x0=x0, generator=gen(48))
            (grads[objective],) = torch.autograd.grad(out.loss, theta)
        torch.testing.assert_close(grads["mse"], 2 * grads["quadratic"], rtol=1e-10, atol=1e-12)


def test_antithetic_sampling_reduces_variance_near_the_endpoints() -> None:
    """Score objective at t ∈ [0.001, 0.01]: the γ⁻¹ z·ŝ term is O(1/γ) without the antithetic twin."""
    n = 4096
    interpolant = StochasticInterpolant("linear", "brownian", t_min=1e-3, t_max=1 - 1e-3)
    base, data = mixtures()
    oracle = fd.testing.InterpolantOracle(interpolant, base, data)
    exact = oracle.model("score")
    x1, x0 = data.sample(n, gen(49)), base.sample(n, gen(50))
    near_end = UniformTime(1e-3, 1e-2)
    variances = {}
    for antithetic in (False, True):
        loss = InterpolantLoss(interpolant, "score", antithetic=antithetic, objective="quadratic", time_sampler=near_end)
        variances[antithetic] = float(loss(exact, x1, x0=x0, generator=gen(51)).per_sample.var())
    assert variances[True] < variances[False] / 10

    # Gradient variance of the MSE form for a model ŝ + θ h(x) at θ = 0 (the constant |z|²/γ² of the MSE has no
    # gradient). One θ per sample: loss = mean_i ℓ_i(θ_i), so B · ∂loss/∂θ_i is sample i's gradient.
    m = 1024
    grad_var = {}
    for antithetic in (False, True):
        theta = torch.zeros(m, dtype=torch.float64, requires_grad=True)

        def model(x, t, theta=theta):
            repeats = x.shape[0] // m  # 2 with the antithetic twin (batched in one call)
            return exact(x, t) + theta.repeat(repeats)[:, None] * torch.sin(x)

        loss = InterpolantLoss(interpolant, "score", antithetic=antithetic, objective="mse", time_sampler=near_end)
        out = loss(model, x1[:m], x0=x0[:m], generator=gen(52))
        (grad,) = torch.autograd.grad(out.loss, theta)
        grad_var[antithetic] = float((m * grad).var())
    assert grad_var[True] < grad_var[False] / 10


def test_interpolant_loss_passes_labels_and_batches_the_antithetic_pair() -> None:
    calls = []

    def model(x, t, y=None):
        calls.append((x.shape[0], t.shape[0], None if y is None else y.clone()))
        return torch.zeros_like(x)

    interpolant = StochasticInterpolant("linear", "brownian")
    x1 = torch.randn(5, 2, generator=gen(53), dtype=torch.float64)
    x0 = torch.randn(5, 2, generator=gen(54), dtype=torch.float64)
    y = torch.arange(5)
    InterpolantLoss(interpolant, "drift", antithetic=True)(model, x1, x0=x0, y=y, generator=gen(55))
    assert calls[-1][0] == 10 and calls[-1][1] == 10 and torch.equal(calls[-1][2], torch.cat([y, y]))
    InterpolantLoss(interpolant, "drift", antithetic=False)(model, x1, x0=x0, generator=gen(55))
    assert calls[-1][:2] == (5, 5) and calls[-1][2] is None
    # γ ≡ 0 two-sided: the antithetic twin is the same point, evaluated once.
    InterpolantLoss(StochasticInterpolant("linear", "zero"), "velocity")(model, x1, x0=x0, generator=gen(55))
    assert calls[-1][0] == 5


# =================================================================================================
# Training sanity
# =================================================================================================


def velocity_error(model, oracle, mean: float, std: float) -> float:
    """Relative RMSE to the exact velocity where p_t has its mass: x = α m + sqrt(α² s² + σ²) z, |z| <= 2."""
    errors, scales = 0.0, 0.0
    for t in (0.2, 0.5, 0.8):
        a, s = t, 1 - t
        x = (a * mean + math.sqrt(a * a * std * std + s * s) * torch.linspace(-2, 2, 41)).reshape(-1, 1)
        tt = torch.full((41,), t)
        with torch.no_grad():
            learned = model(x, tt)
        truth = oracle.velocity(x.double(), tt.double()).float()
        errors += float((learned - truth).pow(2).mean())
        scales += float(truth.pow(2).mean())
    return math.sqrt(errors / scales)


def test_tiny_mlp_learns_the_exact_velocity_of_a_1d_gaussian() -> None:
    # One thread (the one_thread fixture): a 64-unit MLP is fastest that way.
    torch.manual_seed(0)
    path = Linear()
    mean, std = 1.5, 0.5
    oracle = fd.testing.Gaussian([mean], [[std**2]], path=path)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, 1))
    model = lambda x, t: net(torch.cat([x, t[:, None]], dim=1))
    before = velocity_error(model, oracle, mean, std)
    loss = GaussianPathLoss(path, "velocity")
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = gen(60)
    for _ in range(300):
        x1 = mean + std * torch.randn(256, 1, generator=g)
        out = loss(model, x1, generator=g)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    after = velocity_error(model, oracle, mean, std)
    # Measured: ~0.12 after 300 steps (the noise of the conditional target limits it), ~1 before.
    assert before > 0.5
    assert after < 0.2, after


# =================================================================================================
# Registry and validation
# =================================================================================================


def test_registries() -> None:
    assert available_weightings() == WEIGHTINGS == ("none", "snr", "min-snr", "edm", "likelihood")
    assert available_time_samplers() == TIME_SAMPLERS
    assert set(available_predictions()) == set(PREDICTIONS)
    assert set(available_interpolant_targets()) == {"drift", "velocity", "score", "denoiser"}
    assert available_objectives() == OBJECTIVES
    for name in WEIGHTINGS:
        assert make_weighting(name).name == name


def test_validation_errors_name_the_bad_value() -> None:
    vp = VP()
    x1 = torch.randn(4, 2)
    zero = lambda x, t: torch.zeros_like(x)
    with pytest.raises(ValueError, match="unknown prediction 'eps'.*noise, data, velocity, score, v"):
        GaussianPathLoss(vp, "eps")
    with pytest.raises(ValueError, match="unknown weighting 'p2'.*none, snr, min-snr, edm, likelihood"):
        GaussianPathLoss(vp, "noise", "p2")
    with pytest.raises(ValueError, match="unknown time sampler 'beta'.*uniform, logit-normal, edm"):
        GaussianPathLoss(vp, "noise", time_sampler="beta")
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got gamma=0.0"):
        GaussianPathLoss(vp, "noise", "min-snr", gamma=0.0)
    with pytest.raises(TypeError, match="GaussianPath.*InterpolantLoss"):
        GaussianPathLoss(StochasticInterpolant(), "noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size 4.*shape \\(3,\\)"):
        GaussianPathLoss(vp, "noise")(zero, x1, y=torch.arange(3))
    with pytest.raises(ValueError, match="x0 \\(the noise\\) shape"):
        GaussianPathLoss(vp, "noise")(zero, x1, x0=torch.randn(4, 3))
    with pytest.raises(ValueError, match="input's shape"):
        GaussianPathLoss(vp, "noise")(lambda x, t: x[:, :1], x1)
    with pytest.raises(ValueError, match="t must lie in"):
        GaussianPathLoss(vp, "noise")(zero, x1, t=1.5)
    interpolant = StochasticInterpolant("linear", "brownian")
    with pytest.raises(ValueError, match="unknown interpolant target 'flow'.*drift, velocity, denoiser, score"):
        InterpolantLoss(interpolant, "flow")
    with pytest.raises(ValueError, match="unknown objective 'l1'.*mse, quadratic"):
        InterpolantLoss(interpolant, "drift", objective="l1")
    with pytest.raises(ValueError, match="x0 \\(the base samples\\) is required"):
        InterpolantLoss(interpolant, "drift")(zero, x1)
    with pytest.raises(ValueError, match="batch size 4"):
        InterpolantLoss(interpolant, "drift")(zero, x1, x0=torch.randn(4, 2), y=torch.arange(5))
    with pytest.raises(ValueError, match="'denoiser'.*one-sided"):
        InterpolantLoss(StochasticInterpolant("one-sided-linear"), "denoiser")
    with pytest.raises(ValueError, match="needs gamma != 'zero'"):
        InterpolantLoss(StochasticInterpolant("linear", "zero"), "score")
    with pytest.raises(ValueError, match="time_sampler='edm' needs a GaussianPath"):
        InterpolantLoss(interpolant, "drift", time_sampler="edm")


def test_config_round_trip_rebuilds_the_same_loss() -> None:
    import json

    from flowdiff.couplings import LabelledPairs
    from flowdiff.losses import loss_from_config

    path = VP()
    oracle = fd.testing.random_mixture(2, 2, seed=6, path=path)
    model = noise_model_with_error(oracle)
    x1 = oracle.sample(16, gen(70))
    losses = [
        GaussianPathLoss(path, "v", "min-snr", "logit-normal", gamma=3.0),
        GaussianPathLoss(EDM(sigma_data=0.7), "data", "edm", "edm", coupling=MinibatchOT()),
        GaussianPathLoss(path, "noise", "none", ImportanceTime(lambda t: 1 + t, t_min=0.0, t_max=path.t_max)),
        GaussianPathLoss(path, "score", "likelihood", coupling=LabelledPairs(MinibatchOT("sinkhorn", reg=0.5))),
    ]
    y = torch.tensor([0, 1] * 8)
    for loss in losses:
        rebuilt = loss_from_config(json.loads(json.dumps(loss.config())))
        assert repr(rebuilt) == repr(loss)
        # Same randomness, same numbers (the importance table is renormalised: equal up to rounding).
        a = loss(model, x1, y=y, generator=gen(71))
        b = rebuilt(model, x1, y=y, generator=gen(71))
        torch.testing.assert_close(a.per_sample, b.per_sample, rtol=1e-12, atol=0)
    interpolant = StochasticInterpolant("linear", "brownian")
    loss = InterpolantLoss(interpolant, "score", antithetic=True, objective="quadratic", time_sampler=UniformTime(0.1, 0.9))
    rebuilt = loss_from_config(json.loads(json.dumps(loss.config())))
    assert rebuilt.config() == loss.config()
    with pytest.raises(TypeError, match="callable"):
        GaussianPathLoss(path, "noise", lambda t: t).config()
