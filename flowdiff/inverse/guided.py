r"""Guided posterior samplers: score-SDE projection, DPS, ΠGDM and DiffPIR on any Gaussian path.

All four run the same reverse chain of the prior and add the measurement to it; they differ in
*how*. In the library's convention (``t = 0`` noise, ``t = 1`` data) the path is
:math:`x_t = \alpha_t x_1 + \sigma_t\varepsilon`, :math:`\lambda_t = \log(\alpha_t/\sigma_t)`, the
field gives the Tweedie estimate :math:`\hat x = E[x_1 \mid x_t]` and
:math:`\hat\varepsilon = (x_t - \alpha_t\hat x)/\sigma_t`. One reverse step from ``t`` to
``t' > t`` is the DDIM(η) step (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models")
written for any Gaussian path:

.. math::

    x_{t'} = \alpha_{t'}\hat x + \sqrt{\sigma_{t'}^2 - c^2}\,\hat\varepsilon + c\,z, \qquad
    c = \eta\,\sigma_{t'}\sqrt{1 - e^{-2(\lambda_{t'} - \lambda_t)}},

where η = 1 is the ancestral DDPM step with the posterior variance :math:`\tilde\beta`
(Ho, Jain & Abbeel 2020) and η = 0 the deterministic DDIM step. Translating the papers' DDPM
notation (:math:`x_s = \sqrt{\bar\alpha_s}x_0 + \sqrt{1-\bar\alpha_s}\varepsilon`, ``s`` from
``T`` to 0): library ``t = 1 - s``, :math:`\alpha = \sqrt{\bar\alpha}`,
:math:`\sigma = \sqrt{1-\bar\alpha}`; the tests transcribe each paper's step literally in that
notation and check agreement to 1e-10 in float64.

Grid. The model is evaluated at ``N`` times :math:`t_0 = t_{min} < \dots < t_{N-1} = t_{max}`
(``grid``: a kind of :func:`flowdiff.solvers.make_grid`, default ``"logsnr"``, or explicit
times); the last step goes to the data itself (:math:`\alpha = 1, \sigma = 0`), so the sample is
the last (guided) Tweedie estimate and no evaluation is wasted. The chain starts from
:math:`x_{t_0} \sim N(0, (\alpha_{t_0}^2 v + \sigma_{t_0}^2) I)` with ``v = data_variance``
(default 1): for a VP path this is DDPM's :math:`N(0, I)`.

Methods (register names):

* ``"projection"`` — Song et al. 2021, "Score-Based Generative Modeling through Stochastic
  Differential Equations", App. I (``controllable_generation.py``): after every predictor and
  corrector update, the observed spectral coordinates are replaced by a draw of
  :math:`p_t(\bar y_t \mid y) = N(\alpha_t\bar y, \sigma_t^2)`. Noise-free measurements only;
  masks and orthonormal transforms (subsampled Fourier, colourisation, average pooling), read
  through their SVD.
* ``"dps"`` — Chung, Kim, Mccann, Klasky & Ye 2023, "Diffusion Posterior Sampling for General
  Noisy Inverse Problems": ancestral step, then :math:`x \leftarrow x - \zeta\nabla_{x_t}\|y -
  A(\hat x(x_t))\|` with the un-squared per-sample norm of the official code, which is the
  paper's squared norm with the adaptive step :math:`\zeta_i = (\zeta/2)/\|y - A\hat x\|`. One
  forward and one VJP per step; any differentiable operator.
* ``"pgdm"`` — Song, Vahdat, Mardani & Kautz 2023, "Pseudoinverse-Guided Diffusion Models for
  Inverse Problems": :math:`p(x_1 \mid x_t) \approx N(\hat x, r_t^2 I)` gives
  :math:`\nabla_{x_t}\log p(y\mid x_t) \approx g = (\partial\hat x/\partial x_t)^\top A^H
  (r_t^2AA^H + \sigma_y^2 I)^{-1}(y - A\hat x)` (one VJP), and the DDIM(η) step is taken with the
  guided score :math:`\nabla\log p_t + w g`, i.e. with :math:`\hat x + w(\sigma_t^2/\alpha_t) g`
  and :math:`\hat\varepsilon - w\sigma_t g`. The default :math:`r_t^2 = v\sigma_t^2/(\alpha_t^2 v
  + \sigma_t^2)` is :math:`\mathrm{Var}[x_1\mid x_t]` for data of per-coordinate variance ``v``
  (the paper's :math:`\sigma^2/(1+\sigma^2)` in VE units for ``v = 1``): with a Gaussian prior
  :math:`N(\mu, vI)` the guided score is exact and the sampler converges to the exact posterior.
* ``"diffpir"`` — Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool 2023, "Denoising Diffusion
  Models for Plug-and-Play Image Restoration": :math:`\hat x` is replaced by the proximal point
  :math:`\arg\min_x \|y - Ax\|^2 + \rho_t\|x - \hat x\|^2`,
  :math:`\rho_t = \lambda\sigma_y^2/\tilde\sigma_t^2` (:math:`\tilde\sigma = \sigma/\alpha`), then
  :math:`x_{t'} = \alpha_{t'}\hat x_0 + \sigma_{t'}(\sqrt{1-\zeta}\,\hat\varepsilon + \sqrt\zeta z)`
  with :math:`\hat\varepsilon` re-derived from :math:`\hat x_0`. No network gradients.

All norms and losses are per sample (never over the batch; DPS issue #12), complex measurements
count as pairs of reals, and everything follows the dtype and device of ``y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..fields import Field
from ..solvers.grids import GRID_KINDS, make_grid, validate_grid
from .api import register

__all__ = ["dps", "pgdm", "projection", "diffpir"]


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by ddrm.py and variational.py)


def _real_dtype(y: Tensor) -> torch.dtype:
    return y.dtype.to_real() if y.dtype.is_complex else y.dtype


def _sq_norm(r: Tensor) -> Tensor:
    """Per-sample squared norm ``(B,)`` of a batch; complex entries count as pairs of reals."""
    r = r.reshape(r.shape[0], -1)
    if r.is_complex():
        r = torch.view_as_real(r)
    return r.pow(2).reshape(r.shape[0], -1).sum(-1)


def _randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws; for a complex dtype, real and imaginary parts each N(0, 1)."""
    if dtype.is_complex:
        real = dtype.to_real()
        return torch.complex(torch.randn(tuple(shape), generator=generator, dtype=real, device=device),
                             torch.randn(tuple(shape), generator=generator, dtype=real, device=device))
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)


