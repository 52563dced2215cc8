r"""Exact simulators of fractional Brownian motion and the fractional OU process, and a variogram Hurst estimate.

* :func:`simulate_fbm` — fBM on a uniform grid by the Davies–Harte circulant embedding of fractional
  Gaussian noise (Davies & Harte 1987, "Tests for Hurst effect", Biometrika; Dietrich & Newsam 1997) or by
  Cholesky of the exact covariance :math:`\tfrac12(s^{2H} + t^{2H} - |t-s|^{2H})` (any times).
* :func:`simulate_fou` — the fractional OU process :math:`dX = -\theta(X - \mu)dt + \sigma dB^H`
  (Cheridito, Kawaguchi, Maejima 2003, "Fractional Ornstein–Uhlenbeck processes"): exact fGn increments on a
  grid ``substeps`` times finer than the output, and the OU convolution integrated exactly for the
  piecewise-linear interpolation of B^H on that grid.
* :func:`estimate_hurst` — the variogram (second-order increments of order one) estimator: the slope of
  :math:`\log E|X_{t+k\Delta} - X_t|^2` against :math:`\log k` is 2H for small lags
  (e.g. Gneiting, Ševčíková, Percival 2012, "Estimators of fractal dimension").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import check_float, check_int
from .markov import check_hurst, fbm_covariance

__all__ = ["simulate_fbm", "simulate_fou", "estimate_hurst", "fgn_autocovariance"]


def fgn_autocovariance(num: int, hurst: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Autocovariance of unit-step fractional Gaussian noise at lags 0..num-1:
    :math:`\\tfrac12(|k+1|^{2H} - 2|k|^{2H} + |k-1|^{2H})`."""
    k = torch.arange(num, dtype=torch.float64)
    two_h = 2.0 * hurst
    return (0.5 * ((k + 1).abs() ** two_h - 2 * k.abs() ** two_h + (k - 1).abs() ** two_h)).to(dtype)


def _fgn_davies_harte(num: int, hurst: float, num_paths: int, generator: torch.Generator | None) -> Tensor:
    """Unit-step fGn (num_paths, num), float64, by circulant embedding (exact; eigenvalues checked >= 0)."""
    r = fgn_autocovariance(num + 1, hurst)
    circ = torch.cat([r, r[1:num].flip(0)])  # length 2 num
    m = circ.numel()
    lam = torch.fft.fft(circ).real
    if (lam < -1e-10 * lam.abs().max()).any():  # never for fGn (Craigmile 2003), but keep the check honest
        raise ValueError(f"circulant embedding is not non-negative for hurst={hurst}; use method='cholesky'")
    lam = lam.clamp_min(0)
    z = torch.complex(
        torch.randn(num_paths, m, dtype=torch.float64, generator=generator),
        torch.randn(num_paths, m, dtype=torch.float64, generator=generator),
    )
    w = torch.fft.fft(z * torch.sqrt(lam / m), dim=-1)
    return w.real[:, :num]


