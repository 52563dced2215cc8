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
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._utils import TimeLike, batch_time, check_time_range, expand_like
from .paths import PREDICTIONS, GaussianPath, StochasticInterpolant, VP

__all__ = [
    "gaussian_ems_statistics",
    "GaussianMixture", "Gaussian", "InterpolantOracle", "random_mixture",
    "LinearGaussianPosterior", "linear_gaussian_posterior", "mode_weight_tv", "GMMInverseProblem", "gmm_inverse_problem",
    "TiltedMixture", "tilted_mixture", "tilted_problem", "gaussian_kl", "mixture_kl", "mode_frequencies",
    "sliced_w2_to_mixture",
]


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


# ---------------------------------------------------------------------------------------
# Exact posteriors of linear-Gaussian inverse problems
# ---------------------------------------------------------------------------------------


class LinearGaussianPosterior(GaussianMixture):
    r"""The exact posterior :math:`p(x \mid y)` of a Gaussian-mixture prior and a linear Gaussian measurement.

    A :class:`GaussianMixture` (``sample``, ``log_prob``, the exact fields along ``path``) that
    also keeps the problem it came from: ``prior``, ``H``, ``y``, ``sigma_y`` and the
    normalised ``log_weights`` (exact even where a weight underflows to 0 in ``weights``).

    For ``sigma_y = 0`` every component is degenerate: its covariance is zero along the row
    space of ``H`` (the posterior lives on the affine set :math:`\{x: Hx = y\}`). Then
    ``log_prob`` is the log-density on that set (with respect to Lebesgue measure on the
    :math:`(d - m)`-dimensional set) and ignores how far ``x`` lies off it; ``sample`` draws
    exactly on the set; the path fields are exact for ``t < 1``.
    """

    prior: GaussianMixture
    H: Tensor
    y: Tensor
    sigma_y: float
    log_weights: Tensor

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the posterior, shape ``(B,)`` (see the class docstring for ``sigma_y = 0``)."""
        return torch.logsumexp(self.log_joint(x), dim=-1)

    def log_joint(self, x: Tensor) -> Tensor:
        r""":math:`\log \tilde w_k + \log N(x; m_k, C_k)`, shape ``(B, K)``; zero-variance directions are left out."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        dt = x.dtype
        resid = torch.einsum("kdj,bkd->bkj", self.eigvecs.to(dt), x[:, None, :] - self.means.to(dt)[None])
        ev = self.eigvals.to(dt)[None]
        free = ev > 0  # the constrained directions of a noiseless posterior have eigenvalue exactly 0
        safe = torch.where(free, ev, torch.ones_like(ev))
        quad = torch.where(free, resid * resid / safe, torch.zeros_like(resid)).sum(-1)
        rank = free.sum(-1).to(dt)
        log_n = -0.5 * quad - 0.5 * torch.log(safe).sum(-1) - 0.5 * rank * math.log(2 * math.pi)
        return self.log_weights.to(dt)[None] + log_n

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities of each row of ``x``, shape ``(B, K)``."""
        return torch.softmax(self.log_joint(x), dim=-1)


def _check_matrix_problem(prior: Any, H: Any, y: Any, sigma_y: Any) -> tuple[Tensor, Tensor, float]:
    if not isinstance(prior, GaussianMixture):
        raise TypeError(f"prior must be a flowdiff.testing.GaussianMixture, got {type(prior).__name__}")
    if not isinstance(H, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"H and y must be torch.Tensors, got {type(H).__name__} and {type(y).__name__}")
    if H.ndim != 2 or H.shape[1] != prior.dim or H.shape[0] < 1:
        raise ValueError(f"H must have shape (m, {prior.dim}) with m >= 1 (the prior's dimension), got {tuple(H.shape)}")
    if y.shape != (H.shape[0],):
        raise ValueError(f"y must have shape ({H.shape[0]},) (the rows of H), got {tuple(y.shape)}")
    if H.is_complex() or y.is_complex():
        raise TypeError("H and y must be real (complex measurements: stack real and imaginary parts as rows)")
    if not torch.isfinite(H).all():
        raise ValueError(f"H has {int((~torch.isfinite(H)).sum())} non-finite entries")
    if not torch.isfinite(y).all():
        raise ValueError(f"y has {int((~torch.isfinite(y)).sum())} non-finite entries; a measurement must be finite")
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float, Tensor)):
        raise TypeError(f"sigma_y must be a number >= 0, got {type(sigma_y).__name__}")
    s = float(sigma_y)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    return _as64(H.detach().cpu()), _as64(y.detach().cpu()), s


def linear_gaussian_posterior(prior: GaussianMixture, H: Tensor, y: Tensor, sigma_y: float) -> LinearGaussianPosterior:
    r"""The exact posterior of ``prior`` given ``y = H x + sigma_y n``, ``n ~ N(0, I)``.

    Component by component (Bayes' rule for a linear Gaussian model; e.g. Bishop 2006,
    *Pattern Recognition and Machine Learning*, §2.3.3; the GMM benchmark of Cardoso, Janati
    El Idrissi, Le Corff & Moulines 2024, "Monte Carlo guided Diffusion for Bayesian linear
    inverse problems"):

    .. math::

        C_k = (\Sigma_k^{-1} + H^\top H/\sigma_y^2)^{-1}, \quad
        m_k = C_k(\Sigma_k^{-1}\mu_k + H^\top y/\sigma_y^2), \quad
        \tilde w_k \propto w_k\,N(y;\ H\mu_k,\ H\Sigma_kH^\top + \sigma_y^2 I).

    Computed in float64 in the gain form, which is the same and stays finite as
    :math:`\sigma_y \to 0`: with :math:`S_k = H\Sigma_kH^\top + \sigma_y^2 I` (Cholesky) and
    :math:`K_k = \Sigma_kH^\top S_k^{-1}`, :math:`m_k = \mu_k + K_k(y - H\mu_k)` and the Joseph form
    :math:`C_k = (I - K_kH)\Sigma_k(I - K_kH)^\top + \sigma_y^2K_kK_k^\top` (symmetric positive
    semi-definite by construction); the weights by log-sum-exp.

    ``sigma_y = 0`` (noiseless) is supported: these are then the exact limit formulas, the
    posterior lies on :math:`\{x: Hx = y\}` and its covariances are zero along the row space of
    ``H`` (see :class:`LinearGaussianPosterior`). It needs ``H`` of full row rank (else
    ``ValueError``).

    Arguments:
        prior: the prior mixture (its ``path`` is kept for the posterior's fields).
        H: ``(m, d)`` real measurement matrix.
        y: ``(m,)`` one measurement, finite.
        sigma_y: measurement noise standard deviation, ``>= 0``.

    Returns:
        :class:`LinearGaussianPosterior` (float64; full covariances).
    """
    H, y, s = _check_matrix_problem(prior, H, y, sigma_y)
    m, d = H.shape
    cov = prior.covariances()  # (K, d, d)
    mu = prior.means
    HS = H[None] @ cov  # (K, m, d): H Σ_k
    S = HS @ H.T[None] + (s * s) * torch.eye(m, dtype=torch.float64)[None]
    S = 0.5 * (S + S.transpose(-1, -2))
    chol, info = torch.linalg.cholesky_ex(S)
    if (info != 0).any():
        raise ValueError(
            f"H Σ_k Hᵀ + σ_y² I is singular (sigma_y={s}); for sigma_y = 0 the rows of H must be linearly independent"
        )
    resid = y[None] - mu @ H.T  # (K, m)
    white = torch.linalg.solve_triangular(chol, resid[..., None], upper=False)[..., 0]
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_lik = -0.5 * (white * white).sum(-1) - 0.5 * logdet - 0.5 * m * math.log(2 * math.pi)
    log_w = torch.log(prior.weights) + log_lik
    log_w = log_w - torch.logsumexp(log_w, dim=0)
    gain = torch.cholesky_solve(HS, chol).transpose(-1, -2)  # (K, d, m): Σ_k Hᵀ S_k^{-1}
    means = mu + (gain @ resid[..., None])[..., 0]
    eye = torch.eye(d, dtype=torch.float64)
    left = eye[None] - gain @ H[None]
    post_cov = left @ cov @ left.transpose(-1, -2) + (s * s) * gain @ gain.transpose(-1, -2)
    post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))
    eigvals, eigvecs = torch.linalg.eigh(post_cov)
    if s == 0:
        eigvals[:, :m] = 0.0  # the m directions of H's row space: exactly zero in the limit (eigh sorts ascending)
        eigvals = eigvals.clamp_min(0.0)
    elif (eigvals <= 0).any():
        raise ValueError(f"posterior covariance lost positive definiteness (sigma_y={s} too small for float64?)")
    post = object.__new__(LinearGaussianPosterior)
    post.means, post.eigvals, post.eigvecs = means, eigvals, eigvecs
    post.weights, post.log_weights = log_w.exp(), log_w
    post.path = prior.path
    post.prior, post.H, post.y, post.sigma_y = prior, H, y, s
    return post


def mode_weight_tv(samples: Tensor, posterior: GaussianMixture) -> float:
    r"""Total variation between how often samples fall in each posterior component and the component weights.

    Each sample goes to the component with the highest posterior responsibility
    :math:`\arg\max_k \tilde w_k N(x; m_k, C_k)`; with :math:`f_k` the fraction assigned to
    :math:`k`, the score is :math:`\tfrac12\sum_k |f_k - \tilde w_k| \in [0, 1]`. For exact
    posterior samples it is Monte Carlo noise, about :math:`\sum_k\sqrt{\tilde w_k(1-\tilde w_k)/(2\pi N)}`
    (plus the overlap of components, nil when modes are well separated); 1 means all mass
    in components of zero weight. The weight score of the MCGdiff paper's GMM benchmark
    (Cardoso et al. 2024); sharper than sliced Wasserstein when modes are far apart.

    Arguments:
        samples: ``(N, d)``, finite.
        posterior: a :class:`GaussianMixture` (typically from :func:`linear_gaussian_posterior`).

    Returns:
        The TV as a Python float.
    """
    if not isinstance(posterior, GaussianMixture):
        raise TypeError(f"posterior must be a flowdiff.testing.GaussianMixture, got {type(posterior).__name__}")
    if not isinstance(samples, Tensor):
        raise TypeError(f"samples must be a torch.Tensor of shape (N, {posterior.dim}), got {type(samples).__name__}")
    if samples.ndim != 2 or samples.shape[1] != posterior.dim or samples.shape[0] < 1:
        raise ValueError(f"samples must have shape (N, {posterior.dim}) with N >= 1, got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError(f"samples have {int((~torch.isfinite(samples)).sum())} non-finite entries")
    x = samples.detach().to("cpu", torch.float64)
    if isinstance(posterior, LinearGaussianPosterior):
        log_joint = posterior.log_joint(x)
    else:
        log_joint = _mixture_log_joint(posterior, x)
    weights = posterior.weights
    assigned = log_joint.argmax(dim=-1)
    freq = torch.bincount(assigned, minlength=posterior.num_components).to(torch.float64) / x.shape[0]
    return float(0.5 * (freq - weights).abs().sum())


def _mixture_log_joint(gm: GaussianMixture, x: Tensor) -> Tensor:
    """``log w_k + log N(x; μ_k, C_k)`` at the data end, shape ``(B, K)``."""
    y = x[:, None, :] - gm.means[None]
    if gm.eigvecs is not None:
        y = torch.einsum("kdj,bkd->bkj", gm.eigvecs, y)
    ev = gm.eigvals[None]
    log_n = -0.5 * (y * y / ev).sum(-1) - 0.5 * torch.log(ev).sum(-1) - 0.5 * gm.dim * math.log(2 * math.pi)
    return torch.log(gm.weights)[None] + log_n


@dataclass
class GMMInverseProblem:
    r"""A linear inverse problem with a Gaussian-mixture prior and its exact posterior (:func:`gmm_inverse_problem`).

    Attributes:
        prior: the prior :class:`GaussianMixture` (its ``path`` is the prior field's path).
        H: ``(m, d)`` measurement matrix :math:`U\,\mathrm{diag}(s)\,V_{1:m}`.
        y: ``(m,)`` the measurement.
        sigma_y: the measurement noise standard deviation actually used (absolute).
        posterior: the exact :class:`LinearGaussianPosterior`.
        x_true: ``(d,)`` the signal ``y`` was measured from.
        singular_values: ``(m,)`` the singular values ``s`` of ``H`` (descending).
        tries: how many signals were drawn before the multimodality condition held (1 otherwise).
    """

    prior: GaussianMixture
    H: Tensor
    y: Tensor
    sigma_y: float
    posterior: LinearGaussianPosterior
    x_true: Tensor
    singular_values: Tensor
    tries: int = 1

    @property
    def dim(self) -> int:
        return self.prior.dim

    def model(self, prediction: str = "noise") -> Callable[..., Tensor]:
        """An exact network ``model(x, t)`` of the prior on :attr:`path` (see :meth:`GaussianMixture.model`)."""
        return self.prior.model(prediction)

    @property
    def path(self) -> GaussianPath:
        """The prior's path: ``fd.Field(problem.model("noise"), problem.path, "noise")`` is the exact prior field.

        (No ``field()`` here: :mod:`flowdiff.testing` sits beside :mod:`flowdiff.fields` in the
        import layers and may not import it.)
        """
        return self.prior.path


def gmm_inverse_problem(
    dim: int,
    num_measurements: int,
    sigma_y: float,
    *,
    num_modes: int = 25,
    spacing: float = 8.0,
    seed: int = 0,
    path: GaussianPath | None = None,
    relative_noise: bool = True,
    multimodal: bool = False,
    min_weight: float = 0.1,
    min_modes: int = 2,
    max_tries: int = 1000,
) -> GMMInverseProblem:
    r"""The Gaussian-mixture inverse problem of the MCGdiff paper (Cardoso, Janati El Idrissi, Le Corff & Moulines 2024).

    * Prior: ``num_modes = n²`` unit-covariance Gaussians on an ``n × n`` grid: with
      :math:`i, j \in \{-(n-1)/2, \dots, (n-1)/2\}` the mean is
      :math:`\text{spacing}\cdot(i, j, i, j, \dots)` (the pair repeated over the ``dim``
      coordinates); weights :math:`\propto g_k^2`, :math:`g_k \sim N(0, 1)`, normalised.
    * Operator: :math:`H = U\,\mathrm{diag}(s)\,V_{1:m}` with ``U``, ``V`` orthogonal from the SVD of
      a Gaussian matrix and :math:`s` uniform(0, 1), sorted descending.
    * Measurement: :math:`x^* \sim` prior, :math:`y = Hx^* + \sigma_y n`. With ``relative_noise``
      (default, the paper's convention) the noise level is ``sigma_y * max(s)``; otherwise
      ``sigma_y`` is used as given. :attr:`GMMInverseProblem.sigma_y` is the absolute value.
    * ``multimodal=True`` makes the posterior multimodal on purpose: signals :math:`x^*` (and
      noise) are redrawn from the prior until at least ``min_modes`` posterior components have
      weight ``>= min_weight``. If ``max_tries`` draws fail, the signal is taken halfway between
      two random prior means (their measurements are then equidistant from ``y``), again up to
      ``max_tries`` pairs; ``ValueError`` if that fails too (e.g. many precise measurements).

    Arguments:
        dim: ``d >= 2``.
        num_measurements: ``1 <= m <= d``.
        sigma_y: noise level ``>= 0`` (relative to ``max(s)`` by default; ``0`` gives a noiseless problem).
        num_modes: a perfect square ``>= 1``.
        spacing: distance between neighbouring grid means (> 0).
        seed: everything is drawn from ``torch.Generator().manual_seed(seed)``.
        path: the prior's Gaussian path (default ``VP()``).

    Returns:
        :class:`GMMInverseProblem` (float64 tensors).
    """
    for name, value, low in (("dim", dim, 2), ("num_measurements", num_measurements, 1), ("num_modes", num_modes, 1),
                             ("min_modes", min_modes, 1), ("max_tries", max_tries, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_measurements > dim:
        raise ValueError(f"num_measurements must be <= dim = {dim}, got {num_measurements}")
    side = math.isqrt(num_modes)
    if side * side != num_modes:
        raise ValueError(f"num_modes must be a perfect square (a grid of n x n means), got {num_modes}")
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a finite number > 0, got {spacing!r}")
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    if not (0 < min_weight < 1 / min_modes + 1e-12):
        raise ValueError(f"min_weight must lie in (0, 1/min_modes], got {min_weight!r} with min_modes={min_modes}")
    if multimodal and min_modes > num_modes:
        raise ValueError(f"min_modes={min_modes} exceeds num_modes={num_modes}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    grid = torch.arange(side, dtype=f64) - (side - 1) / 2
    ii, jj = torch.meshgrid(grid, grid, indexing="ij")
    pair = torch.stack([ii.reshape(-1), jj.reshape(-1)], dim=-1)  # (K, 2)
    means = spacing * pair.repeat(1, (dim + 1) // 2)[:, :dim]
    weights = torch.randn(num_modes, generator=g, dtype=f64) ** 2 + 1e-300
    prior = GaussianMixture(means, scales=torch.ones(num_modes, dim, dtype=f64), weights=weights, path=path)
    u, _, _ = torch.linalg.svd(torch.randn(num_measurements, num_measurements, generator=g, dtype=f64))
    _, _, vh = torch.linalg.svd(torch.randn(dim, dim, generator=g, dtype=f64))
    s = torch.sort(torch.rand(num_measurements, generator=g, dtype=f64), descending=True).values
    H = u @ torch.diag(s) @ vh[:num_measurements]
    noise = float(sigma_y) * (float(s.max()) if relative_noise else 1.0)

    def measure(x: Tensor) -> tuple[Tensor, LinearGaussianPosterior]:
        y = H @ x + noise * torch.randn(num_measurements, generator=g, dtype=f64)
        return y, linear_gaussian_posterior(prior, H, y, noise)

    def ok(post: LinearGaussianPosterior) -> bool:
        return not multimodal or int((post.weights >= min_weight).sum()) >= min_modes

    tries = 0
    for _ in range(max_tries):
        tries += 1
        x = prior.sample(1, generator=g)[0]
        y, post = measure(x)
        if ok(post):
            return GMMInverseProblem(prior, H, y, noise, post, x, s, tries)
    for _ in range(max_tries):
        tries += 1
        a, b = torch.randperm(num_modes, generator=g)[:2].tolist()
        x = 0.5 * (means[a] + means[b])
        y, post = measure(x)
        if ok(post):
            return GMMInverseProblem(prior, H, y, noise, post, x, s, tries)
    raise ValueError(
        f"no measurement with >= {min_modes} posterior components of weight >= {min_weight} in {tries} tries "
        f"(dim={dim}, num_measurements={num_measurements}, sigma_y={sigma_y}, seed={seed}); lower min_weight or use "
        "fewer measurements / more noise"
    )


# ---------------------------------------------------------------------------------------
# Exact reward-tilted targets (inference-time steering and RL fine-tuning, issue 15)
# ---------------------------------------------------------------------------------------


class TiltedMixture(LinearGaussianPosterior):
    r"""The reward-tilted mixture :math:`p(x)\,e^{r(x)/\beta}/Z` of :func:`tilted_mixture`.

    A :class:`GaussianMixture` (``weights`` = the tilted mode weights, ``means``,
    ``covariances()``, ``sample``, ``log_prob``, the exact fields along ``path``) that also keeps
    the reward it came from and its closed-form statistics.

    Attributes:
        prior: the untilted :class:`GaussianMixture`.
        A: ``(m, D)`` feature matrix; b: ``(m,)`` target feature; reward_cov: ``(m, m)`` the
            reward's covariance ``S``; temperature: ``β``; normalized: whether ``r`` includes
            :math:`-\tfrac12\log\det(2\pi S)` (the Gaussian log-density) or not.
        log_normalizer: :math:`\log Z = \log E_p[e^{r(x)/\beta}]` (exact).
    """

    A: Tensor
    b: Tensor
    reward_cov: Tensor
    temperature: float
    normalized: bool
    log_normalizer: float

    def with_path(self, path: GaussianPath) -> "TiltedMixture":
        """The same tilted distribution, with fields along another path (keeps the class)."""
        other = object.__new__(TiltedMixture)
        other.__dict__.update(self.__dict__)
        other.path = path
        return other

    def reward(self, x: Tensor) -> Tensor:
        r""":math:`r(x) = -\tfrac12 (Ax - b)^\top S^{-1}(Ax - b)\ [-\tfrac12\log\det(2\pi S)]`, shape ``(B,)``.

        ``x`` has shape ``(B, D)`` (or ``(B, *)`` with ``D`` entries per row); computed in ``x``'s
        dtype and on its device, differentiable in ``x``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {self.dim}), got {type(x).__name__}")
        flat = x.reshape(x.shape[0], -1) if x.ndim >= 1 else x
        if x.ndim < 2 or flat.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        dt, dev = x.dtype, x.device
        white_a = self._white_A.to(dtype=dt, device=dev)
        white_b = self._white_b.to(dtype=dt, device=dev)
        z = flat @ white_a.T - white_b
        return -0.5 * (z * z).sum(-1) - self._reward_const

    def expected_reward(self) -> float:
        r""":math:`E_{\tilde p}[r]` in closed form: per component
        :math:`-\tfrac12[(Am_k - b)^\top S^{-1}(Am_k - b) + \mathrm{tr}(S^{-1}AC_kA^\top)]`."""
        return _expected_reward(self, self)

    def prior_expected_reward(self) -> float:
        """:math:`E_p[r]` under the untilted prior, in closed form."""
        return _expected_reward(self.prior, self)

    def kl_to_prior(self) -> float:
        r""":math:`\mathrm{KL}(\tilde p\,\|\,p) = E_{\tilde p}[r]/\beta - \log Z` (exact)."""
        return self.expected_reward() / self.temperature - self.log_normalizer

    def objective(self) -> float:
        r"""The optimum :math:`E_{\tilde p}[r] - \beta\,\mathrm{KL}(\tilde p\|p) = \beta\log Z` of the KL-regularised problem."""
        return self.temperature * self.log_normalizer


def _expected_reward(dist: GaussianMixture, tilt: TiltedMixture) -> float:
    wa, wb = tilt._white_A, tilt._white_b
    z = dist.means @ wa.T - wb  # (K, m)
    cov = dist.covariances()
    trace = torch.einsum("ij,kjl,il->k", wa, cov, wa)
    per = -0.5 * ((z * z).sum(-1) + trace) - tilt._reward_const
    return float((dist.weights * per).sum())


def tilted_mixture(
    prior: GaussianMixture,
    A: Tensor | Sequence,
    b: Tensor | Sequence,
    *,
    scale: float | None = None,
    cov: Tensor | Sequence | None = None,
    temperature: float = 1.0,
    normalized: bool = False,
) -> TiltedMixture:
    r"""The exact tilted target :math:`\tilde p(x) = p(x)\,e^{r(x)/\beta}/Z` of a mixture prior and a Gaussian reward.

    The reward is Gaussian in a linear feature :math:`Ax`:

    .. math::

        r(x) = -\tfrac12 (Ax - b)^\top S^{-1}(Ax - b)\ \big[-\tfrac12\log\det(2\pi S)\big],

    with :math:`S = \text{scale}^2 I` (``scale``) or a full ``cov`` (the bracket only if
    ``normalized``, making :math:`r = \log N(Ax; b, S)`). Since
    :math:`e^{r/\beta} \propto N(b; Ax, \beta S)`, the tilted distribution is the posterior of the
    prior given the pseudo-measurement ``b = Ax + n``, ``n ~ N(0, βS)``: again a mixture, with
    (whitening by :math:`S = LL^\top`, then :func:`linear_gaussian_posterior`)

    .. math::

        \tilde w_k \propto w_k\,N(b; A\mu_k, AC_kA^\top + \beta S),\quad
        \tilde C_k = (C_k^{-1} + A^\top S^{-1}A/\beta)^{-1},\quad
        \tilde m_k = \tilde C_k(C_k^{-1}\mu_k + A^\top S^{-1}b/\beta),

    and :math:`\log Z = \log\sum_k w_k N(b; A\mu_k, AC_kA^\top + \beta S) + \tfrac m2\log 2\pi
    + \tfrac12\log\det(\beta S)\ [- \tfrac1{2\beta}\log\det(2\pi S)]`. This is the KL-regularised
    optimum :math:`\arg\max_q E_q[r] - \beta\,\mathrm{KL}(q\|p)` that reward steering (Feynman–Kac
    steering, Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of
    Diffusion Models") and RL fine-tuning (Liu et al. 2025, "Flow-GRPO") aim at; Kim et al. 2025,
    "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing",
    propose exactly this Gaussian-mixture test (§2.6 of the notes).

    Arguments:
        prior: the mixture :math:`p` (its ``path`` is kept).
        A: ``(m, D)`` feature matrix (a ``(D,)`` vector is one feature).
        b: ``(m,)`` target feature value (a number when ``m = 1``).
        scale: the reward's standard deviation ``s > 0`` (``S = s² I``); give this or ``cov``.
        cov: ``(m, m)`` symmetric positive-definite reward covariance ``S``.
        temperature: ``β > 0``; small ``β`` concentrates the tilted law on high reward.
        normalized: include the Gaussian log-normaliser in ``r`` (default ``False``: ``r ≤ 0`` with
            maximum 0 at ``Ax = b``).

    Returns:
        :class:`TiltedMixture` (float64; full covariances) with :meth:`~TiltedMixture.reward`,
        ``weights`` (the tilted mode weights), ``log_normalizer``, :meth:`~TiltedMixture.kl_to_prior`.
    """
    if not isinstance(prior, GaussianMixture):
        raise TypeError(f"prior must be a flowdiff.testing.GaussianMixture, got {type(prior).__name__}")
    A64 = _as64(A)
    if A64.ndim == 1:
        A64 = A64[None]
    if A64.ndim != 2 or A64.shape[1] != prior.dim or A64.shape[0] < 1:
        raise ValueError(f"A must have shape (m, {prior.dim}) with m >= 1, got {tuple(A64.shape)}")
    m = A64.shape[0]
    b64 = _as64(b).reshape(-1)
    if b64.shape != (m,):
        raise ValueError(f"b must have shape ({m},) (the rows of A), got {tuple(_as64(b).shape)}")
    if not (torch.isfinite(A64).all() and torch.isfinite(b64).all()):
        raise ValueError("A and b must be finite")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if (scale is None) == (cov is None):
        raise ValueError("give exactly one of scale (S = scale² I) or cov (S, shape (m, m))")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        S = float(scale) ** 2 * torch.eye(m, dtype=torch.float64)
    else:
        S = _as64(cov)
        if S.shape != (m, m):
            raise ValueError(f"cov must have shape ({m}, {m}), got {tuple(S.shape)}")
        if not torch.allclose(S, S.T, atol=1e-12):
            raise ValueError("cov must be symmetric")
    L, info = torch.linalg.cholesky_ex(S)
    if info != 0:
        raise ValueError("cov must be positive definite")
    beta = float(temperature)
    white_A = torch.linalg.solve_triangular(L, A64, upper=False)
    white_b = torch.linalg.solve_triangular(L, b64[:, None], upper=False)[:, 0]
    post = linear_gaussian_posterior(prior, white_A, white_b, math.sqrt(beta))
    logdet_S = 2 * float(torch.log(torch.diagonal(L)).sum())
    const = 0.5 * (logdet_S + m * math.log(2 * math.pi)) if normalized else 0.0
    # log Z: log Σ_k w_k ∫ N(x; μ_k, C_k) exp(-½|L⁻¹(Ax - b)|²/β) dx - const/β, the integral being
    # (2π)^{m/2} det(βS)^{1/2} N(b; Aμ_k, AC_kAᵀ + βS) (whitened: det(β I) and N in whitened units).
    cov_k = prior.covariances()
    pred = white_A[None] @ cov_k @ white_A.T[None] + beta * torch.eye(m, dtype=torch.float64)[None]
    chol = torch.linalg.cholesky(0.5 * (pred + pred.transpose(-1, -2)))
    resid = white_b[None] - prior.means @ white_A.T
    zz = torch.linalg.solve_triangular(chol, resid[..., None], upper=False)[..., 0]
    log_n = -0.5 * (zz * zz).sum(-1) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) \
        - 0.5 * m * math.log(2 * math.pi)
    log_z = float(torch.logsumexp(torch.log(prior.weights) + log_n, 0)) + 0.5 * m * math.log(2 * math.pi) \
        + 0.5 * m * math.log(beta) - const / beta
    out = object.__new__(TiltedMixture)
    out.__dict__.update(post.__dict__)
    out.A, out.b, out.reward_cov, out.temperature, out.normalized = A64, b64, S, beta, bool(normalized)
    out.log_normalizer = log_z
    out._white_A, out._white_b, out._reward_const = white_A, white_b, const
    return out


def gaussian_kl(mean0: Tensor, cov0: Tensor, mean1: Tensor, cov1: Tensor) -> float:
    r""":math:`\mathrm{KL}(N(m_0, C_0)\,\|\,N(m_1, C_1)) = \tfrac12[\mathrm{tr}(C_1^{-1}C_0) + (m_1-m_0)^\top C_1^{-1}(m_1-m_0) - d + \log\frac{\det C_1}{\det C_0}]` (float64)."""
    m0, m1, c0, c1 = (_as64(v) for v in (mean0, mean1, cov0, cov1))
    d = m0.shape[-1]
    if m0.shape != (d,) or m1.shape != (d,) or c0.shape != (d, d) or c1.shape != (d, d):
        raise ValueError(f"need means (d,) and covariances (d, d); got {tuple(m0.shape)}, {tuple(c0.shape)}, "
                         f"{tuple(m1.shape)}, {tuple(c1.shape)}")
    l0, i0 = torch.linalg.cholesky_ex(c0)
    l1, i1 = torch.linalg.cholesky_ex(c1)
    if i0 != 0 or i1 != 0:
        raise ValueError("covariances must be positive definite")
    a = torch.linalg.solve_triangular(l1, l0, upper=False)
    dm = torch.linalg.solve_triangular(l1, (m1 - m0)[:, None], upper=False)[:, 0]
    logdet = 2 * (torch.log(torch.diagonal(l1)).sum() - torch.log(torch.diagonal(l0)).sum())
    return float(0.5 * ((a * a).sum() + (dm * dm).sum() - d + logdet))


def mixture_kl(p: GaussianMixture, q: GaussianMixture, num_samples: int = 100_000,
               generator: torch.Generator | None = None) -> tuple[float, float]:
    r"""Monte Carlo :math:`\mathrm{KL}(p\|q) = E_p[\log p - \log q]` between two mixtures (no closed form exists).

    Uses ``num_samples`` exact draws of ``p``. Returns ``(estimate, standard_error)``.
    """
    for name, g in (("p", p), ("q", q)):
        if not isinstance(g, GaussianMixture):
            raise TypeError(f"{name} must be a flowdiff.testing.GaussianMixture, got {type(g).__name__}")
    if p.dim != q.dim:
        raise ValueError(f"p and q live in different dimensions: {p.dim} vs {q.dim}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    x = p.sample(num_samples, generator=generator)
    diff = p.log_prob(x) - q.log_prob(x)
    return float(diff.mean()), float(diff.std() / math.sqrt(num_samples))


def mode_frequencies(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """How often the samples fall in each component (assigned by the highest responsibility), ``(K,)`` float64.

    The empirical counterpart of ``mixture.weights``; :func:`mode_weight_tv` is half their L1 distance.
    """
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a flowdiff.testing.GaussianMixture, got {type(mixture).__name__}")
    if not isinstance(samples, Tensor) or samples.ndim != 2 or samples.shape[1] != mixture.dim or samples.shape[0] < 1:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be a tensor of shape (N, {mixture.dim}) with N >= 1, got {shape}")
    if not torch.isfinite(samples).all():
        raise ValueError(f"samples have {int((~torch.isfinite(samples)).sum())} non-finite entries")
    x = samples.detach().to("cpu", torch.float64)
    lj = mixture.log_joint(x) if isinstance(mixture, LinearGaussianPosterior) else _mixture_log_joint(mixture, x)
    counts = torch.bincount(lj.argmax(-1), minlength=mixture.num_components).to(torch.float64)
    return counts / x.shape[0]


def sliced_w2_to_mixture(samples: Tensor, mixture: GaussianMixture, num_reference: int = 20_000,
                         num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between ``samples`` ``(N, D)`` and ``num_reference`` exact draws of ``mixture``.

    (:func:`flowdiff.metrics.sliced_wasserstein`, Bonneel et al. 2015.) The reference draws and the
    projections come from ``seed``, so two sample sets are compared against the same reference.
    Exact draws of the same size give the Monte Carlo floor.
    """
    from .metrics import sliced_wasserstein

    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a flowdiff.testing.GaussianMixture, got {type(mixture).__name__}")
    if not isinstance(samples, Tensor) or samples.ndim != 2 or samples.shape[1] != mixture.dim:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be a tensor of shape (N, {mixture.dim}), got {shape}")
    if not torch.isfinite(samples).all():
        raise ValueError(f"samples have {int((~torch.isfinite(samples)).sum())} non-finite entries")
    g = torch.Generator().manual_seed(seed)
    ref = mixture.sample(num_reference, generator=g)
    return float(sliced_wasserstein(samples.detach().to("cpu", torch.float64), ref, num_projections=num_projections,
                                    generator=g))


def tilted_problem(dim: int, num_modes: int = 4, seed: int = 0, temperature: float = 1.0,
                   rare_weight: float = 0.05, spread: float = 6.0, path: GaussianPath | None = None) -> TiltedMixture:
    r"""A reproducible steering test: a mixture whose rarest mode is favoured by a 1-feature Gaussian reward.

    Prior: ``num_modes`` isotropic components (standard deviation 0.5–1) with means drawn as
    ``N(0, (spread/2)^2 I)``; one mode (the *rare* one) gets prior weight ``rare_weight``, the
    rest share the remainder. Reward: :math:`r(x) = -(a^\top x - a^\top\mu_{rare})^2/(2 s^2)` along
    the unit direction ``a`` from the mixture mean to the rare mode, with ``s`` = the rare mode's
    spread along ``a`` plus one; so the tilted target puts much more weight on the rare mode than
    the prior does (exactly how much: ``tilted.weights``).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 2:
        raise ValueError(f"num_modes must be an integer >= 2, got {num_modes!r}")
    if not 0 < rare_weight < 1:
        raise ValueError(f"rare_weight must lie in (0, 1), got {rare_weight!r}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_modes, dim, generator=g, dtype=torch.float64) * (spread / 2)
    scales = (0.5 + 0.5 * torch.rand(num_modes, 1, generator=g, dtype=torch.float64)).expand(num_modes, dim).clone()
    rest = torch.rand(num_modes - 1, generator=g, dtype=torch.float64) + 0.5
    weights = torch.cat([torch.tensor([rare_weight], dtype=torch.float64), (1 - rare_weight) * rest / rest.sum()])
    prior = GaussianMixture(means, scales=scales, weights=weights, path=path)
    others = means[1:].mean(0)
    a = means[0] - others
    a = a / a.norm().clamp_min(1e-12)
    b = a @ means[0]
    return tilted_mixture(prior, a[None], b[None], scale=float(scales[0, 0]) + 1.0, temperature=temperature)


def gaussian_ems_statistics(mean: Tensor, cov: Tensor, lambdas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Closed-form empirical model statistics ``l, s, b`` of DPM-Solver-v3 (Zheng et al. 2023,
    §3.2) for data :math:`N(\mu, C)` at log-SNRs ``lambdas``, each of shape ``(K, d)``, float64.

    With :math:`P = (I + e^{2\lambda}C)^{-1}` the noise predictor is :math:`\sigma\hat\varepsilon =
    P(x - \alpha\mu)`, so :math:`l = \operatorname{diag}P` and :math:`l' = \operatorname{diag}P'`,
    :math:`P' = -P(2e^{2\lambda}C)P`; with :math:`M = P - \operatorname{diag} l`,
    :math:`s_j = [M(I + e^{2\lambda}C)(M' - MP)^\top]_{jj} / [M(I + e^{2\lambda}C)M^\top]_{jj}` and
    :math:`b = -l'\circ\mu + s\circ l\circ\mu`.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    eye = torch.eye(mean.numel(), dtype=torch.float64)
    ls, ss, bs = [], [], []
    for lam in torch.as_tensor(lambdas, dtype=torch.float64).tolist():
        e2 = math.exp(2 * lam)
        p = torch.linalg.inv(eye + e2 * cov)
        dp = -p @ (2 * e2 * cov) @ p
        l, dl = torch.diagonal(p), torch.diagonal(dp)
        m, dm = p - torch.diag(l), dp - torch.diag(dl)
        var = torch.diagonal(m @ (eye + e2 * cov) @ m.T)
        cv = torch.diagonal(m @ (eye + e2 * cov) @ (dm - m @ p).T)
        s = torch.where(var > 1e-14, cv / var.clamp_min(1e-300), torch.zeros_like(var))
        ls.append(l)
        ss.append(s)
        bs.append(-dl * mean + s * l * mean)
    return torch.stack(ls), torch.stack(ss), torch.stack(bs)
