r"""EDM preconditioning as a network wrapper, for every Gaussian path and every prediction type.

Karras, Aittala, Aila & Laine (2022), "Elucidating the Design Space of Diffusion-Based Generative
Models", §5 and Table 1, write the denoiser in σ-space, :math:`\tilde x = x/\alpha`,
:math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}`, as a skip connection plus a scaled network:

.. math::

    D(\tilde x, \tilde\sigma) = c_{skip}(\tilde\sigma)\,\tilde x
        + c_{out}(\tilde\sigma)\,F_\theta\big(c_{in}(\tilde\sigma)\,\tilde x,\ c_{noise}\big),
    \qquad
    c_{skip} = \frac{\sigma_d^2}{\tilde\sigma^2 + \sigma_d^2},\;
    c_{out} = \frac{\tilde\sigma\sigma_d}{\sqrt{\tilde\sigma^2 + \sigma_d^2}},\;
    c_{in} = \frac{1}{\sqrt{\tilde\sigma^2 + \sigma_d^2}}.

The choice makes the network's input and its regression target :math:`F^\star = (x_1 - c_{skip}\tilde x)/c_{out}`
both of unit variance at every noise level when the data has standard deviation :math:`\sigma_d`,
and :math:`c_{skip}` minimises the amplification of the network's errors.

**Any Gaussian path.** With :math:`d = \sqrt{\sigma^2 + \alpha^2\sigma_d^2}` the same coefficients
in the path's own variables are finite at both ends (no division by α or σ):

.. math::

    c_{in}\tilde x = \frac{x}{d}, \qquad
    c_{skip}\tilde x = \frac{\sigma_d^2\,\alpha}{d^2}\,x, \qquad
    c_{out} = \frac{\sigma\,\sigma_d}{d},

so the data prediction is :math:`\hat x = \sigma_d^2\alpha x/d^2 + (\sigma\sigma_d/d) F`, and
the noise prediction, :math:`\hat\varepsilon = (x - \alpha\hat x)/\sigma`, simplifies to
:math:`\hat\varepsilon = \sigma x/d^2 - (\alpha\sigma_d/d) F` (again without a division).

**Any prediction type.** :class:`Preconditioned` outputs whichever prediction its field is
declared with (``"data"``, ``"noise"``, ``"velocity"`` :math:`\dot\alpha\hat x + \dot\sigma\hat\varepsilon`,
``"v"`` :math:`\alpha\hat\varepsilon - \sigma\hat x`, ``"score"`` :math:`-\hat\varepsilon/\sigma`), so
it is a drop-in network: ``Field(Preconditioned(net, path, "velocity"), path, "velocity")`` and
``GaussianPathLoss(path, "velocity", ...)`` train and sample it with no other change. Since every
loss weighting of :mod:`flowdiff.losses` is defined on the data MSE, the ``"edm"`` weighting
:math:`\lambda = 1/c_{out}^2` is EDM's loss: unit weight on :math:`\lVert F - F^\star\rVert^2`,
whatever the prediction.

**Noise input.** EDM feeds :math:`c_{noise} = \tfrac14\ln\tilde\sigma`; on the EDM path
:math:`\ln\tilde\sigma` is affine in ``t``, so feeding the path time ``t`` to the inner network's
sinusoidal embedding (what every network of :mod:`flowdiff.nn` expects) carries the same
information on every path.

This module knows only torch: the path is used through its public float64 ``path.table(t)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Preconditioned", "PRECONDITIONED_PREDICTIONS"]

PRECONDITIONED_PREDICTIONS = ("data", "noise", "velocity", "v", "score")


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    return c.to(dtype=x.dtype, device=x.device).reshape(c.shape + (1,) * (x.ndim - c.ndim))


class Preconditioned(nn.Module):
    r"""EDM-preconditioned network (Karras et al. 2022) that outputs any prediction type.

    Arguments:
        network: the inner network :math:`F_\theta`, called as ``network(x, t, **cond)``.
        path: a Gaussian path (anything with ``table(t)`` returning ``alpha, sigma, d_alpha, d_sigma``).
        prediction: what this wrapper outputs, one of ``"data"``, ``"noise"``, ``"velocity"``,
            ``"v"``, ``"score"``; declare the same on the :class:`~flowdiff.Field` and the loss.
        sigma_data: :math:`\sigma_d`, the standard deviation of the data (0.5 in EDM; measure yours).

    Call ``model(x, t, **cond)`` with ``t`` of shape ``(B,)``; the output has ``x``'s shape.
    Attribute access that the wrapper does not define (``num_classes``, ...) reaches the inner network.
    """

    def __init__(self, network: nn.Module, path: Any, prediction: str = "data", sigma_data: float = 0.5) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        if not callable(getattr(path, "table", None)):
            raise TypeError(f"path must be a Gaussian path with a table(t) method, got {type(path).__name__}")
        if prediction not in PRECONDITIONED_PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PRECONDITIONED_PREDICTIONS)}")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not (
            math.isfinite(sigma_data) and sigma_data > 0
        ):
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.network = network
        self.path = path
        self.prediction = prediction
        self.sigma_data = float(sigma_data)

    @property
    def num_classes(self) -> int | None:
        """The inner network's number of classes (``None``: unconditional)."""
        return getattr(self.network, "num_classes", None)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        r"""``(α, σ, α̇, σ̇, d, σ_d)`` at ``t`` in float64, :math:`d = \sqrt{\sigma^2 + \alpha^2\sigma_d^2}`."""
        table = self.path.table(t.detach())
        a, s = table.alpha, table.sigma
        d = torch.sqrt(s * s + (a * self.sigma_data) ** 2)
        return a, s, table.d_alpha, table.d_sigma, d, torch.as_tensor(self.sigma_data, dtype=torch.float64)

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """The preconditioned prediction at ``(x, t)``; ``cond`` (e.g. ``y``) goes to the inner network."""
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point Tensor, got {type(x).__name__}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(x.shape[0])
        a, s, da, ds, d, sd = self.coefficients(t)
        c_in = _per_sample(1.0 / d, x)
        inner = self.network(c_in * x, t, **cond)
        # F enters every prediction with one of these two coefficients (module docstring).
        skip_data, out_data = _per_sample(sd * sd * a / (d * d), x), _per_sample(s * sd / d, x)
        skip_noise, out_noise = _per_sample(s / (d * d), x), _per_sample(-a * sd / d, x)
        p = self.prediction
        if p == "data":
            return skip_data * x + out_data * inner
        if p == "noise":
            return skip_noise * x + out_noise * inner
        if p == "score":
            inv = _per_sample(-1.0 / s, x)
            return inv * (skip_noise * x + out_noise * inner)
        # velocity and v are linear in (x̂, ε̂): fold the coefficients in float64 first.
        if p == "velocity":
            ca, cs = da, ds
        else:  # v = α ε̂ − σ x̂
            ca, cs = -s, a
        skip = ca * sd * sd * a / (d * d) + cs * s / (d * d)
        out = ca * s * sd / d - cs * a * sd / d
        return _per_sample(skip, x) * x + _per_sample(out, x) * inner

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, sigma_data={self.sigma_data}"
