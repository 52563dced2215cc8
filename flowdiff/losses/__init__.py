r"""Training objectives: regression losses on Gaussian paths and stochastic interpolants.

Every loss object is called the same way, so the Trainer never branches on the family::

    out = loss(model, x1, y=None, x0=None, generator=None)   # -> LossOutput(loss, per_sample, t)
    out.loss.backward()

``model(x_t, t)`` (or ``model(x_t, t, y=y)`` when labels are given) receives ``t`` of shape
``(B,)``. ``per_sample`` (shape ``(B,)``, detached) is each sample's weighted loss, for
logging against ``t``; no sample is ever coupled to another through a batch statistic.

A loss is three parts, one module each:

* :mod:`~flowdiff.losses.objectives` — what is regressed on what:
  :class:`GaussianPathLoss` (the conditional target of a prediction type on
  :math:`x_t = \alpha x_1 + \sigma\varepsilon`; Vincent 2011, Ho et al. 2020, Lipman et al. 2023)
  and :class:`InterpolantLoss` (the objectives of Albergo, Boffi & Vanden-Eijnden 2023 for
  :math:`x_t = I(t, x_0, x_1) + \gamma(t) z`), with :func:`loss_from_config`;
* :mod:`~flowdiff.losses.weightings` — :math:`w(t)`, defined once on the data-prediction MSE and
  converted exactly to any prediction (``snr``, ``min-snr``, ``edm``, ``likelihood``, ``none``);
* :mod:`~flowdiff.losses.time_samplers` — the distribution of :math:`t` (uniform,
  logit-normal, EDM's log-normal noise levels, importance sampling with unbiased weights).

.. math::

    \mathcal L = E_{t, x_1, \varepsilon}\big[w(t)\,\overline{(f_\theta(x_t, t) - f^\star)^2}\big].
"""

from .objectives import (
    OBJECTIVES,
    GaussianPathLoss,
    InterpolantLoss,
    LossOutput,
    Model,
    available_interpolant_targets,
    available_objectives,
    loss_from_config,
)
from .time_samplers import (
    TIME_SAMPLERS,
    EDMTime,
    ImportanceTime,
    LogitNormalTime,
    TimeSampler,
    UniformTime,
    available_time_samplers,
    make_time_sampler,
    time_sampler_from_config,
)
from .weightings import (
    WEIGHTINGS,
    CustomWeighting,
    EDMWeighting,
    LikelihoodWeighting,
    MinSNRWeighting,
    NoWeighting,
    SNRWeighting,
    ScheduleWeighting,
    Weighting,
    WeightingLike,
    available_predictions,
    available_weightings,
    error_scale,
    make_weighting,
)

__all__ = [
    "OBJECTIVES",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "CustomWeighting",
    "EDMTime",
    "EDMWeighting",
    "GaussianPathLoss",
    "ImportanceTime",
    "InterpolantLoss",
    "LikelihoodWeighting",
    "LogitNormalTime",
    "LossOutput",
    "MinSNRWeighting",
    "NoWeighting",
    "SNRWeighting",
    "ScheduleWeighting",
    "TimeSampler",
    "UniformTime",
    "Weighting",
    "available_interpolant_targets",
    "available_objectives",
    "available_predictions",
    "available_time_samplers",
    "available_weightings",
    "error_scale",
    "loss_from_config",
    "make_time_sampler",
    "make_weighting",
    "time_sampler_from_config",
]