def simulate_fbm(
    num_paths: int,
    num_steps: int | None = None,
    t_end: float = 1.0,
    hurst: float = 0.5,
    *,
    times: Tensor | None = None,
    method: str = "davies-harte",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact samples of standard fBM (:math:`B^H_0 = 0`, :math:`\\operatorname{Var} B^H_t = t^{2H}`).

    Either a uniform grid (``num_steps`` steps on [0, t_end], both methods) or arbitrary increasing
    ``times`` > 0 (Cholesky only). Returns ``(times, paths)``: times (n,) including 0 on the grid, paths
    (num_paths, n).
    """
    num_paths = check_int("num_paths", num_paths, low=1)
    hurst = float(check_hurst(hurst))
    if method not in ("davies-harte", "cholesky"):
        raise ValueError(f"method must be 'davies-harte' or 'cholesky', got method={method!r}")
    if times is None:
        if num_steps is None:
            raise ValueError("give num_steps (uniform grid) or times")
        num_steps = check_int("num_steps", num_steps, low=1)
        t_end = check_float("t_end", t_end, 0.0, low_open=True)
        grid = torch.linspace(0.0, t_end, num_steps + 1, dtype=torch.float64)
        if method == "davies-harte":
            dt = t_end / num_steps
            fgn = _fgn_davies_harte(num_steps, hurst, num_paths, generator) * dt**hurst
            paths = torch.cat([torch.zeros(num_paths, 1, dtype=torch.float64), fgn.cumsum(-1)], dim=-1)
            return grid.to(dtype=dtype, device=device), paths.to(dtype=dtype, device=device)
        query = grid[1:]
    else:
        if method != "cholesky":
            raise ValueError("arbitrary times need method='cholesky'")
        query = torch.as_tensor(times, dtype=torch.float64).reshape(-1).cpu()
        if (query <= 0).any() or (query.diff() <= 0).any():
            raise ValueError("times must be positive and strictly increasing (B^H_0 = 0 is not random)")
        grid = query
    cov = fbm_covariance(query, query, hurst)
    chol = torch.linalg.cholesky(cov + 1e-13 * torch.eye(len(query), dtype=torch.float64))
    paths = torch.randn(num_paths, len(query), dtype=torch.float64, generator=generator) @ chol.T
    if times is None:
        paths = torch.cat([torch.zeros(num_paths, 1, dtype=torch.float64), paths], dim=-1)
    return grid.to(dtype=dtype, device=device), paths.to(dtype=dtype, device=device)


def simulate_fou(
    num_paths: int,
    num_steps: int,
    t_end: float,
    hurst: float,
    *,
    theta: float = 1.0,
    sigma: float = 1.0,
    mean: float = 0.0,
    x0: float = 0.0,
    substeps: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fractional OU paths :math:`dX = -\\theta (X - \\mu) dt + \\sigma dB^H`, :math:`X_0 = x_0`, on a uniform grid.

    fBM is drawn exactly (Davies–Harte) on a grid ``substeps`` times finer; between fine nodes B^H is taken
    linear, for which :math:`X_{n+1} = \\mu + e^{-\\theta h}(X_n - \\mu) + \\sigma\\frac{1 - e^{-\\theta h}}{\\theta h}
    \\Delta B_n` is the exact solution (the pathwise Riemann–Stieltjes integral; θ = 0 gives :math:`x_0 + \\sigma B^H`
    exactly). Returns ``(times (num_steps + 1,), paths (num_paths, num_steps + 1))``.
    """
    num_steps = check_int("num_steps", num_steps, low=1)
    substeps = check_int("substeps", substeps, low=1)
    theta = check_float("theta", theta)
    sigma = check_float("sigma", sigma, 0.0)
    mean = check_float("mean", mean)
    x0 = check_float("x0", x0)
    _, b = simulate_fbm(num_paths, num_steps * substeps, t_end, hurst, generator=generator)
    h = t_end / (num_steps * substeps)
    db = b.diff(dim=-1)
    decay = math.exp(-theta * h)
    gain = 1.0 if theta == 0 else -math.expm1(-theta * h) / (theta * h)
    x = torch.full((num_paths,), x0 - mean, dtype=torch.float64)
    out = [x]
    for n in range(num_steps * substeps):
        x = decay * x + sigma * gain * db[:, n]
        if (n + 1) % substeps == 0:
            out.append(x)
    grid = torch.linspace(0.0, t_end, num_steps + 1, dtype=torch.float64)
    paths = torch.stack(out, dim=-1) + mean
    return grid.to(dtype=dtype, device=device), paths.to(dtype=dtype, device=device)


def estimate_hurst(paths: Tensor, max_lag: int = 8, min_lag: int = 1) -> float:
    """Variogram estimate of the Hurst index from paths on a uniform grid (P, n) (or (n,)).

    Least-squares slope of :math:`\\log \\hat v(k)` on :math:`\\log k`, :math:`k = ` min_lag..max_lag, with
    :math:`\\hat v(k)` the mean squared increment at lag k over all paths and times; returns slope/2 clipped to
    (0, 1). Mean reversion (fOU) and observation noise bend the variogram at large / small lags: keep the
    lags small relative to 1/θ and the increments well above the noise.
    """
    if not isinstance(paths, Tensor):
        raise TypeError(f"paths must be a torch.Tensor, got {type(paths).__name__}")
    x = paths.to(torch.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"paths must have shape (P, n) or (n,), got {tuple(paths.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("paths contain non-finite values")
    min_lag = check_int("min_lag", min_lag, low=1)
    max_lag = check_int("max_lag", max_lag, low=min_lag + 1, high=x.shape[1] - 1)
    lags = torch.arange(min_lag, max_lag + 1, dtype=torch.float64)
    v = torch.stack([((x[:, k:] - x[:, :-k]) ** 2).mean() for k in range(min_lag, max_lag + 1)])
    if (v <= 0).any():
        raise ValueError("paths are constant at some lag; the variogram is zero")
    lx, ly = lags.log(), v.log()
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    return float(min(max(float(slope) / 2, 1e-6), 1 - 1e-6))
