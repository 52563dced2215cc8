r"""Guidance as fields: classifier-free, classifier and energy guidance (every solver takes them).

Each function here wraps a :class:`~flowdiff.Field` into another :class:`~flowdiff.Field`
(:class:`GuidedField`, a subclass that only adds a backward-pass counter) on the same path with
the same prediction type, so every solver, likelihood and steering method takes a guided field
unchanged: they call ``field.<prediction>(x, t, **cond)`` and the guidance happens inside the
model call.

**Classifier-free guidance** (Ho & Salimans, 2022, "Classifier-free diffusion guidance"). A
network trained with label dropout (:func:`flowdiff.nn.drop_labels`) is both the conditional
model :math:`f(x, t, y)` and, with the null label :math:`\varnothing`, the unconditional one.
Guidance at scale :math:`w` combines the two predictions

.. math::

    f_w(x, t, y) = f(x, t, \varnothing) + w\,\big(f(x, t, y) - f(x, t, \varnothing)\big).

At fixed :math:`(x, t)` every prediction type (noise, data, velocity, score, v) is an affine
function of every other with coefficients that do not depend on the model, and an affine map
preserves combinations whose weights sum to one. So the combination is the *same field*
whichever prediction the network outputs (also with a scale :math:`w(t)` that varies with
time: it is constant at fixed ``t``); in score form it is the score of the tilted density

.. math::

    \nabla\log p^w_t(x \mid y) = (1 - w)\,\nabla\log p_t(x) + w\,\nabla\log p_t(x \mid y)
        = \nabla\log p_t(x) + w\,\nabla\log p_t(y \mid x),

:math:`w = 1` is the conditional model, :math:`w = 0` the unconditional one, :math:`w > 1`
sharpens the class. The scale may be a schedule :math:`w(t)` and may be confined to an interval
of times, outside which the field is the conditional model (:math:`w = 1`): Kynkäänniemi et al.
(2024), "Applying guidance in a limited interval improves sample and distribution quality in
diffusion models", guide only at intermediate noise levels.

**Classifier guidance** (Dhariwal & Nichol, 2021, "Diffusion models beat GANs on image
synthesis"; Song et al., 2021, "Score-based generative modeling through stochastic differential
equations", §5) adds the gradient of a noise-aware classifier :math:`\log p_\phi(y \mid x_t)` to
the score: :math:`\tilde s = s + w\,\nabla_x\log p_\phi(y \mid x_t)`.

**Energy guidance on the Tweedie estimate** (Chung et al., 2023, "Diffusion posterior sampling
for general noisy inverse problems" (DPS); Kollovieh et al., 2023, "Predict, refine, synthesize:
self-guiding diffusion models for probabilistic time series forecasting" (TSDiff)) subtracts the
gradient of an energy of the denoised estimate :math:`\hat x(x, t) = E[x_1 \mid x_t = x]`,
differentiated through the denoiser: :math:`\tilde s = s - w\,\nabla_x E(\hat x(x, t))`. With
:math:`E = \lVert A\hat x - y\rVert^2 / (2\sigma_y^2)` this is DPS's approximation
:math:`\nabla\log p_t(y \mid x) \approx \nabla\log N(y; A\hat x, \sigma_y^2 I)` (DPS itself uses
the step :math:`\zeta/\lVert y - A\hat x\rVert` instead of :math:`w/\sigma_y^2`).

**A score tilt in any prediction space.** Classifier and energy guidance change the score by
:math:`\Delta s` and leave everything else as it is. From :math:`\hat\varepsilon = -\sigma s`,
:math:`\hat x = (x + \sigma^2 s)/\alpha`, :math:`u = \dot\alpha\hat x + \dot\sigma\hat\varepsilon`
and :math:`v = \alpha\hat\varepsilon - \sigma\hat x` (:mod:`flowdiff.fields`), each prediction
moves by :math:`\kappa\,\Delta s` (:func:`score_coefficient`):

==========  ==============================================================================
noise       :math:`\tilde\varepsilon = \hat\varepsilon - \sigma\,\Delta s`
data        :math:`\tilde x = \hat x + (\sigma^2/\alpha)\,\Delta s`
velocity    :math:`\tilde u = u + \sigma(\dot\alpha\sigma - \alpha\dot\sigma)/\alpha\,\Delta s = u + \sigma^2\dot\lambda\,\Delta s`
score       :math:`\tilde s = s + \Delta s`
v           :math:`\tilde v = v - \sigma(\alpha^2 + \sigma^2)/\alpha\,\Delta s`
==========  ==============================================================================

so the guided model outputs its own prediction type and the guided field converts it like any
other.

**Evaluations.** ``field.nfe`` counts guided evaluations; each is *one* forward pass of the
network: classifier-free guidance makes it on a doubled batch (conditional and null halves; a
batch of B rows where :math:`w(t)` is 0 or 1 for every row), classifier guidance on the batch
(the backward pass then goes through the classifier only), energy guidance on the batch with
the autograd graph kept, followed by one vector–Jacobian product through the network, counted in
``field.vjp`` (network backward passes). ``field.model.gradient_calls`` counts the calls of the
classifier or energy. Rows where the scale is 0 cost no gradient: an evaluation whose scale is
0 for the whole batch is a plain model call.

**Gradients.** The gradients are taken with :func:`torch.autograd.grad` inside
:func:`torch.enable_grad`, so guided fields work under :func:`torch.no_grad` (the solvers' loop
runs there). The per-sample gradient is the gradient of the batch sum: ``log_prob_fn`` and
``energy_fn`` must treat rows independently (no batch statistics). When the caller records a
graph (grad mode on, e.g. ``fd.sample(..., differentiable=True)``) the guided output is itself
differentiable (``create_graph``); otherwise it is detached.

This module is part of the fields layer: it imports only paths, fields and _utils.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from ._utils import expand_like
from .fields import Field, _convert
from .paths import PREDICTIONS, GaussianPath
from .paths.gaussian import PathCoefficients

__all__ = [
    "GuidanceScale", "GuidedField", "GuidedModel", "ClassifierGuidedModel", "EnergyGuidedModel",
    "classifier_free_guidance", "classifier_guidance", "energy_guidance", "score_coefficient",
    "check_class_label", "model_num_classes", "stratified_labels",
]

#: A guidance scale: a number ``w >= 0`` or a schedule ``w(t)`` of the times ``t`` (shape ``(B,)``).
ScaleLike = Union[float, Callable[[Tensor], Any]]


def model_num_classes(model: Any) -> int | None:
    """The number of real classes of a class-conditional network (its null label), or ``None``."""
    k = getattr(model, "num_classes", None)
    return k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else None


def check_class_label(label: Any, num_classes: int | None) -> int:
    """``label`` as an int in ``[0, num_classes - 1]``; a ``ValueError`` naming the valid range otherwise."""
    if num_classes is None:
        raise ValueError(f"class {label!r} was requested but the model is unconditional (it was trained without labels)")
    if isinstance(label, bool) or not isinstance(label, (int,)) and not (isinstance(label, Tensor) and label.ndim == 0):
        raise TypeError(f"class must be an integer, got {label!r}")
    label = int(label)
    if not 0 <= label < num_classes:
        raise ValueError(f"class {label} is outside the trained classes: valid classes are 0..{num_classes - 1}")
    return label


def stratified_labels(count: int, num_classes: int, weights: Any = None,
                      generator: torch.Generator | None = None) -> Tensor:
    r"""Labels for drawing ``count`` samples of the class mixture :math:`\sum_y p(y)\,p(x \mid y)`, stratified.

    Stratified sampling (Cochran 1977, ch. 5): instead of drawing each label from :math:`p(y)`
    (multinomial class counts), class :math:`k` gets :math:`\lfloor n p_k \rceil` samples (largest
    remainders, so the counts add up to ``count``), in random order. Each sample is still an exact
    draw of :math:`p(x \mid y)`; only the multinomial noise of the class counts is removed, which
    at a few hundred samples is the largest term of a Fréchet distance in classifier features
    (docs/training.md: a perfect i.i.d. generator of digits scores 1.56× the real-vs-real floor on
    average at 500 samples, the same real digits in exact class proportions 0.88×).

    Arguments:
        count: number of labels ``n``.
        num_classes: number of classes ``K``.
        weights: class probabilities :math:`p_k` (``K`` non-negative numbers, normalised here);
            ``None``: uniform.
        generator: random generator for the order.

    Returns:
        A ``long`` tensor of shape ``(count,)`` with values in ``0..K-1``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    p = torch.ones(num_classes, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if p.shape != (num_classes,) or not torch.isfinite(p).all() or (p < 0).any() or float(p.sum()) <= 0:
        raise ValueError(f"weights must be {num_classes} finite non-negative numbers with a positive sum, got {weights!r}")
    expected = count * p / p.sum()
    counts = torch.floor(expected).long()
    remainder = count - int(counts.sum())
    if remainder:
        counts[torch.argsort(expected - counts, descending=True, stable=True)[:remainder]] += 1
    labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    return labels[torch.randperm(count, generator=generator)]


# ----- the scale ---------------------------------------------------------------------------------
class GuidanceScale:
    r"""A guidance scale :math:`w(t)`: a number or a schedule, optionally confined to an interval.

    Arguments:
        scale: a finite number :math:`w \ge 0`, or a callable ``scale(t)`` of the times ``t``
            (shape ``(B,)``) returning a number or a tensor of shape ``()`` or ``(B,)`` with finite
            values :math:`\ge 0` (checked at every call).
        interval: ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1``: the scale applies only for
            ``t_lo <= t <= t_hi`` (Kynkäänniemi et al. 2024, "Applying guidance in a limited
            interval improves sample and distribution quality in diffusion models"); ``None``: at
            every time. To give the interval in log-SNR use ``path.t_of_log_snr``.
        outside: the scale outside the interval: 1 for classifier-free guidance (the conditional
            model), 0 for classifier and energy guidance (no guidance).
        name: what the error messages call it.

    Calling it with ``t`` (shape ``(B,)``) gives :math:`w(t)` with shape ``(B,)`` in ``t``'s dtype.
    """

    def __init__(self, scale: ScaleLike, interval: Sequence[float] | None = None, outside: float = 0.0,
                 name: str = "guidance scale") -> None:
        self.name, self.outside = name, float(outside)
        if isinstance(scale, Tensor) and scale.ndim == 0 and not scale.dtype.is_complex:
            scale = scale.item()
        if callable(scale):
            self.schedule: Callable[[Tensor], Any] | None = scale
            self.constant: float | None = None
        else:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"{name} must be a number >= 0 or a callable w(t) of the times t (shape (B,)), "
                                f"got {scale!r} of type {type(scale).__name__}")
            if not (math.isfinite(scale) and scale >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {scale!r}")
            self.schedule, self.constant = None, float(scale)
        self.interval = None if interval is None else self._check_interval(interval)

    def _check_interval(self, interval: Any) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise TypeError(f"interval must be a pair (t_lo, t_hi) of times, got {interval!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval!r}")
        return lo, hi

    @property
    def value(self) -> float | None:
        """The scale as one number when it is one at every time (no schedule, no interval), else ``None``."""
        return self.constant if self.interval is None else None

    def __call__(self, t: Tensor) -> Tensor:
        if self.schedule is None:
            w = torch.full_like(t, self.constant)
        else:
            raw = self.schedule(t)
            try:
                w = torch.as_tensor(raw, dtype=t.dtype, device=t.device)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"the {self.name} schedule must return a number or a tensor, "
                                f"got {type(raw).__name__}") from None
            if w.ndim == 0:
                w = w.expand_as(t)
            elif w.shape != t.shape:
                raise ValueError(f"the {self.name} schedule must return a number or a tensor of shape {tuple(t.shape)} "
                                 f"(one scale per sample), got shape {tuple(w.shape)}")
            bad = ~torch.isfinite(w) | (w < 0)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"the {self.name} schedule must return finite values >= 0; "
                                 f"it returned {float(w[i])!r} at t={float(t[i])!r}")
        if self.interval is not None:
            lo, hi = self.interval
            w = torch.where((t >= lo) & (t <= hi), w, torch.full_like(w, self.outside))
        return w

    def __repr__(self) -> str:
        scale = self.constant if self.schedule is None else getattr(self.schedule, "__name__", "schedule")
        return f"GuidanceScale({scale!r}, interval={self.interval!r})"


