r"""Fokker–Planck residuals, a Fokker–Planck training regulariser, and the ODE–SDE gap.

**Why the gap exists.** With the exact score, the probability-flow ODE and every SDE of the
family :math:`dX = [u + \varepsilon(t)s]dt + \sqrt{2\varepsilon(t)}dW` share the path's marginals.
With a *learned* score :math:`s_\theta` they do not, unless :math:`s_\theta` is the score of a
family of densities that solves the Fokker–Planck equation of the path; the Wasserstein distance
between ODE and SDE samples is controlled by the model's Fokker–Planck residual (Deveney,
Stanczuk, Kreusser, Budd & Schönlieb 2025, "Closing the ODE–SDE gap in score-based diffusion
models through the Fokker–Planck equation", Phil. Trans. R. Soc. A 383, arXiv:2311.15996; Lai et
al. 2023, "FP-Diffusion: Improving score-based diffusion models by enforcing the underlying score
Fokker–Planck equation").

**The equations in library time** (t = 0 noise, t = 1 data; Gaussian path
:math:`x_t = \alpha x_1 + \sigma\varepsilon`). The marginals solve the continuity equation of the
probability-flow velocity

.. math::

    u = f\,x + c\,s, \qquad f = \frac{\dot\alpha}{\alpha}, \qquad
    c = \sigma^2\dot\lambda = \sigma^2\Big(\frac{\dot\alpha}{\alpha} - \frac{\dot\sigma}{\sigma}\Big)

(:math:`c = g^2/2` of the noising SDE run in :math:`1 - t`). For :math:`\ell = \log p_t` and
:math:`s = \nabla\ell`, :math:`\partial_t\ell = -\nabla\cdot u - u\cdot s`, hence the residuals

.. math::

    R_{\log p} &= \partial_t\ell + D f + f\,x\cdot\nabla\ell + c\,(\Delta\ell + \|\nabla\ell\|^2), \\
    R_{s} &= \partial_t s + \nabla_x\big[c\,(\nabla\cdot s + \|s\|^2) + f\,x\cdot s\big],

both identically zero for the true marginals (the second is the gradient of the first: the "score
FPE" of Lai et al. 2023). For the OU process of Deveney et al. (:math:`f = 1`, :math:`c = 1/2`,
diffusion time :math:`\tau = -t`) :math:`R_{\log p}` is their residual with the opposite sign.

Derivatives: :math:`\partial_t` by a double vector–Jacobian product (works for any autograd
model), the divergence exactly (batched basis VJPs) or by Hutchinson probes, and
:math:`\nabla_x` of the bracket by one more backward pass (nested autograd, as in the paper).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._utils import batch_time, check_int, check_time_range, expand_like
from .fields import Field
from .metrics import histogram_w2
from .paths import PREDICTIONS, GaussianPath
from .solvers import sample
from .solvers.logp import FlowCoordinates, draw_probes
from .solvers.logp import check_data as _check_data
from .solvers.logp import divergence as _divergence

__all__ = [
    "FP_KINDS",
    "FP_WEIGHTINGS",
    "FokkerPlanckRegularizer",
    "ODESDEGap",
    "fokker_planck_residual",
    "ode_sde_gap",
]

#: What the model passed to :func:`fokker_planck_residual` outputs.
FP_KINDS = ("score", "log_density")
#: Weightings of the squared residual in :class:`FokkerPlanckRegularizer`.
FP_WEIGHTINGS = ("noise", "none")


def _require_gaussian_path(path: Any, what: str) -> GaussianPath:
    if not isinstance(path, GaussianPath):
        raise TypeError(
            f"{what} needs a Gaussian path (fd.paths.VP(), Linear(), ...; alpha(t), sigma(t) define the "
            f"Fokker-Planck coefficients), got {type(path).__name__}"
        )
    return path


def _coefficients(path: GaussianPath, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(f, c) = (α̇/α, σ²λ̇)`` at ``t`` (no gradient through t: they multiply x-derivatives only)."""
    tab = path.table(t.detach())
    a, s, da, ds = tab.alpha.to(t.dtype), tab.sigma.to(t.dtype), tab.d_alpha.to(t.dtype), tab.d_sigma.to(t.dtype)
    f = da / a
    c = s * s * (da / a - ds / s)
    return f, c


