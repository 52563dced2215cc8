r"""One entry point for reward steering at inference time: :func:`sample`.

Given a field for :math:`p` and a reward :math:`r`, every method aims at high reward under a
fixed budget of model evaluations; the *samplers* among them (``smc``) target the tilted
distribution

.. math::

    \tilde p(x) = \frac{1}{Z}\,p(x)\,e^{r(x)/\beta}, \qquad
    \tilde p = \arg\max_q\ E_q[r] - \beta\,\mathrm{KL}(q\,\|\,p),

the *searches* (``bon``, ``beam``, ``rbf``) maximise :math:`r` and are judged by the reward they
find. A reward is a callable on a batch of clean-data estimates (the Tweedie denoiser
:math:`\hat x(x_t) = E[x_1 \mid x_t]` during sampling, the sample itself at the end),
``reward(x) -> Tensor`` of shape ``(B,)``; it need not be differentiable except for the
gradient-guided methods.

This module checks the input once for every method, wraps the reward so that a wrong shape or a
non-finite value raises one clear error wherever it appears (a non-finite reward never silently
zeroes a particle's weight), and counts the model evaluations itself: the batch rows of every
network call, divided by ``num_samples`` (:attr:`SteerResult.nfe`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

import torch
from torch import Tensor

from ..fields import Field

__all__ = ["SteerResult", "MethodSpec", "Reward", "register", "available", "describe", "sample"]


@dataclass
class SteerResult:
    """What :func:`sample` returns.

    Attributes:
        x: the samples, shape ``(num_samples, *shape)``.
        reward: ``(num_samples,)`` the reward of each returned sample.
        nfe: model evaluations spent per returned sample (network rows of every call, a call on a
            batch of B counting B, divided by ``num_samples``), counted by :func:`sample`.
        method: the method's name.
        vjp: network vector-Jacobian products (backward passes) per returned sample.
        info: method-specific diagnostics (steps, particles, ESS trace, ...).
    """

    x: Tensor
    reward: Tensor
    nfe: float
    method: str
    vjp: float = 0.0
    info: dict = dc_field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, whether it needs a differentiable reward, a one-line summary."""

    name: str
    fn: Callable[..., Any]
    needs_gradient: bool
    kind: str
    description: str


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, needs_gradient: bool = False, kind: str = "search", description: str = "") -> Callable:
    """Decorator: register ``fn(field, reward, *, shape, num_samples, nfe, temperature, generator, dtype, device, **options)``.

    ``fn`` returns ``(x, info)`` or ``(x, info, vjp_total)``; ``reward`` is a :class:`Reward`.
    ``nfe`` is the budget in model evaluations per returned sample; the method chooses its steps
    and particles from it and must not exceed it. ``kind`` is ``"sampler"`` (targets the tilted
    distribution) or ``"search"`` (maximises the reward).
    """

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"steering method {name!r} is registered twice")
        summary = description or (fn.__doc__ or "").strip().split("\n")[0]
        _METHODS[name] = MethodSpec(name, fn, needs_gradient, kind, summary)
        return fn

    return deco


def available() -> list[str]:
    """The method names :func:`sample` accepts."""
    return sorted(_METHODS)