def _as_scale(scale: ScaleLike | GuidanceScale, interval: Sequence[float] | None, outside: float) -> GuidanceScale:
    if isinstance(scale, GuidanceScale):
        if interval is not None:
            raise ValueError("give the interval once: in the GuidanceScale or as interval=, not both")
        return scale
    return GuidanceScale(scale, interval, outside=outside)


# ----- fields with a backward counter -------------------------------------------------------------
class GuidedField(Field):
    r"""A :class:`~flowdiff.Field` whose model is a guidance wrapper; it adds the counter ``vjp``.

    ``nfe`` counts guided evaluations (one network forward pass each, module docstring);
    ``vjp`` the network backward passes (vector–Jacobian products) they made;
    :meth:`reset_nfe` sets both back to zero.
    """

    @property
    def vjp(self) -> int:
        """Network vector–Jacobian products (backward passes) spent by this field's evaluations."""
        return int(getattr(self.model, "vjp", 0))

    def reset_nfe(self) -> None:
        """Set ``nfe``, ``vjp`` and the wrapper's gradient-call counter back to zero."""
        super().reset_nfe()
        reset = getattr(self.model, "reset_counters", None)
        if callable(reset):
            reset()

    def __repr__(self) -> str:
        return f"GuidedField({self.model!r}, path={self.path!r}, prediction={self.prediction!r})"


