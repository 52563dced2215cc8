r"""Conversions of a trained model's sampling dynamics: marginal-preserving SDEs and path (interpolant) changes.

**Marginal-preserving SDEs.** For a field on a Gaussian path with probability-flow velocity
:math:`u` and score :math:`s = \nabla\log p_t`, every diffusion coefficient :math:`g(t) \ge 0` gives

.. math::

    dX_t = \Big[u(X_t, t) + \tfrac{g(t)^2}{2}\,s(X_t, t)\Big]\,dt + g(t)\,dW_t ,

whose marginals are the path's :math:`p_t` (the Fokker–Planck equation of the SDE reduces to the
continuity equation of the ODE because :math:`\tfrac{g^2}{2}\nabla\cdot(p\,s) = \tfrac{g^2}{2}\Delta p`).
In flowdiff's sampling equation :math:`dX = [u + \varepsilon s]dt + \sqrt{2\varepsilon}\,dW` this is
:math:`\varepsilon = g^2/2`: :meth:`DiffusionCoefficient.eps` plugs any :math:`g` below into
``fd.sample(field, x, solver="euler-maruyama", eps=g.eps)``. The coefficients of the papers, written in
flowdiff's time (``t = 0`` noise, ``t = 1`` data; their noise level is :math:`\tau = 1 - t`):

===================  ==========================================  ==========================================================
class                :math:`g(t)`                                 source
===================  ==========================================  ==========================================================
:class:`FlowGRPO`    :math:`a\sqrt{(1-t)/t}`, ``a = 0.7``         Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"
:class:`DanceGRPO`   :math:`\eta`, ``η = 0.3``                    Xue et al. 2025, "DanceGRPO: Unleashing GRPO on Visual Generation"
:class:`RBF`         :math:`c\,(1-t)^2`, ``c = 3``                Kim et al. 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing"
:class:`ReverseDiffusion` :math:`\sqrt{2\sigma^2\dot\lambda}`    Song et al. 2021 (the reverse SDE; "memoryless": for Linear it is FlowGRPO with a = √2)
:class:`Window`      ``g`` on ``[t_start, t_end)``, 0 elsewhere   MixGRPO / Flow-GRPO-Fast; one step of it is G²RPO's singular SDE step (Zhou et al. 2025)
===================  ==========================================  ==========================================================

Flow-GRPO's coefficient diverges at the noise end; as its code clamps the first step to the
second grid time, :class:`FlowGRPO` evaluates it at ``max(t, t_floor)``.

**Path (interpolant) conversion.** Two Gaussian paths :math:`x = \alpha x_1 + \sigma\varepsilon` and
:math:`\bar x = \bar\alpha x_1 + \bar\sigma\varepsilon` describe the same family of noisy data: at the time
:math:`s(t)` where the source path has the target's log-SNR, :math:`\lambda(s) = \bar\lambda(t)`, the
states are proportional, :math:`\bar x_t = c(t)\,x_{s(t)}` with
:math:`c = \bar\alpha(t)/\alpha(s) = \bar\sigma(t)/\sigma(s)`. Hence a model trained on one path is
exactly a model of the other: :math:`E[x_1 | \bar x_t = y] = E[x_1 | x_{s(t)} = y/c(t)]` (and the same for
the noise). :func:`time_change` gives :math:`(s, c)`; :meth:`flowdiff.Field.with_path` builds the
converted field. (Kim et al. 2025 use it to run a linear flow as a VP-SDE; Lipman et al. 2024, "Flow
Matching Guide and Code", §4.8 "scheduler change".)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils import TimeLike, as_time_tensor, check_time_range
from .gaussian import GaussianPath

__all__ = [
    "DiffusionCoefficient", "FlowGRPO", "DanceGRPO", "RBF", "ReverseDiffusion", "Window", "Constant",
    "diffusion_coefficient", "available_diffusions", "TimeChange", "time_change",
]


def _finite_number(name: str, value: object, low: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {name}={value!r}")
    return float(value)


class DiffusionCoefficient:
    r"""A diffusion coefficient :math:`g(t) \ge 0` of the marginal-preserving SDE (module docstring).

    ``g(t)`` takes ``t`` as a number or a tensor of times in ``[0, 1]`` and returns a tensor of its shape,
    dtype and device; :meth:`eps` is :math:`g^2/2`, the ``eps`` of flowdiff's SDE samplers.
    """

    name = "diffusion"

    def _g(self, t: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, t: TimeLike) -> Tensor:
        t = as_time_tensor(t)
        check_time_range(t)
        return self._g(t)

    def eps(self, t: TimeLike) -> Tensor:
        """:math:`\\varepsilon(t) = g(t)^2/2` for ``fd.sample(..., solver="euler-maruyama", eps=g.eps)``."""
        g = self(t)
        return 0.5 * g * g

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"

    def config(self) -> dict:
        """A JSON-serialisable description; :func:`diffusion_coefficient` rebuilds it."""
        return {"name": self.name}


class Constant(DiffusionCoefficient):
    """:math:`g(t) = \\eta` (also DanceGRPO's choice, :class:`DanceGRPO`)."""

    name = "constant"

    def __init__(self, eta: float = 0.3):
        self.eta = _finite_number("eta", eta, 0.0, strict=False)

    def _g(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.eta)

    def config(self) -> dict:
        return {"name": self.name, "eta": self.eta}


class DanceGRPO(Constant):
    r"""DanceGRPO's constant coefficient :math:`g = \eta = 0.3` (Xue et al. 2025, "DanceGRPO: Unleashing
    GRPO on Visual Generation"; ``flux_step`` of the official code)."""

    name = "dance-grpo"


class FlowGRPO(DiffusionCoefficient):
    r"""Flow-GRPO's coefficient :math:`g = a\sqrt{\tau/(1-\tau)}` in the noise level :math:`\tau = 1 - t`:
    :math:`g(t) = a\sqrt{(1 - t)/\max(t, t_{floor})}` (Liu et al. 2025, "Flow-GRPO: Training Flow Matching
    Models via Online RL", ``noise_level`` a = 0.7). ``t_floor`` replaces the code's clamp of the first
    step to the second grid time (10 steps: 0.1). With ``a = √2`` on the Linear path this is the reverse
    diffusion (memoryless) SDE.
    """

    name = "flow-grpo"

    def __init__(self, a: float = 0.7, t_floor: float = 0.05):
        self.a = _finite_number("a", a, 0.0, strict=False)
        self.t_floor = _finite_number("t_floor", t_floor, 0.0, strict=True)
        if self.t_floor >= 1:
            raise ValueError(f"t_floor must lie in (0, 1), got t_floor={t_floor!r}")

    def _g(self, t: Tensor) -> Tensor:
        return self.a * torch.sqrt((1 - t).clamp(min=0) / t.clamp(min=self.t_floor))

    def config(self) -> dict:
        return {"name": self.name, "a": self.a, "t_floor": self.t_floor}


class RBF(DiffusionCoefficient):
    r"""Rollover Budget Forcing's coefficient :math:`g = c\,\tau^2 = c\,(1 - t)^2`, ``c = 3`` (Kim et al. 2025,
    "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing";
    ``diffusion_coefficient: square``, ``diffusion_norm: 3.0``)."""

    name = "rbf"

    def __init__(self, c: float = 3.0):
        self.c = _finite_number("c", c, 0.0, strict=False)

    def _g(self, t: Tensor) -> Tensor:
        return self.c * (1 - t) ** 2

    def config(self) -> dict:
        return {"name": self.name, "c": self.c}


class ReverseDiffusion(DiffusionCoefficient):
    r"""The reverse-diffusion (memoryless) coefficient :math:`g^2 = 2\sigma^2\dot\lambda` of ``path``
    (Song et al. 2021; flowdiff's ``eps="reverse-diffusion"``), capped at ``g_max`` near the ends
    where :math:`\dot\lambda` diverges (Linear: :math:`g^2 = 2(1-t)/t`)."""

    name = "reverse-diffusion"

    def __init__(self, path: GaussianPath, g_max: float = 10.0):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}")
        self.path = path
        self.g_max = _finite_number("g_max", g_max, 0.0, strict=True)

    def _g(self, t: Tensor) -> Tensor:
        tab = self.path.table(t.clamp(self.path.t_min, self.path.t_max))
        return torch.sqrt(2 * tab.sigma**2 * tab.d_log_snr).clamp(max=self.g_max).to(t.dtype)

    def config(self) -> dict:
        return {"name": self.name, "path": self.path.config(), "g_max": self.g_max}


