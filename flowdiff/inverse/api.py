r"""One entry point for posterior sampling with a diffusion/flow prior: :func:`sample_posterior`.

A *method* is a function registered with :func:`register`; it receives the prior ``field``
(any :class:`~flowdiff.Field` on a Gaussian path), a forward ``operator``
(:class:`~flowdiff.inverse.operators.Operator`), one measurement ``y`` of the operator's output
shape, the measurement noise ``sigma_y`` and the budget, and returns ``num_samples`` draws that
aim at :math:`p(x \mid y) \propto p(x)\,N(y; A(x), \sigma_y^2 I)`.

This module checks the input once for every method (shapes, finiteness, ``sigma_y >= 0``, the
operator kinds a method accepts) and counts the model evaluations itself (network rows per returned
sample), so what :class:`PosteriorResult` reports is what was spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

import torch
from torch import Tensor

from ..fields import Field

__all__ = ["PosteriorResult", "MethodSpec", "register", "available", "describe", "sample_posterior"]


@dataclass
class PosteriorResult:
    """What a posterior sampler returns.

    Attributes:
        x: the samples, shape ``(num_samples, *operator.in_shape)``.
        nfe: model evaluations per returned sample: the rows of every network call (a call on a
            batch of B counts B), divided by ``num_samples``.
        vjp: network vector-Jacobian products (backward passes) per returned sample.
        method: the method's name.
        info: method-specific diagnostics (effective sample sizes, step sizes, ...).
    """

    x: Tensor
    nfe: float
    vjp: float
    method: str
    info: dict = dc_field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function and the operators it accepts."""

    name: str
    fn: Callable[..., Any]
    linear_only: bool
    needs_svd: bool
    noiseless_only: bool
    description: str


_METHODS: dict[str, MethodSpec] = {}


class _RowCounter:
    """Wraps a model and counts the batch rows it is called on (the evaluations really spent)."""

    def __init__(self, model: Callable[..., Tensor], in_shape: tuple[int, ...] = ()) -> None:
        self.model, self.rows, self.in_shape = model, 0, tuple(in_shape)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        first = self.rows == 0
        self.rows += int(x.shape[0])
        if not first:
            return self.model(x, t, **cond)
        try:  # the first call tells whether the operator's in_shape fits the network
            return self.model(x, t, **cond)
        except (RuntimeError, ValueError, IndexError) as error:
            raise ValueError(f"the field's model cannot take samples of the operator's in_shape {self.in_shape} "
                             f"(does the operator fit the data the model was trained on?): {error}") from error

    def __getattr__(self, name: str) -> Any:  # num_classes etc. of the wrapped network
        return getattr(self.__dict__["model"], name)