def _bview(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample ``(B,)`` tensor shaped to broadcast over ``x`` ``(B, *)``."""
    return c.reshape(-1, *([1] * (x.ndim - 1)))


def _get_svd(operator: Any, method: str, dtype: torch.dtype, device: torch.device) -> Any:
    """The operator's SVD (``svd`` method or attribute), or a ValueError naming the method."""
    dec = getattr(operator, "svd", None)
    if callable(dec):
        try:
            dec = dec(dtype=dtype, device=device)
        except TypeError:
            dec = dec()
    if dec is None:
        raise ValueError(f"method {method!r} needs an operator with an SVD; {type(operator).__name__} has none "
                         "(methods for any linear operator: 'pgdm', 'dps', 'daps', 'reddiff')")
    return dec


def _gram_solve(operator: Any, r: Tensor, c: float, s2: float) -> Tensor:
    r""":math:`(c AA^H + s_2 I)^{-1} r` through the operator (SVD or conjugate gradients)."""
    return operator.gram_solve(r, c, s2)


@dataclass(frozen=True)
class _Schedule:
    """Evaluation times ``t_0 < … < t_{N-1}`` and the path at them, plus the data end (α = 1, σ = 0).

    Float64 Python lists: ``alpha``, ``sigma``, ``log_snr`` have ``N + 1`` entries (the last is
    the data end, λ = +inf).
    """

    times: list[float]
    alpha: list[float]
    sigma: list[float]
    log_snr: list[float]

    @property
    def steps(self) -> int:
        return len(self.times)

    def ddim(self, i: int, eta: float) -> tuple[float, float, float]:
        """``(α', k, c)`` of the DDIM(η) step from node ``i`` to ``i + 1``: x' = α' x̂ + k ε̂ + c z."""
        a_next, s_next = self.alpha[i + 1], self.sigma[i + 1]
        if s_next == 0.0:
            return a_next, 0.0, 0.0
        ratio = math.exp(2.0 * (self.log_snr[i] - self.log_snr[i + 1]))  # (α σ' / (α' σ))^2 < 1
        c = eta * s_next * math.sqrt(max(0.0, 1.0 - ratio))
        return a_next, math.sqrt(max(0.0, s_next * s_next - c * c)), c

    def ddim_step(self, i: int, eta: float, xhat: Tensor, eps: Tensor, generator: torch.Generator | None) -> Tensor:
        """The DDIM(η) step from node ``i`` to ``i + 1`` given the estimates ``x̂`` and ``ε̂``."""
        a_next, kk, c = self.ddim(i, eta)
        x = a_next * xhat
        if kk > 0:
            x = x + kk * eps
        if c > 0:
            x = x + c * _randn(tuple(xhat.shape), xhat.dtype, xhat.device, generator)
        return x


def _check_grid_kind(grid: Any) -> None:
    if isinstance(grid, str) and grid not in GRID_KINDS:
        raise ValueError(f"grid must be one of {', '.join(GRID_KINDS)} or an increasing sequence of times, "
                         f"got {grid!r}")


def _schedule(field: Field, steps: int, grid: Any = "logsnr") -> _Schedule:
    """The :class:`_Schedule` of ``steps`` evaluations (``grid``: kind name or explicit times)."""
    path = field.path
    _check_grid_kind(grid)
    if isinstance(grid, str):
        steps = check_int("steps", steps, 1)
        if steps == 1:
            times = torch.tensor([path.t_min], dtype=torch.float64)
        else:
            times = make_grid(path, grid, steps - 1)
    else:
        try:
            times = torch.as_tensor(grid, dtype=torch.float64).detach().cpu().flatten()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"grid must be one of {', '.join(GRID_KINDS)} or an increasing sequence of times, "
                             f"got {grid!r}") from err
        if times.numel() > 1:
            times = validate_grid(times)  # strictly increasing, inside [0, 1]
        if times.numel() > steps:
            raise ValueError(f"the explicit grid has {times.numel()} evaluation times, more than the budget "
                             f"nfe={steps} allows")
    table = path.table(times)
    if not (torch.all(table.sigma > 0) and torch.all(table.alpha > 0)):
        raise ValueError(f"every evaluation time needs alpha > 0 and sigma > 0 on {path!r}; got times "
                         f"{times.tolist()[:4]}... (stay inside the path's safe interval [t_min, t_max])")
    return _Schedule(times.tolist(), table.alpha.tolist() + [1.0], table.sigma.tolist() + [0.0],
                     table.log_snr.tolist() + [math.inf])