def _check_field(field: Any) -> Field:
    if not isinstance(field, Field):
        raise TypeError(f"field must be a flowdiff.Field (a model on a Gaussian path), got {type(field).__name__}")
    return field


# ----- classifier-free guidance --------------------------------------------------------------------
class GuidedModel(torch.nn.Module):
    r"""``model(x, t, y)`` with classifier-free guidance at scale :math:`w(t)` (module docstring).

    Arguments:
        model: a class-conditional network ``model(x, t, y=None)`` whose null label is
            ``model.num_classes`` (every :mod:`flowdiff.nn` network with ``num_classes``).
        scale: the guidance scale: a number :math:`w \ge 0` or a schedule ``scale(t)``
            (:class:`GuidanceScale`).
        interval: ``(t_lo, t_hi)``: guide only for ``t`` in it; outside, :math:`w = 1` (the
            conditional model; Kynkäänniemi et al. 2024).

    ``y = None`` gives the unconditional prediction (no guidance); otherwise ``y`` is an integer
    tensor ``(B,)`` of classes in ``[0, num_classes - 1]`` (the null label is allowed and gives the
    unconditional prediction for that sample).
    """

    def __init__(self, model: Any, scale: ScaleLike | GuidanceScale, interval: Sequence[float] | None = None) -> None:
        super().__init__()
        num_classes = model_num_classes(model)
        if num_classes is None:
            raise ValueError(
                "a guidance scale needs a class-conditional model (trained with labels and label dropout); "
                "this model is unconditional"
            )
        self.guidance = _as_scale(scale, interval, outside=1.0)
        self.model = model
        self.scale = scale if not isinstance(scale, (int, float)) or isinstance(scale, bool) else float(scale)
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"guidance={self.guidance!r}"

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        if y is None:
            return self.model(x, t, **cond)
        if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.shape != (x.shape[0],):
            raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},), got {y!r}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"classes must lie in 0..{self.num_classes - 1} (or {self.num_classes}, the null label), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        w = self.guidance(t)
        if bool((w == 1).all()):
            return self.model(x, t, y=y, **cond)
        null = torch.full_like(y, self.num_classes)
        if bool((w == 0).all()):
            return self.model(x, t, y=null, **cond)
        batch = x.shape[0]
        doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch else v
                   for k, v in cond.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **doubled)
        conditional, unconditional = out[:batch], out[batch:]
        return unconditional + expand_like(w.to(out.dtype), out) * (conditional - unconditional)