def _time_derivative(out: Tensor, t: Tensor, create_graph: bool) -> Tensor:
    """:math:`\\partial_t\\,\\mathrm{out}` for a per-sample time ``t`` ``(B,)`` (double-VJP trick).

    ``g(w) = wᵀ ∂out/∂t`` is linear in ``w``, so ``∂g/∂w = ∂out/∂t``: two reverse passes give the
    forward-mode derivative with any autograd-compatible model.
    """
    w = torch.zeros_like(out, requires_grad=True)
    (gt,) = torch.autograd.grad(out, t, grad_outputs=w, create_graph=True, allow_unused=True)
    if gt is None:  # the model ignores t
        return torch.zeros_like(out)
    (d,) = torch.autograd.grad(gt, w, grad_outputs=torch.ones_like(gt), create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(out) if d is None else d


def _score_function(model: Any, path: GaussianPath, prediction: str, cond: dict) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(model, Field):
        return lambda x, t: model.score(x, t, **cond)
    if not callable(model):
        raise TypeError(f"model must be a fd.Field or a callable model(x, t), got {type(model).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    field = Field(model, path, prediction)
    return lambda x, t: field.score(x, t, **cond)


def fokker_planck_residual(
    model: Any,
    path: GaussianPath | None,
    x: Tensor,
    t: float | Tensor,
    *,
    kind: str = "score",
    prediction: str = "score",
    divergence: str = "exact",
    probes: int | Tensor = 1,
    probe_dist: str = "rademacher",
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    cond: dict | None = None,
) -> Tensor:
    r"""The Fokker–Planck residual of a score model (or a log-density model) at ``(x, t)``.

    ``kind="score"``: :math:`R_s = \partial_t s + \nabla_x[c(\nabla\cdot s + \|s\|^2) + f\,x\cdot s]`,
    shape ``(B, *S)``; ``kind="log_density"``:
    :math:`R_{\log p} = \partial_t\ell + Df + f\,x\cdot\nabla\ell + c(\Delta\ell + \|\nabla\ell\|^2)`,
    shape ``(B,)`` (module docstring; :math:`f = \dot\alpha/\alpha`, :math:`c = \sigma^2\dot\lambda`).
    Both vanish for the true marginals of ``path``.

    Arguments:
        model: ``kind="score"``: a :class:`~flowdiff.Field` (its ``score``) or a network
            ``model(x, t, **cond)`` whose output is of type ``prediction`` (converted to the score
            on ``path``); ``kind="log_density"``: a callable ``(x, t) -> (B,)`` (or ``(B, 1)``)
            log-density, e.g. a scalar-potential network (Deveney et al. 2025).
        path: the Gaussian path (``None``: the field's).
        x: ``(B, *S)``; t: a float or ``(B,)`` tensor inside ``[0, 1]``.
        kind: ``"score"`` or ``"log_density"``.
        prediction: output type of a raw score network (``"score"``, ``"noise"``, …).
        divergence: ``"exact"`` or ``"hutchinson"`` (for :math:`\nabla\cdot s` or :math:`\Delta\ell`).
        probes: number of Hutchinson probes, or the probes ``(P, B, *S)`` themselves.
        create_graph: keep the graph (training); otherwise the result is detached.
        cond: conditioning keyword arguments.

    Returns:
        The residual (``(B, *S)`` or ``(B,)``), in ``x``'s dtype.
    """
    if kind not in FP_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(FP_KINDS)}")
    if path is None:
        path = getattr(model, "path", None)
        if path is None:
            raise TypeError("path is None and the model has no .path; pass the Gaussian path")
    path = _require_gaussian_path(path, "fokker_planck_residual")
    x = _check_data(x)
    cond = dict(cond or {})
    tb = batch_time(t, x)
    check_time_range(tb)
    f, c = _coefficients(path, tb)
    dims = x[0].numel()
    probe_tensor: Tensor | None = None
    if divergence == "hutchinson":
        probe_tensor = probes if isinstance(probes, Tensor) else draw_probes(x, check_int("probes", probes, 1), probe_dist, generator)
    with torch.enable_grad(), warnings.catch_warnings():
        # Fields validate t with float(t.min()); t carries a gradient here on purpose.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        xr = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        tr = tb.detach().clone().requires_grad_(True)
        if kind == "score":
            score_fn = _score_function(model, path, prediction, cond)
            s = score_fn(xr, tr)
            if not isinstance(s, Tensor) or s.shape != x.shape:
                raise ValueError(f"the score model must return shape {tuple(x.shape)}, got {getattr(s, 'shape', s)}")
            ds_dt = _time_derivative(s, tr, create_graph)
            div_s = _divergence(s, xr, method=divergence, probes=probe_tensor, create_graph=True)
            if div_s.ndim == 2:
                div_s = div_s.mean(0)
            bracket = c * (div_s + s.reshape(s.shape[0], -1).pow(2).sum(-1)) + f * (xr * s).reshape(s.shape[0], -1).sum(-1)
            (grad_bracket,) = torch.autograd.grad(bracket.sum(), xr, create_graph=create_graph)
            residual = ds_dt + grad_bracket
        else:
            if not callable(model):
                raise TypeError(f"a log_density model must be callable (x, t) -> (B,), got {type(model).__name__}")
            ell = model(xr, tr, **cond)
            if isinstance(ell, Tensor) and ell.shape == (x.shape[0], 1):
                ell = ell[:, 0]
            if not isinstance(ell, Tensor) or ell.shape != (x.shape[0],):
                raise ValueError(f"the log_density model must return shape ({x.shape[0]},), got {getattr(ell, 'shape', ell)}")
            (dl_dt,) = torch.autograd.grad(ell.sum(), tr, create_graph=True, allow_unused=True)
            if dl_dt is None:
                dl_dt = torch.zeros_like(ell)
            (grad_l,) = torch.autograd.grad(ell.sum(), xr, create_graph=True)
            lap = _divergence(grad_l, xr, method=divergence, probes=probe_tensor, create_graph=create_graph)
            if lap.ndim == 2:
                lap = lap.mean(0)
            flat = grad_l.reshape(x.shape[0], -1)
            residual = (
                dl_dt + dims * f + f * (xr.reshape(x.shape[0], -1) * flat).sum(-1) + c * (lap + flat.pow(2).sum(-1))
            )
    return residual if create_graph else residual.detach()


class FokkerPlanckRegularizer:
    r"""A Fokker–Planck residual penalty to add to a training loss (Deveney et al. 2025; Lai et al. 2023).

    ``reg(model, x_t, t)`` returns the per-sample penalty
    ``weight · w(t) · mean_i R_i(x_t, t)²`` (``(B,)``, differentiable in the model's parameters),
    with :math:`R` from :func:`fokker_planck_residual`. Add its mean to the denoising loss::

        reg = FokkerPlanckRegularizer(path, weight=1.0, prediction="noise")
        loss = dsm_loss + reg(model, x_t, t).mean()

    The collocation points ``(x_t, t)`` are the caller's: the noised training batch (on-manifold)
    or uniform points in a box (the paper's 2-D protocol).

    Arguments:
        path: the Gaussian path.
        weight: the penalty weight :math:`w_R \ge 0`.
        kind: ``"score"`` (the network's output is converted to the score) or ``"log_density"``
            (a scalar-potential network).
        prediction: output type of a score-kind network (``"noise"``, ``"score"``, …).
        weighting: ``"noise"`` (default) multiplies the residual by :math:`\sigma/\dot\lambda`,
            which makes the score residual dimensionless and O(1) at every noise level (it is the
            residual of :math:`\hat\varepsilon = -\sigma s` with time measured in log-SNR); without
            it the near-data times, where :math:`\|R_s\| \sim \dot\lambda/\sigma`, swamp the rest.
            For ``kind="log_density"`` the factor is :math:`1/\dot\lambda`. ``"none"``: raw
            :math:`R^2`.
        divergence, probes, probe_dist: the divergence inside the residual (Hutchinson probes are
            redrawn at each call from ``generator``).
    """

    def __init__(
        self,
        path: GaussianPath,
        weight: float = 1.0,
        *,
        kind: str = "score",
        prediction: str = "score",
        weighting: str = "noise",
        divergence: str = "exact",
        probes: int = 1,
        probe_dist: str = "rademacher",
        generator: torch.Generator | None = None,
    ):
        self.path = _require_gaussian_path(path, "FokkerPlanckRegularizer")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got weight={weight!r}")
        if kind not in FP_KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(FP_KINDS)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if weighting not in FP_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(FP_WEIGHTINGS)}")
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"unknown divergence {divergence!r}; valid: exact, hutchinson")
        self.weight, self.kind, self.prediction, self.weighting = float(weight), kind, prediction, weighting
        self.divergence, self.probes, self.probe_dist = divergence, check_int("probes", probes, 1), probe_dist
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"FokkerPlanckRegularizer(path={self.path!r}, weight={self.weight}, kind={self.kind!r}, "
            f"prediction={self.prediction!r}, weighting={self.weighting!r}, divergence={self.divergence!r})"
        )

    def config(self) -> dict:
        """A JSON-serialisable description (for checkpoints and logs)."""
        return {
            "name": "FokkerPlanckRegularizer", "path": self.path.config(), "weight": self.weight, "kind": self.kind,
            "prediction": self.prediction, "weighting": self.weighting, "divergence": self.divergence, "probes": self.probes,
        }

    def residual_weight(self, t: Tensor) -> Tensor:
        """The factor multiplying the residual at ``t`` (``(B,)``)."""
        if self.weighting == "none":
            return torch.ones_like(t)
        tab = self.path.table(t)
        lam_dot = tab.d_log_snr.to(t.dtype)
        if self.kind == "score":
            return tab.sigma.to(t.dtype) / lam_dot
        return 1.0 / lam_dot

    def __call__(self, model: Any, x_t: Tensor, t: float | Tensor, **cond: Any) -> Tensor:
        """Per-sample penalty ``(B,)`` at the collocation points ``(x_t, t)``."""
        tb = batch_time(t, x_t).detach()
        if self.weight == 0.0:
            return x_t.new_zeros(x_t.shape[0])
        residual = fokker_planck_residual(
            model, self.path, x_t, tb, kind=self.kind, prediction=self.prediction, divergence=self.divergence,
            probes=self.probes, probe_dist=self.probe_dist, generator=self.generator, create_graph=True, cond=cond,
        )
        w = self.residual_weight(tb).to(residual.dtype)
        if residual.ndim == 1:
            return self.weight * (w * residual).pow(2)
        scaled = expand_like(w, residual) * residual
        return self.weight * scaled.reshape(scaled.shape[0], -1).pow(2).mean(-1)


