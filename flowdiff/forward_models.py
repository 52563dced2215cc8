r"""Learning a diffusion prior from indirect observations: expectation–maximisation with a posterior sampler.

The data :math:`x_i` are never seen; only measurements through forward operators known per sample,

.. math::

    y_i = A_i x_i + \sigma_y n_i, \qquad n_i \sim N(0, I),

with :math:`A_i` a random pixel mask (:class:`MaskedObservations`) or a random linear projection
(:class:`ProjectedObservations`). :func:`train_from_observations` learns a prior
:math:`p_\theta(x)` whose samples approach the distribution of the unseen :math:`x_i`.

Method: expectation–maximisation (Rozet, Andry, Lanusse & Louppe, NeurIPS 2024, "Learning
Diffusion Priors from Observations by Expectation Maximization"). Maximising the marginal
likelihood :math:`\sum_i \log \int p_\theta(x)\,N(y_i; A_i x, \sigma_y^2 I)\,dx` by EM alternates

* **E-step**: draw :math:`x_i \sim p_{\theta_k}(x \mid y_i, A_i)` for every observation with a
  posterior sampler for linear-Gaussian measurements (:func:`sample_posteriors`);
* **M-step**: :math:`\theta_{k+1} = \arg\max_\theta \sum_i \log p_\theta(x_i)`, approximated by a few
  hundred steps of ordinary denoising training on those samples, warm-started from
  :math:`\theta_k` (:func:`train_denoiser`).

Each round cannot decrease the marginal likelihood when both steps are exact, and its fixed
points are the priors whose posteriors, pooled over the observations, reproduce the prior (the
empirical-Bayes condition :math:`p_\theta(x) = \frac1N\sum_i p_\theta(x \mid y_i)`).
EM starts from a Gaussian prior fitted to the observations by closed-form EM
(:func:`fit_gaussian`); its posteriors are Gaussian and sampled exactly (:func:`sample_gaussian_posteriors`).

Why EM and not Ambient Diffusion (Daras et al., NeurIPS 2023, "Ambient Diffusion: Learning
Clean Distributions from Corrupted Data"): Ambient Diffusion trains on further-masked masked
images and is defined for inpainting masks only; EM treats any linear operator the same way
(masks, projections, blurs — everything enters through :math:`A_i` and :math:`A_i^\top`), keeps
ordinary denoising training and an ordinary network, and its E-step is an existing posterior
sampler. Its cost is one posterior draw per observation per round.

The E-step sampler is moment-matching posterior sampling (MMPS, Rozet et al. 2024, §3): at each
noise level the denoiser posterior :math:`p(x \mid x_t)` is replaced by the Gaussian with
Tweedie's mean and covariance,

.. math::

    \hat x = E[x \mid x_t] = D(x_t), \qquad
    \Sigma_t = \mathrm{Cov}[x \mid x_t] = \frac{\sigma_t^2}{\alpha_t}\,\frac{\partial D}{\partial x_t},

which gives the posterior denoiser in closed form,

.. math::

    E[x \mid x_t, y] \approx \hat x + \Sigma_t A^\top \big(\sigma_y^2 I + A\Sigma_t A^\top\big)^{-1}(y - A\hat x),

with the linear system solved by a few conjugate-gradient iterations whose matrix–vector
products are vector–Jacobian products of the denoiser (no Jacobian is formed; ``cg_iterations``
iterations cost ``cg_iterations`` backward passes per evaluation). That posterior denoiser is an
ordinary data-prediction field, integrated by any solver of :mod:`flowdiff.solvers`.
For a Gaussian prior the moment matching is exact (the denoiser is affine), so only the
discretisation error remains; ``tests/test_forward_models.py`` checks that against the
closed-form posterior.

The sampler is batched over *different* operators (one :math:`A_i` per row), which the
one-measurement entry point :func:`flowdiff.inverse.sample_posterior` is not designed for: that
is why it lives here.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .fields import Field
from .losses import GaussianPathLoss

__all__ = [
    "Observations",
    "MaskedObservations",
    "ProjectedObservations",
    "EMResult",
    "fit_gaussian",
    "sample_gaussian_posteriors",
    "sample_posteriors",
    "train_denoiser",
    "train_from_observations",
]


def _check_sigma_y(sigma_y: Any) -> float:
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    return float(sigma_y)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _all_index(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


class Observations:
    r"""Measurements :math:`y_i = A_i x_i + \sigma_y n_i` of ``N`` unseen signals, one operator per row.

    Every operator has ``m`` output rows; a row may be *inactive* (a missing pixel of a mask):
    it carries no measurement, ``y`` is 0 there and it is left out of every likelihood.

    Attributes:
        y: ``(N, m)`` measurements (flattened), zero in inactive rows.
        sigma_y: the measurement noise standard deviation (>= 0).
        shape: the shape of one signal ``x_i`` (e.g. ``(2,)`` or ``(1, 8, 8)``).
    """

    y: Tensor
    sigma_y: float
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def dim(self) -> int:
        """``d``: the number of entries of one signal."""
        return int(math.prod(self.shape))

    @property
    def rows(self) -> int:
        """``m``: the number of rows of each operator."""
        return int(self.y.shape[1])

    # ---- to implement -------------------------------------------------------------------
    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        """:math:`A_i x` for the operators ``index`` (B,) and signals ``x`` (B, *shape) -> (B, m)."""
        raise NotImplementedError

    def adjoint(self, v: Tensor, index: Tensor) -> Tensor:
        """:math:`A_i^\\top v` for ``v`` (B, m) -> (B, *shape)."""
        raise NotImplementedError

    def active(self, index: Tensor) -> Tensor:
        """``(B, m)``: 1 where a row carries a measurement, 0 where it does not."""
        raise NotImplementedError

    def matrix(self, index: Tensor) -> Tensor:
        """The dense operators ``(B, m, d)`` (inactive rows are zero)."""
        raise NotImplementedError

    def naive(self) -> Tensor:
        """The observations placed in signal space without a prior, ``(N, *shape)`` (what naive training sees)."""
        raise NotImplementedError

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Observations":
        """A copy with every tensor on ``device`` in ``dtype`` (masks stay boolean)."""
        out = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(out, name, value.to(device=device, dtype=dtype if value.is_floating_point() else None))
        return out

    # ---- shared -------------------------------------------------------------------------
    def noise_variance(self, index: Tensor) -> Tensor:
        r"""``(B, m)``: :math:`\sigma_y^2` on active rows and 1 on inactive ones.

        The 1 makes the Gram matrices :math:`A\Sigma A^\top + R` invertible without touching the
        active block; inactive rows have zero residual, so they never contribute.
        """
        act = self.active(index)
        return self.sigma_y**2 * act + (1.0 - act)

    def residual(self, x: Tensor, index: Tensor) -> Tensor:
        """``(B, m)``: :math:`y_i - A_i x` on active rows, 0 on inactive ones."""
        return (self.y[index] - self.forward(x, index)) * self.active(index)

    def _check(self) -> None:
        if not torch.isfinite(self.y).all():
            raise ValueError(f"y has {int((~torch.isfinite(self.y)).sum())} non-finite entries; measurements must be finite")
        if len(self) < 1:
            raise ValueError("need at least one observation")


class MaskedObservations(Observations):
    r"""Pixel masks: :math:`y_i = M_i \odot x_i + \sigma_y n_i` with a known boolean mask per signal.

    Arguments:
        y: ``(N, *shape)``; entries where ``mask`` is False are ignored (set to 0).
        mask: ``(N, *shape)`` booleans, True where the entry is observed.
        sigma_y: measurement noise standard deviation (>= 0; 0 is allowed).
    """

    def __init__(self, y: Tensor, mask: Tensor, sigma_y: float = 0.0) -> None:
        if not isinstance(y, Tensor) or not isinstance(mask, Tensor):
            raise TypeError(f"y and mask must be torch.Tensors, got {type(y).__name__} and {type(mask).__name__}")
        if y.ndim < 2 or tuple(mask.shape) != tuple(y.shape):
            raise ValueError(f"y and mask must have the same shape (N, *shape) with N >= 1, got {tuple(y.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor (True = observed), got dtype {mask.dtype}")
        if not y.is_floating_point():
            raise TypeError(f"y must be a floating-point tensor, got dtype {y.dtype}")
        self.shape = tuple(int(s) for s in y.shape[1:])
        self.mask = mask.reshape(len(y), -1)
        self.y = torch.where(self.mask, y.reshape(len(y), -1), torch.zeros((), dtype=y.dtype, device=y.device))
        self.sigma_y = _check_sigma_y(sigma_y)
        self._check()
        empty = int((~self.mask.any(1)).sum())
        if empty:
            raise ValueError(f"{empty} of the {len(y)} masks observe nothing; drop those observations")

    @classmethod
    def simulate(cls, x: Tensor, missing: float = 0.5, sigma_y: float = 0.0,
                 generator: torch.Generator | None = None) -> "MaskedObservations":
        """Observe each signal of ``x`` (N, *shape) with exactly ``round((1 - missing) d)`` entries at random."""
        missing = _check_float("missing", missing, 0.0, 1.0)
        n, d = len(x), int(math.prod(x.shape[1:]))
        keep = int(round((1.0 - missing) * d))
        if keep < 1:
            raise ValueError(f"missing={missing} leaves no observed entry of the {d}; use missing < {1 - 0.5 / d:.4f}")
        order = torch.rand(n, d, generator=generator).argsort(dim=1)
        mask = torch.zeros(n, d, dtype=torch.bool)
        mask.scatter_(1, order[:, :keep], True)
        mask = mask.reshape(x.shape).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
        return cls(x + _check_sigma_y(sigma_y) * noise, mask, sigma_y)

    def active(self, index: Tensor) -> Tensor:
        return self.mask[index].to(self.y.dtype)

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        return x.reshape(len(x), -1) * self.active(index).to(x.dtype)

    def adjoint(self, v: Tensor, index: Tensor) -> Tensor:
        return (v * self.active(index).to(v.dtype)).reshape(len(v), *self.shape)

    def matrix(self, index: Tensor) -> Tensor:
        return torch.diag_embed(self.active(index))

    def naive(self) -> Tensor:
        """Zero-filled signals: the observed entries, 0 elsewhere (:math:`A_i^\\top y_i`)."""
        return self.y.reshape(len(self), *self.shape).clone()


class ProjectedObservations(Observations):
    r"""Linear projections: :math:`y_i = A_i x_i + \sigma_y n_i` with a known matrix :math:`A_i` (m, d) per signal.

    Arguments:
        y: ``(N, m)``.
        A: ``(N, m, d)`` (one operator per signal) or ``(m, d)`` (the same for all).
        sigma_y: measurement noise standard deviation (>= 0).
        shape: the shape of one signal (default ``(d,)``).
    """

    def __init__(self, y: Tensor, A: Tensor, sigma_y: float = 0.0, shape: tuple[int, ...] | None = None) -> None:
        if not isinstance(y, Tensor) or not isinstance(A, Tensor):
            raise TypeError(f"y and A must be torch.Tensors, got {type(y).__name__} and {type(A).__name__}")
        if y.ndim != 2:
            raise ValueError(f"y must have shape (N, m), got {tuple(y.shape)}")
        if A.ndim == 2:
            A = A.expand(len(y), *A.shape)
        if A.ndim != 3 or A.shape[:2] != y.shape:
            raise ValueError(f"A must have shape (N, m, d) = ({y.shape[0]}, {y.shape[1]}, d) or (m, d), got {tuple(A.shape)}")
        if not y.is_floating_point() or not A.is_floating_point():
            raise TypeError(f"y and A must be floating-point tensors, got {y.dtype} and {A.dtype}")
        if not torch.isfinite(A).all():
            raise ValueError(f"A has {int((~torch.isfinite(A)).sum())} non-finite entries")
        d = int(A.shape[2])
        self.shape = (d,) if shape is None else tuple(int(s) for s in shape)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} has {math.prod(self.shape)} entries but A has d = {d} columns")
        self.y, self.A = y, A.to(y.dtype)
        self.sigma_y = _check_sigma_y(sigma_y)
        self._check()

    @classmethod
    def simulate(cls, x: Tensor, rows: int = 1, sigma_y: float = 0.0,
                 generator: torch.Generator | None = None) -> "ProjectedObservations":
        """Observe each signal of ``x`` (N, *shape) through ``rows`` random unit directions (uniform on the sphere)."""
        rows = _check_int("rows", rows, 1)
        n, d = len(x), int(math.prod(x.shape[1:]))
        A = torch.randn(n, rows, d, generator=generator, dtype=torch.float64)
        A = (A / A.norm(dim=-1, keepdim=True)).to(device=x.device, dtype=x.dtype)
        noise = torch.randn(n, rows, generator=generator).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("nmd,nd->nm", A, x.reshape(n, d)) + _check_sigma_y(sigma_y) * noise
        return cls(y, A, sigma_y, tuple(x.shape[1:]))

    def active(self, index: Tensor) -> Tensor:
        return torch.ones(len(index), self.rows, dtype=self.y.dtype, device=self.y.device)

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        return torch.einsum("bmd,bd->bm", self.A[index].to(x.dtype), x.reshape(len(x), -1))

    def adjoint(self, v: Tensor, index: Tensor) -> Tensor:
        return torch.einsum("bmd,bm->bd", self.A[index].to(v.dtype), v).reshape(len(v), *self.shape)

    def matrix(self, index: Tensor) -> Tensor:
        return self.A[index]

    def naive(self) -> Tensor:
        """Minimum-norm back-projections :math:`A_i^+ y_i` (the signals nearest 0 that explain ``y_i``)."""
        return torch.linalg.lstsq(self.A.double(), self.y.double()[..., None]).solution[..., 0].to(self.y.dtype).reshape(
            len(self), *self.shape)


# ------------------------------------------------------------------------------------------
# Gaussian prior: closed-form EM and exact posteriors
# ------------------------------------------------------------------------------------------

def _gaussian_gain(mean: Tensor, cov: Tensor, obs: Observations, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Kalman gain ``K = Σ Aᵀ (A Σ Aᵀ + R)⁻¹`` (B, d, m), the operators (B, m, d) and the residuals at the mean."""
    A = obs.matrix(index).to(cov.dtype)
    R = obs.noise_variance(index).to(cov.dtype)
    gram = A @ cov @ A.transpose(1, 2) + torch.diag_embed(R)
    jitter = 1e-10 * float(torch.diagonal(cov).mean()) + 1e-300
    gram = gram + jitter * torch.eye(gram.shape[-1], dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info > 0).any()):
        raise FloatingPointError("A Σ Aᵀ + σ_y² I is not positive definite for some observations (σ_y = 0 and "
                                 "linearly dependent rows?); use sigma_y > 0 or drop the dependent rows")
    SAt = cov @ A.transpose(1, 2)                              # (B, d, m)
    K = torch.cholesky_solve(SAt.transpose(1, 2), chol).transpose(1, 2)
    resid = (obs.y[index].to(cov.dtype) - torch.einsum("bmd,d->bm", A, mean)) * obs.active(index).to(cov.dtype)
    return K, A, resid


