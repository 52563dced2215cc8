"""DPM-Solver-v3 and its empirical model statistics against truth: the reduction to
DPM-Solver++, closed-form statistics of a Gaussian, exactness and convergence orders with exact
statistics, storage round trip, and the rejection of statistics that belong to another model."""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.solvers import sample
from flowdiff.solvers.dpm_v3 import EMS, estimate_ems, v3_defaults

DISCRETE = fd.paths.Discrete.linear()
VP = fd.paths.VP()


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_field(oracle, prediction: str = "noise") -> fd.Field:
    return fd.Field(oracle.model(prediction), oracle.path, prediction)


# ----- closed forms for a Gaussian N(μ, C) ---------------------------------------------------
#
# With P(λ) = σ²Σ_t⁻¹ = (I + e^{2λ}C)⁻¹ the noise predictor is σε̂ = P(x − αμ), so
# l = diag P, l' = diag P' with P' = −P(2e^{2λ}C)P. With M = P − diag(l) and y = x − αμ ~ N(0, σ²P⁻¹),
# f = My/α − l∘μ and, along dy/dλ = (dlogα/dλ − P)y, f⁽¹⁾ = (M' − MP)y/α − l'∘μ. Hence per dimension
# s = [M P⁻¹ (M' − MP)ᵀ]_jj / [M P⁻¹ Mᵀ]_jj and b = −l'∘μ + s∘l∘μ (s = 0 where M's row vanishes).


def gaussian_ems(mean: torch.Tensor, cov: torch.Tensor, lambdas: torch.Tensor, path) -> EMS:
    """Closed-form EMS of N(mean, cov) (fd.testing.gaussian_ems_statistics) as an EMS on ``path``."""
    l, s, b = fd.testing.gaussian_ems_statistics(mean, cov, lambdas)
    return EMS(lambdas, l, s, b, {"path": path.config(), "closed_form": True})