def _initial(sched: _Schedule, shape: Sequence[int], data_variance: float, dtype: torch.dtype,
             device: torch.device, generator: torch.Generator | None) -> Tensor:
    """:math:`x_{t_0} \\sim N(0, (\\alpha_0^2 v + \\sigma_0^2) I)` (DDPM's N(0, I) on a VP path with v = 1)."""
    scale = math.sqrt(sched.alpha[0] ** 2 * data_variance + sched.sigma[0] ** 2)
    return scale * _randn(shape, dtype, device, generator)


def _check_finite(x: Tensor, method: str, step: int, what: str = "state") -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{method}: non-finite {what} at step {step} ({int((~torch.isfinite(x)).sum())} "
                                 "entries); lower the step size or raise nfe")


def _common_options(eta: float, data_variance: float) -> tuple[float, float]:
    return (check_float("eta", eta, 0.0, 1.0), check_float("data_variance", data_variance, 0.0, low_open=True))


# ----------------------------------------------------------------------------------------------
# score-SDE projection


@register("projection", linear_only=True, needs_svd=True, noiseless_only=True,
          description="score-SDE replacement (Song et al. 2021): overwrite the observed coordinates at every step; "
                      "masks and orthonormal transforms, noise-free")
def projection(field: Field, operator: Any, y: Tensor, *, sigma_y: float, num_samples: int, nfe: int,
               generator: torch.Generator | None, corrector_steps: int = 0, snr: float = 0.16, eta: float = 1.0,
               grid: Any = "logsnr", data_variance: float = 1.0, max_condition: float = 2.0) -> tuple[Tensor, dict]:
    r"""Score-SDE replacement sampling (Song et al. 2021, App. I: ``get_pc_inpainter``/``get_pc_colorizer``).

    The operator must be a mask or an orthonormal transform (up to scale): its SVD
    :math:`A = U\,\mathrm{diag}(s)V_{:k}^\top` fixes the spectral coordinates
    :math:`V_{:k}^\top x = \bar y = \mathrm{diag}(1/s)U^\top y` of a noise-free measurement.
    Accepted: condition number :math:`s_{max}/s_{min} \le` ``max_condition`` (default 2: masks,
    colourisation, average pooling have equal singular values; subsampled Fourier has 1 and
    :math:`1/\sqrt2` where only one of a conjugate pair is observed). The replacement is
    well defined for any SVD (a range-space projection, as in MCG/DDNM); raising
    ``max_condition`` allows it, outside the score-SDE paper's setting.
    Each step: ``corrector_steps`` Langevin corrector steps (signal-to-noise ``snr``, per-sample
    norms), then a DDIM(η) predictor step (η = 1: reverse diffusion), each followed by the
    replacement of the observed coordinates with :math:`\alpha_t\bar y + \sigma_t\xi`. The last
    step lands on the data, where the replacement is :math:`\bar y` itself: the samples have
    exactly the observed values.

    Budget: ``N = nfe // (1 + corrector_steps)`` steps of ``1 + corrector_steps`` evaluations.

    Raises:
        ValueError: operator without an SVD, or with condition number above ``max_condition``
        (not a mask or orthonormal transform; use ``pgdm``, ``ddrm`` or ``dps``), or a noisy
        measurement.
    """
    eta, data_variance = _common_options(eta, data_variance)
    corrector_steps = check_int("corrector_steps", corrector_steps, 0)
    snr = check_float("snr", snr, 0.0, low_open=True)
    max_condition = check_float("max_condition", max_condition, 1.0)
    if sigma_y > 0:
        raise ValueError(f"projection replaces coordinates by the measurement and needs sigma_y = 0, got {sigma_y}")
    dtype, device = _real_dtype(y), y.device
    dec = _get_svd(operator, "projection", dtype, device)
    s = dec.s.to(dtype=dtype, device=device)
    condition = float(s.max() / s.min())
    if condition > max_condition * (1 + 1e-9):
        raise ValueError(f"projection needs a mask or an orthonormal transform; {type(operator).__name__} has singular "
                         f"values in [{float(s.min()):.4g}, {float(s.max()):.4g}] (condition number {condition:.3g} > "
                         f"max_condition={max_condition:g}); use 'ddrm', 'pgdm' or 'dps'")
    steps = nfe // (1 + corrector_steps)
    if steps < 1:
        raise ValueError(f"nfe={nfe} is less than one step of 1 + corrector_steps = {1 + corrector_steps} evaluations")
    sched = _schedule(field, steps, grid)
    k = int(s.numel())
    ybar = (dec.ut(y[None]).to(dtype) / s)  # (1, k)
    shape = (num_samples, *tuple(operator.in_shape))

    def replace(x: Tensor, a: float, sd: float) -> Tensor:
        c = dec.vt(x)
        known = a * ybar + (sd * _randn((num_samples, k), dtype, device, generator) if sd > 0 else 0.0)
        c = torch.cat([known.expand(num_samples, k).to(c.dtype), c[:, k:]], dim=1)
        return dec.v(c)

    x = replace(_initial(sched, shape, data_variance, dtype, device, generator), sched.alpha[0], sched.sigma[0])
    for i, t in enumerate(sched.times):
        a, sd = sched.alpha[i], sched.sigma[i]
        for _ in range(corrector_steps):
            score = field.score(x, t)
            z = _randn(shape, dtype, device, generator)
            ratio = (snr * torch.sqrt(_sq_norm(z)) / torch.sqrt(_sq_norm(score)).clamp_min(torch.finfo(dtype).tiny))
            step = 2.0 * ratio**2
            x = x + _bview(step, x) * score + _bview(torch.sqrt(2.0 * step), x) * z
            x = replace(x, a, sd)
        xhat = field.denoise(x, t)
        x_new = sched.ddim_step(i, eta, xhat, (x - a * xhat) / sd, generator)
        x = replace(x_new, sched.alpha[i + 1], sched.sigma[i + 1])
        _check_finite(x, "projection", i)
    info = {"steps": sched.steps, "corrector_steps": corrector_steps, "snr": snr, "eta": eta, "condition": condition,
            "times": sched.times}
    return x, info