def fit_gaussian(observations: Observations, iterations: int = 50, batch_size: int = 4096,
                 tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    r"""The Gaussian prior :math:`N(\mu, \Sigma)` of maximal marginal likelihood of the observations, by EM.

    Closed-form EM for the linear-Gaussian model (Dempster, Laird & Rubin 1977; the initial prior of
    Rozet et al. 2024): with :math:`K_i = \Sigma A_i^\top (A_i\Sigma A_i^\top + \sigma_y^2 I)^{-1}`,
    the posterior of :math:`x_i` is :math:`N(m_i, C_i)`, :math:`m_i = \mu + K_i(y_i - A_i\mu)`,
    :math:`C_i = \Sigma - K_i A_i \Sigma`, and the update is :math:`\mu \leftarrow \bar m`,
    :math:`\Sigma \leftarrow \overline{C_i + (m_i - \mu)(m_i - \mu)^\top}`. Starts from
    :math:`N(0, s I)` with :math:`s` matching the observed energy. Runs in float64.

    Arguments:
        observations: the measurements.
        iterations: at most this many EM updates.
        batch_size: observations processed at once (memory: ``batch_size · m · d`` numbers).
        tol: stop when the relative change of :math:`\Sigma` (Frobenius) falls below this.

    Returns:
        ``(mean (d,), covariance (d, d))`` in float64 on the observations' device.
    """
    iterations = _check_int("iterations", iterations, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    obs = observations
    device, d, n = obs.y.device, obs.dim, len(obs)
    idx_all = _all_index(n, device)
    act = obs.active(idx_all).double()
    energy = float((obs.y.double() ** 2 * act).sum())
    row_norm = 0.0
    for start in range(0, n, batch_size):
        idx = idx_all[start:start + batch_size]
        row_norm += float((obs.matrix(idx).double() ** 2).sum())
    scale = max(energy - obs.sigma_y**2 * float(act.sum()), 1e-12) / max(row_norm, 1e-300)
    mean = torch.zeros(d, dtype=torch.float64, device=device)
    cov = scale * torch.eye(d, dtype=torch.float64, device=device)
    for _ in range(iterations):
        sum_m = torch.zeros(d, dtype=torch.float64, device=device)
        sum_mm = torch.zeros(d, d, dtype=torch.float64, device=device)
        sum_c = torch.zeros(d, d, dtype=torch.float64, device=device)
        for start in range(0, n, batch_size):
            idx = idx_all[start:start + batch_size]
            K, A, resid = _gaussian_gain(mean, cov, obs, idx)
            m = mean + torch.einsum("bdm,bm->bd", K, resid)
            sum_m += m.sum(0)
            sum_mm += m.T @ m
            sum_c += (torch.eye(d, dtype=cov.dtype, device=device) * len(idx) - torch.einsum("bdm,bme->de", K, A)) @ cov
        new_mean = sum_m / n
        new_cov = (sum_c + sum_mm) / n - torch.outer(new_mean, new_mean)
        new_cov = 0.5 * (new_cov + new_cov.T)
        change = float((new_cov - cov).norm() / cov.norm().clamp_min(1e-300))
        mean, cov = new_mean, new_cov
        if change < tol:
            break
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise FloatingPointError("the Gaussian EM produced non-finite values; check the observations' scale")
    return mean, cov


def sample_gaussian_posteriors(mean: Tensor, cov: Tensor, observations: Observations,
                               generator: torch.Generator | None = None, batch_size: int = 4096) -> Tensor:
    r"""One exact draw of :math:`p(x_i \mid y_i)` per observation under the prior :math:`N(\mu, \Sigma)`.

    Matheron's rule (e.g. Wilson et al. 2020, "Efficiently sampling functions from Gaussian process
    posteriors"): draw :math:`x \sim N(\mu, \Sigma)` and :math:`\epsilon \sim N(0, \sigma_y^2 I)`, return
    :math:`x + K_i(y_i - A_i x - \epsilon)`. Exact also for :math:`\sigma_y = 0`, where
    :math:`C_i` is singular. Returns ``(N, *shape)`` in the observations' dtype.
    """
    obs = observations
    device, n, d = obs.y.device, len(obs), obs.dim
    mean, cov = mean.to(device=device, dtype=torch.float64), cov.to(device=device, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0.0).sqrt()
    out = []
    idx_all = _all_index(n, device)
    for start in range(0, n, batch_size):
        idx = idx_all[start:start + batch_size]
        z = torch.randn(len(idx), d, generator=generator, dtype=torch.float64).to(device)
        eps = torch.randn(len(idx), obs.rows, generator=generator, dtype=torch.float64).to(device)
        x = mean + z @ root.T
        K, A, _ = _gaussian_gain(mean, cov, obs, idx)
        act = obs.active(idx).double()
        resid = (obs.y[idx].double() - torch.einsum("bmd,bd->bm", A, x) - obs.sigma_y * eps) * act
        out.append(x + torch.einsum("bdm,bm->bd", K, resid))
    return torch.cat(out).to(obs.y.dtype).reshape(n, *obs.shape)


# ------------------------------------------------------------------------------------------
# Diffusion prior: moment-matching posterior sampling (the E-step)
# ------------------------------------------------------------------------------------------

def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


class _PosteriorDenoiser:
    r"""``model(x, t)`` returning the MMPS posterior denoiser :math:`E[x \mid x_t, y_i]` for a block of observations.

    A model callable for a ``Field(..., prediction="data")``, so any solver of
    :mod:`flowdiff.solvers` samples the posterior. Counts its backward passes in ``vjps``.
    """

    def __init__(self, field: Field, obs: Observations, index: Tensor, cg_iterations: int, jitter: float,
                 covariance: Tensor | None) -> None:
        self.field, self.obs, self.index = field, obs, index
        self.cg_iterations, self.jitter = cg_iterations, jitter
        self.vjps = 0
        self.anchor = None
        if covariance is not None:
            evals, evecs = torch.linalg.eigh(covariance.to(torch.float64))
            evals = evals.clamp_min(0.0)
            self.anchor = (evals, evecs, float(evals.mean()))

    def _anchor_weights(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``w_t = α²s/(α²s + σ²)``: the weight of the Jacobian covariance (``1`` without an anchor)."""
        if self.anchor is None:
            return torch.ones_like(alpha)
        level = alpha**2 * self.anchor[2]
        return level / (level + sigma**2)

    def _anchor_apply(self, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        r""":math:`\Sigma_0(I + (\alpha/\sigma)^2\Sigma_0)^{-1} v`: the exact Tweedie covariance of the Gaussian prior."""
        evals, evecs, _ = self.anchor
        flat = v.reshape(len(v), -1).to(torch.float64)
        snr = (alpha / sigma).reshape(-1, 1) ** 2
        spectral = flat @ evecs * (evals / (1.0 + snr * evals))
        return (spectral @ evecs.T).to(v.dtype).reshape(v.shape)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        obs, index = self.obs, self.index
        if len(x) != len(index):
            raise ValueError(f"the posterior denoiser holds {len(index)} observations but got a batch of {len(x)}")
        coef = self.field.path.table(t.detach().to(torch.float64))
        shape = (-1,) + (1,) * (x.ndim - 1)
        weight = self._anchor_weights(coef.alpha, coef.sigma)
        # Σ_t = c · ∂D/∂x_t (times w_t, plus (1 − w_t) · the Gaussian anchor when one is given)
        c = (weight * coef.sigma**2 / coef.alpha).to(x.dtype).reshape(shape)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            denoised = self.field.denoise(xg, t, **cond)
            act = obs.active(index).to(x.dtype)
            resid = obs.residual(denoised.detach(), index).to(x.dtype)
            R = obs.noise_variance(index).to(x.dtype) + self.jitter

            def cov_at(v: Tensor) -> Tensor:                   # Σ_t Aᵀ v: one backward pass
                self.vjps += 1
                back = obs.adjoint(v * act, index).to(x.dtype)
                (g,) = torch.autograd.grad(denoised, xg, grad_outputs=back, retain_graph=True)
                g = c * g
                if self.anchor is not None:
                    g = g + (1.0 - weight).to(x.dtype).reshape(shape) * self._anchor_apply(back, coef.alpha, coef.sigma)
                return g

            # Conjugate gradients on (R + A Σ_t Aᵀ) u = r, per row (Σ_t symmetric for an exact
            # denoiser). Σ_t Aᵀ p_j is kept, so the correction Σ_t Aᵀ u = Σ_j a_j Σ_t Aᵀ p_j costs
            # no further backward pass.
            correction = torch.zeros_like(x)
            r, p = resid, resid
            rr = _rowdot(r, r)
            for _ in range(self.cg_iterations):
                jp = cov_at(p)
                mp = R * p + obs.forward(jp, index).to(x.dtype) * act
                pmp = _rowdot(p, mp)
                step = torch.where(pmp > 0, rr / pmp.clamp_min(1e-300), torch.zeros_like(pmp))
                correction = correction + step.reshape(shape) * jp
                r = r - step * mp
                rr_new = _rowdot(r, r)
                p = r + torch.where(rr > 0, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr)) * p
                rr = rr_new
        return denoised.detach() + correction.detach()


def sample_posteriors(field: Field, observations: Observations, *, steps: int = 32, cg_iterations: int = 1,
                      solver: str | None = None, batch_size: int = 1024, index: Tensor | None = None,
                      generator: torch.Generator | None = None, jitter: float = 1e-6,
                      covariance: Tensor | None = None, **solver_options: Any) -> Tensor:
    r"""One draw of :math:`p(x_i \mid y_i, A_i)` per observation under the prior ``field`` (MMPS).

    Moment-matching posterior sampling (Rozet et al. 2024; module docstring): the posterior
    denoiser is wrapped as a data-prediction :class:`~flowdiff.Field` and integrated by a solver
    of :mod:`flowdiff.solvers` from the path's base to the data end. Each network evaluation
    makes ``cg_iterations`` vector–Jacobian products.

    Arguments:
        field: the prior (any prediction type on a Gaussian path).
        observations: :class:`MaskedObservations` or :class:`ProjectedObservations`.
        steps: network evaluations per sample (the solver's ``nfe``).
        cg_iterations: conjugate-gradient iterations per evaluation (>= 1; Rozet et al. find 1–3
            enough; ``m`` iterations solve the ``m``-row system exactly).
        solver: a name of :func:`flowdiff.solvers.available` (default: the library's default
            solver, a deterministic high-order one; ``"ddpm"`` for ancestral sampling).
        batch_size: observations sampled at once.
        index: which observations (default all).
        generator: for the base noise (and a stochastic solver's noise), on the field's device.
        jitter: added to the Gram diagonal (keeps σ_y = 0 well posed at the nearly noise-free end).
        covariance: ``(d, d)``, the data covariance (e.g. of :func:`fit_gaussian`) that anchors the
            high-noise end: :math:`\Sigma_t = w_t\,\frac{\sigma_t^2}{\alpha_t}\frac{\partial D}{\partial x_t}
            + (1 - w_t)\,\Sigma_0(I + \frac{\alpha_t^2}{\sigma_t^2}\Sigma_0)^{-1}` with
            :math:`w_t = \alpha_t^2 s/(\alpha_t^2 s + \sigma_t^2)`, :math:`s = \mathrm{tr}\,\Sigma_0/d`.
            Why: at high noise the factor :math:`\sigma_t^2/\alpha_t` (10³ at the linear path's
            ``t_min``) multiplies the Jacobian error of a *trained* network (measured: entries of
            −90 where the truth is 2 on a 2-D mixture), while there the prior's own Gaussian
            covariance is nearly exact. Both terms equal the true covariance for a Gaussian prior.
            ``None``: the Jacobian alone (exact networks, tests).
        **solver_options: passed to :func:`flowdiff.solvers.sample`.

    Returns:
        ``(len(index), *shape)`` samples in the observations' dtype.
    """
    from .solvers import sample

    if not isinstance(field, Field):
        raise TypeError(f"field must be a flowdiff.Field on a Gaussian path, got {type(field).__name__}")
    if not isinstance(observations, Observations):
        raise TypeError(f"observations must be MaskedObservations or ProjectedObservations, got {type(observations).__name__}")
    steps = _check_int("steps", steps, 1)
    cg_iterations = _check_int("cg_iterations", cg_iterations, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter!r}")
    obs = observations
    device, dtype = obs.y.device, obs.y.dtype
    if index is None:
        index = _all_index(len(obs), device)
    anchor = None
    if covariance is not None:
        if not isinstance(covariance, Tensor) or tuple(covariance.shape) != (obs.dim, obs.dim):
            raise ValueError(f"covariance must be a ({obs.dim}, {obs.dim}) tensor, got "
                             f"{tuple(covariance.shape) if isinstance(covariance, Tensor) else type(covariance).__name__}")
        if not torch.isfinite(covariance).all():
            raise ValueError("covariance has non-finite entries")
        anchor = covariance.to(device)
    out = []
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        denoiser = _PosteriorDenoiser(field, obs, idx, cg_iterations, float(jitter), anchor)
        posterior = Field(denoiser, field.path, "data")
        x0 = field.path.prior_sample((len(idx), *obs.shape), generator=generator, dtype=dtype, device=device)
        x = sample(posterior, x0, solver=solver, nfe=steps, generator=generator, **solver_options).x.detach()
        field.nfe += posterior.nfe
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"the posterior sampler produced {int((~torch.isfinite(x)).sum())} non-finite "
                                     "values; raise jitter or steps")
        out.append(x)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# M-step and the EM loop
# ------------------------------------------------------------------------------------------

def train_denoiser(model: nn.Module, loss: Callable[..., Any], data: Tensor, steps: int, *, batch_size: int = 256,
                   optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3, ema: nn.Module | None = None,
                   ema_decay: float = 0.995, ema_step: int = 0, grad_clip: float | None = 1.0,
                   generator: torch.Generator | None = None) -> float:
    r"""``steps`` updates of ordinary denoising training of ``model`` on ``data``: the EM's M-step.

    A short loop (minibatches drawn with replacement, AdamW, global-norm clipping, EMA
    ``ema ← d_k·ema + (1 − d_k)·model`` with the warm-up :math:`d_k = \min(d, (1 + k)/(10 + k))`,
    ``k = ema_step +`` the update's index, so the average forgets a cold start), so that EM can
    warm-start every round and keep its optimizer state. For a standalone run use :class:`flowdiff.train.Trainer` (checkpoints,
    resume, logs). Returns the mean loss over the steps. Raises ``FloatingPointError`` on a
    non-finite loss (before the update).
    """
    steps = _check_int("steps", steps, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    total = 0.0
    for step in range(steps):
        pick = torch.randint(len(data), (batch_size,), generator=generator, device=data.device)
        out = loss(model, data[pick], generator=generator)
        value = out.loss if hasattr(out, "loss") else out
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite training loss ({float(value)}) at M-step update {step + 1}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        total += float(value.detach())
        if ema is not None:
            k = ema_step + step
            decay = min(ema_decay, (1.0 + k) / (10.0 + k))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1.0 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
    model.eval()
    return total / max(steps, 1)


@dataclass
class EMResult:
    """What :func:`train_from_observations` returns.

    Attributes:
        field: the learned prior: ``Field(ema_model, loss.path, loss.prediction)``.
        model: the trained network (last weights); ``ema_model`` its EMA (what ``field`` uses).
        gaussian: ``(mean, covariance)`` of the initial Gaussian prior (float64).
        samples: the last E-step's posterior samples, ``(N, *shape)``.
        history: one dict per round: ``round``, ``m_steps``, ``loss``, ``residual_rms`` (the E-step
            samples' RMS misfit :math:`\\lVert y_i - A_i x_i\\rVert` on active rows), ``e_seconds``,
            ``m_seconds`` (process CPU time).
    """

    field: Field
    model: nn.Module
    ema_model: nn.Module
    gaussian: tuple[Tensor, Tensor]
    samples: Tensor
    history: list[dict[str, Any]] = dc_field(default_factory=list)


def _residual_rms(obs: Observations, x: Tensor) -> float:
    idx = _all_index(len(obs), obs.y.device)
    r = obs.residual(x, idx)
    return float((r.double() ** 2).sum() / obs.active(idx).double().sum().clamp_min(1)) ** 0.5


def train_from_observations(
    model: nn.Module,
    loss: GaussianPathLoss,
    observations: Observations,
    *,
    rounds: int = 8,
    steps_per_round: int = 300,
    first_round_steps: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    ema_decay: float = 0.995,
    grad_clip: float | None = 1.0,
    gaussian_iterations: int = 50,
    posterior_steps: int = 32,
    cg_iterations: int = 1,
    solver: str | None = None,
    posterior_batch: int = 1024,
    anchor_covariance: bool = True,
    seed: int = 0,
    callback: Callable[[dict[str, Any], EMResult], None] | None = None,
) -> EMResult:
    r"""Learn a diffusion prior from observations :math:`y_i = A_i x_i + \sigma_y n_i` by EM (Rozet et al. 2024).

    Round 0: fit a Gaussian prior by closed-form EM (:func:`fit_gaussian`), draw one exact
    Gaussian posterior sample per observation (:func:`sample_gaussian_posteriors`) and train the
    network on them for ``first_round_steps`` updates. Rounds 1..``rounds``: E-step — one MMPS
    posterior sample per observation under the current EMA network (:func:`sample_posteriors`);
    M-step — ``steps_per_round`` warm-started denoising updates on them (:func:`train_denoiser`,
    one AdamW state for the whole run).

    Arguments:
        model: the network, called as ``model(x, t)`` by ``loss`` (e.g. ``fd.nn.MLP`` or a
            ``fd.nn.Preconditioned`` UNet); trained in place; its device and dtype are used.
        loss: a :class:`~flowdiff.losses.GaussianPathLoss` (gives the path and prediction type).
        observations: :class:`MaskedObservations` or :class:`ProjectedObservations`.
        rounds: diffusion EM rounds after the Gaussian round (0: only the Gaussian round).
        steps_per_round: M-step updates per round.
        first_round_steps: updates of round 0 (default ``2 · steps_per_round``: the network starts cold).
        batch_size, lr, ema_decay, grad_clip: the M-step's optimisation.
        gaussian_iterations: EM iterations of the initial Gaussian fit.
        posterior_steps, cg_iterations, solver, posterior_batch: the E-step sampler (:func:`sample_posteriors`).
        anchor_covariance: anchor the E-step's high-noise covariance on the Gaussian fit's
            (``covariance`` of :func:`sample_posteriors`; recommended for trained networks).
        seed: seeds every draw (posterior samples, minibatches, training noise).
        callback: ``callback(record, result_so_far)`` after each round (e.g. to evaluate samples).

    Returns:
        :class:`EMResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss, GaussianPathLoss):
        raise TypeError(f"loss must be a flowdiff.losses.GaussianPathLoss (it names the path and prediction), "
                        f"got {type(loss).__name__}")
    if not isinstance(observations, Observations):
        raise TypeError(f"observations must be MaskedObservations or ProjectedObservations, got {type(observations).__name__}")
    rounds = _check_int("rounds", rounds, 0)
    steps_per_round = _check_int("steps_per_round", steps_per_round, 1)
    first_round_steps = 2 * steps_per_round if first_round_steps is None else _check_int("first_round_steps", first_round_steps, 1)
    ema_decay = _check_float("ema_decay", ema_decay, 0.0, 1.0)
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError("model has no floating-point parameters to train")
    device, dtype = params[0].device, params[0].dtype
    obs = observations.to(device=device, dtype=dtype)
    cpu_gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)

    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    field = Field(ema_model, loss.path, loss.prediction)

    clock = time.process_time()
    gaussian = fit_gaussian(obs, iterations=gaussian_iterations)
    samples = sample_gaussian_posteriors(*gaussian, obs, generator=cpu_gen)
    e_seconds = time.process_time() - clock
    result = EMResult(field=field, model=model, ema_model=ema_model, gaussian=gaussian, samples=samples)
    done = 0
    for k in range(rounds + 1):
        if k > 0:
            clock = time.process_time()
            samples = sample_posteriors(field, obs, steps=posterior_steps, cg_iterations=cg_iterations, solver=solver,
                                        covariance=gaussian[1] if anchor_covariance else None,
                                        batch_size=posterior_batch, generator=dev_gen)
            e_seconds = time.process_time() - clock
        clock = time.process_time()
        m_steps = first_round_steps if k == 0 else steps_per_round
        value = train_denoiser(model, loss, samples, m_steps, batch_size=batch_size, optimizer=optimizer,
                               ema=ema_model, ema_decay=ema_decay, ema_step=done, grad_clip=grad_clip,
                               generator=dev_gen)
        done += m_steps
        record = {"round": k, "m_steps": m_steps, "loss": value, "residual_rms": _residual_rms(obs, samples),
                  "e_seconds": e_seconds, "m_seconds": time.process_time() - clock}
        result.samples = samples
        result.history.append(record)
        if callback is not None:
            callback(record, result)
    return result