def classifier_free_guidance(field: Field, scale: ScaleLike | GuidanceScale,
                             interval: Sequence[float] | None = None) -> GuidedField:
    r"""The guided field :math:`f_w` of a class-conditional :class:`~flowdiff.Field` (Ho & Salimans 2022).

    Arguments:
        field: a field whose model is class-conditional (``model.num_classes``, null label = it).
        scale: guidance scale :math:`w \ge 0` (1: conditional, 0: unconditional), or a schedule
            ``scale(t) -> (B,)`` of the times (shape ``(B,)``), or a :class:`GuidanceScale`.
        interval: ``(t_lo, t_hi)``: guide only there; outside the field is the conditional model
            (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval ...").

    Returns:
        A :class:`GuidedField` on the same path with the same prediction type; call it with
        ``y=labels`` (e.g. ``fd.sample(guided, x0, cond={"y": labels})``). Any prediction type is
        combined in its own space, which is the score-space combination (module docstring).

    Raises:
        ValueError: the model is unconditional, the scale is negative or not finite, the interval
            is not inside ``[0, 1]``; TypeError: the scale is neither a number nor a callable.
    """
    field = _check_field(field)
    return GuidedField(GuidedModel(field.model, scale, interval), field.path, field.prediction)


# ----- score tilts: classifier and energy guidance -------------------------------------------------
def score_coefficient(path: GaussianPath, prediction: str, t: Tensor) -> Tensor:
    r""":math:`\kappa(t)`: a score change :math:`\Delta s` moves the ``prediction`` by :math:`\kappa\,\Delta s`.

    From the affine relations of :mod:`flowdiff.fields` at fixed :math:`(x, t)`: noise
    :math:`-\sigma`, data :math:`\sigma^2/\alpha`, velocity :math:`\sigma(\dot\alpha\sigma - \alpha\dot\sigma)/\alpha
    = \sigma^2\dot\lambda`, score 1, v :math:`-\sigma(\alpha^2 + \sigma^2)/\alpha` (module docstring).

    Arguments:
        path: the Gaussian path.
        prediction: one of ``noise``, ``data``, ``velocity``, ``score``, ``v``.
        t: times, shape ``(B,)``.

    Returns:
        :math:`\kappa`, shape ``(B,)``, in ``t``'s dtype.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    c = path.coefficients(t)
    a, s, da, ds = c.alpha, c.sigma, c.d_alpha, c.d_sigma
    if prediction == "score":
        return torch.ones_like(s)
    if prediction == "noise":
        return -s
    if prediction == "data":
        return s * s / a
    if prediction == "velocity":
        return s * (da * s - a * ds) / a
    return -s * (a * a + s * s) / a


class _ScoreTiltModel(torch.nn.Module):
    """``model`` plus :math:`w(t)\\,\\kappa(t)\\,\\Delta s(x, t)` in the model's prediction space."""

    kind = "guidance"

    def __init__(self, model: Any, path: GaussianPath, prediction: str, guidance: GuidanceScale) -> None:
        super().__init__()
        self.model, self.path, self.prediction, self.guidance = model, path, prediction, guidance
        self.num_classes = model_num_classes(model)
        self._vjp = 0
        self.gradient_calls = 0

    @property
    def vjp(self) -> int:
        """Network backward passes made by this wrapper and any guidance wrapper inside it."""
        return self._vjp + int(getattr(self.model, "vjp", 0))

    def reset_counters(self) -> None:
        self._vjp, self.gradient_calls = 0, 0
        inner = getattr(self.model, "reset_counters", None)
        if callable(inner):
            inner()

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, guidance={self.guidance!r}"

    def _input(self, x: Tensor, graph: bool) -> Tensor:
        # Differentiate with respect to x itself when the caller records a graph through it
        # (the guided output must then stay differentiable); otherwise a detached leaf.
        return x if graph and x.requires_grad else x.detach().requires_grad_(True)

    def _gradient(self, value: Any, xg: Tensor, t: Tensor, what: str, graph: bool) -> Tensor:
        """∇ₓ of the batch sum of ``value`` (shape (B,), checked) at ``xg``."""
        batch = xg.shape[0]
        if not isinstance(value, Tensor):
            raise TypeError(f"{what} must return a tensor of shape ({batch},), got {type(value).__name__}")
        if value.shape != (batch,):
            raise ValueError(f"{what} must return one value per sample, shape ({batch},), got shape {tuple(value.shape)}")
        bad = ~torch.isfinite(value.detach())
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{what} returned a non-finite value ({float(value.detach()[i])!r}) for {int(bad.sum())} of "
                             f"{batch} samples, the first at t={float(t[i])!r}")
        if not value.requires_grad:
            raise ValueError(f"{what} returned a tensor without gradient with respect to x "
                             f"(detached, or computed under torch.no_grad / inference_mode)")
        (grad,) = torch.autograd.grad(value.sum(), xg, create_graph=graph, allow_unused=True)
        self.gradient_calls += 1
        if grad is None:
            raise ValueError(f"{what} does not depend on x: its gradient with respect to x is undefined")
        bad = ~torch.isfinite(grad.detach()).reshape(batch, -1).all(1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"the gradient of {what} is not finite for {int(bad.sum())} of {batch} samples, "
                             f"the first at t={float(t[i])!r}")
        return grad

    def _tilt(self, x: Tensor, t: Tensor, cond: dict, graph: bool) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        w = self.guidance(t)
        if not bool((w != 0).any()):
            return self.model(x, t, **cond)
        graph = torch.is_grad_enabled()
        out, tilt = self._tilt(x, t, cond, graph)
        shift = expand_like((w * score_coefficient(self.path, self.prediction, t)).to(tilt.dtype), tilt) * tilt
        return out + shift.to(out.dtype)