# ----------------------------------------------------------------------------------------------
# DPS


@register("dps", linear_only=False, needs_svd=False, noiseless_only=False,
          description="diffusion posterior sampling (Chung et al. 2023): gradient of ||y - A(x_hat)|| through the "
                      "denoiser; any differentiable operator")
def dps(field: Field, operator: Any, y: Tensor, *, sigma_y: float, num_samples: int, nfe: int,
        generator: torch.Generator | None, zeta: float = 0.3, eta: float = 1.0, grid: Any = "logsnr",
        data_variance: float = 1.0) -> tuple[Tensor, dict, float]:
    r"""Diffusion posterior sampling (Chung et al. 2023, Algorithm 1; step rule of the official code).

    ``N = nfe`` steps, each one model evaluation and one VJP through the denoiser:

    .. math::

        x' = \mathrm{DDIM}_\eta(x_t, \hat x) - \zeta_N \nabla_{x_t}\|y - A(\hat x(x_t))\|,

    with the per-sample, un-squared norm (the official code's ``torch.linalg.norm``, there over
    the whole batch — issue #12; here per sample), i.e. the paper's squared norm with
    :math:`\zeta_i = (\zeta_N/2)/\|y - A\hat x\|`. The step ignores ``sigma_y`` (as the paper).

    Step size: :math:`\zeta_N = \zeta\sqrt{v}` per step (``v = data_variance``, default 1), with
    ``zeta`` the official code's ``scale`` (0.3 for super-resolution and deblurring — the default —,
    0.5 inpainting, 1.0 phase retrieval, for images in [-1, 1]). The gradient of the norm is
    invariant to the scale of ``y``, so the step is in units of ``x``: the ``sqrt(v)`` factor makes
    the rule invariant to rescaling the data when ``v`` is given. ζ is *not* rescaled with the
    number of steps: on Gaussian test problems (d = 8, 32) the per-step ζ = 0.1–0.3 gave the same
    posterior-mean error at 100 and 400 steps, while keeping the 1000-step total pull (ζ·1000/N)
    overshoots at 100 steps. The last step's pull sets the final residual (about ζ‖A‖): DPS
    oscillates around the measurement set at the scale of ζ, the notes' "no single ζ works".

    Returns ``(x, info, vjp_total)``.
    """
    eta, data_variance = _common_options(eta, data_variance)
    zeta = check_float("zeta", zeta, 0.0)
    dtype, device = _real_dtype(y), y.device
    sched = _schedule(field, nfe, grid)
    step_size = zeta * math.sqrt(data_variance)
    shape = (num_samples, *tuple(operator.in_shape))
    yb = y[None]
    tiny = torch.finfo(dtype).tiny
    x = _initial(sched, shape, data_variance, dtype, device, generator)
    residual = torch.zeros(num_samples, dtype=dtype, device=device)
    for i, t in enumerate(sched.times):
        a, sd = sched.alpha[i], sched.sigma[i]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            xhat = field.denoise(xg, t)
            norm = torch.sqrt(_sq_norm(yb - operator.forward(xhat)).clamp_min(tiny))
            grad, = torch.autograd.grad(norm.sum(), xg)  # samples are independent: per-sample gradients
        xhat, residual = xhat.detach(), norm.detach()
        x = sched.ddim_step(i, eta, xhat, (x - a * xhat) / sd, generator) - step_size * grad
        _check_finite(x, "dps", i)
    info = {"steps": sched.steps, "zeta": zeta, "step_size": step_size, "eta": eta, "times": sched.times,
            "final_residual": residual}
    return x, info, float(sched.steps * num_samples)