# =========================================================================================
# The ODE–SDE gap
# =========================================================================================


@dataclass
class ODESDEGap:
    """What :func:`ode_sde_gap` returns. Distances are squared 2-Wasserstein distances (W2²).

    Attributes:
        ode_sde: W2² between the ODE and the SDE sample sets of the same model.
        ode_data, sde_data: W2² of each to ``data`` (``None`` without data).
        method: how W2² was computed (``"histogram"``, ``"samples"`` or ``"sliced"``).
        x_ode, x_sde: the samples, ``(n, *S)``.
        nfe_ode, nfe_sde: model calls of each sampler.
        steps: steps of each sampler.
        outside: histogram method: fraction of (ODE, SDE, data) samples outside the box.
    """

    ode_sde: float
    ode_data: float | None
    sde_data: float | None
    method: str
    x_ode: Tensor
    x_sde: Tensor
    nfe_ode: int
    nfe_sde: int
    steps: int
    outside: tuple[float, float, float] | None = None

    def __repr__(self) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
        return (
            f"ODESDEGap(W2² ODE–SDE={fmt(self.ode_sde)}, ODE–data={fmt(self.ode_data)}, "
            f"SDE–data={fmt(self.sde_data)}, method={self.method!r}, n={self.x_ode.shape[0]}, steps={self.steps})"
        )