def register(name: str, *, linear_only: bool = False, needs_svd: bool = False, noiseless_only: bool = False,
             description: str = "") -> Callable:
    """Decorator: register ``fn(field, operator, y, *, sigma_y, num_samples, nfe, generator, **options)``.

    ``fn`` returns ``(x, info)`` or ``(x, info, vjp_total)``: samples ``(num_samples, *in_shape)``,
    a dict of diagnostics and (optionally) the total number of network VJPs it made. ``nfe`` is
    the budget in model evaluations *per returned sample*; the method chooses its steps,
    particles and inner iterations from it (and from ``sigma_y``), and must not exceed it by more
    than one evaluation per sample.
    """

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"posterior method {name!r} is registered twice")
        _METHODS[name] = MethodSpec(name, fn, linear_only, needs_svd, noiseless_only, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def available() -> list[str]:
    """The method names :func:`sample_posterior` accepts."""
    return sorted(_METHODS)


def describe(method: str) -> MethodSpec:
    """The registered :class:`MethodSpec` of ``method`` (what operators it accepts)."""
    if method not in _METHODS:
        raise ValueError(f"unknown posterior method {method!r}; available: {', '.join(available())}")
    return _METHODS[method]


def sample_posterior(field: Field, operator: Any, y: Tensor, sigma_y: float = 0.0, method: str = "smc",
                     num_samples: int = 16, nfe: int = 200, generator: torch.Generator | None = None,
                     **options: Any) -> PosteriorResult:
    r"""Draw ``num_samples`` samples of :math:`p(x \mid y)` for the prior ``field`` and ``y = A(x) + \sigma_y n``.

    Arguments:
        field: the prior, a :class:`~flowdiff.Field` on any Gaussian path and prediction type.
        operator: a :class:`~flowdiff.inverse.operators.Operator` (``forward``; ``adjoint`` and
            ``svd`` for linear ones) whose ``in_shape`` is the shape of one sample.
        y: one measurement, shape ``operator.out_shape`` (a leading batch axis of 1 is accepted).
        sigma_y: standard deviation of the Gaussian measurement noise (>= 0; some methods need > 0
            or == 0, see :func:`describe`).
        method: one of :func:`available`.
        num_samples: how many posterior samples to return.
        nfe: budget, model evaluations per returned sample.
        generator: a ``torch.Generator`` for reproducible draws.
        **options: method-specific settings (see each method's docstring).

    Returns:
        :class:`PosteriorResult` with the samples and the evaluations really spent per sample.

    Raises:
        ValueError / TypeError naming the bad value: unknown method, shapes that do not fit,
        ``sigma_y < 0`` or not finite, non-finite ``y``, an operator the method cannot use.
    """
    spec = describe(method)
    if not isinstance(field, Field):
        raise TypeError(f"field must be a flowdiff.Field on a Gaussian path, got {type(field).__name__}")
    for attr in ("forward", "in_shape", "out_shape", "linear"):
        if not hasattr(operator, attr):
            raise TypeError(f"operator must be a flowdiff.inverse.operators.Operator (missing {attr!r}), "
                            f"got {type(operator).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1 (model evaluations per sample), got {nfe!r}")
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of shape {tuple(operator.out_shape)}, got {type(y).__name__}")
    out_shape = tuple(operator.out_shape)
    if tuple(y.shape) == (1, *out_shape):
        y = y[0]
    if tuple(y.shape) != out_shape:
        raise ValueError(f"y has shape {tuple(y.shape)}, but the operator's output shape is {out_shape}")
    if not torch.all(torch.isfinite(y)):
        raise ValueError(f"y has {int((~torch.isfinite(y)).sum())} non-finite entries; a measurement must be finite")
    if spec.linear_only and not operator.linear:
        raise ValueError(f"method {method!r} needs a linear operator; {type(operator).__name__} is nonlinear "
                         f"(use one of: {', '.join(m for m in available() if not _METHODS[m].linear_only)})")
    if spec.needs_svd and (not operator.linear or not callable(getattr(operator, "svd", None)) or operator.svd() is None):
        raise ValueError(f"method {method!r} needs an operator with an SVD; {type(operator).__name__} has none")
    if spec.noiseless_only and sigma_y > 0:
        raise ValueError(f"method {method!r} handles noiseless measurements only (sigma_y = 0), got sigma_y={sigma_y}")
    counter = _RowCounter(field.model, tuple(operator.in_shape))
    counted = Field(counter, field.path, field.prediction)
    out = spec.fn(counted, operator, y, sigma_y=float(sigma_y), num_samples=num_samples, nfe=nfe,
                  generator=generator, **options)
    x, info = out[0], out[1]
    vjp = float(out[2]) if len(out) > 2 else 0.0
    expected = (num_samples, *tuple(operator.in_shape))
    if tuple(x.shape) != expected:
        raise RuntimeError(f"method {method!r} returned samples of shape {tuple(x.shape)}, expected {expected}")
    if not torch.all(torch.isfinite(x)):
        raise FloatingPointError(f"method {method!r} produced {int((~torch.isfinite(x)).sum())} non-finite values; "
                                 "lower the step size or raise nfe")
    field.nfe += counted.nfe
    spent = counter.rows / num_samples
    return PosteriorResult(x=x.detach(), nfe=spent, vjp=vjp / num_samples, method=method, info=dict(info))