# ----------------------------------------------------------------------------------------------
# ΠGDM


def _posterior_variance(a: float, sd: float, data_variance: float) -> float:
    """:math:`r_t^2 = v\\sigma^2/(\\alpha^2 v + \\sigma^2)`, Var[x_1 | x_t] for data N(μ, v I)."""
    return data_variance * sd * sd / (a * a * data_variance + sd * sd)


@register("pgdm", linear_only=True, needs_svd=False, noiseless_only=False,
          description="pseudoinverse-guided diffusion (Song et al. 2023): Gaussian p(x|x_t) with variance r_t^2, "
                      "one VJP per step; linear operators")
def pgdm(field: Field, operator: Any, y: Tensor, *, sigma_y: float, num_samples: int, nfe: int,
         generator: torch.Generator | None, eta: float = 1.0, data_variance: float = 1.0, weight: float = 1.0,
         grid: Any = "logsnr") -> tuple[Tensor, dict, float]:
    r"""ΠGDM (Song, Vahdat, Mardani & Kautz 2023, Eqs. 7–8) with the DDIM(η) step of the guided score.

    ``N = nfe`` steps, each one model evaluation and one VJP:

    .. math::

        g = \Big(\frac{\partial\hat x}{\partial x_t}\Big)^\top A^H (r_t^2 AA^H + \sigma_y^2 I)^{-1}
            (y - A\hat x), \qquad \hat x_c = \hat x + w\frac{\sigma_t^2}{\alpha_t}g, \quad
        \hat\varepsilon_c = \hat\varepsilon - w\sigma_t g,

    then :math:`x_{t'} = \alpha_{t'}\hat x_c + \sqrt{\sigma_{t'}^2 - c^2}\,\hat\varepsilon_c + cz`.
    ``r_t^2 = v σ_t²/(α_t² v + σ_t²)`` with ``v = data_variance`` (default 1: the paper's
    :math:`\sigma^2/(1+\sigma^2)` in VE units); pass the data's per-coordinate variance when it
    is not 1, since ΠGDM's results depend on it (the notes, "measured"). The solve uses
    ``operator.gram_solve`` (SVD or conjugate gradients); ``sigma_y = 0`` uses the
    pseudo-inverse of :math:`AA^H`. ``weight`` = w scales the guidance (1: the Bayes-rule
    score). The RED-diff re-implementation instead adds :math:`w\sqrt{\bar\alpha_{s}\bar\alpha_t}\,
    \nabla_{x_t}\langle A^+(y - A\hat x), \hat x\rangle` per step (``algos/pgdm.py``), a weight that
    does not shrink with the step; this implementation takes the score form, whose Gaussian-prior
    limit is exact.

    Returns ``(x, info, vjp_total)``.
    """
    eta, data_variance = _common_options(eta, data_variance)
    weight = check_float("weight", weight, 0.0)
    dtype, device = _real_dtype(y), y.device
    sched = _schedule(field, nfe, grid)
    shape = (num_samples, *tuple(operator.in_shape))
    yb = y[None].expand(num_samples, *y.shape)
    s2y = sigma_y * sigma_y
    x = _initial(sched, shape, data_variance, dtype, device, generator)
    for i, t in enumerate(sched.times):
        a, sd = sched.alpha[i], sched.sigma[i]
        r2 = _posterior_variance(a, sd, data_variance)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            xhat = field.denoise(xg, t)
            with torch.no_grad():
                u = _gram_solve(operator, yb - operator.forward(xhat.detach()), r2, s2y)
                w = operator.adjoint(u).to(dtype)
            g, = torch.autograd.grad(xhat, xg, grad_outputs=w)
        xhat = xhat.detach()
        xhat_c = xhat + (weight * sd * sd / a) * g
        eps_c = (x - a * xhat) / sd - (weight * sd) * g
        x = sched.ddim_step(i, eta, xhat_c, eps_c, generator)
        _check_finite(x, "pgdm", i)
    info = {"steps": sched.steps, "eta": eta, "data_variance": data_variance, "weight": weight, "times": sched.times}
    return x, info, float(sched.steps * num_samples)