def _flow_grid(path: Any, steps: int, t0: float, t1: float) -> Tensor:
    """Times from ``t0`` to ``t1`` uniform in flow time τ = α/(α+σ) (uniform in t for interpolants)."""
    coords = FlowCoordinates(path)
    ends = coords.tau(torch.tensor([t0, t1], dtype=torch.float64))
    t = coords.t_of_tau(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)).clamp(t0, t1)
    t[0], t[-1] = t0, t1
    return t


def ode_sde_gap(
    field: Any,
    n: int,
    *,
    data: Tensor | None = None,
    steps: int = 500,
    eps: float | str | Callable[[Tensor], Tensor] = "reverse",
    method: str | None = None,
    bins: int = 64,
    box: float | Sequence[float] = 4.0,
    x_init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> ODESDEGap:
    r"""Measure the ODE–SDE gap of one model: W2² between its probability-flow ODE samples and its SDE samples.

    Both samplers start from the same prior draws at ``t_min`` and integrate
    :math:`dX = [u + \varepsilon(t)s]dt + \sqrt{2\varepsilon(t)}dW` to ``t_max`` on the same grid
    of ``steps`` steps (uniform in flow time τ, fine near the data): the ODE (ε = 0) with Heun's
    method (2 evaluations per step), the SDE with Euler–Maruyama (one evaluation: the drift and
    the score come from one model call). ``eps="reverse"`` is the reverse-diffusion SDE
    :math:`\varepsilon = \sigma^2\dot\lambda` (Anderson 1982; Song et al. 2021). The states at
    ``t_max`` are compared (no final denoising), as in Deveney et al. (2025). Both run through
    :func:`flowdiff.sample` (``solver="heun"`` and ``"euler-maruyama"`` on the explicit grid).

    Arguments:
        field: a :class:`~flowdiff.Field` (Gaussian path; or an InterpolantField with a score
            model and a numeric ``eps``).
        n: samples per sampler.
        data: reference samples for the ODE–data and SDE–data distances (optional).
        steps: steps of each sampler.
        eps: ``"reverse"``, a number ≥ 0, or a callable of t (called with ``t`` of shape ``(B,)``).
        method: ``"histogram"`` (2-D only, default there: :func:`histogram_w2` on ``bins``² bins over
            ``box``), ``"samples"`` (exact empirical W2² via POT, n ≤ 5000) or ``"sliced"``
            (squared sliced W2, default for D > 2).
        x_init: the prior draws (default ``path.prior_sample``; for interpolants N(0, I)).
        generator: for the prior draws and the Brownian increments.
        dtype: of the samples (default torch's default).
        batch_size: samples per model call (memory).

    Returns:
        :class:`ODESDEGap`.
    """
    from . import metrics

    n = check_int("n", n, 2)
    steps = check_int("steps", steps, 1)
    path = getattr(field, "path", None)
    if path is None or not hasattr(field, "velocity") or not hasattr(field, "score"):
        raise TypeError(f"field must be a fd.Field or fd.InterpolantField with a score, got {type(field).__name__}")
    if not (eps == "reverse" or callable(eps) or (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0)):
        raise ValueError(f"eps must be 'reverse', a number >= 0 or a callable of t, got {eps!r}")
    dtype = dtype or torch.get_default_dtype()
    if x_init is None:
        if isinstance(path, GaussianPath):
            shape = _data_shape(field, data)
            x_init = path.prior_sample((n, *shape), generator=generator, dtype=dtype)
        else:
            raise ValueError("x_init is required for a stochastic-interpolant field")
    x_init = _check_data(x_init, "x_init")
    if x_init.shape[0] != n:
        raise ValueError(f"x_init has {x_init.shape[0]} samples, expected n={n}")
    if method is None:
        method = "histogram" if x_init[0].numel() == 2 else "sliced"
    if method not in ("histogram", "samples", "sliced"):
        raise ValueError(f"unknown method {method!r}; valid: histogram, samples, sliced")
    times = _flow_grid(path, steps, float(path.t_min), float(path.t_max))
    size = n if batch_size is None else check_int("batch_size", batch_size, 1)

    if eps == "reverse":
        _require_gaussian_path(path, "eps='reverse' (the reverse-diffusion SDE, eps = sigma^2 dlambda/dt)")
    sde_eps = "reverse-diffusion" if eps == "reverse" else (eps if callable(eps) else float(eps))

    def run(stochastic: bool) -> tuple[Tensor, int]:
        outs, nfe = [], 0
        for b in range(0, n, size):
            solver = {"solver": "euler-maruyama", "eps": sde_eps} if stochastic else {"solver": "heun"}
            try:
                res = sample(field, x_init[b : b + size], grid=times, denoise_final=False, generator=generator, **solver)
            except FloatingPointError as error:
                raise FloatingPointError(f"the {'SDE' if stochastic else 'ODE'} sampler produced non-finite samples: {error}") from error
            outs.append(res.x)
            nfe += res.nfe
        return torch.cat(outs), nfe

    with torch.no_grad():
        x_ode, nfe_ode = run(False)
        x_sde, nfe_sde = run(True)

    outside = None

    def distance(a: Tensor, b: Tensor) -> tuple[float, float, float]:
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        if method == "histogram":
            return histogram_w2(a2, b2, bins=bins, box=box)
        if method == "samples":
            return float(metrics.wasserstein2_exact(a2, b2)) ** 2, 0.0, 0.0
        return float(metrics.sliced_wasserstein(a2.double(), b2.double())) ** 2, 0.0, 0.0

    ode_sde, out_o, out_s = distance(x_ode, x_sde)
    ode_data = sde_data = None
    out_d = 0.0
    if data is not None:
        data = _check_data(data, "data")
        ode_data, _, out_d = distance(x_ode, data)
        sde_data, _, _ = distance(x_sde, data)
    if method == "histogram":
        outside = (out_o, out_s, out_d)
    return ODESDEGap(ode_sde, ode_data, sde_data, method, x_ode, x_sde, nfe_ode, nfe_sde, steps, outside)


def _data_shape(field: Any, data: Tensor | None) -> tuple[int, ...]:
    if data is not None:
        return tuple(data.shape[1:])
    model = getattr(field, "model", None)
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    raise ValueError("cannot infer the sample shape: pass data or x_init")
