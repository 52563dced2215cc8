r"""Analytic oracles: exact fields for Gaussian and Gaussian-mixture data.

For data :math:`x_1 \sim \sum_k w_k N(\mu_k, C_k)` and a Gaussian path
:math:`x_t = \alpha x_1 + \sigma\varepsilon`, the marginal is
:math:`p_t = \sum_k w_k N(\alpha\mu_k, \Sigma_k)` with :math:`\Sigma_k = \alpha^2 C_k + \sigma^2 I`,
and with responsibilities :math:`r_k(x) \propto w_k N(x; \alpha\mu_k, \Sigma_k)`:

.. math::

    \nabla\log p_t = -\sum_k r_k \Sigma_k^{-1}(x - \alpha\mu_k), \quad
    E[x_1|x] = \sum_k r_k\,(\mu_k + \alpha C_k\Sigma_k^{-1}(x - \alpha\mu_k)), \quad
    E[\varepsilon|x] = \sum_k r_k\,\sigma\Sigma_k^{-1}(x - \alpha\mu_k).

Each :math:`C_k = U_k\,\mathrm{diag}(\ell_k)\,U_k^\top` is diagonalised once, so every ``t``
costs only elementwise work: :math:`\Sigma_k^{-1} = U_k\,\mathrm{diag}(1/(\alpha^2\ell_k+\sigma^2))U_k^\top`.
Noise, data and score are computed *independently* from these formulas (not from each
other), so they test :class:`~flowdiff.Field`'s conversions.

For two-sided interpolants :math:`x_t = a_0x_0 + a_1x_1 + \gamma z` between two mixtures
(Albergo, Boffi & Vanden-Eijnden 2023), each component pair (k, l) is Gaussian with
:math:`\Sigma_{kl} = a_0^2C^0_k + a_1^2C^1_l + \gamma^2 I` and the drift, velocity, score and
denoiser are the pairwise linear regressions mixed by the pair responsibilities.

Everything is computed in the dtype of the input (use float64 for reference values).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._utils import TimeLike, batch_time, check_time_range, expand_like
from .paths import PREDICTIONS, GaussianPath, StochasticInterpolant, VP

__all__ = ["GaussianMixture", "Gaussian", "InterpolantOracle", "random_mixture"]


def _as64(x: Any) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).clone()


class GaussianMixture:
    """A Gaussian mixture data distribution with the exact fields of any Gaussian path.

    Arguments:
        means: ``(K, D)``.
        covariances: ``(K, D, D)`` full covariances, **or** ``scales``: ``(K, D)`` per-axis
            standard deviations (diagonal components; the fast case).
        weights: ``(K,)`` positive (normalised here); uniform by default.
        path: the Gaussian path whose marginals the field methods describe (default VP()).
    """

    def __init__(
        self,
        means: Tensor | Sequence,
        covariances: Tensor | Sequence | None = None,
        weights: Tensor | Sequence | None = None,
        path: GaussianPath | None = None,
        scales: Tensor | Sequence | None = None,
    ):
        self.means = _as64(means)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        k, d = self.means.shape
        if (covariances is None) == (scales is None):
            raise ValueError("give exactly one of covariances (K, D, D) or scales (K, D)")
        if scales is not None:
            sc = _as64(scales)
            if sc.shape != (k, d):
                raise ValueError(f"scales must have shape (K, D) = {(k, d)}, got {tuple(sc.shape)}")
            if (sc <= 0).any():
                raise ValueError(f"scales must be > 0, got min {float(sc.min())!r}")
            self.eigvals, self.eigvecs = sc**2, None
        else:
            cov = _as64(covariances)
            if cov.shape != (k, d, d):
                raise ValueError(f"covariances must have shape (K, D, D) = {(k, d, d)}, got {tuple(cov.shape)}")
            if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-12):
                raise ValueError("covariances must be symmetric")
            ev, u = torch.linalg.eigh(cov)
            if (ev <= 0).any():
                raise ValueError(f"covariances must be positive definite, smallest eigenvalue {float(ev.min())!r}")
            self.eigvals, self.eigvecs = ev, u
        w = torch.ones(k, dtype=torch.float64) if weights is None else _as64(weights)
        if w.shape != (k,) or (w <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        self.path = path if path is not None else VP()
        if not isinstance(self.path, GaussianPath):
            raise TypeError(f"path must be a GaussianPath, got {type(self.path).__name__}")

    # ----- basic facts --------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def diagonal(self) -> bool:
        return self.eigvecs is None

    def covariances(self) -> Tensor:
        """Component covariances ``(K, D, D)`` (float64)."""
        if self.eigvecs is None:
            return torch.diag_embed(self.eigvals)
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)

    def with_path(self, path: GaussianPath) -> "GaussianMixture":
        """The same data distribution, with fields along another path."""
        other = object.__new__(GaussianMixture)
        other.__dict__.update(self.__dict__)
        other.path = path
        return other

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> Tensor:
        """Covariance of the mixture (law of total covariance)."""
        m = self.mean()
        dev = self.means - m
        return (self.weights[:, None, None] * (self.covariances() + dev[:, :, None] * dev[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """``n`` exact draws of the data, shape ``(n, D)``."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = z * self.eigvals[comp].sqrt()
        if self.eigvecs is not None:
            scaled = torch.einsum("nij,nj->ni", self.eigvecs[comp], scaled)
        return (self.means[comp] + scaled).to(dtype)

    # ----- the path marginal p_t ----------------------------------------------------
    def _parts(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Shared pieces: alpha, sigma (B,1,1), projected residual y' (B,K,D), variances (B,K,D), log r (B,K)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        tb = batch_time(t, x)
        a, s, _, _ = (c[:, None, None] for c in self._schedule(tb, x.dtype))
        dt = x.dtype
        mu, ev = self.means.to(dt), self.eigvals.to(dt)
        y = x[:, None, :] - a * mu[None]
        if self.eigvecs is not None:
            y = torch.einsum("kdj,bkd->bkj", self.eigvecs.to(dt), y)
        var = a * a * ev[None] + s * s
        log_n = -0.5 * (y * y / var).sum(-1) - 0.5 * torch.log(var).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        log_joint = torch.log(self.weights.to(dt))[None] + log_n
        return a, s, y, var, log_joint

    def _schedule(self, tb: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """α, σ, α̇, σ̇ at ``tb`` (checked to lie in [0, 1]) from the path's float64 table, in ``dtype``."""
        table = self.path.table(tb)
        return tuple(c.to(dtype) for c in (table.alpha, table.sigma, table.d_alpha, table.d_sigma))  # type: ignore[return-value]

    def _back(self, coeffs: Tensor, log_joint: Tensor) -> Tensor:
        """Σ_k r_k U_k coeffs_k."""
        r = torch.softmax(log_joint, dim=-1)
        if self.eigvecs is not None:
            coeffs = torch.einsum("kdj,bkj->bkd", self.eigvecs.to(coeffs.dtype), coeffs)
        return (r[..., None] * coeffs).sum(1)

    def log_prob_t(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`\\log p_t(x)`, shape ``(B,)``."""
        return torch.logsumexp(self._parts(x, t)[4], dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the data distribution itself (``t = 1``, σ = 0), shape ``(B,)``."""
        return GaussianMixture._data_log_prob(self, x)

    def _data_log_prob(self, x: Tensor) -> Tensor:
        dt = x.dtype
        y = x[:, None, :] - self.means.to(dt)[None]
        if self.eigvecs is not None:
            y = torch.einsum("kdj,bkd->bkj", self.eigvecs.to(dt), y)
        ev = self.eigvals.to(dt)[None]
        log_n = -0.5 * (y * y / ev).sum(-1) - 0.5 * torch.log(ev).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return torch.logsumexp(torch.log(self.weights.to(dt))[None] + log_n, dim=-1)

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`\\nabla\\log p_t(x)`."""
        a, s, y, var, lj = self._parts(x, t)
        return -self._back(y / var, lj)

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`E[x_1 | x_t = x]`."""
        a, s, y, var, lj = self._parts(x, t)
        r = torch.softmax(lj, dim=-1)
        ev = self.eigvals.to(x.dtype)[None]
        return (r[..., None] * self.means.to(x.dtype)[None]).sum(1) + self._back(a * ev * y / var, lj)

    def noise(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`E[\\varepsilon | x_t = x]`."""
        a, s, y, var, lj = self._parts(x, t)
        return self._back(s * y / var, lj)

    def velocity(self, x: Tensor, t: TimeLike) -> Tensor:
        """Probability-flow velocity :math:`\\dot\\alpha E[x_1|x] + \\dot\\sigma E[\\varepsilon|x]`."""
        a, s, y, var, lj = self._parts(x, t)
        _, _, da, ds = (c[:, None, None] for c in self._schedule(batch_time(t, x), x.dtype))
        r = torch.softmax(lj, dim=-1)
        ev = self.eigvals.to(x.dtype)[None]
        mean_part = (r[..., None] * self.means.to(x.dtype)[None]).sum(1)
        return expand_like(da[:, 0, 0], x) * mean_part + self._back((da * a * ev + ds * s) * y / var, lj)

    def v(self, x: Tensor, t: TimeLike) -> Tensor:
        """Salimans & Ho's :math:`v = \\alpha E[\\varepsilon|x] - \\sigma E[x_1|x]`."""
        a, s, _, _ = (expand_like(c, x) for c in self._schedule(batch_time(t, x), x.dtype))
        return a * self.noise(x, t) - s * self.denoise(x, t)

    def predict(self, x: Tensor, t: TimeLike, prediction: str) -> Tensor:
        """The exact value of ``prediction`` (``noise``, ``data``, ``velocity``, ``score``, ``v``)."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        fn = {"noise": self.noise, "data": self.denoise, "velocity": self.velocity, "score": self.score, "v": self.v}
        return fn[prediction](x, t)

    def model(self, prediction: str) -> Callable[..., Tensor]:
        """A model callable ``model(x, t)`` that outputs the exact ``prediction``.

        ``Field(oracle.model("noise"), oracle.path, "noise")`` is an exact field. The callable
        insists on ``t`` of shape ``(B,)``, the library's model signature.
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")

        def exact_model(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            if t.ndim != 1 or t.shape[0] != x.shape[0]:
                raise ValueError(f"model expects t of shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
            flat = x.reshape(x.shape[0], -1)
            return self.predict(flat, t, prediction).reshape(x.shape)

        exact_model.__name__ = f"exact_{prediction}_model"
        return exact_model


class Gaussian(GaussianMixture):
    """A single Gaussian :math:`N(\\mu, C)` with full covariance (a one-component mixture)."""

    def __init__(self, mean: Tensor | Sequence, covariance: Tensor | Sequence, path: GaussianPath | None = None):
        mean = _as64(mean)
        cov = _as64(covariance)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"need mean (D,) and covariance (D, D), got {tuple(mean.shape)} and {tuple(cov.shape)}")
        super().__init__(mean[None], cov[None], path=path)


def random_mixture(
    dim: int,
    num_components: int = 4,
    seed: int = 0,
    anisotropic: bool = True,
    spread: float = 2.0,
    path: GaussianPath | None = None,
) -> GaussianMixture:
    """A reproducible diagonal mixture for tests and benchmarks.

    Each mean coordinate is drawn from N(0, (spread/2)²); with ``anisotropic`` the per-axis
    standard deviations are log-uniform in [0.1, 1] (different per component and axis),
    otherwise 0.5; weights are uniform in [0.5, 1.5] before normalising.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, dim, generator=g, dtype=torch.float64) * (spread / 2)
    if anisotropic:
        scales = torch.exp(torch.empty(num_components, dim, dtype=torch.float64).uniform_(math.log(0.1), 0.0, generator=g))
    else:
        scales = torch.full((num_components, dim), 0.5, dtype=torch.float64)
    weights = torch.rand(num_components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, scales=scales, weights=weights, path=path)


class InterpolantOracle:
    """Exact drift, velocity, score and denoiser of a stochastic interpolant between two mixtures.

    Arguments:
        interpolant: a :class:`~flowdiff.paths.StochasticInterpolant`.
        base: the law of ``x0`` (ignored for ``mirror``; for one-sided interpolants ``None``
            means N(0, I)).
        target: the law of ``x1``.

    Two-sided interpolants assume ``x0 ⟂ x1`` (independent coupling).
    """

    def __init__(self, interpolant: StochasticInterpolant, base: GaussianMixture | None, target: GaussianMixture):
        if not isinstance(interpolant, StochasticInterpolant):
            raise TypeError(f"interpolant must be a StochasticInterpolant, got {type(interpolant).__name__}")
        d = target.dim
        if base is None:
            if not (interpolant.one_sided or interpolant.is_mirror):
                raise ValueError("base is required for a two-sided interpolant")
            base = GaussianMixture(torch.zeros(1, d), scales=torch.ones(1, d))
        if base.dim != d:
            raise ValueError(f"base dim {base.dim} != target dim {d}")
        self.interpolant, self.base, self.target = interpolant, base, target
        c0, c1 = base.covariances(), target.covariances()
        k0, k1 = base.num_components, target.num_components
        # pair (k, l) flattened to index k * K1 + l
        self._m0 = base.means[:, None, :].expand(k0, k1, d).reshape(-1, d)
        self._m1 = target.means[None, :, :].expand(k0, k1, d).reshape(-1, d)
        self._c0 = c0[:, None].expand(k0, k1, d, d).reshape(-1, d, d)
        self._c1 = c1[None, :].expand(k0, k1, d, d).reshape(-1, d, d)
        self._logw = (torch.log(base.weights)[:, None] + torch.log(target.weights)[None, :]).reshape(-1)

    @property
    def dim(self) -> int:
        return self.target.dim

    def _pairs(self, x: Tensor, t: TimeLike):
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        tb = batch_time(t, x)
        check_time_range(tb)
        it = self.interpolant
        a0, a1, d0, d1 = it.coefficients(tb)
        if it.is_mirror:  # x0 = x1: all the weight sits on x1
            a0, d0 = torch.zeros_like(a0), torch.zeros_like(d0)
        g, gg = it.gamma_fn.gamma(tb), it.gamma_fn.gamma_d_gamma(tb)
        dt = x.dtype
        m0, m1, c0, c1 = (v.to(dt) for v in (self._m0, self._m1, self._c0, self._c1))
        sh = (-1, 1, 1)
        eye = torch.eye(self.dim, dtype=dt)
        mean = a0[:, None, None] * m0[None] + a1[:, None, None] * m1[None]  # (B, P, D)
        cov = (a0.reshape(sh)[:, None] ** 2) * c0[None] + (a1.reshape(sh)[:, None] ** 2) * c1[None] + (g.reshape(sh)[:, None] ** 2) * eye
        cross_v = (a0 * d0).reshape(sh)[:, None] * c0[None] + (a1 * d1).reshape(sh)[:, None] * c1[None]
        mean_dI = d0[:, None, None] * m0[None] + d1[:, None, None] * m1[None]
        chol = torch.linalg.cholesky(cov)
        resid = (x[:, None, :] - mean)
        sol = torch.cholesky_solve(resid[..., None], chol)[..., 0]  # Σ⁻¹(x − μ), (B, P, D)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_n = -0.5 * (resid * sol).sum(-1) - 0.5 * logdet - 0.5 * self.dim * math.log(2 * math.pi)
        r = torch.softmax(self._logw.to(dt)[None] + log_n, dim=-1)
        return tb, g, gg, sol, cross_v, mean_dI, r, self._logw.to(dt)[None] + log_n

    def log_prob_t(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`\\log\\rho_t(x)`."""
        return torch.logsumexp(self._pairs(x, t)[-1], dim=-1)

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        *_, sol, _, _, r, _ = self._pairs(x, t)
        return -(r[..., None] * sol).sum(1)

    def noise(self, x: Tensor, t: TimeLike) -> Tensor:
        """The noise prediction :math:`\\eta = E[z|x_t = x] = -\\gamma s` (the ``"denoiser"`` target)."""
        tb, g, *_ = self._pairs(x, t)
        return -expand_like(g, x) * self.score(x, t)

    def denoiser(self, x: Tensor, t: TimeLike) -> Tensor:
        """:meth:`noise` under the name of its regression target (``InterpolantLoss(target="denoiser")``)."""
        return self.noise(x, t)

    def velocity(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`v = E[\\partial_t I | x_t = x]`."""
        tb, g, gg, sol, cross_v, mean_dI, r, _ = self._pairs(x, t)
        per = mean_dI + (cross_v @ sol[..., None])[..., 0]
        return (r[..., None] * per).sum(1)

    def drift(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`b = E[\\partial_t I + \\dot\\gamma z | x_t = x] = v - \\gamma\\dot\\gamma s`."""
        tb, g, gg, sol, cross_v, mean_dI, r, _ = self._pairs(x, t)
        per = mean_dI + (cross_v @ sol[..., None])[..., 0] + gg[:, None, None] * sol
        return (r[..., None] * per).sum(1)

    def model(self, prediction: str) -> Callable[..., Tensor]:
        """A model callable for ``prediction`` ∈ {drift, velocity, score, denoiser}."""
        fns = {"drift": self.drift, "velocity": self.velocity, "score": self.score, "denoiser": self.noise}
        if prediction not in fns:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(fns)}")
        fn = fns[prediction]

        def exact_model(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            if t.ndim != 1 or t.shape[0] != x.shape[0]:
                raise ValueError(f"model expects t of shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
            return fn(x.reshape(x.shape[0], -1), t).reshape(x.shape)

        return exact_model
