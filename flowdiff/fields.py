r"""Fields: a model, the path it was trained on, and what it predicts.

A :class:`Field` turns any prediction type into every other one, so that solvers, likelihoods
and guidance never branch on what the network outputs. For a Gaussian path
:math:`x = \alpha x_1 + \sigma\varepsilon` (``α, σ, α̇, σ̇, λ̇`` at the same ``t``) with
:math:`\hat x = E[x_1|x]`, :math:`\hat\varepsilon = E[\varepsilon|x]`:

=============  ==========================================  ==========================================
from → to      data :math:`\hat x`                          noise :math:`\hat\varepsilon`
=============  ==========================================  ==========================================
noise ε̂        :math:`(x - \sigma\hat\varepsilon)/\alpha`   —
data x̂         —                                            :math:`(x - \alpha\hat x)/\sigma`
velocity u     :math:`(\sigma u - \dot\sigma x)/(\alpha\sigma\dot\lambda)`  :math:`(\dot\alpha x - \alpha u)/(\alpha\sigma\dot\lambda)`
score s        :math:`(x + \sigma^2 s)/\alpha`              :math:`-\sigma s`
v              :math:`(\alpha x - \sigma v)/(\alpha^2+\sigma^2)`  :math:`(\sigma x + \alpha v)/(\alpha^2+\sigma^2)`
=============  ==========================================  ==========================================

and :math:`u = \dot\alpha\hat x + \dot\sigma\hat\varepsilon`, :math:`s = -\hat\varepsilon/\sigma`,
:math:`v = \alpha\hat\varepsilon - \sigma\hat x` (Salimans & Ho 2022), with the direct forms
:math:`u = (\dot\alpha/\alpha)x - \sigma\dot\lambda\hat\varepsilon = (\dot\sigma/\sigma)x + \alpha\dot\lambda\hat x`
used to avoid a detour (Lu et al. 2022; Lipman et al. 2024, "Flow Matching Guide and Code").

Conditioning (where each conversion loses accuracy): anything → data divides by α, so it
amplifies errors near the noise end (``t → 0``; for VP α(0) ≈ 6.6e-3, for Linear α = t);
anything → noise or score divides by σ, ill-conditioned near the data end (``t → 1``); the
velocity conversions also carry λ̇, which diverges at both ends for Linear/Trig. Every path's
safe interval ``[t_min, t_max]`` keeps all of them finite; the field computes the formulas
as written and does not clamp — a sampler that needs ``t`` outside the interval is a bug.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Union

import torch
from torch import Tensor

from ._utils import TimeLike, batch_time, check_float, check_time_range, expand_like
from .paths import PREDICTIONS, GaussianPath, StochasticInterpolant
from .paths.conversions import time_change
from .paths.gaussian import PathCoefficients

__all__ = ["Field", "InterpolantField", "Model", "Diffusion"]

Model = Callable[..., Tensor]
#: ε(t) in dX = [b + ε(t)s]dt + sqrt(2ε(t))dW: a constant or a callable of t (shape (B,)).
Diffusion = Union[float, Callable[[Tensor], Tensor]]


def _diffusion_value(eps: Diffusion, t: Tensor) -> Tensor:
    if callable(eps):
        val = eps(t)
        val = torch.as_tensor(val, dtype=t.dtype, device=t.device)
        return val.expand_as(t) if val.ndim == 0 else val
    try:
        value = check_float("eps", eps, 0.0)
    except ValueError as error:
        raise ValueError(f"{error} (or a callable of t)") from None
    return torch.full_like(t, value)


class _BaseField:
    """What every field shares: calling a model with a batched ``t``, counting the calls."""

    nfe: int

    def _call(self, model: Model, x: Tensor, t: TimeLike, cond: dict) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        tb = batch_time(t, x)
        check_time_range(tb)
        out = model(x, tb, **cond)
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model must return a tensor of the input's shape {tuple(x.shape)}, got {shape}")
        return out, tb

    def reset_nfe(self) -> None:
        """Set the model-evaluation counter back to zero."""
        self.nfe = 0

    def velocity(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Field(_BaseField):
    r"""A model on a Gaussian path, seen as every prediction type.

    Arguments:
        model: ``model(x, t, **cond) -> Tensor`` of the shape of ``x``; ``t`` is always
            given with shape ``(B,)``.
        path: the :class:`~flowdiff.paths.GaussianPath` the model was trained on.
        prediction: what the model outputs: ``"noise"``, ``"data"``, ``"velocity"``,
            ``"score"`` or ``"v"``.

    Methods ``noise``, ``denoise``, ``velocity``, ``score``, ``v`` and ``drift`` take
    ``x`` of shape ``(B, *)`` and ``t`` as a scalar or ``(B,)`` and call the model once.
    ``nfe`` counts model calls.
    """

    def __init__(self, model: Model, path: GaussianPath, prediction: str = "noise"):
        if not callable(model):
            raise TypeError(f"model must be callable model(x, t, **cond), got {type(model).__name__}")
        if not isinstance(path, GaussianPath):
            raise TypeError(
                f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}"
                + (" (use InterpolantField for stochastic interpolants)" if isinstance(path, StochasticInterpolant) else "")
            )
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.model, self.path, self.prediction = model, path, prediction
        self.nfe = 0

    def __repr__(self) -> str:
        return f"Field(path={self.path!r}, prediction={self.prediction!r})"

    # ----- core ---------------------------------------------------------------------
    def predict(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The raw model output (the field's own prediction type)."""
        return self._call(self.model, x, t, cond)[0]

    def evaluate(self, x: Tensor, t: TimeLike, to: str, **cond: Any) -> Tensor:
        """One model call, converted to the prediction type ``to``."""
        if to not in PREDICTIONS:
            raise ValueError(f"unknown prediction {to!r}; valid: {', '.join(PREDICTIONS)}")
        out, tb = self._call(self.model, x, t, cond)
        return self.convert(out, x, tb, self.prediction, to)

    def convert(self, out: Tensor, x: Tensor, t: TimeLike, source: str, to: str) -> Tensor:
        """Convert a prediction ``out`` of type ``source`` at ``(x, t)`` into type ``to`` (no model call)."""
        for name, val in (("source", source), ("to", to)):
            if val not in PREDICTIONS:
                raise ValueError(f"unknown prediction {name}={val!r}; valid: {', '.join(PREDICTIONS)}")
        if source == to:
            return out
        tb = batch_time(t, x)
        if tb.ndim == 1 and tb.shape[0] > 1 and tb.stride(0) == 0:
            # One time for the whole batch (a broadcast view): compute the coefficients once,
            # not per sample — this keeps a solver step's overhead independent of the batch size.
            tb = tb[:1]
        c = self.path.coefficients(tb)
        c = PathCoefficients(*(expand_like(v, x) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma)))
        return _convert(out, x, c, source, to)

    # ----- named conversions ---------------------------------------------------------
    def noise(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """:math:`\\hat\\varepsilon(x, t) = E[\\varepsilon | x_t = x]`."""
        return self.evaluate(x, t, "noise", **cond)

    def denoise(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """:math:`\\hat x(x, t) = E[x_1 | x_t = x]` (the data prediction / Tweedie denoiser)."""
        return self.evaluate(x, t, "data", **cond)

    def velocity(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """Probability-flow velocity :math:`u = \\dot\\alpha\\hat x + \\dot\\sigma\\hat\\varepsilon` (dx/dt)."""
        return self.evaluate(x, t, "velocity", **cond)

    def score(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """:math:`\\nabla_x\\log p_t(x) = -\\hat\\varepsilon/\\sigma`."""
        return self.evaluate(x, t, "score", **cond)

    def v(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """Salimans & Ho's v-prediction :math:`\\alpha\\hat\\varepsilon - \\sigma\\hat x`."""
        return self.evaluate(x, t, "v", **cond)

    def with_path(self, path: GaussianPath) -> "Field":
        r"""This model run as if it had been trained on ``path``: exact time change and rescaling.

        At the time :math:`s(t)` where this field's path has ``path``'s log-SNR, noisy states are
        proportional, :math:`\bar x_t = c(t)\,x_{s(t)}` (:func:`flowdiff.paths.conversions.time_change`),
        so :math:`E[x_1 | \bar x_t = y] = E[x_1 | x_{s} = y/c]`: the returned field predicts ``"noise"``
        (when this one does) or ``"data"`` by calling this model at ``(y / c, s)``. E.g. a linear
        (rectified) flow becomes a VP model, whose reverse SDE then has the same marginals (Kim et al. 2025,
        "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing").
        Exact for an exact model; ``path``'s times whose log-SNR this path does not reach on its safe
        interval raise ``ValueError``. The returned field counts its own ``nfe`` (one call per call).
        """
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}")
        return Field(_PathChangedModel(self, path), path, "noise" if self.prediction == "noise" else "data")

    def drift(self, x: Tensor, t: TimeLike, eps: Diffusion = 0.0, **cond: Any) -> Tensor:
        """Drift :math:`u + \\varepsilon(t)\\,s` of :math:`dX = [u + \\varepsilon s]dt + \\sqrt{2\\varepsilon}dW`.

        ``eps`` is a number ≥ 0 or a callable of ``t`` (shape ``(B,)``); ``eps = 0`` is the
        probability-flow ODE. Every choice has the marginals of the path when the field is exact.
        """
        out, tb = self._call(self.model, x, t, cond)
        u = self.convert(out, x, tb, self.prediction, "velocity")
        e = _diffusion_value(eps, tb)
        if torch.all(e == 0):
            return u
        return u + expand_like(e, x) * self.convert(out, x, tb, self.prediction, "score")


class _PathChangedModel:
    """``model(y, t)`` of :meth:`Field.with_path`: the source field's noise or data prediction at ``(y / c, s)``."""

    def __init__(self, field: Field, path: GaussianPath):
        self.field, self.path = field, path
        self.prediction = "noise" if field.prediction == "noise" else "data"

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        change = time_change(self.field.path, self.path, t)
        y = x / expand_like(change.scale.to(x.dtype), x)
        s = change.s.to(x.dtype)
        out = self.field.predict(y, s, **cond)
        return self.field.convert(out, y, s, self.field.prediction, self.prediction)


def _convert(out: Tensor, x: Tensor, c: PathCoefficients, source: str, to: str) -> Tensor:
    if source == to:
        return out
    a, s, da, ds = c.alpha, c.sigma, c.d_alpha, c.d_sigma
    if to == "data":
        if source == "noise":
            return (x - s * out) / a
        if source == "velocity":
            return (s * out - ds * x) / (da * s - ds * a)
        if source == "score":
            return (x + s * s * out) / a
        if source == "v":
            return (a * x - s * out) / (a * a + s * s)
    if to == "noise":
        if source == "data":
            return (x - a * out) / s
        if source == "velocity":
            return (da * x - a * out) / (da * s - ds * a)
        if source == "score":
            return -s * out
        if source == "v":
            return (s * x + a * out) / (a * a + s * s)
    if to == "score":
        if source == "data":
            return (a * out - x) / (s * s)
        return -_convert(out, x, c, source, "noise") / s
    if to == "velocity":
        if source == "noise":
            return (da / a) * x + (ds - da * s / a) * out
        if source == "data":
            return (ds / s) * x + (da - ds * a / s) * out
        if source == "score":
            return (da / a) * x - s * (ds - da * s / a) * out
    # remaining: to "v" from anything, to "velocity" from "v"
    data = out if source == "data" else _convert(out, x, c, source, "data")
    noise = out if source == "noise" else _convert(out, x, c, source, "noise")
    if to == "v":
        return a * noise - s * data
    return da * data + ds * noise


class InterpolantField(_BaseField):
    r"""A model of a stochastic interpolant, seen as the drift ``b`` (the probability-flow velocity) and the score ``s``.

    Albergo, Boffi & Vanden-Eijnden (2023): :math:`b = v - \gamma\dot\gamma s`,
    :math:`s = -\eta/\gamma`, and :math:`dX = [b + \varepsilon(t) s]dt + \sqrt{2\varepsilon(t)}dW`
    has the interpolant's marginals for every ε ≥ 0.

    Arguments (in :class:`Field`'s order, ``model, path, prediction``):
        model: ``model(x, t, **cond)``, predicts ``prediction`` ∈ {``"drift"`` (b),
            ``"velocity"`` (v = E[∂ₜI | x_t])}.
        path: the :class:`~flowdiff.paths.StochasticInterpolant` (also ``.interpolant``).
        prediction: ``"drift"`` or ``"velocity"``.
        score_model: predicts ``score_prediction`` ∈ {``"score"``, ``"denoiser"`` (η = E[z | x_t])};
            required for SDE sampling and, when ``prediction="velocity"`` and γ ≠ 0, for the drift.
        score_prediction: ``"score"`` or ``"denoiser"``.

    Methods, named as :class:`Field`'s: ``predict`` (the model's raw output), ``velocity``
    (the probability-flow velocity b = dx/dt), ``score``, ``noise`` (η = E[z | x_t], the noise
    prediction: :math:`-\gamma s`) and ``drift`` (:math:`b + \varepsilon s`). ``nfe`` counts model calls.

    Deprecated spellings, still accepted with a ``DeprecationWarning``: the old argument order
    ``InterpolantField(interpolant, model, ...)``, the keyword ``interpolant=`` and the method
    ``denoiser`` (now ``noise``).
    """

    DRIFT_PREDICTIONS = ("drift", "velocity")
    SCORE_PREDICTIONS = ("score", "denoiser")

    def __init__(
        self,
        model: Model | None = None,
        path: StochasticInterpolant | None = None,
        prediction: str = "drift",
        score_model: Model | None = None,
        score_prediction: str = "denoiser",
        *,
        interpolant: StochasticInterpolant | None = None,
    ):
        if isinstance(model, (StochasticInterpolant, GaussianPath)) and callable(path):
            warnings.warn(
                "InterpolantField(interpolant, model, ...) is deprecated: pass the model first, "
                "InterpolantField(model, path, ...), as for Field",
                DeprecationWarning,
                stacklevel=2,
            )
            model, path = path, model
        if interpolant is not None:
            if path is not None:
                raise TypeError("pass the interpolant once, as path= (interpolant= is its deprecated name)")
            warnings.warn("InterpolantField(interpolant=...) is deprecated; use path=", DeprecationWarning, stacklevel=2)
            path = interpolant
        if not isinstance(path, StochasticInterpolant):
            hint = " (use Field for Gaussian paths)" if isinstance(path, GaussianPath) else ""
            raise TypeError(f"path must be a flowdiff.paths.StochasticInterpolant, got {type(path).__name__}{hint}")
        if prediction not in self.DRIFT_PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(self.DRIFT_PREDICTIONS)}")
        if score_prediction not in self.SCORE_PREDICTIONS:
            raise ValueError(
                f"unknown score_prediction {score_prediction!r}; valid: {', '.join(self.SCORE_PREDICTIONS)}"
            )
        if not callable(model) or (score_model is not None and not callable(score_model)):
            raise TypeError("model and score_model must be callables model(x, t, **cond)")
        self.model, self.path, self.prediction = model, path, prediction
        self.score_model, self.score_prediction = score_model, score_prediction
        self.nfe = 0

    @property
    def interpolant(self) -> StochasticInterpolant:
        """The stochastic interpolant (the same object as :attr:`path`)."""
        return self.path

    def __repr__(self) -> str:
        return (f"InterpolantField(path={self.path!r}, prediction={self.prediction!r}, "
                f"score_prediction={self.score_prediction!r})")

    @property
    def has_score(self) -> bool:
        return self.score_model is not None

    def _score_from(self, out: Tensor, x: Tensor, tb: Tensor) -> Tensor:
        if self.score_prediction == "score":
            return out
        return -out / expand_like(self.interpolant.gamma_fn.gamma(tb), x)

    def score(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """:math:`s = \\nabla\\log\\rho_t`; from a denoiser, :math:`-\\eta/\\gamma` (needs γ > 0)."""
        if self.score_model is None:
            raise ValueError("this InterpolantField has no score_model; pass one to use the score or SDE samplers")
        out, tb = self._call(self.score_model, x, t, cond)
        return self._score_from(out, x, tb)

    def noise(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The noise prediction :math:`\\eta = E[z | x_t = x] = -\\gamma s` (from the score model)."""
        if self.score_model is None:
            raise ValueError("this InterpolantField has no score_model; pass one to use noise()")
        out, tb = self._call(self.score_model, x, t, cond)
        if self.score_prediction == "denoiser":
            return out
        return -expand_like(self.interpolant.gamma_fn.gamma(tb), x) * out

    def denoiser(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """Deprecated name of :meth:`noise`."""
        warnings.warn("InterpolantField.denoiser() is deprecated; use noise()", DeprecationWarning, stacklevel=2)
        return self.noise(x, t, **cond)

    def predict(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The raw output of ``model`` (the field's own prediction type, ``drift`` or ``velocity``)."""
        return self._call(self.model, x, t, cond)[0]

    def velocity(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The probability-flow velocity, i.e. the drift :math:`b` (= v − γγ̇ s)."""
        out, tb = self._call(self.model, x, t, cond)
        if self.prediction == "drift" or self.interpolant.gamma_fn.name == "zero":
            return out
        gg = expand_like(self.interpolant.gamma_fn.gamma_d_gamma(tb), x)
        return out - gg * self.score(x, tb, **cond)

    def drift(self, x: Tensor, t: TimeLike, eps: Diffusion = 0.0, **cond: Any) -> Tensor:
        """:math:`b + \\varepsilon(t) s`."""
        tb = batch_time(t, x)
        b = self.velocity(x, tb, **cond)
        e = _diffusion_value(eps, tb)
        if torch.all(e == 0):
            return b
        return b + expand_like(e, x) * self.score(x, tb, **cond)