class ClassifierGuidedModel(_ScoreTiltModel):
    r"""``model`` with classifier guidance: score :math:`s + w\,\nabla_x\log p_\phi(y \mid x_t)` (:func:`classifier_guidance`)."""

    def __init__(self, model: Any, path: GaussianPath, prediction: str, log_prob_fn: Callable[[Tensor, Tensor], Tensor],
                 guidance: GuidanceScale) -> None:
        if not callable(log_prob_fn):
            raise TypeError(f"log_prob_fn must be a callable log_prob_fn(x, t) -> (B,) log-probabilities, "
                            f"got {type(log_prob_fn).__name__}")
        super().__init__(model, path, prediction, guidance)
        self.log_prob_fn = log_prob_fn

    def _tilt(self, x: Tensor, t: Tensor, cond: dict, graph: bool) -> tuple[Tensor, Tensor]:
        out = self.model(x, t, **cond)  # in the caller's grad mode: no graph through the network needed
        with torch.enable_grad():
            xg = self._input(x, graph)
            log_prob = self.log_prob_fn(xg, t)
            grad = self._gradient(log_prob, xg, t, "log_prob_fn", graph)
        return out, grad


class EnergyGuidedModel(_ScoreTiltModel):
    r"""``model`` with energy guidance on the Tweedie estimate: score :math:`s - w\,\nabla_x E(\hat x(x, t))` (:func:`energy_guidance`)."""

    def __init__(self, model: Any, path: GaussianPath, prediction: str, energy_fn: Callable[[Tensor], Tensor],
                 guidance: GuidanceScale) -> None:
        if not callable(energy_fn):
            raise TypeError(f"energy_fn must be a callable energy_fn(x_hat) -> (B,) energies, got {type(energy_fn).__name__}")
        super().__init__(model, path, prediction, guidance)
        self.energy_fn = energy_fn

    def _tilt(self, x: Tensor, t: Tensor, cond: dict, graph: bool) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xg = self._input(x, graph)
            out = self.model(xg, t, **cond)
            c = self.path.coefficients(t)
            c = PathCoefficients(*(expand_like(v.to(out.dtype), out) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma)))
            x_hat = _convert(out, xg, c, self.prediction, "data")
            energy = self.energy_fn(x_hat)
            grad = self._gradient(energy, xg, t, "energy_fn", graph)
        self._vjp += 1
        return (out if graph else out.detach()), -grad