class Window(DiffusionCoefficient):
    r"""``g`` on ``[t_start, t_end)`` and 0 elsewhere: SDE exploration on a window of steps, the ODE
    outside (MixGRPO; Flow-GRPO-Fast; a window of one step is G²RPO's singular stochastic step)."""

    name = "window"

    def __init__(self, g: DiffusionCoefficient | float, t_start: float, t_end: float):
        if not isinstance(g, DiffusionCoefficient):
            g = Constant(_finite_number("g", g, 0.0, strict=False))
        t_start = _finite_number("t_start", t_start, 0.0, strict=False)
        t_end = _finite_number("t_end", t_end, 0.0, strict=False)
        if not (0.0 <= t_start < t_end <= 1.0):
            raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start!r}, t_end={t_end!r}")
        self.inner, self.t_start, self.t_end = g, t_start, t_end

    def _g(self, t: Tensor) -> Tensor:
        inside = (t >= self.t_start) & (t < self.t_end)
        return torch.where(inside, self.inner._g(t), torch.zeros_like(t))

    def config(self) -> dict:
        return {"name": self.name, "g": self.inner.config(), "t_start": self.t_start, "t_end": self.t_end}


_NAMED = {"constant": Constant, "dance-grpo": DanceGRPO, "flow-grpo": FlowGRPO, "rbf": RBF}