def describe(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``."""
    if method not in _METHODS:
        raise ValueError(f"unknown steering method {method!r}; available: {', '.join(available())}")
    return _METHODS[method]


class Reward:
    """A user's reward callable with its checks: output of shape ``(B,)``, finite, in float64.

    Every evaluation goes through :meth:`__call__`, which raises ``ValueError`` naming the shape
    or the non-finite entries (count and first index) — a reward of NaN or ±inf is never turned
    into a zero weight. :meth:`value_and_grad` also returns :math:`\\nabla_x r`.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        if not callable(fn):
            raise TypeError(f"reward must be a callable reward(x) -> Tensor of shape (B,), got {type(fn).__name__}")
        self.fn = fn
        self.calls = 0
        self.cast: torch.dtype | None = None  # the float dtype the reward wants, when it refused ours

    def _eval(self, x: Tensor) -> Tensor:
        """``fn(x)``; a reward built from tensors of the other float dtype (float32/float64) gets ``x`` cast to it."""
        if self.cast is not None and x.dtype != self.cast:
            return self.fn(x.to(self.cast))
        try:
            return self.fn(x)
        except RuntimeError as error:
            other = {torch.float32: torch.float64, torch.float64: torch.float32}.get(x.dtype)
            text = str(error)
            if other is None or not any(k in text for k in ("dtype", "Double", "Float", "scalar type")):
                raise
            out = self.fn(x.to(other))
            self.cast = other
            return out

    def _check(self, out: Any, batch: int) -> Tensor:
        if not isinstance(out, Tensor):
            raise ValueError(f"the reward must return a torch.Tensor of shape ({batch},), got {type(out).__name__}")
        if tuple(out.shape) != (batch,):
            raise ValueError(f"the reward must return one value per sample, shape ({batch},); got shape "
                             f"{tuple(out.shape)} for a batch of {batch}")
        if out.is_complex():
            raise ValueError("the reward must be real, got a complex tensor")
        bad = ~torch.isfinite(out)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"the reward returned {int(bad.sum())} non-finite value(s) of {batch} (first at row "
                             f"{first}: {float(out[first].detach())}); rewards must be finite (a particle's weight is never "
                             "silently set to zero); clip or shift the reward")
        return out

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = self._eval(x)
        self.calls += 1
        return self._check(out, x.shape[0]).detach().to(torch.float64)

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(r(x), ∇_x r(x))`` for a differentiable reward (``TypeError`` otherwise)."""
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self._check(self._eval(xg), x.shape[0])
            if not out.requires_grad:
                raise TypeError("this method needs a differentiable reward (its output carries no gradient)")
            (grad,) = torch.autograd.grad(out.sum(), xg)
        self.calls += 1
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(f"the reward's gradient has {int((~torch.isfinite(grad)).sum())} non-finite entries")
        return out.detach().to(torch.float64), grad.detach()


class _RowCounter:
    """Wraps a model and counts the batch rows it is called on (the evaluations really spent)."""

    def __init__(self, model: Callable[..., Tensor]) -> None:
        self.model, self.rows = model, 0

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.rows += int(x.shape[0])
        return self.model(x, t, **cond)

    def __getattr__(self, name: str) -> Any:  # num_classes etc. of the wrapped network
        return getattr(self.__dict__["model"], name)


_SHAPE_ATTRS = ("sample_shape", "data_shape", "in_shape", "shape", "dim", "in_dim", "data_dim")


def _shape_of(obj: Any) -> tuple[int, ...] | None:
    for attr in _SHAPE_ATTRS:
        value = getattr(obj, attr, None)
        if isinstance(value, bool) or value is None or callable(value):
            continue
        if isinstance(value, int) and value >= 1:
            return (value,)
        if isinstance(value, (tuple, list, torch.Size)) and value and all(isinstance(v, int) and v >= 1 for v in value):
            return tuple(value)
    return None


def _infer_shape(field: Field, reward: Callable) -> tuple[int, ...] | None:
    """The shape of one sample, from ``reward``/model attributes or the objects they close over."""
    candidates: list[Any] = []
    for fn in (reward, field.model):
        candidates.append(fn)
        owner = getattr(fn, "__self__", None)
        if owner is not None:
            candidates.append(owner)
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
        if inner is not None:
            candidates.append(inner)
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                candidates.append(cell.cell_contents)
            except ValueError:  # empty cell
                continue
    for obj in candidates:
        if isinstance(obj, (int, float, str, Tensor)) or inspect.ismodule(obj):
            continue
        shape = _shape_of(obj)
        if shape is not None:
            return shape
    return None


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError(f"shape must be a positive integer or a tuple of positive integers (one sample's shape), "
                         f"got {shape!r}")
    return tuple(shape)


def sample(field: Field, reward: Callable[[Tensor], Tensor], method: str = "smc", num_samples: int = 16,
           nfe: int = 500, temperature: float = 1.0, generator: torch.Generator | None = None, *,
           shape: int | tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
           device: torch.device | str | None = None, **options: Any) -> SteerResult:
    r"""Steer ``field`` toward high ``reward``: ``num_samples`` samples for ``nfe`` evaluations each.

    Arguments:
        field: a :class:`~flowdiff.Field` on a Gaussian path (any prediction type).
        reward: ``reward(x) -> (B,)`` on a batch ``(B, *shape)`` of clean-data estimates; finite.
        method: one of :func:`available` (``smc``: Feynman–Kac steering, the sampler of the tilted
            distribution; ``bon``: best-of-N; ``beam``: beam search over SDE paths; ``rbf``:
            Rollover Budget Forcing; ``dps``: gradient guidance).
        num_samples: how many samples to return.
        nfe: budget, model evaluations per returned sample.
        temperature: ``β > 0`` of the target :math:`p\,e^{r/\beta}` (samplers and gradient
            guidance; searches ignore it beyond the check).
        generator: a ``torch.Generator`` for reproducible draws.
        shape: the shape of one sample; inferred from ``reward``/``field.model`` attributes
            (``dim``, ``in_shape``, ``sample_shape``, ..., or those of an object they are bound to
            or close over, such as a :class:`~flowdiff.testing.GaussianMixture`) when omitted.
        dtype, device: of the samples (default: float32 on the CPU, or the model's parameters').
        **options: method-specific settings (see each method's docstring).

    Returns:
        :class:`SteerResult` with the samples, their rewards and the evaluations spent per sample.

    Raises:
        ValueError / TypeError naming the bad value: unknown method, ``temperature <= 0``, a budget
        too small for one trajectory, a reward of the wrong shape or with non-finite values, a
        non-differentiable reward for a gradient method, an unknown option.
    """
    spec = describe(method)
    if not isinstance(field, Field):
        raise TypeError(f"field must be a flowdiff.Field on a Gaussian path, got {type(field).__name__}")
    if not callable(reward):
        raise TypeError(f"reward must be a callable reward(x) -> Tensor of shape (B,), got {type(reward).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1 (model evaluations per returned sample), got {nfe!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (the beta of p·exp(r/beta)), got {temperature!r}")
    if shape is None:
        shape = _infer_shape(field, reward)
        if shape is None:
            raise ValueError("cannot tell the shape of one sample: pass shape=(...) (e.g. shape=(2,) for 2-D points)")
    shape = _check_shape(shape)
    params = [p for p in getattr(field.model, "parameters", lambda: iter(()))()] \
        if callable(getattr(field.model, "parameters", None)) else []
    if dtype is None:
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    checked = Reward(reward)
    counter = _RowCounter(field.model)
    counted = Field(counter, field.path, field.prediction)
    out = spec.fn(counted, checked, shape=shape, num_samples=num_samples, nfe=nfe, temperature=float(temperature),
                  generator=generator, dtype=dtype, device=device, **options)
    x, info = out[0], out[1]
    vjp = float(out[2]) if len(out) > 2 else 0.0
    expected = (num_samples, *shape)
    if tuple(x.shape) != expected:
        raise RuntimeError(f"method {method!r} returned samples of shape {tuple(x.shape)}, expected {expected}")
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"method {method!r} produced {int((~torch.isfinite(x)).sum())} non-finite values")
    field.nfe += counted.nfe
    spent = counter.rows / num_samples
    if spent > nfe + 1e-9:
        raise RuntimeError(f"method {method!r} spent {spent} evaluations per sample, over the budget nfe={nfe}")
    final_reward = info.pop("final_reward", None)
    if final_reward is None:
        final_reward = checked(x)
    return SteerResult(x=x.detach(), reward=final_reward.detach(), nfe=spent, method=method,
                       vjp=vjp / num_samples, info=dict(info))
