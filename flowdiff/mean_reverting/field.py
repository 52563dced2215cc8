r"""Mean-reverting fields: a network on ``(x, t, μ)`` seen as an ordinary field on ``y = x − μ``.

A restoration network (IR-SDE, Luo et al. 2023; MRS, Li et al. 2025) is called as
``model(x, t, mu=μ, **cond)`` on the *unshifted* state ``x`` and the degraded image ``μ`` and
predicts, for the marginal :math:`x = \mu + \alpha(x_0 - \mu) + \bar\sigma\varepsilon` of
:class:`~flowdiff.mean_reverting.IRSDE`:

=============  ======================================================================
prediction     output
=============  ======================================================================
``noise``      ε̂ (IR-SDE's and DA-CLIP's parametrisation)
``data``       x̂₀, the clean image in ``x`` coordinates (not ``x̂₀ − μ``)
``velocity``   the probability-flow velocity ``dx/dt`` (equal to ``dy/dt``)
``score``      ∇ₓ log p_t(x | μ) (equal to ∇_y log p_t(y))
``v``          :math:`\alpha\hat\varepsilon - \bar\sigma(\hat x_0 - \mu)` (Salimans & Ho's v of ``y``)
=============  ======================================================================

:func:`shifted_field` turns it into a :class:`~flowdiff.Field` on the :class:`IRSDE` path of
``y`` (only ``data`` needs a shift: :math:`\hat y = \hat x_0 - \mu`), which is all MRS needs:
its semi-analytic solutions are the exponential integrators of that Gaussian path
(:mod:`flowdiff.mean_reverting.sampling`). :func:`mixture_model` builds exact networks of this
kind from a Gaussian mixture of :math:`x_0 - \mu` (the shift makes the analytic fields of
:mod:`flowdiff.testing` exact here too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..fields import Field
from ..paths import PREDICTIONS, GaussianPath

__all__ = ["MU", "ShiftedModel", "check_mu", "mixture_model", "shifted_field"]

#: The keyword under which a mean-reverting network receives the stationary mean μ.
MU = "mu"


def check_mu(mu: Any, like: Tensor, name: str = "x") -> Tensor:
    """``mu`` as a tensor of ``like``'s shape, dtype and device; TypeError / ValueError naming the mismatch."""
    if not isinstance(mu, Tensor):
        raise TypeError(f"mu must be a torch.Tensor of the shape of {name}, got {type(mu).__name__}")
    if not mu.is_floating_point():
        raise TypeError(f"mu must be a floating-point tensor, got dtype {mu.dtype}")
    if mu.shape != like.shape:
        raise ValueError(f"mu of shape {tuple(mu.shape)} does not match {name} of shape {tuple(like.shape)}; the "
                         f"stationary mean needs one value per entry (the degraded image of each sample)")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"mu has {int((~torch.isfinite(mu)).sum())} non-finite entries")
    return mu.to(dtype=like.dtype, device=like.device)


class ShiftedModel:
    """``model(x, t, mu=μ, **cond)`` as a model of ``y = x − μ``: calls it at ``x = y + μ`` and
    subtracts μ from a data prediction (module docstring). ``mu`` is fixed per sampling run."""

    def __init__(self, model: Callable[..., Tensor], mu: Tensor, prediction: str):
        if not callable(model):
            raise TypeError(f"model must be callable model(x, t, mu=..., **cond), got {type(model).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.model, self.mu, self.prediction = model, mu, prediction

    def __call__(self, y: Tensor, t: Tensor, **cond: Any) -> Tensor:
        mu = self.mu
        if mu.shape != y.shape:
            raise ValueError(f"mu of shape {tuple(mu.shape)} does not match the state of shape {tuple(y.shape)}")
        mu = mu.to(dtype=y.dtype, device=y.device)
        out = self.model(y + mu, t, **{MU: mu, **cond})
        return out - mu if self.prediction == "data" else out


def shifted_field(model: Callable[..., Tensor], path: GaussianPath, mu: Tensor, prediction: str = "noise") -> Field:
    """The :class:`~flowdiff.Field` of ``y = x − μ`` on ``path`` (an :class:`IRSDE`) for a
    mean-reverting ``model(x, t, mu=μ, **cond)`` predicting ``prediction`` (module docstring)."""
    if not isinstance(mu, Tensor):
        raise TypeError(f"mu must be a torch.Tensor, got {type(mu).__name__}")
    return Field(ShiftedModel(model, mu, prediction), path, prediction)


def mixture_model(mixture: Any, prediction: str = "noise") -> Callable[..., Tensor]:
    r"""An exact mean-reverting network for data :math:`x_0 = \mu + y_1`, :math:`y_1 \sim` ``mixture``.

    ``mixture`` is a :class:`flowdiff.testing.GaussianMixture` whose ``path`` is the
    :class:`IRSDE` (``mixture.with_path(path)``); it describes :math:`x_0 - \mu`, the same for
    every μ. The returned ``model(x, t, mu=μ)`` outputs the exact ``prediction`` of ``x``
    (data: :math:`\mu + E[y_1 | y]`), so that MRS on it is checked against closed-form truth.
    """
    exact = mixture.model(prediction)

    def mean_reverting_model(x: Tensor, t: Tensor, mu: Tensor | None = None, **cond: Any) -> Tensor:
        if mu is None:
            raise TypeError("a mean-reverting model needs the stationary mean: call model(x, t, mu=...)")
        mu = check_mu(mu, x)
        out = exact(x - mu, t)
        return out + mu if prediction == "data" else out

    mean_reverting_model.__name__ = f"mean_reverting_{prediction}_model"
    return mean_reverting_model
