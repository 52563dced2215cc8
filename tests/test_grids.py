"""Time grids: each kind against its defining formula, ends, monotonicity, validation."""

from __future__ import annotations

import math

import pytest
import torch

import flowdiff as fd
from flowdiff.solvers import GRID_KINDS, make_grid, validate_grid

PATHS = [fd.paths.VP(), fd.paths.Discrete.linear(), fd.paths.Linear(), fd.paths.VE(), fd.paths.Cosine()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("kind", GRID_KINDS)
def test_ends_and_monotone(path: fd.GaussianPath, kind: str) -> None:
    g = make_grid(path, kind, 13)
    assert g.dtype == torch.float64 and g.shape == (14,)
    assert float(g[0]) == path.t_min and float(g[-1]) == path.t_max
    assert (torch.diff(g) > 0).all()
    sub = make_grid(path, kind, 5, t_start=0.2, t_end=0.7)
    assert float(sub[0]) == 0.2 and float(sub[-1]) == 0.7 and (torch.diff(sub) > 0).all()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_logsnr_is_uniform_in_lambda(path: fd.GaussianPath) -> None:
    g = make_grid(path, "logsnr", 10)
    dl = torch.diff(path.log_snr(g))
    assert torch.allclose(dl, dl.mean().expand_as(dl), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_karras_is_uniform_in_sigma_tilde_power(path: fd.GaussianPath) -> None:
    rho = 7.0
    g = make_grid(path, "karras", 9, rho=rho)
    s = torch.exp(-path.log_snr(g) / rho)  # (sigma/alpha)^(1/rho)
    ds = torch.diff(s)
    assert torch.allclose(ds, ds.mean().expand_as(ds), rtol=1e-6, atol=1e-12)
    assert (ds < 0).all()  # sigma~ decreases towards the data


def test_quadratic_is_uniform_in_sqrt_of_diffusion_time() -> None:
    path = fd.paths.VP()
    g = make_grid(path, "quadratic", 8)
    d = torch.diff(torch.sqrt(1 - g))
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-10)


def test_uniform_and_shift() -> None:
    path = fd.paths.Linear()
    u = make_grid(path, "uniform", 6)
    assert torch.allclose(torch.diff(u), torch.full((6,), (path.t_max - path.t_min) / 6, dtype=torch.float64))
    assert torch.allclose(make_grid(path, "shifted", 6, shift=1.0), u, atol=1e-12)
    # shift k: the noise time u = 1 - t is k w / (1 + (k - 1) w) with w uniform
    k = 3.0
    g = make_grid(path, "shifted", 6, shift=k)
    w = (1 - g) / (k - (k - 1) * (1 - g))
    dw = torch.diff(w)
    assert torch.allclose(dw, dw.mean().expand_as(dw), rtol=1e-10)
    assert (g[1:-1] < u[1:-1]).all()  # k > 1 spends more steps at high noise (small t)


def test_interpolant_grids() -> None:
    si = fd.paths.StochasticInterpolant("linear", "brownian")
    for kind in ("uniform", "quadratic", "shifted"):
        g = make_grid(si, kind, 4)
        assert float(g[0]) == si.t_min and float(g[-1]) == si.t_max
    with pytest.raises(ValueError, match="log-SNR"):
        make_grid(si, "logsnr", 4)


def test_bad_arguments() -> None:
    path = fd.paths.VP()
    with pytest.raises(ValueError, match="unknown grid kind 'cosine'.*logsnr"):
        make_grid(path, "cosine", 4)
    with pytest.raises(ValueError, match="steps=0"):
        make_grid(path, "uniform", 0)
    with pytest.raises(ValueError, match="t_start=0.5, t_end=0.5"):
        make_grid(path, "uniform", 3, t_start=0.5, t_end=0.5)
    with pytest.raises(ValueError, match="rho"):
        make_grid(path, "karras", 3, rho=-1.0)
    with pytest.raises(ValueError, match="shift"):
        make_grid(path, "shifted", 3, shift=0.0)
    with pytest.raises(ValueError, match="finite log-SNR"):  # alpha(0) = 0 on a Linear path from t = 0
        make_grid(fd.paths.Linear(t_min=0.0), "logsnr", 3)


def test_validate_grid() -> None:
    g = validate_grid([0.0, 0.5, 0.9])
    assert g.dtype == torch.float64 and g.tolist() == [0.0, 0.5, 0.9]
    with pytest.raises(ValueError, match=r"strictly increasing.*grid\[1\]=0.5"):
        validate_grid([0.0, 0.5, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        validate_grid([0.0, 1.5])
    with pytest.raises(ValueError, match="at least 2"):
        validate_grid([0.3])
    with pytest.raises(ValueError, match="finite"):
        validate_grid([0.0, math.nan])
    with pytest.raises(ValueError, match="t_start"):
        validate_grid([0.1, 0.5], t_start=0.0)


def test_jump_grid_is_log_snr_uniform_between_its_noise_levels_and_ends_before_t_end():
    from flowdiff.solvers.grids import jump_grid

    path = fd.paths.Discrete.linear()
    assert torch.equal(jump_grid(path, 9), jump_grid(path, 9, sigma_max=7.0, sigma_min=0.045))  # default 0.45/(N + 1)
    g = jump_grid(path, 9, sigma_max=10.0, sigma_min=0.04)
    assert g.dtype == torch.float64 and g.shape == (10,) and (torch.diff(g) > 0).all()
    assert float(g[0]) == path.t_min and float(g[-1]) < path.t_max
    lam = path.table(g).log_snr
    torch.testing.assert_close(lam[1:], torch.linspace(-math.log(10.0), -math.log(0.04), 9, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # the range clipped to the interval: a start below sigma_max gives the log-SNR grid to sigma_min
    lam0 = float(path.table([0.5]).log_snr[0])
    g2 = jump_grid(path, 4, t_start=0.5, sigma_max=1e3, sigma_min=0.04)
    torch.testing.assert_close(path.table(g2).log_snr, torch.linspace(lam0, -math.log(0.04), 5, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # used as an explicit grid, sample's final denoise is made at its last node
    mix = fd.testing.random_mixture(4, 2, seed=1, path=path)
    field = fd.Field(mix.model("noise"), path, "noise")
    x = path.prior_sample((4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = fd.sample(field, x, solver="unipc", grid=jump_grid(path, 4), nfe=5)
    assert res.nfe == 5 and torch.isfinite(res.x).all()


def test_jump_grid_rejects_bad_input():
    from flowdiff.solvers.grids import jump_grid

    path = fd.paths.Discrete.linear()
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        jump_grid(path, 4, sigma_max=0.1, sigma_min=1.0)
    with pytest.raises(ValueError, match="sigma_max"):
        jump_grid(path, 4, sigma_max=-1.0)
    with pytest.raises(ValueError, match="steps"):
        jump_grid(path, 0)
    with pytest.raises(TypeError, match="GaussianPath"):
        jump_grid(None, 4)
