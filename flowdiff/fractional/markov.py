r"""Markov approximation of fractional Brownian motion (MA-fBM).

Daems, Opper, Crevecoeur, Birdal (ICLR 2024), "Variational Inference for SDEs Driven by Fractional
Noise"; the OU-mixture representation goes back to Harms & Stefanovits (2019), "Affine representations
of fractional processes with applications in mathematical finance".

Fractional Brownian motion :math:`B^H` is not Markov, but the Laplace identity
:math:`u^{H-1/2} \propto \int_0^\infty e^{-\gamma u}\gamma^{-(H+1/2)}\,d\gamma` writes it as a continuous
mixture of Ornstein–Uhlenbeck processes driven by *one* Brownian motion :math:`W`. MA-fBM keeps
:math:`K` of them, :math:`dY_k = -\gamma_k Y_k\,dt + dW`, with speeds on a geometric grid
:math:`\gamma_k = r^{k-(K+1)/2}`, :math:`r = \gamma_{\max}^{2/(K-1)}`, and

.. math::
    \text{type I (Mandelbrot–van Ness):}\quad \hat B^H(t) = \sum_k \omega_k (Y_k(t) - Y_k(0)),\quad
    Y(0) \sim N(0, C),\ C_{ij} = 1/(\gamma_i + \gamma_j) \\
    \text{type II (Riemann–Liouville):}\quad \hat B^H(t) = \sum_k \omega_k Y_k(t),\quad Y(0) = 0.

The weights :math:`\omega` minimise the time-averaged error
:math:`\frac1T\int_0^T E(B^H(t) - \hat B^H(t))^2 dt`, a quadratic in :math:`\omega`: :math:`A\omega = b`
with :math:`A_{ij} = \int_0^T E[\hat Y_i \hat Y_j]dt` and :math:`b_k = \int_0^T E[B^H \hat Y_k]dt` in closed
form (incomplete gamma functions; derivation in docs/fractional.md). Here both targets are normalised to
:math:`\operatorname{Var} B^H(t) = t^{2H}`: type I is standard fBM, type II the Riemann–Liouville process
:math:`\sqrt{2H}\int_0^t (t-s)^{H-1/2}dW_s`. Everything is written in torch, so :math:`\omega(H)` is
differentiable in :math:`H` (a learnable Hurst index).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import check_float, check_int

__all__ = ["MAfBM", "check_hurst", "fbm_covariance", "geometric_speeds", "lower_gamma_regularized"]

KINDS = ("I", "II")

# Number of series terms / continued-fraction steps: the series is used for z < _SWITCH (at most ~70
# terms are needed there for float64), the continued fraction (fast for z >= 10) above it.
_SWITCH = 10.0
_SERIES_TERMS = 120
_CF_STEPS = 60


def check_hurst(hurst: float | Tensor, name: str = "hurst") -> Tensor | float:
    """Validate a Hurst index: a finite number (or tensor) strictly inside (0, 1)."""
    if isinstance(hurst, Tensor):
        if hurst.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(hurst.shape)}")
        value = float(hurst.detach())
        if not math.isfinite(value) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} (the Hurst index) must be a finite number in (0, 1), got {name}={value!r}")
        return hurst.reshape(())
    return check_float(name, hurst, 0.0, 1.0, low_open=True, high_open=True)


def geometric_speeds(num_processes: int, gamma_max: float = 20.0, gamma_min: float | None = None) -> Tensor:
    """OU speeds on a geometric grid (float64, shape ``(K,)``).

    Default: the paper's grid centred at 1, :math:`\\gamma_k = r^{k-(K+1)/2}`, :math:`r = \\gamma_{\\max}^{2/(K-1)}`
    (K = 5, γ_max = 20 gives {0.05, 0.224, 1, 4.47, 20}); with ``gamma_min`` the grid runs from γ_min to γ_max.
    K = 1 gives the single speed γ_max (or 1 if no range is given).
    """
    num_processes = check_int("num_processes (K)", num_processes, low=1)
    gamma_max = check_float("gamma_max", gamma_max, 0.0, low_open=True)
    if gamma_min is None:
        if num_processes == 1:
            return torch.ones(1, dtype=torch.float64)
        if gamma_max <= 1.0:
            raise ValueError(f"gamma_max must be > 1 for the grid centred at 1, got gamma_max={gamma_max!r}")
        r = gamma_max ** (2.0 / (num_processes - 1))
        k = torch.arange(1, num_processes + 1, dtype=torch.float64)
        return r ** (k - (num_processes + 1) / 2.0)
    gamma_min = check_float("gamma_min", gamma_min, 0.0, gamma_max, low_open=True)
    if num_processes == 1:
        return torch.tensor([gamma_max], dtype=torch.float64)
    return torch.logspace(math.log10(gamma_min), math.log10(gamma_max), num_processes, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Incomplete gamma functions in torch (differentiable in both arguments; torch.special.gammainc has
# no derivative in its first argument, which a learnable Hurst index needs).


def _log_lower_series(a: Tensor, z: Tensor) -> Tensor:
    """log P(a, z) by the series P = e^{-z} z^a / Γ(a+1) · Σ_n z^n / ((a+1)…(a+n)); for z < _SWITCH."""
    term = torch.ones_like(z)
    total = torch.ones_like(z)
    for n in range(1, _SERIES_TERMS):
        term = term * z / (a + n)
        total = total + term
    return -z + a * torch.log(z) - torch.lgamma(a + 1) + torch.log(total)


def _upper_cf(a: Tensor, z: Tensor) -> Tensor:
    """Γ(a, z) e^{z} z^{-a} by the continued fraction 1/(z+1-a- 1(1-a)/(z+3-a- …)) (modified Lentz); z >= _SWITCH."""
    tiny = torch.finfo(z.dtype).tiny * 1e10
    b = z + 1.0 - a
    c = torch.full_like(z, 1.0 / tiny)
    d = 1.0 / b
    h = d
    for i in range(1, _CF_STEPS):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
        c = b + an / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        d = 1.0 / d
        h = h * d * c
    return h


def lower_gamma_regularized(a: Tensor, z: Tensor) -> Tensor:
    """Regularised lower incomplete gamma P(a, z) = γ(a, z)/Γ(a), differentiable in ``a`` and ``z`` (z >= 0)."""
    a, z = torch.broadcast_tensors(a, z)
    small = z < _SWITCH
    z_s = torch.where(small, z, torch.ones_like(z)).clamp_min(torch.finfo(z.dtype).tiny)
    z_c = torch.where(small, torch.full_like(z, _SWITCH), z)
    series = torch.exp(_log_lower_series(a, z_s))
    series = torch.where(z > 0, series, torch.zeros_like(series))
    upper = torch.exp(-z_c + a * torch.log(z_c) - torch.lgamma(a)) * _upper_cf(a, z_c)
    return torch.where(small, series, 1.0 - upper)


def _exp_upper_regularized(a: Tensor, z: Tensor) -> Tensor:
    """e^{z} Q(a, z) with Q = 1 - P the regularised upper incomplete gamma, without overflow for large z."""
    a, z = torch.broadcast_tensors(a, z)
    small = z < _SWITCH
    z_s = torch.where(small, z, torch.ones_like(z))
    z_c = torch.where(small, torch.full_like(z, _SWITCH), z)
    from_series = torch.exp(z_s) * (1.0 - lower_gamma_regularized(a, z_s))
    from_cf = torch.exp(a * torch.log(z_c) - torch.lgamma(a)) * _upper_cf(a, z_c)
    return torch.where(small, from_series, from_cf)


# ----------------------------------------------------------------------------------------------


def fbm_covariance(s: Tensor, t: Tensor, hurst: float | Tensor) -> Tensor:
    """Covariance of standard fBM, :math:`\\tfrac12(s^{2H} + t^{2H} - |t-s|^{2H})`, shape ``s.shape + t.shape``."""
    hurst = check_hurst(hurst)
    s = torch.as_tensor(s)
    t = torch.as_tensor(t, dtype=s.dtype, device=s.device)
    two_h = 2.0 * hurst
    s_ = s.reshape(s.shape + (1,) * t.ndim)
    return 0.5 * (s_.abs() ** two_h + t.abs() ** two_h - (t - s_).abs() ** two_h)


class MAfBM:
    """The Markov approximation :math:`\\hat B^H = \\sum_k \\omega_k Y_k` (type II) or
    :math:`\\sum_k \\omega_k (Y_k - Y_k(0))` (type I) of fBM with optimal weights.

    Arguments:
        hurst: Hurst index in (0, 1); a float or a 0-d tensor (gradients flow into :attr:`weights`).
        num_processes: K >= 1, the number of OU processes.
        gamma_max: the fastest speed of the geometric grid (the paper: 20 with K = 5).
        kind: ``"I"`` (Mandelbrot–van Ness, stationary Y(0)) or ``"II"`` (Riemann–Liouville, Y(0) = 0).
        horizon: T, the interval [0, T] over which ω minimises the mean squared error (the paper: 6).
        gamma_min: optional slowest speed (default: the grid centred at 1, γ_min = 1/γ_max).
        speeds: optional explicit speeds (K,) instead of the grid.

    Attributes ``speeds`` (K,) and ``weights`` (K,) are float64 (the solve is ill-conditioned for wide grids);
    cast them where needed.
    """

    def __init__(
        self,
        hurst: float | Tensor,
        num_processes: int = 5,
        *,
        gamma_max: float = 20.0,
        kind: str = "I",
        horizon: float = 6.0,
        gamma_min: float | None = None,
        speeds: Tensor | None = None,
    ) -> None:
        self.hurst = check_hurst(hurst)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} (type I: Mandelbrot–van Ness, II: Riemann–Liouville), got kind={kind!r}")
        self.kind = kind
        self.horizon = check_float("horizon", horizon, 0.0, low_open=True)
        if speeds is None:
            self.speeds = geometric_speeds(num_processes, gamma_max, gamma_min)
        else:
            speeds = torch.as_tensor(speeds, dtype=torch.float64).reshape(-1).cpu()
            if speeds.numel() < 1 or not torch.isfinite(speeds).all() or (speeds <= 0).any():
                raise ValueError(f"speeds must be K >= 1 finite positive numbers, got {speeds.tolist()}")
            self.speeds = speeds
        self.num_processes = int(self.speeds.numel())
        self._weights: Tensor | None = None

    # -- weights -------------------------------------------------------------------------------
    def _hurst64(self) -> Tensor:
        h = self.hurst
        if isinstance(h, Tensor):
            return h.to(dtype=torch.float64, device="cpu")
        return torch.tensor(h, dtype=torch.float64)

    def gram(self) -> tuple[Tensor, Tensor]:
        """The normal equations (A, b) of the weight fit, float64, shapes (K, K) and (K,)."""
        g, T = self.speeds, self.horizon
        a = self._hurst64() + 0.5
        gi, gj = g[:, None], g[None, :]
        if self.kind == "I":
            A = (2 * T - (1 - torch.exp(-gi * T)) / gi - (1 - torch.exp(-gj * T)) / gj) / (gi + gj)
            z = g * T
            b = (
                2 * T * g ** (-a)
                - T**a / (g * torch.exp(torch.lgamma(a + 1)))
                + (torch.exp(-z) - _exp_upper_regularized(a, z)) * g ** (-(a + 1))
            )
            # MvN with the 1/Γ(H+1/2) prefactor has Var B(1) = 1/(Γ(2H+1) sin πH); rescale to standard fBM.
            scale = torch.sqrt(torch.exp(torch.lgamma(2 * a)) * torch.sin(math.pi * (a - 0.5)))
        else:
            s = gi + gj
            A = (T + (torch.exp(-s * T) - 1) / s) / s
            z = g * T
            b = T * g ** (-a) * lower_gamma_regularized(a, z) - a * g ** (-(a + 1)) * lower_gamma_regularized(a + 1, z)
            # RL with the 1/Γ(H+1/2) prefactor has Var B(t) = t^{2H}/(2H Γ(H+1/2)^2).
            scale = torch.exp(torch.lgamma(a)) * torch.sqrt(2 * a - 1)
        return A, b * scale

    @property
    def weights(self) -> Tensor:
        """Optimal ω (K,), float64, differentiable in the Hurst index when it is a tensor."""
        if self._weights is None or (isinstance(self.hurst, Tensor) and self.hurst.requires_grad):
            A, b = self.gram()
            w = torch.linalg.solve(A, b)
            if not torch.isfinite(w).all():
                raise ValueError(
                    f"the weight solve is not finite for hurst={float(self._hurst64()):.4g}, speeds={self.speeds.tolist()}; "
                    "use fewer processes or a narrower speed range"
                )
            if isinstance(self.hurst, Tensor) and self.hurst.requires_grad:
                return w
            self._weights = w
        return self._weights

    def approximation_error(self) -> float:
        """Relative time-averaged squared error :math:`\\int_0^T E(B - \\hat B)^2 / \\int_0^T E B^2` of the optimal ω."""
        A, b = self.gram()
        w = torch.linalg.solve(A, b)
        h = float(self._hurst64())
        total = self.horizon ** (2 * h + 1) / (2 * h + 1)  # ∫ t^{2H} dt
        return float((total - 2 * b @ w + w @ A @ w) / total)

    # -- second moments ------------------------------------------------------------------------
    def initial_covariance(self) -> Tensor:
        """Cov Y(0) (K, K), float64: 1/(γ_i + γ_j) for type I (stationary), zeros for type II."""
        g = self.speeds
        if self.kind == "II":
            return torch.zeros(self.num_processes, self.num_processes, dtype=torch.float64)
        return 1.0 / (g[:, None] + g[None, :])

    def ou_covariance(self, s: Tensor, t: Tensor) -> Tensor:
        """Cov(Y_i(s), Y_j(t)), shape ``(n, m, K, K)`` for times s (n,) and t (m,), float64."""
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).cpu()
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        g = self.speeds
        m = torch.minimum(s[:, None], t[None, :])[..., None, None]
        gi, gj = g[:, None], g[None, :]
        if self.kind == "I":
            base = 1.0 / (gi + gj)
        else:
            base = (1.0 - torch.exp(-(gi + gj) * m)) / (gi + gj)
        return torch.exp(-gi * (s[:, None, None, None] - m)) * torch.exp(-gj * (t[None, :, None, None] - m)) * base

    def covariance(self, s: Tensor, t: Tensor | None = None) -> Tensor:
        """Covariance of the approximation :math:`\\hat B^H` at times s (n,) and t (m,): (n, m), float64."""
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).cpu()
        t = s if t is None else torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        w = self.weights.detach()
        c = self.ou_covariance(s, t)
        if self.kind == "I":
            zero = torch.zeros(1, dtype=torch.float64)
            c = c - self.ou_covariance(s, zero) - self.ou_covariance(zero, t) + self.ou_covariance(zero, zero)
        return torch.einsum("i,nmij,j->nm", w, c, w)

    def target_covariance(self, s: Tensor, t: Tensor | None = None, nodes: int = 400) -> Tensor:
        """Covariance of the process being approximated (n, m), float64: standard fBM for type I (closed
        form); for type II the Riemann–Liouville process :math:`\\sqrt{2H}\\int_0^t (t-u)^{H-1/2}dW_u`, by
        Gauss–Legendre quadrature after the substitution that removes the endpoint singularity."""
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).cpu()
        t = s if t is None else torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        h = float(self._hurst64())
        if self.kind == "I":
            return fbm_covariance(s, t, h)
        a = h + 0.5
        # 2H ∫_0^m (d + v)^{a-1} v^{a-1} dv, v = w^{1/a}:  (2H/a) ∫_0^{m^a} (d + w^{1/a})^{a-1} dw.
        x, wq = _gauss_legendre(nodes)
        m = torch.minimum(s[:, None], t[None, :])
        d = (s[:, None] - t[None, :]).abs()
        upper = m**a
        w_nodes = upper[..., None] * x
        v = w_nodes ** (1.0 / a)
        integrand = (d[..., None] + v) ** (a - 1.0)
        integrand = torch.where(torch.isfinite(integrand), integrand, torch.zeros_like(integrand))
        return (2 * h / a) * upper * (integrand * wq).sum(-1)

    def variance(self, t: Tensor) -> Tensor:
        """Var :math:`\\hat B^H(t)` for times t (n,), float64."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        return torch.stack([self.covariance(ti.reshape(1))[0, 0] for ti in t])

    def sample(self, times: Tensor, num_paths: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of :math:`\\hat B^H` at increasing times (n,) with times[0] >= 0: (num_paths, n), float64.

        The OU vector Y is propagated with its exact Gaussian transitions (one shared Brownian motion), so
        the result has exactly the covariance :meth:`covariance`.
        """
        num_paths = check_int("num_paths", num_paths, low=1)
        times = torch.as_tensor(times, dtype=torch.float64).reshape(-1).cpu()
        if (times < 0).any() or (times.diff() <= 0).any():
            raise ValueError("times must be non-negative and strictly increasing")
        K = self.num_processes
        y0 = _psd_sqrt(self.initial_covariance()) @ torch.randn(K, num_paths, dtype=torch.float64, generator=generator)
        y = y0
        prev = 0.0
        out = []
        w = self.weights.detach()
        for ti in times.tolist():
            h = ti - prev
            if h > 0:
                decay, _, q_sqrt = ou_step_matrices(self.speeds, h)
                y = decay[:, None] * y + q_sqrt @ torch.randn(K, num_paths, dtype=torch.float64, generator=generator)
            prev = ti
            out.append(w @ (y - y0) if self.kind == "I" else w @ y)
        return torch.stack(out, dim=1)

    def __repr__(self) -> str:
        return (
            f"MAfBM(hurst={float(self._hurst64()):.4g}, K={self.num_processes}, kind={self.kind!r}, "
            f"speeds=[{float(self.speeds.min()):.3g}..{float(self.speeds.max()):.3g}], horizon={self.horizon:g})"
        )


def ou_step_matrices(speeds: Tensor, h: float, with_increment: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Exact one-step transition of :math:`dY_k = -\\gamma_k Y_k dt + (u\\,dt + dW)` over a step h with a
    constant control u: :math:`Y' = e^{-\\gamma h} Y + \\frac{1 - e^{-\\gamma h}}{\\gamma} u + \\xi`,
    :math:`\\xi \\sim N(0, Q)`, :math:`Q_{ij} = (1 - e^{-(\\gamma_i+\\gamma_j)h})/(\\gamma_i+\\gamma_j)`.

    Returns (decay (K,), control gain (K,), Q^{1/2} (K, K)), float64. With ``with_increment`` the square root
    is that of the joint covariance of (ξ, ΔW) (K + 1, K + 1): Cov(ξ_k, ΔW) = gain_k, Var ΔW = h.
    """
    g = speeds.to(torch.float64)
    decay = torch.exp(-g * h)
    gain = -torch.expm1(-g * h) / g
    s = g[:, None] + g[None, :]
    q = -torch.expm1(-s * h) / s
    if with_increment:
        K = g.numel()
        joint = torch.empty(K + 1, K + 1, dtype=torch.float64)
        joint[:K, :K] = q
        joint[:K, K] = joint[K, :K] = gain
        joint[K, K] = h
        q = joint
    return decay, gain, _psd_sqrt(q)


def _psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clipped to zero)."""
    if not m.abs().sum() > 0:
        return torch.zeros_like(m)
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


_GL_CACHE: dict[int, tuple[Tensor, Tensor]] = {}


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1] (float64), via the Golub–Welsch eigenproblem."""
    if n not in _GL_CACHE:
        k = torch.arange(1, n, dtype=torch.float64)
        beta = k / torch.sqrt(4 * k**2 - 1)
        jac = torch.diag(beta, 1) + torch.diag(beta, -1)
        x, v = torch.linalg.eigh(jac)
        _GL_CACHE[n] = ((x + 1) / 2, v[0] ** 2)
    return _GL_CACHE[n]