# ----------------------------------------------------------------------------------------------
# DiffPIR


@register("diffpir", linear_only=True, needs_svd=False, noiseless_only=False,
          description="DiffPIR (Zhu et al. 2023): proximal data step on the Tweedie estimate (half-quadratic "
                      "splitting), no network gradients; linear operators")
def diffpir(field: Field, operator: Any, y: Tensor, *, sigma_y: float, num_samples: int, nfe: int,
            generator: torch.Generator | None, lam: float = 7.0, zeta: float = 0.3, grid: Any = "logsnr",
            data_variance: float = 1.0) -> tuple[Tensor, dict]:
    r"""DiffPIR (Zhu et al. 2023, Algorithm 1), written for any Gaussian path.

    ``N = nfe`` steps of one evaluation: :math:`\hat x = \hat x(x_t)`, then the data
    subproblem of the half-quadratic splitting,

    .. math::

        \hat x_0 = \arg\min_x \|y - Ax\|^2 + \rho_t\|x - \hat x\|^2
                 = \hat x + A^H(AA^H + \rho_t I)^{-1}(y - A\hat x), \qquad
        \rho_t = \lambda\sigma_y^2/\tilde\sigma_t^2

    (:math:`\tilde\sigma_t = \sigma_t/\alpha_t`, the VE noise level; ``sigma_y = 0`` gives the
    projection :math:`\hat x + A^+(y - A\hat x)`), then with
    :math:`\hat\varepsilon = (x_t - \alpha_t\hat x_0)/\sigma_t`,
    :math:`x_{t'} = \alpha_{t'}\hat x_0 + \sigma_{t'}(\sqrt{1-\zeta}\,\hat\varepsilon + \sqrt\zeta z)`.
    Defaults λ = 7, ζ = 0.3 (deepinv's; the paper sweeps λ ∈ [1, 25] and ζ ∈ [0, 1]).
    """
    lam = check_float("lam", lam, 0.0, low_open=True)
    zeta = check_float("zeta", zeta, 0.0, 1.0)
    _, data_variance = _common_options(0.0, data_variance)
    dtype, device = _real_dtype(y), y.device
    sched = _schedule(field, nfe, grid)
    shape = (num_samples, *tuple(operator.in_shape))
    yb = y[None].expand(num_samples, *y.shape)
    x = _initial(sched, shape, data_variance, dtype, device, generator)
    for i, t in enumerate(sched.times):
        a, sd = sched.alpha[i], sched.sigma[i]
        xhat = field.denoise(x, t).detach()
        ve2 = (sd / a) ** 2
        u = _gram_solve(operator, yb - operator.forward(xhat), 1.0, lam * sigma_y * sigma_y / ve2)
        x0 = xhat + operator.adjoint(u).to(dtype)
        a_next, s_next = sched.alpha[i + 1], sched.sigma[i + 1]
        if s_next == 0.0:
            x = x0
        else:
            eps = (x - a * x0) / sd
            x = a_next * x0 + s_next * (math.sqrt(1.0 - zeta) * eps
                                        + math.sqrt(zeta) * _randn(shape, dtype, device, generator))
        _check_finite(x, "diffpir", i)
    return x, {"steps": sched.steps, "lam": lam, "zeta": zeta, "times": sched.times}
