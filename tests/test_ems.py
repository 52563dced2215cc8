"""estimate_ems (DPM-Solver-v3's empirical model statistics, Zheng et al. 2023) against truth:
closed-form l, s, b of a Gaussian for the pooled fit over fresh points, the half-sample error
estimate against the actual error, one class per point in every model call, the batched JVPs
against forward-mode AD, the sampling check's warning, and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import flowdiff as fd
from flowdiff.solvers import EMS, estimate_ems
from flowdiff.solvers.ems import _noise_fn, _tangent_derivatives, jvp

pytestmark = pytest.mark.usefixtures("one_thread")

VP = fd.paths.VP()
MEAN3 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.6, -0.3], [0.0, 0.8, 0.5], [0.2, -0.4, 1.2]], dtype=torch.float64)
COV3 = _A @ _A.T + 0.1 * torch.eye(3, dtype=torch.float64)


def gaussian_ems(mean: torch.Tensor, cov: torch.Tensor, lambdas: torch.Tensor) -> EMS:
    """Closed-form EMS of N(mean, cov) on the VP path (fd.testing.gaussian_ems_statistics)."""
    l, s, b = fd.testing.gaussian_ems_statistics(mean, cov, lambdas)
    return EMS(lambdas, l, s, b, {"path": VP.config()})


def gaussian_field() -> tuple[fd.Field, object]:
    gauss = fd.testing.Gaussian(MEAN3, COV3, path=VP)
    return fd.Field(gauss.model("noise"), VP, "noise"), gauss


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def test_pooled_fit_over_fresh_points_matches_the_gaussian_closed_form():
    field, gauss = gaussian_field()
    ems = estimate_ems(field, gauss, num_lambdas=60, num_samples=256, batch_size=256, t_start=0.3, t_end=0.9,
                       points="fresh", bandwidth=0.5, progress=False, check=None,
                       generator=torch.Generator().manual_seed(0))
    truth = gaussian_ems(MEAN3, COV3, ems.lambdas)
    # l is exact at every knot (the Jacobian of a Gaussian's noise predictor is constant); the
    # local cubic fit leaves only its smoothing bias
    assert float((ems.l - truth.l).abs().max()) < 2e-3
    # s and b: 60 knots x 256 fresh points pooled over +-0.5 in λ
    assert rms(ems.s - truth.s) < 0.03, rms(ems.s - truth.s)
    assert rms(ems.b - truth.b) < 0.02, rms(ems.b - truth.b)
    assert ems.settings["points"] == "fresh" and ems.settings["bandwidth"] == 0.5
    # with 4 points per knot the per-knot slopes are noise; pooling them is 3x better
    small = dict(num_lambdas=60, num_samples=4, t_start=0.3, t_end=0.9, points="fresh", progress=False, check=None,
                 max_error=None)
    raw = estimate_ems(field, gauss, bandwidth=0.0, generator=torch.Generator().manual_seed(1), **small)
    pooled = estimate_ems(field, gauss, bandwidth=0.5, generator=torch.Generator().manual_seed(1), **small)
    assert rms(raw.s - truth.s) > 3 * rms(pooled.s - truth.s), (rms(raw.s - truth.s), rms(pooled.s - truth.s))


@pytest.mark.parametrize("points,bandwidth,knots,samples", [("fresh", 0.25, 60, 32), ("common", 0.0, 40, 128)])
def test_error_estimate_tracks_the_actual_error(points, bandwidth, knots, samples):
    """The half-sample standard errors (settings["error_estimate"]) against the actual RMS error
    from the closed form, over 3 seeds: within a factor 3. They measure the sampling noise only:
    where the smoothing bias dominates (a wide window on few knots) they are too small, which the
    sampling check (settings["quality"]) sees instead."""
    field, gauss = gaussian_field()
    est, act = [], []
    for seed in range(3):
        ems = estimate_ems(field, gauss, num_lambdas=knots, num_samples=samples, t_start=0.3, t_end=0.9,
                           points=points, bandwidth=bandwidth, progress=False, check=None, max_error=None,
                           generator=torch.Generator().manual_seed(seed))
        truth = gaussian_ems(MEAN3, COV3, ems.lambdas)
        est.append(ems.settings["error_estimate"]["s"])
        act.append(rms(ems.s - truth.s))
    ratio = math.sqrt(sum(e * e for e in est) / sum(a * a for a in act))
    assert 1 / 3 < ratio < 3, (est, act)


def test_sampling_check_warns_when_the_statistics_do_not_help():
    field, gauss = gaussian_field()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # good statistics: no warning
        good = estimate_ems(field, gauss, num_lambdas=40, num_samples=256, progress=False, points="fresh",
                            bandwidth=0.5, check=32)
    q = good.settings["quality"]
    assert q["nfe"] == 5 and q["count"] == 32
    assert q["v3"] < 0.1 * q["dpm_solver++"] and q["noise"] < q["v3"] + 1e-3
    with pytest.warns(UserWarning, match="do not help DPM-Solver-v3"):
        bad = estimate_ems(field, gauss, num_lambdas=8, num_samples=16, progress=False, check=32, max_error=None,
                           points="common", bandwidth=0.0)
    assert bad.settings["quality"]["v3"] >= bad.settings["quality"]["dpm_solver++"]
    assert estimate_ems(field, gauss, num_lambdas=4, num_samples=8, progress=False, check=None,
                        max_error=None).settings["quality"] is None


class _Labelled(torch.nn.Module):
    """A class-conditional noise predictor σε̂ = (1 + y/10)·x/(1 + σ²)-like map that records the
    labels of every call and, without labels, draws them by batch size (as the class-mixture
    wrapper of a trained network does)."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls: list[torch.Tensor | None] = []

    def forward(self, x, t, y=None):
        self.calls.append(y)
        if y is None:
            y = torch.arange(x.shape[0]) % 3
        scale = (1 + y.to(x.dtype) / 10).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(scale * x)


class _Data:
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("with_labels", [True, False])
def test_every_call_gets_one_class_per_point(with_labels):
    model = _Labelled()
    field = fd.Field(model, VP, "noise")
    data = _Data(40)
    ems = estimate_ems(field, data if with_labels else data.x, num_lambdas=3, num_samples=12, batch_size=5,
                       progress=False, check=None, max_error=None, hutchinson=True)
    assert ems.settings["labels"] == ("data" if with_labels else "stratified")
    assert model.calls and all(y is not None for y in model.calls)


def test_batched_jvps_equal_forward_mode_ad():
    mix = fd.testing.random_mixture(4, 3, seed=1, path=VP)
    field = fd.Field(mix.model("noise"), VP, "noise")
    eps_fn = _noise_fn(field, VP, {})
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.full((6,), 0.6, dtype=torch.float64)
    tx = torch.randn(3, 6, 4, dtype=torch.float64)
    tt = torch.rand(3, 6, dtype=torch.float64)
    batched = _tangent_derivatives(eps_fn, x, t, tx, tt, eps_fn)
    for p in range(3):
        _, ref = jvp(eps_fn, (x, t), (tx[p], tt[p]))
        assert torch.allclose(batched[p], ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kw,match", [({"points": "some"}, "points"), ({"bandwidth": -1.0}, "bandwidth"),
                                      ({"check": -2}, "check"), ({"check_nfe": 1}, "check_nfe")])
def test_bad_input_names_the_value(kw, match):
    field, gauss = gaussian_field()
    with pytest.raises(ValueError, match=match):
        estimate_ems(field, gauss, num_lambdas=4, num_samples=8, progress=False, **kw)
