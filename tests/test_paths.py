"""Gaussian paths: closed forms, derivatives against autograd, exact inverse of the log-SNR."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowdiff as fd
from flowdiff.paths import VE, VP, Cosine, Custom, Discrete, EDM, Linear, Shifted, SubVP, Trig

PATHS = {
    "vp": VP(),
    "subvp": SubVP(),
    "ve": VE(),
    "edm": EDM(),
    "linear": Linear(),
    "trig": Trig(),
    "cosine": Cosine(),
    "ddpm": Discrete.linear(),
    "ddpm-scaled": Discrete.scaled_linear(),
    "shifted-linear": Shifted(Linear(), 3.0),
    "shifted-vp": Shifted(VP(), 0.5),
    "custom": Custom(lambda t: torch.sin(0.5 * math.pi * t) ** 2, lambda t: torch.cos(0.5 * math.pi * t)),
}


def _grid(path, n=2001, dtype=torch.float64):
    return torch.linspace(path.t_min, path.t_max, n, dtype=dtype)


def _autograd(fn, t):
    tt = t.clone().requires_grad_(True)
    y = fn(tt)
    if not y.requires_grad:  # a constant (VE's alpha)
        return torch.zeros_like(t)
    return torch.autograd.grad(y.sum(), tt)[0]


@pytest.mark.parametrize("name", list(PATHS))
def test_derivatives_match_autograd(name):
    path = PATHS[name]
    t = _grid(path)
    torch.testing.assert_close(path.d_alpha(t), _autograd(path._alpha, t), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(path.d_sigma(t), _autograd(path._sigma, t), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(path.d_log_snr(t), _autograd(path._log_snr, t), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(PATHS))
def test_log_snr_inverse_is_exact(name):
    path = PATHS[name]
    t = _grid(path)
    lam = path.log_snr(t)
    assert (torch.diff(lam) > 0).all(), "log-SNR must increase strictly"
    torch.testing.assert_close(path.t_of_log_snr(lam), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(PATHS))
def test_safe_interval_is_finite_and_monotone(name):
    path = PATHS[name]
    t = _grid(path)
    c = path.coefficients(t)
    for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma):
        assert torch.isfinite(v).all()
    assert (c.alpha > 0).all() and (c.sigma > 0).all()
    assert (torch.diff(c.alpha) >= -1e-15).all() and (torch.diff(c.sigma) <= 1e-15).all()


def test_vp_closed_form_against_score_sde():
    # score_sde's VPSDE: mean coefficient exp(-1/4 s^2 (b1 - b0) - 1/2 s b0), std sqrt(1 - mean^2)
    path = VP(beta_min=0.1, beta_max=20.0)
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    log_mean = -0.25 * s**2 * 19.9 - 0.5 * s * 0.1
    torch.testing.assert_close(path.alpha(1 - s), torch.exp(log_mean))
    torch.testing.assert_close(path.sigma(1 - s), torch.sqrt(1 - torch.exp(2 * log_mean)))
    # reverse-diffusion rate: d lambda / dt = beta / (2 sigma^2)
    beta = 0.1 + s * 19.9
    torch.testing.assert_close(path.d_log_snr(1 - s)[:-1], (beta / (2 * (1 - torch.exp(2 * log_mean))))[:-1])


def test_subvp_ve_linear_trig_closed_forms():
    t = torch.tensor([0.01, 0.3, 0.7, 0.97], dtype=torch.float64)
    a_vp = VP().alpha(t)
    torch.testing.assert_close(SubVP().sigma(t), 1 - a_vp**2)
    ve = VE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * (50.0 / 0.01) ** (1 - t))
    torch.testing.assert_close(ve.alpha(t), torch.ones_like(t))
    torch.testing.assert_close(Linear().alpha(t), t)
    torch.testing.assert_close(Linear().sigma(t), 1 - t)
    torch.testing.assert_close(Trig().alpha(t), torch.sin(math.pi * t / 2))
    torch.testing.assert_close(Trig().sigma(t), torch.cos(math.pi * t / 2))


def test_discrete_matches_ddpm_table():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    path = Discrete(betas)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    k = torch.tensor([1, 10, 500, 1000])
    t = 1 - k.double() / 1000  # DDPM step k sits at diffusion time k/N
    torch.testing.assert_close(path.alpha(t) ** 2, alphas_cumprod[k - 1])
    torch.testing.assert_close(path.sigma(t) ** 2, 1 - alphas_cumprod[k - 1])


def test_shift_lowers_linear_log_snr_by_log_shift():
    base, shifted = Linear(t_min=0.01, t_max=0.99), Shifted(Linear(t_min=0.01, t_max=0.99), 3.0)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    # the SD3 shift is sigma' = k sigma / (1 + (k - 1) sigma) in the noise-time convention
    u = 1 - t
    u_shift = 3 * u / (1 + 2 * u)
    torch.testing.assert_close(shifted.sigma(t), u_shift)
    torch.testing.assert_close(shifted.log_snr(t), base.log_snr(base.t_of_log_snr(shifted.log_snr(t))))
    torch.testing.assert_close(shifted.log_snr(t) + math.log(3.0), base.log_snr(t))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(list(PATHS)),
    u=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_inverse_property(name, u, dtype):
    path = PATHS[name]
    t = torch.tensor(path.t_min + u * (path.t_max - path.t_min), dtype=dtype)
    back = path.t_of_log_snr(path.log_snr(t))
    assert back.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert abs(float(back) - float(t)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_follow_input(dtype):
    t = torch.rand(3, 4, dtype=dtype) * 0.9 + 0.05
    for path in PATHS.values():
        for fn in (path.alpha, path.sigma, path.d_alpha, path.d_sigma, path.log_snr):
            out = fn(t)
            assert out.shape == t.shape and out.dtype == dtype


def test_sample_has_path_moments():
    path = VP()
    n = 200_000
    x1 = torch.full((n, 1), 2.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    xt, _ = path.sample(x1, 0.6, generator=g)
    a, s = float(path.alpha(0.6)), float(path.sigma(0.6))
    se_mean = s / math.sqrt(n)
    assert abs(float(xt.mean()) - 2 * a) < 5 * se_mean
    # variance standard error ~ s^2 sqrt(2/n)
    assert abs(float(xt.var()) - s**2) < 5 * s**2 * math.sqrt(2 / n)


def test_targets_are_consistent():
    path = Trig()
    g = torch.Generator().manual_seed(1)
    x1, eps = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.8 + 0.1
    xt, _ = path.sample(x1, t, noise=eps)
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    torch.testing.assert_close(path.target("velocity", x1, eps, t), path.d_alpha(t)[:, None] * x1 + path.d_sigma(t)[:, None] * eps)
    torch.testing.assert_close(path.target("v", x1, eps, t), a * eps - s * x1)
    torch.testing.assert_close(path.target("score", x1, eps, t), -eps / s)
    torch.testing.assert_close(xt, a * x1 + s * eps)


# ----- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_time_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match=r"t"):
        VP().alpha(torch.tensor([0.5, bad]))


def test_bad_parameters_name_the_value():
    with pytest.raises(ValueError, match="beta_min"):
        VP(beta_min=20.0, beta_max=0.1)
    with pytest.raises(ValueError, match="sigma_min"):
        VE(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        VE(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="shift"):
        Shifted(Linear(), -1.0)
    with pytest.raises(ValueError, match="t_min"):
        Linear(t_min=0.9, t_max=0.1)
    with pytest.raises(ValueError, match="beta"):
        Discrete([0.5, 1.2])
    with pytest.raises(TypeError):
        VP(beta_min="a")
    with pytest.raises(ValueError, match="increasing"):
        Custom(lambda t: 1 - t, lambda t: t)


def test_get_path_lists_valid_names():
    assert isinstance(fd.paths.get_path("vp"), VP)
    with pytest.raises(ValueError, match="valid: .*linear"):
        fd.paths.get_path("nope")


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "edm", "linear", "trig", "cosine", "ddpm", "shifted-linear"])
def test_config_round_trip(name):
    path = PATHS[name]
    again = fd.paths.path_from_config(path.config())
    t = _grid(path, 11)
    torch.testing.assert_close(again.log_snr(t), path.log_snr(t))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "edm", "linear", "trig", "cosine"])
def test_table_matches_public_methods_in_float64(name):
    path = fd.paths.get_path(name)
    t = torch.linspace(path.t_min, path.t_max, 7, dtype=torch.float32)
    tab = path.table(t)
    t64 = t.double()
    assert tab.alpha.dtype == torch.float64 and tab.alpha.shape == t.shape
    torch.testing.assert_close(tab.alpha, path.alpha(t64), rtol=1e-12, atol=0)
    torch.testing.assert_close(tab.sigma, path.sigma(t64), rtol=1e-12, atol=0)
    torch.testing.assert_close(tab.d_alpha, path.d_alpha(t64), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(tab.d_sigma, path.d_sigma(t64), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(tab.log_snr, torch.log(tab.alpha / tab.sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tab.d_log_snr, path.d_log_snr(t64), rtol=1e-12, atol=0)
    a, s, da, ds = tab.floats(3)
    assert a == float(tab.alpha[3]) and ds == float(tab.d_sigma[3])
    with pytest.raises(ValueError, match="t must lie"):
        path.table([0.5, 1.5])


def test_check_int_and_float_name_value_and_range():
    from flowdiff._utils import check_float, check_int

    assert check_int("n", 3.0, low=1) == 3
    for bad in (0, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=r"n must be an integer >= 1, got n="):
            check_int("n", bad, low=1)
    assert check_float("x", 0.5, 0, 1, low_open=True) == 0.5
    for bad in (0.0, float("nan"), float("inf"), "a", False, 1.5):
        with pytest.raises(ValueError, match=r"x must be a finite number in \(0, 1\], got x="):
            check_float("x", bad, 0, 1, low_open=True)


@pytest.mark.parametrize("path", [fd.paths.Discrete.linear(), fd.paths.Discrete.linear(100),
                                  fd.paths.Discrete.scaled_linear(), fd.paths.VP()], ids=repr)
def test_log_snr_inverse_of_the_ends_stays_in_the_interval_and_sample_accepts_it(path):
    """The times the library hands out (t_of_log_snr of the path's own end noise level) are accepted
    back: within [0, 1], no NaN log-SNR at t = 1 (a DDPM table once gave log α > 0 there)."""
    ends = torch.tensor([0.0, path.t_min, path.t_max, 1.0], dtype=torch.float64)
    lam = path.log_snr(ends)
    assert not torch.isnan(lam).any() and lam[-1] == math.inf
    back = path.t_of_log_snr(lam)
    assert ((back >= 0) & (back <= 1)).all()
    assert torch.allclose(back, ends, atol=1e-12)
    mix = fd.testing.random_mixture(2, path=path)
    x = path.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = fd.sample(fd.Field(mix.model("noise"), path, "noise"), x, nfe=6, t_start=float(back[1]), t_end=float(back[2]))
    assert torch.isfinite(res.x).all()
