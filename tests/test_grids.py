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