def available_diffusions() -> list[str]:
    """Names accepted by :func:`diffusion_coefficient` (``reverse-diffusion`` and ``window`` need arguments)."""
    return sorted([*_NAMED, "reverse-diffusion", "window"])


def diffusion_coefficient(spec: str | dict | DiffusionCoefficient | float, **kwargs: object) -> DiffusionCoefficient:
    """A :class:`DiffusionCoefficient` from a name (``"flow-grpo"``, ``"dance-grpo"``, ``"rbf"``,
    ``"constant"``; keywords are its parameters), a config dict, a number (constant g) or itself."""
    if isinstance(spec, DiffusionCoefficient):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(float(spec))
    if isinstance(spec, dict):
        cfg = dict(spec)
        name = cfg.pop("name", None)
        if name == "window":
            return Window(diffusion_coefficient(cfg["g"]), cfg["t_start"], cfg["t_end"])
        if name == "reverse-diffusion":
            from . import path_from_config

            return ReverseDiffusion(path_from_config(cfg["path"]), cfg.get("g_max", 10.0))
        return diffusion_coefficient(str(name), **cfg)
    if not isinstance(spec, str):
        raise TypeError(f"a diffusion coefficient must be a name, a dict, a number or a DiffusionCoefficient, got "
                        f"{type(spec).__name__}")
    key = spec.lower().replace("_", "-")
    if key not in _NAMED:
        raise ValueError(f"unknown diffusion coefficient {spec!r}; valid: {', '.join(sorted(_NAMED))} "
                         f"(and ReverseDiffusion(path), Window(g, t_start, t_end))")
    return _NAMED[key](**kwargs)


@dataclass(frozen=True)
class TimeChange:
    r"""Where a target path's time ``t`` sits on a source path: the source time ``s`` with equal log-SNR
    and the scale ``c`` with :math:`\bar x_t = c\,x_s` (shapes of ``t``)."""

    t: Tensor
    s: Tensor
    scale: Tensor


def time_change(source: GaussianPath, target: GaussianPath, t: TimeLike) -> TimeChange:
    r"""Map target-path times ``t`` to the source path (module docstring): :math:`s = \lambda^{-1}(\bar\lambda(t))`
    and :math:`c = \bar\alpha(t)/\alpha(s)` (or :math:`\bar\sigma(t)/\sigma(s)`, whichever ratio has the larger
    denominator, for accuracy). Computed in float64, returned in ``t``'s dtype.

    Raises:
        ValueError: ``t`` outside ``[0, 1]``, or a target log-SNR the source path does not reach inside its
            safe interval ``[t_min, t_max]`` (the converted model would be queried outside it).
    """
    for name, p in (("source", source), ("target", target)):
        if not isinstance(p, GaussianPath):
            raise TypeError(f"{name} must be a flowdiff.paths.GaussianPath, got {type(p).__name__}")
    t = as_time_tensor(t)
    check_time_range(t)
    tab = target.table(t)
    s = source.t_of_log_snr(tab.log_snr).to(torch.float64)
    lo, hi = source.t_min, source.t_max
    slack = 1e-9
    if s.numel() and (float(s.min()) < lo - slack or float(s.max()) > hi + slack):
        bad = float(t.flatten()[torch.argmax(((s < lo - slack) | (s > hi + slack)).flatten().int())])
        raise ValueError(
            f"target time t={bad:.6g} has log-SNR {float(target.log_snr(bad)):.4g}, outside what the source path "
            f"{source!r} reaches on its safe interval [{lo:g}, {hi:g}] (log-SNR "
            f"[{float(source.log_snr(lo)):.4g}, {float(source.log_snr(hi)):.4g}]); restrict t"
        )
    s = s.clamp(lo, hi)
    src = source.table(s)
    use_alpha = src.alpha >= src.sigma
    scale = torch.where(use_alpha, tab.alpha / src.alpha, tab.sigma / src.sigma)
    return TimeChange(t=t, s=s.to(t.dtype), scale=scale.to(t.dtype))