def flow_map(x: torch.Tensor, s: float, t: float, path, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Exact PF-ODE flow of N(μ, C): y_t = Σ_t^{1/2} Σ_s^{-1/2} y_s (Σ = α²C + σ²I commute)."""
    ev, u = torch.linalg.eigh(cov)
    tt = torch.tensor([s, t], dtype=torch.float64)
    a, sg = path._alpha(tt), path._sigma(tt)
    var = a[:, None] ** 2 * ev + sg[:, None] ** 2
    gain = u @ torch.diag((var[1] / var[0]).sqrt()) @ u.T
    return a[1] * mean + (x - a[0] * mean) @ gain.T


def lambda_knots(path, n: int) -> torch.Tensor:
    ends = path._log_snr(torch.tensor([path.t_min, path.t_max], dtype=torch.float64))
    return torch.linspace(float(ends[0]), float(ends[1]), n, dtype=torch.float64)


MEAN3 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.6, -0.3], [0.0, 0.8, 0.5], [0.2, -0.4, 1.2]], dtype=torch.float64)
COV3 = _A @ _A.T + 0.1 * torch.eye(3, dtype=torch.float64)


# ----- reduction to DPM-Solver++ ----------------------------------------------------------------


@pytest.mark.parametrize("order,solver,opts", [
    (1, "ddim", {}),
    (2, "dpm-solver++", {"solver_type": "taylor"}),
    (3, "dpm-solver++3m", {"solver_type": "taylor"}),
])
@pytest.mark.parametrize("grid", ["logsnr", "quadratic"])
def test_degenerate_statistics_give_dpm_solver_pp(order, solver, opts, grid):
    mix = fd.testing.random_mixture(5, 3, seed=1, path=DISCRETE)
    field = exact_field(mix)
    x0 = DISCRETE.prior_sample((16, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ems = EMS.degenerate(DISCRETE, (5,))
    for nfe in (5, 8, 12):
        for final in ((True, False) if order > 1 else (True,)):
            extra = dict(opts, lower_order_final=final) if order > 1 else {}
            ref = sample(field, x0, solver=solver, nfe=nfe, grid=grid, **extra)
            out = sample(field, x0, solver="dpm-solver-v3", nfe=nfe, grid=grid, ems=ems, order=order,
                         use_corrector=False, p_pseudo=False, lower_order_final=final)
            assert out.nfe == ref.nfe == nfe
            assert float((out.x - ref.x).abs().max()) < 1e-10


def test_degenerate_statistics_with_many_knots_and_pseudo_order_two():
    """Interpolated constant statistics on 50 knots, and pseudo-order 2 (= exact order 2), still reduce."""
    mix = fd.testing.random_mixture(4, 2, seed=2, path=VP)
    x0 = VP.prior_sample((8, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = lambda_knots(VP, 50)
    ems = EMS(lam, torch.ones(50, 4), torch.zeros(50, 4), torch.zeros(50, 4), {"path": VP.config()})
    ref = sample(exact_field(mix), x0, solver="dpm-solver++", nfe=7, grid="logsnr", solver_type="taylor",
                 lower_order_final=True)
    out = sample(exact_field(mix), x0, solver="dpm-solver-v3", nfe=7, grid="logsnr", ems=ems, order=2, p_pseudo=True,
                 use_corrector=False, lower_order_final=True)
    assert float((out.x - ref.x).abs().max()) < 1e-10


# ----- exact statistics -----------------------------------------------------------------------


def test_first_order_is_exact_for_a_diagonal_gaussian_with_exact_statistics():
    """For N(μ, diag c) the nonlinear part is f = −l∘μ, so g is constant with the exact EMS and the
    first-order v3 step is the exact flow map (up to the interpolation of l between knots)."""
    scales = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    cov = torch.diag(scales**2)
    gauss = fd.testing.GaussianMixture(MEAN3[None], scales=scales[None], path=DISCRETE)
    ems = gaussian_ems(MEAN3, cov, lambda_knots(DISCRETE, 3001), DISCRETE)
    assert float(ems.s.abs().max()) == 0.0
    x0 = DISCRETE.prior_sample((32, 3), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = flow_map(x0, DISCRETE.t_min, DISCRETE.t_max, DISCRETE, MEAN3, cov)
    v3 = sample(exact_field(gauss), x0, solver="dpm-solver-v3", nfe=3, ems=ems, order=1, use_corrector=False,
                denoise_final=False)
    ddim = sample(exact_field(gauss), x0, solver="ddim", nfe=3, grid="logsnr", denoise_final=False)
    err_v3 = float((v3.x - exact).abs().max())
    err_ddim = float((ddim.x - exact).abs().max())
    assert err_ddim > 1e-2
    assert err_v3 < 1e-5


def warmup_grid(path, steps: int) -> torch.Tensor:
    """A log-SNR-uniform grid whose first two steps are O(h²): the lower-order warm-up steps of a
    multistep method then do not limit the global order (with l ≠ 1, g varies at the noise end,
    and a first-order first step of size h alone would leave an O(h²) global error)."""
    lam0, lam1 = (float(v) for v in path._log_snr(torch.tensor([path.t_min, path.t_max], dtype=torch.float64)))
    h = (lam1 - lam0) / steps
    tiny = 0.1 * h * h
    lams = torch.cat([torch.tensor([lam0, lam0 + tiny], dtype=torch.float64),
                      torch.linspace(lam0 + 2 * tiny, lam1, steps - 1, dtype=torch.float64)])
    grid = path._t_of_log_snr(lams)
    grid[0], grid[-1] = path.t_min, path.t_max
    return grid


@pytest.mark.parametrize("order,corrector", [(1, False), (2, False), (3, False), (2, True)])
def test_convergence_order_with_exact_statistics(order, corrector):
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    ems = gaussian_ems(MEAN3, COV3, lambda_knots(VP, 801), VP)
    x0 = VP.prior_sample((16, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = flow_map(x0, VP.t_min, VP.t_max, VP, MEAN3, COV3)
    errors = []
    steps = (40, 80, 160)
    for n in steps:
        out = sample(exact_field(gauss), x0, solver="dpm-solver-v3", grid=warmup_grid(VP, n), ems=ems, order=order,
                     p_pseudo=False, use_corrector=corrector, lower_order_final=False, denoise_final=False)
        errors.append(float((out.x - exact).abs().max()))
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(2)]
    assert slopes[-1] > order - 0.3, (errors, slopes)


# ----- estimation -------------------------------------------------------------------------------


def test_estimated_statistics_match_the_gaussian_closed_form():
    path = VP
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=path)
    field = exact_field(gauss)
    # the per-knot estimator (points common to all knots, no fit across knots)
    ems = estimate_ems(field, gauss, num_lambdas=40, num_samples=1024, batch_size=1024, t_start=0.3, t_end=0.9,
                       progress=False, generator=torch.Generator().manual_seed(0), points="common", bandwidth=0)
    truth = gaussian_ems(MEAN3, COV3, ems.lambdas, path)
    # l is exact (the Jacobian of a Gaussian's noise predictor does not depend on x)
    assert float((ems.l - truth.l).abs().max()) < 1e-10
    # s and b: Monte Carlo over 1024 samples (common to all knots) and central differences for l'
    for name in ("s", "b"):
        est, ref = getattr(ems, name), getattr(truth, name)
        rel = (est - ref).abs() / (1 + ref.abs())
        assert float(rel.max()) < 0.05, name
        assert float(rel.median()) < 0.01, name
    assert ems.shape == (3,)
    assert ems.settings["hutchinson"] is False and ems.settings["num_samples"] == 1024
    assert ems.cost["model_calls"] > 0 and ems.cost["seconds"] >= 0
    assert ems.settings["path"] == path.config()


def test_hutchinson_estimate_of_l_is_unbiased():
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    ems = estimate_ems(exact_field(gauss), gauss, num_lambdas=5, num_samples=2048, batch_size=2048,
                       hutchinson=True, probes=4, t_start=0.4, t_end=0.8, progress=False)
    truth = gaussian_ems(MEAN3, COV3, ems.lambdas, VP)
    # Rademacher probes: the estimator is diag(P) + Σ_{k≠j} P_jk v_j v_k; std ≤ |P_offdiag|/sqrt(8192)
    assert float((ems.l - truth.l).abs().max()) < 0.05
    assert ems.settings["hutchinson"] is True


def mixture_case(dim: int, seed: int, samples: int, knots: int, count: int):
    """An exact mixture field, its estimated EMS, starting noise and an error against a 300–400-call
    third-order reference: (field, ems, x0, err(result) -> median RMS error)."""
    mix = fd.testing.random_mixture(dim, 4, seed=seed, path=DISCRETE)
    field = exact_field(mix)
    ems = estimate_ems(field, mix, num_lambdas=knots, num_samples=samples, batch_size=samples, progress=False)
    x0 = DISCRETE.prior_sample((count, dim), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = sample(field, x0, solver="dpm-solver++3m", nfe=300 + 100 * (dim > 6), grid="logsnr", solver_type="taylor").x

    def err(res):
        return float(((res.x - ref) ** 2).mean(1).sqrt().median())

    return field, ems, x0, err


def test_estimated_statistics_improve_on_dpm_solver_pp_for_a_mixture():
    field, ems, x0, err = mixture_case(6, 4, samples=256, knots=60, count=64)
    e_v3 = err(sample(field, x0, solver="dpm-solver-v3", nfe=15, grid="logsnr", ems=ems))
    e_pp = err(sample(field, x0, solver="dpm-solver++", nfe=15, grid="logsnr"))
    assert e_v3 < e_pp


# ----- storage and validation -------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    ems = estimate_ems(exact_field(gauss), gauss, num_lambdas=8, num_samples=64, progress=False, guidance_scale=2.0)
    file = ems.save(tmp_path / "sub" / "ems.safetensors")
    back = EMS.load(file)
    for name in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(ems, name))
    assert back.settings == ems.settings
    assert back.guidance_scale == 2.0 and back.cost == ems.cost
    x0 = VP.prior_sample((4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample(exact_field(gauss), x0, solver="dpm-solver-v3", nfe=6, ems=ems)
    b = sample(exact_field(gauss), x0, solver="dpm-solver-v3", nfe=6, ems=str(file))
    assert torch.equal(a.x, b.x)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        EMS.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no EMS file"):
        EMS.load(tmp_path / "missing.safetensors")


def test_statistics_of_another_model_are_rejected():
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    x0 = VP.prior_sample((4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    field = exact_field(gauss)
    with pytest.raises(ValueError, match="path"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems=EMS.degenerate(DISCRETE, (3,)))
    with pytest.raises(ValueError, match="shape"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems=EMS.degenerate(VP, (4,)))
    narrow = EMS.degenerate(VP, (3,), t_start=0.2, t_end=0.9)
    with pytest.raises(ValueError, match="outside the EMS range"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems=narrow)
    with pytest.raises(ValueError, match="ems"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6)
    with pytest.raises(ValueError, match="needs empirical model statistics"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems=None)
    with pytest.raises(ValueError, match="order"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems=EMS.degenerate(VP, (3,)), order=4)
    with pytest.raises(TypeError, match="use_corrector"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems=EMS.degenerate(VP, (3,)), use_corrector="yes")
    with pytest.raises(ValueError, match="guidance scale"):
        sample(field, x0, solver="dpm-solver-v3", nfe=6, ems={3.0: EMS.degenerate(VP, (3,))})


def test_estimate_ems_rejects_bad_input():
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    field = exact_field(gauss)
    with pytest.raises(ValueError, match="num_lambdas"):
        estimate_ems(field, gauss, num_lambdas=1, progress=False)
    with pytest.raises(ValueError, match="hutchinson"):
        estimate_ems(field, gauss, hutchinson="sometimes", progress=False)
    with pytest.raises(ValueError, match="t_start"):
        estimate_ems(field, gauss, t_start=0.9, t_end=0.5, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        estimate_ems(field, 3.0, progress=False)
    interp = fd.InterpolantField(lambda x, t: x, fd.paths.StochasticInterpolant("linear"), prediction="velocity")
    with pytest.raises(TypeError, match="Gaussian path"):
        estimate_ems(interp, gauss, progress=False)


def test_float32_state_and_data_tensor_source():
    mix = fd.testing.random_mixture(4, 2, seed=6, path=VP)
    data = mix.sample(256, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    model64 = mix.model("noise")
    field = fd.Field(lambda x, t: model64(x.double(), t.double()).to(x.dtype), VP, "noise")
    ems = estimate_ems(field, data, num_lambdas=10, num_samples=128, progress=False)
    assert ems.settings["dtype"] == "float32"
    x0 = VP.prior_sample((8, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    out = sample(field, x0, solver="dpm-solver-v3", nfe=8, ems=ems)
    assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all()


def test_default_presets():
    assert v3_defaults(4, preset="paper") == {"order": 3, "p_pseudo": True, "use_corrector": True, "c_pseudo": False,
                                              "lower_order_final": False, "half": False,
                                              "final_corrector": False}
    assert v3_defaults(7, preset="paper")["use_corrector"] and not v3_defaults(7, preset="paper")["p_pseudo"]
    assert not v3_defaults(14, preset="paper")["use_corrector"]
    assert v3_defaults(14)["use_corrector"] and v3_defaults(14)["p_pseudo"] and v3_defaults(14)["lower_order_final"]
    assert v3_defaults(10, guided=True)["order"] == 2
    with pytest.raises(ValueError, match="preset"):
        v3_defaults(10, preset="best")


def test_half_corrector_corrects_only_the_noisier_half():
    mix = fd.testing.random_mixture(4, 3, seed=8, path=VP)
    field = exact_field(mix)
    x0 = VP.prior_sample((8, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ems = EMS.degenerate(VP, (4,))
    t0, t1 = VP.t_min, VP.t_max
    mid = 0.5 * (t0 + t1)
    opts = {"ems": ems, "order": 2, "p_pseudo": False, "lower_order_final": False}
    # every node after the first lies in the cleaner half: half=True corrects nothing
    late = torch.tensor([t0, mid + 0.05, mid + 0.2, mid + 0.3, t1], dtype=torch.float64)
    plain = sample(field, x0, solver="dpm-solver-v3", grid=late, use_corrector=False, **opts).x
    half = sample(field, x0, solver="dpm-solver-v3", grid=late, use_corrector=True, half=True, **opts).x
    full = sample(field, x0, solver="dpm-solver-v3", grid=late, use_corrector=True, **opts).x
    assert torch.equal(plain, half) and not torch.allclose(full, plain)
    # a node in the noisier half is corrected
    early = torch.tensor([t0, 0.2, 0.35, mid + 0.2, t1], dtype=torch.float64)
    plain = sample(field, x0, solver="dpm-solver-v3", grid=early, use_corrector=False, **opts).x
    half = sample(field, x0, solver="dpm-solver-v3", grid=early, use_corrector=True, half=True, **opts).x
    assert not torch.allclose(half, plain)


def test_corrector_with_pseudo_order_is_consistent():
    """c_pseudo raises the corrector's order by one with divided differences: still convergent."""
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    ems = gaussian_ems(MEAN3, COV3, lambda_knots(VP, 401), VP)
    x0 = VP.prior_sample((8, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = flow_map(x0, VP.t_min, VP.t_max, VP, MEAN3, COV3)
    errs = [float((sample(exact_field(gauss), x0, solver="dpm-solver-v3", grid=warmup_grid(VP, n), ems=ems, order=3,
                          use_corrector=True, c_pseudo=True, denoise_final=False).x - exact).abs().max())
            for n in (20, 40)]
    assert errs[1] < errs[0] / 4


# ----- the final corrector (the final denoise's evaluation corrects the last step) --------------


def test_final_corrector_keeps_the_exact_diagonal_gaussian_exact():
    """N(μ, diag c) with exact EMS: the nonlinear part σε̂ − l∘x = −αl∘μ does not depend on x, so
    moving the data prediction through the linear part is exact — the returned denoised output is
    the data prediction *at the corrected state*, and both equal the closed form."""
    scales = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    cov = torch.diag(scales**2)
    gauss = fd.testing.GaussianMixture(MEAN3[None], scales=scales[None], path=DISCRETE)
    field = exact_field(gauss)
    ems = gaussian_ems(MEAN3, cov, lambda_knots(DISCRETE, 3001), DISCRETE)
    x0 = DISCRETE.prior_sample((32, 3), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t1 = DISCRETE.t_max
    exact = flow_map(x0, DISCRETE.t_min, t1, DISCRETE, MEAN3, cov)
    res = sample(field, x0, solver="dpm-solver-v3", nfe=5, ems=ems, final_corrector=True)
    assert res.nfe == 5
    assert float((res.state - exact).abs().max()) < 1e-5
    truth = field.denoise(exact, torch.full((32,), t1, dtype=torch.float64))
    assert float((res.x - truth).abs().max()) < 1e-5
    assert float((res.x - field.denoise(res.state, torch.full((32,), t1, dtype=torch.float64))).abs().max()) < 1e-9


def test_final_corrector_lowers_the_error_at_low_nfe_and_spends_no_extra_call():
    field, ems, x0, err = mixture_case(8, 6, samples=512, knots=80, count=128)
    seen = []
    on = sample(field, x0, solver="dpm-solver-v3", nfe=5, ems=ems, final_corrector=True,
                callback=lambda i, t, x, d: seen.append(x))
    off = sample(field, x0, solver="dpm-solver-v3", nfe=5, ems=ems, final_corrector=False)
    assert on.nfe == off.nfe == 5
    assert torch.equal(seen[-1], on.state)  # the callback sees the corrected final state
    assert not torch.allclose(on.state, off.state)
    assert err(on) < 0.95 * err(off), (err(on), err(off))
    # without the final denoise there is nothing to correct with
    a = sample(field, x0, solver="dpm-solver-v3", nfe=4, ems=ems, final_corrector=True, denoise_final=False)
    b = sample(field, x0, solver="dpm-solver-v3", nfe=4, ems=ems, final_corrector=False, denoise_final=False)
    assert torch.equal(a.x, b.x) and a.nfe == 4


# ----- the fast estimator (issue 12 item 3) ------------------------------------------------------


@pytest.mark.parametrize("hutchinson", [False, True])
def test_finite_difference_statistics_equal_the_jvp_reference_formula(hutchinson):
    """derivatives="fd" (forward differences, 3 forward passes per point) against the forward-mode
    AD reference on an exact mixture field, the same points, noise and probes: equal to the
    differences' truncation error (step 1e-6 in float64)."""
    mix = fd.testing.random_mixture(5, 3, seed=2, path=VP)
    field = exact_field(mix)
    kw = dict(num_lambdas=24, num_samples=256, hutchinson=hutchinson, progress=False)
    ref = estimate_ems(field, mix, derivatives="jvp", generator=torch.Generator().manual_seed(3), **kw)
    fast = estimate_ems(field, mix, derivatives="fd", generator=torch.Generator().manual_seed(3), **kw)
    assert fast.settings["derivatives"] == "fd" and ref.settings["derivatives"] == "jvp"
    assert fast.cost["jvp_calls"] == (0 if hutchinson else ref.cost["jvp_calls"] - 24)  # the exact diagonal keeps its JVPs
    for name in ("l", "s", "b"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert float(((a - b).abs() / (1 + b.abs())).max()) < 1e-4, name


def test_error_estimate_matches_the_actual_error_of_the_statistics():
    """The half-sample standard errors reported on the EMS against the actual error from the
    Gaussian's closed form: the same size (within a factor 3), and smaller with more points."""
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    field = exact_field(gauss)
    sizes = {}
    for n in (256, 4096):
        ems = estimate_ems(field, gauss, num_lambdas=30, num_samples=n, batch_size=1024, t_start=0.3, t_end=0.9,
                           progress=False, generator=torch.Generator().manual_seed(1), points="common", bandwidth=0)
        truth = gaussian_ems(MEAN3, COV3, ems.lambdas, VP)
        est = ems.settings["error_estimate"]
        actual = float((ems.s - truth.s).pow(2).mean().sqrt())
        assert est["s"] / 3 < actual < 3 * est["s"], (n, est, actual)
        assert est["l"] == 0.0  # exact diagonal of a Gaussian: l does not depend on the points
        sizes[n] = est
    assert sizes[4096]["s"] < sizes[256]["s"] / 2 and sizes[4096]["solver"] < sizes[256]["solver"] / 2


def test_too_small_settings_warn_with_the_values():
    mix = fd.testing.random_mixture(6, 4, seed=4, path=DISCRETE)
    field = exact_field(mix)
    with pytest.warns(UserWarning, match=r"num_lambdas=8 knots x num_samples=16 points"):
        ems = estimate_ems(field, mix, num_lambdas=8, num_samples=16, progress=False)
    assert ems.settings["error_estimate"]["solver"] > 2.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ok = estimate_ems(field, mix, num_lambdas=60, num_samples=1024, batch_size=1024, progress=False)
    assert ok.settings["error_estimate"]["solver"] < 2.0
    with pytest.raises(ValueError, match="derivatives"):
        estimate_ems(field, mix, derivatives="adjoint", progress=False)
    with pytest.raises(ValueError, match="fd_step"):
        estimate_ems(field, mix, fd_step=0.0, progress=False)