def classifier_guidance(field: Field, log_prob_fn: Callable[[Tensor, Tensor], Tensor],
                        scale: ScaleLike | GuidanceScale = 1.0, interval: Sequence[float] | None = None) -> GuidedField:
    r"""Classifier guidance as a field: score :math:`s + w\,\nabla_x\log p_\phi(y \mid x_t)`.

    Dhariwal & Nichol (2021), "Diffusion models beat GANs on image synthesis"; Song et al.
    (2021), "Score-based generative modeling through stochastic differential equations". The
    term is added in the field's own prediction space, :math:`w\kappa(t)\nabla\log p_\phi`
    (:func:`score_coefficient`; e.g. :math:`\tilde\varepsilon = \hat\varepsilon - w\sigma\nabla\log p_\phi`),
    so the guided field is exact in every prediction type: with the exact class posterior
    :math:`\log p_t(y \mid x)` and :math:`w = 1` it is the exact conditional field.

    Arguments:
        field: a :class:`~flowdiff.Field` (any path and prediction; conditional or not).
        log_prob_fn: ``log_prob_fn(x, t) -> (B,)``: :math:`\log p_\phi(y \mid x_t = x)` of a
            classifier trained on noisy inputs of this path, the class bound in the closure (a
            tensor ``(B,)`` of per-sample classes works too); ``t`` has shape ``(B,)``. It must be
            differentiable in ``x`` and treat rows independently. Its output is checked (shape,
            finite values) at every call.
        scale: :math:`w \ge 0`, a schedule ``scale(t)`` or a :class:`GuidanceScale`.
        interval: ``(t_lo, t_hi)``: guide only there (no guidance outside).

    Returns:
        A :class:`GuidedField`: one network call per evaluation (``nfe``), no network backward
        pass (``vjp`` stays 0); ``field.model.gradient_calls`` counts the classifier's.
    """
    field = _check_field(field)
    guidance = _as_scale(scale, interval, outside=0.0)
    return GuidedField(ClassifierGuidedModel(field.model, field.path, field.prediction, log_prob_fn, guidance),
                       field.path, field.prediction)


