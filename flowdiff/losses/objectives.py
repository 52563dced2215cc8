r"""Training objectives: regression losses on Gaussian paths and stochastic interpolants.

Every loss object is called the same way (see :mod:`flowdiff.losses`); the weightings of the Gaussian-path loss
are in :mod:`flowdiff.losses.weightings`, its time samplers in :mod:`flowdiff.losses.time_samplers`.

Gaussian paths
--------------
For :math:`x_t = \alpha x_1 + \sigma\varepsilon` (``x1`` data, ``ε ~ N(0, I)``), a model of
prediction type ``p`` is regressed on the conditional target ``path.target(p, x1, ε, t)``
(ε, x₁, :math:`\dot\alpha x_1 + \dot\sigma\varepsilon`, :math:`-\varepsilon/\sigma` or
:math:`\alpha\varepsilon - \sigma x_1`); the minimiser is the conditional expectation, i.e. the
exact field (Vincent 2011; Ho et al. 2020; Lipman et al. 2023):

.. math::

    \mathcal L = E_{t, x_1, \varepsilon}\big[w(t)\,\overline{(f_\theta(x_t, t) - f^\star)^2}\big],

where the bar is the mean over the non-batch dimensions (a constant factor away from the sum).

The weighting :math:`w(t)` is defined on the data-prediction MSE and converted to the model's
prediction (:mod:`flowdiff.losses.weightings`).

Stochastic interpolants
-----------------------
For :math:`x_t = I(t, x_0, x_1) + \gamma(t) z` (Albergo, Boffi & Vanden-Eijnden 2023,
"Stochastic Interpolants: A Unifying Framework for Flows and Diffusions") the objectives

.. math::

    L_b = E[\tfrac12|\hat b|^2 - (\partial_t I + \dot\gamma z)\cdot\hat b],\quad
    L_v = E[\tfrac12|\hat v|^2 - \partial_t I\cdot\hat v],\quad
    L_s = E[\tfrac12|\hat s|^2 + \gamma^{-1}z\cdot\hat s],\quad
    L_\eta = E[\tfrac12|\hat\eta|^2 - z\cdot\hat\eta]

are, with target :math:`T` (:math:`\partial_t I + \dot\gamma z`, :math:`\partial_t I`,
:math:`-z/\gamma`, :math:`z`), :math:`\tfrac12|\hat f|^2 - T\cdot\hat f = \tfrac12|\hat f - T|^2 - \tfrac12|T|^2`:
the MSE to the target up to a model-independent term. :class:`InterpolantLoss` uses the MSE
(``objective="mse"``, so the exact field's loss is the irreducible conditional variance and
the numbers read like any regression loss) or the quadratic form itself
(``objective="quadratic"``, whose *value* has a much smaller variance near the endpoints for
the score, because the :math:`|z|^2/\gamma^2` term is gone). Gradients are identical.
Antithetic sampling evaluates both :math:`I \pm \gamma z` and averages, which cancels the
:math:`O(1/\gamma)` term :math:`\gamma^{-1}z\cdot\hat s` of the score objective near the ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils import batch_time, check_time_range, expand_like
from ..couplings import Coupling
from ..paths import PREDICTIONS, GaussianPath, StochasticInterpolant
from ..paths.interpolants import INTERPOLANT_TARGETS
from .time_samplers import TimeSampler, make_time_sampler, time_sampler_from_config
from .weightings import ScheduleWeighting, WeightingLike, make_weighting

__all__ = [
    "OBJECTIVES",
    "GaussianPathLoss",
    "InterpolantLoss",
    "LossOutput",
    "available_interpolant_targets",
    "available_objectives",
    "loss_from_config",
]

#: Forms of the interpolant objectives.
OBJECTIVES = ("mse", "quadratic")

Model = Callable[..., Tensor]


def available_interpolant_targets() -> tuple[str, ...]:
    """Targets of :class:`InterpolantLoss`."""
    return tuple(INTERPOLANT_TARGETS)


def available_objectives() -> tuple[str, ...]:
    """Forms of :class:`InterpolantLoss` (``"mse"`` or ``"quadratic"``)."""
    return OBJECTIVES


@dataclass
class LossOutput:
    """What a loss returns.

    Attributes:
        loss: scalar mean of ``per_sample`` with its autograd graph (what to backpropagate).
        per_sample: each sample's weighted loss, shape ``(B,)``, detached (for logging).
        t: the times used, shape ``(B,)``.
    """

    loss: Tensor
    per_sample: Tensor
    t: Tensor


def _check_inputs(model: Model, x1: Tensor, y: Tensor | None, x0: Tensor | None, x0_name: str) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t, **cond), got {type(model).__name__}")
    if not isinstance(x1, Tensor):
        raise TypeError(f"x1 must be a torch.Tensor, got {type(x1).__name__}")
    if x1.ndim < 1 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, *) with B >= 1, got {tuple(x1.shape)}")
    if not x1.is_floating_point():
        raise TypeError(f"x1 must be a floating tensor, got dtype {x1.dtype}")
    if y is not None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
        if y.ndim == 0 or y.shape[0] != x1.shape[0]:
            raise ValueError(
                f"y must have one entry per sample: x1 has batch size {x1.shape[0]}, y has shape {tuple(y.shape)}"
            )
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"{x0_name} must be a torch.Tensor or None, got {type(x0).__name__}")
        if x0.shape != x1.shape:
            raise ValueError(f"{x0_name} shape {tuple(x0.shape)} must equal x1 shape {tuple(x1.shape)}")


def _call_model(model: Model, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    out = model(x, t) if y is None else model(x, t, y=y)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return a tensor of the input's shape {tuple(x.shape)}, got {shape}")
    return out


def _times(
    sampler: TimeSampler, t: Tensor | float | None, x1: Tensor, t_min: float, t_max: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Sampled (or given) times clipped to [t_min, t_max], and the importance weights."""
    if t is None:
        tt, w = sampler.sample(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
    else:
        tt = batch_time(t, x1)
        check_time_range(tt)
        w = torch.ones_like(tt)
    return tt.clamp(t_min, t_max), w


def _mean_over_features(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).mean(dim=1)


class GaussianPathLoss:
    r"""Weighted regression of a model on a Gaussian path's conditional target.

    .. math::

        \ell_i = \omega(t_i)\, w_p(t_i)\,\overline{\big(f_\theta(x_{t_i}, t_i) - f^\star_p(x_1, \varepsilon, t_i)\big)^2},
        \qquad x_t = \alpha x_1 + \sigma\varepsilon,

    with :math:`f^\star_p` = ``path.target(prediction, ...)``, :math:`w_p` the weighting on the
    MSE of ``prediction`` (module docstring) and :math:`\omega` the time sampler's importance
    weight. ``loss`` is the batch mean.

    Arguments:
        path: the :class:`~flowdiff.paths.GaussianPath`.
        prediction: what the model outputs: ``"velocity"``, ``"noise"``, ``"data"``,
            ``"score"`` or ``"v"``.
        weighting: ``"none"``, ``"snr"``, ``"min-snr"``, ``"edm"``, ``"likelihood"``, a
            :class:`Weighting`, or a callable ``w(t)`` on the data MSE.
        time_sampler: ``"uniform"`` (on the path's safe interval), ``"logit-normal"``,
            ``"edm"`` or a :class:`TimeSampler`. Times are clipped to ``[path.t_min, path.t_max]``.
        gamma: γ of min-SNR.
        sigma_data: σ_d of the EDM weighting; ``None`` takes ``path.sigma_data`` when the path
            has one (:class:`~flowdiff.paths.EDM`), else 0.5.
        coupling: optional :class:`~flowdiff.couplings.Coupling` applied to
            ``(ε, x1, y)`` before ``x_t`` is formed (minibatch OT flow matching, Tong et al. 2023).

    Call ``loss(model, x1, y=None, x0=None, generator=None, t=None)``: ``x0`` is the noise ε
    (drawn N(0, I) when ``None``); ``t`` fixes the times (no importance weights).
    """

    def __init__(
        self,
        path: GaussianPath,
        prediction: str = "velocity",
        weighting: WeightingLike = "none",
        time_sampler: str | TimeSampler = "uniform",
        gamma: float = 5.0,
        sigma_data: float | None = None,
        coupling: Coupling | None = None,
    ):
        if not isinstance(path, GaussianPath):
            hint = " (use InterpolantLoss for stochastic interpolants)" if isinstance(path, StochasticInterpolant) else ""
            raise TypeError(f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}{hint}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if coupling is not None and not isinstance(coupling, Coupling):
            raise TypeError(f"coupling must be a flowdiff.couplings.Coupling or None, got {type(coupling).__name__}")
        if sigma_data is None:
            sigma_data = float(getattr(path, "sigma_data", 0.5))
        self.path, self.prediction, self.coupling = path, prediction, coupling
        self.weighting = make_weighting(weighting, gamma=gamma, sigma_data=sigma_data)
        self.time_sampler = make_time_sampler(time_sampler, path)

    def __repr__(self) -> str:
        return (f"GaussianPathLoss({self.path!r}, prediction={self.prediction!r}, weighting={self.weighting!r}, "
                f"time_sampler={self.time_sampler!r})")

    def config(self) -> dict:
        """A JSON-serialisable description; :func:`loss_from_config` rebuilds the loss from it."""
        return {
            "name": "GaussianPathLoss",
            "path": self.path.config(),
            "prediction": self.prediction,
            "weighting": self.weighting.config(),
            "time_sampler": self.time_sampler.config(),
            "coupling": None if self.coupling is None else self.coupling.config(),
        }

    def weight(self, t: Tensor) -> Tensor:
        """The weighting :math:`w_p(t)` on this loss's prediction MSE (no importance weight)."""
        return self.weighting.weight(self.path, t, self.prediction)

    def __call__(
        self,
        model: Model,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | float | None = None,
    ) -> LossOutput:
        _check_inputs(model, x1, y, x0, "x0 (the noise)")
        noise = x0 if x0 is not None else torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        if self.coupling is not None:
            noise, x1, y = self.coupling.pair(noise, x1, y, generator)
        path = self.path
        tt, importance = _times(self.time_sampler, t, x1, path.t_min, path.t_max, generator)
        # One float64 evaluation of the schedule per batch through the path's public API, cast
        # back to the batch's dtype; a named weighting reads the same table (the log-SNR columns
        # are computed only when it needs them).
        tt64 = tt.to(torch.float64)
        weighting = self.weighting
        if isinstance(weighting, ScheduleWeighting):
            c = path.table(tt64)
            w = weighting.weight_from_table(c, self.prediction).to(x1.dtype)
        else:
            c = path.coefficients(tt64)
            w = self.weight(tt)
        a, s, da, ds = (expand_like(v.to(x1.dtype), x1) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
        x_t = a * x1 + s * noise
        target = self._target(x1, noise, a, s, da, ds)
        out = _call_model(model, x_t, tt, y)
        per_sample = importance * w * _mean_over_features((out - target) ** 2)
        return LossOutput(per_sample.mean(), per_sample.detach(), tt)

    def _target(self, x1: Tensor, noise: Tensor, a: Tensor, s: Tensor, da: Tensor, ds: Tensor) -> Tensor:
        # Same as path.target, reusing the table's α, σ, α̇, σ̇.
        p = self.prediction
        if p == "noise":
            return noise
        if p == "data":
            return x1
        if p == "v":
            return a * noise - s * x1
        if p == "score":
            return -noise / s
        return da * x1 + ds * noise


class InterpolantLoss:
    r"""The objectives of Albergo, Boffi & Vanden-Eijnden 2023 for a stochastic interpolant.

    For :math:`x_t^\pm = I(t, x_0, x_1) \pm \gamma(t) z` and target :math:`T^\pm` of ``target``
    (``drift`` :math:`\partial_t I \pm \dot\gamma z`, ``velocity`` :math:`\partial_t I`,
    ``score`` :math:`\mp z/\gamma`, ``denoiser`` :math:`\pm z`):

    * ``objective="mse"``: :math:`\ell = \tfrac12\big(\overline{|\hat f(x^+) - T^+|^2} + \overline{|\hat f(x^-) - T^-|^2}\big)`;
    * ``objective="quadratic"``: :math:`\ell = \tfrac12\sum_\pm \overline{\tfrac12|\hat f(x^\pm)|^2 - T^\pm\cdot\hat f(x^\pm)}`
      (the paper's form; equal to :math:`\tfrac12(\text{MSE} - \overline{|T|^2})`, so the same minimiser
      and half the gradient);

    with only the ``+`` term when ``antithetic=False``. Bars are means over features.

    * Two-sided interpolants need ``x0`` from the caller (the base samples).
    * One-sided interpolants (``"one-sided-linear"``, ``"one-sided-trig"``, γ = 0) draw
      ``x0 ~ N(0, I)`` when it is not given; the Gaussian ``x0`` plays the role of ``z``:
      the antithetic pair is :math:`\pm a_0 x_0 + a_1 x_1`, and the score target is
      :math:`-x_0/a_0` (:math:`\nabla\log\rho_t = -E[x_0|x_t]/a_0`). ``denoiser`` is not
      defined there (η = E[z] = 0); use a :class:`GaussianPathLoss` with ``prediction="noise"``.
    * Mirror interpolants use ``x0 = x1`` (a given ``x0`` is ignored).

    Arguments:
        interpolant: the :class:`~flowdiff.paths.StochasticInterpolant`.
        target: ``"drift"`` (b), ``"velocity"`` (v), ``"score"`` (s) or ``"denoiser"`` (η).
        antithetic: average over :math:`I \pm \gamma z` (two model evaluations per sample,
            batched in one call).
        time_sampler: ``"uniform"`` (on ``[interpolant.t_min, interpolant.t_max]``),
            ``"logit-normal"`` or a :class:`TimeSampler`; times are clipped to the safe interval.
        objective: ``"mse"`` or ``"quadratic"``.
        coupling: optional :class:`~flowdiff.couplings.Coupling` applied to ``(x0, x1, y)``
            (not for mirror interpolants).
    """

    def __init__(
        self,
        interpolant: StochasticInterpolant,
        target: str = "drift",
        antithetic: bool = True,
        time_sampler: str | TimeSampler = "uniform",
        objective: str = "mse",
        coupling: Coupling | None = None,
    ):
        if not isinstance(interpolant, StochasticInterpolant):
            hint = " (use GaussianPathLoss for Gaussian paths)" if isinstance(interpolant, GaussianPath) else ""
            raise TypeError(f"interpolant must be a StochasticInterpolant, got {type(interpolant).__name__}{hint}")
        if target not in INTERPOLANT_TARGETS:
            raise ValueError(f"unknown interpolant target {target!r}; valid: {', '.join(INTERPOLANT_TARGETS)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
        if coupling is not None and not isinstance(coupling, Coupling):
            raise TypeError(f"coupling must be a flowdiff.couplings.Coupling or None, got {type(coupling).__name__}")
        if coupling is not None and interpolant.is_mirror:
            raise ValueError("a coupling has no effect on the mirror interpolant (x0 = x1); pass coupling=None")
        no_gamma = interpolant.gamma_fn.name == "zero"
        if interpolant.one_sided and target == "denoiser":
            raise ValueError(
                "target 'denoiser' (η = E[z]) is zero for a one-sided interpolant (γ = 0); valid there: "
                "drift, velocity, score (or use GaussianPathLoss with prediction='noise')"
            )
        if no_gamma and not interpolant.one_sided and target in ("score", "denoiser"):
            raise ValueError(f"target {target!r} needs gamma != 'zero' for the two-sided interpolant; valid: drift, velocity")
        self.interpolant, self.target, self.objective, self.coupling = interpolant, target, objective, coupling
        # With γ ≡ 0 (two-sided) the two antithetic points coincide: one evaluation is the same estimator.
        self.antithetic = antithetic and (interpolant.one_sided or not no_gamma)
        self.time_sampler = make_time_sampler(time_sampler, interpolant)

    def __repr__(self) -> str:
        return (f"InterpolantLoss({self.interpolant!r}, target={self.target!r}, antithetic={self.antithetic!r}, "
                f"objective={self.objective!r}, time_sampler={self.time_sampler!r})")

    def config(self) -> dict:
        """A JSON-serialisable description; :func:`loss_from_config` rebuilds the loss from it."""
        return {
            "name": "InterpolantLoss",
            "interpolant": self.interpolant.config(),
            "target": self.target,
            "antithetic": self.antithetic,
            "objective": self.objective,
            "time_sampler": self.time_sampler.config(),
            "coupling": None if self.coupling is None else self.coupling.config(),
        }

    def __call__(
        self,
        model: Model,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | float | None = None,
    ) -> LossOutput:
        it = self.interpolant
        _check_inputs(model, x1, y, None if it.is_mirror else x0, "x0")
        if it.is_mirror:
            x0 = x1
        elif x0 is None:
            if not it.one_sided:
                raise ValueError(
                    f"x0 (the base samples) is required for the two-sided interpolant {it.interpolant!r}; "
                    "only one-sided interpolants draw x0 ~ N(0, I) themselves"
                )
            x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        if self.coupling is not None:
            x0, x1, y = self.coupling.pair(x0, x1, y, generator)
        tt, importance = _times(self.time_sampler, t, x1, it.t_min, it.t_max, generator)

        if it.one_sided:
            a0, a1, d0, d1 = (expand_like(c, x1) for c in it.coefficients(tt))
            points = [a0 * x0 + a1 * x1]
            targets = [self._one_sided_target(x0, x1, a0, d0, d1, sign=1.0)]
            if self.antithetic:
                points.append(-a0 * x0 + a1 * x1)
                targets.append(self._one_sided_target(x0, x1, a0, d0, d1, sign=-1.0))
        else:
            sample = it.sample(x0, x1, tt, generator=generator)
            points = [sample.x_t]
            targets = [it.target(self.target, sample)]
            if self.antithetic:
                points.append(sample.x_t_antithetic)
                targets.append(it.target(self.target, sample, antithetic=True))

        n = len(points)
        x_in = torch.cat(points) if n > 1 else points[0]
        t_in = tt.repeat(n) if n > 1 else tt
        y_in = None if y is None else (torch.cat([y] * n) if n > 1 else y)
        out = _call_model(model, x_in, t_in, y_in)
        terms = []
        for k, (f, target) in enumerate(zip(out.chunk(n), targets)):
            if self.objective == "mse":
                terms.append(_mean_over_features((f - target) ** 2))
            else:
                terms.append(_mean_over_features(0.5 * f * f - target * f))
        per_sample = importance * (sum(terms) / n)
        return LossOutput(per_sample.mean(), per_sample.detach(), tt)

    def _one_sided_target(self, x0: Tensor, x1: Tensor, a0: Tensor, d0: Tensor, d1: Tensor, sign: float) -> Tensor:
        # The Gaussian x0 is the noise: drift = velocity = ∂ₜI, score = −x0/a0 (with x0 → −x0 for the twin).
        if self.target == "score":
            return -sign * x0 / a0
        return sign * d0 * x0 + d1 * x1


def loss_from_config(config: dict) -> GaussianPathLoss | InterpolantLoss:
    """Rebuild a loss from the dict written by its ``config()`` method (e.g. from a checkpoint)."""
    from ..couplings import coupling_from_config
    from ..paths import path_from_config

    cfg = dict(config)
    name = cfg.pop("name", None)
    coupling = None if cfg.get("coupling") is None else coupling_from_config(cfg["coupling"])
    if name == "GaussianPathLoss":
        path = path_from_config(cfg["path"])
        if not isinstance(path, GaussianPath):
            raise ValueError(f"a GaussianPathLoss config needs a Gaussian path, got {cfg['path'].get('name')!r}")
        return GaussianPathLoss(
            path, cfg["prediction"], make_weighting(cfg["weighting"]),
            time_sampler_from_config(cfg["time_sampler"], path), coupling=coupling,
        )
    if name == "InterpolantLoss":
        interpolant = path_from_config(cfg["interpolant"])
        if not isinstance(interpolant, StochasticInterpolant):
            raise ValueError("an InterpolantLoss config needs a StochasticInterpolant")
        return InterpolantLoss(
            interpolant, cfg["target"], antithetic=cfg["antithetic"],
            time_sampler=time_sampler_from_config(cfg["time_sampler"], interpolant),
            objective=cfg["objective"], coupling=coupling,
        )
    raise ValueError(f"unknown loss config name {name!r}; valid: GaussianPathLoss, InterpolantLoss")
