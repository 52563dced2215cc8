"""Interoperability: models trained elsewhere, as flowdiff fields.

>>> field = fd.interop.from_diffusers(unet, scheduler)                      # doctest: +SKIP
>>> res = fd.sample(field, noise, **fd.interop.sample_kwargs(scheduler, 25))  # doctest: +SKIP
>>> pipe.scheduler = fd.interop.FlowdiffScheduler(pipe.scheduler, "unipc")    # doctest: +SKIP

See :mod:`flowdiff.interop.diffusers` for the mathematics (the time maps, the prediction types),
:mod:`flowdiff.interop.scheduler` for flowdiff's solvers inside diffusers' pipelines, and docs/interop.md for a walk-through. ``diffusers`` itself is not imported: models, schedulers
and pipelines are read through their public attributes (``config``, ``timesteps``, ``sigmas``).
"""

from __future__ import annotations

from .diffusers import (
    DIFFUSERS_BETA_SCHEDULES,
    DIFFUSERS_PREDICTIONS,
    DiffusersModel,
    alphas_cumprod,
    from_diffusers,
    path_from_scheduler,
    sample_kwargs,
    scheduler_grid,
)
from .scheduler import FlowdiffScheduler, FlowdiffSchedulerOutput, one_call_solvers

__all__ = [
    "DIFFUSERS_BETA_SCHEDULES", "DIFFUSERS_PREDICTIONS", "DiffusersModel", "alphas_cumprod", "from_diffusers",
    "path_from_scheduler", "sample_kwargs", "scheduler_grid", "FlowdiffScheduler", "FlowdiffSchedulerOutput",
    "one_call_solvers",
]