def energy_guidance(field: Field, energy_fn: Callable[[Tensor], Tensor], scale: ScaleLike | GuidanceScale = 1.0,
                    interval: Sequence[float] | None = None) -> GuidedField:
    r"""Energy guidance on the Tweedie estimate: score :math:`s - w\,\nabla_x E(\hat x(x, t))`.

    Reconstruction guidance through the denoiser :math:`\hat x(x, t) = E[x_1 \mid x_t = x]`
    (``field.denoise``): Chung et al. (2023), "Diffusion posterior sampling for general noisy
    inverse problems" (DPS); Kollovieh et al. (2023), "Predict, refine, synthesize: self-guiding
    diffusion models for probabilistic time series forecasting" (TSDiff observation
    self-guidance). The gradient :math:`\nabla_x E(\hat x) = J_{\hat x}(x)^\top\nabla E(\hat x)` is one
    vector–Jacobian product through the network; the term is added in the field's own
    prediction space (:func:`score_coefficient`).

    With :math:`E(\hat x) = \lVert A\hat x - y\rVert^2/(2\sigma_y^2)` the tilt is DPS's
    approximation of :math:`\nabla\log p_t(y \mid x)` (exact for a Gaussian prior only when
    :math:`\mathrm{Cov}[x_1 \mid x_t]` is neglected; the test checks the formula, not the posterior).

    Arguments:
        field: a :class:`~flowdiff.Field` (any path and prediction).
        energy_fn: ``energy_fn(x_hat) -> (B,)``, differentiable, rows independent; ``x_hat`` has
            the shape of ``x``.
        scale: :math:`w \ge 0`, a schedule ``scale(t)`` or a :class:`GuidanceScale`.
        interval: ``(t_lo, t_hi)``: guide only there (no guidance outside).

    Returns:
        A :class:`GuidedField`: per evaluation one network forward pass (``nfe``) and one
        network backward pass (``vjp``) where the scale is not 0.
    """
    field = _check_field(field)
    guidance = _as_scale(scale, interval, outside=0.0)
    return GuidedField(EnergyGuidedModel(field.model, field.path, field.prediction, energy_fn, guidance),
                       field.path, field.prediction)
