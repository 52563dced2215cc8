r"""A flowdiff solver where diffusers expects a scheduler.

diffusers' pipelines drive the sampling loop themselves::

    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, ...).sample
        x = scheduler.step(out, t, x).prev_sample

:class:`FlowdiffScheduler` answers that protocol with one of flowdiff's solvers, so that any
pipeline (``DDPMPipeline``, ``StableDiffusionPipeline``, …) samples with, say, UniPC, DEIS or
DPM-Solver++ on flowdiff's grids: ``pipe.scheduler = FlowdiffScheduler.from_scheduler(pipe.scheduler,
"unipc")``. With ``n`` model calls the solver runs ``n − 1`` steps on its own default grid from
the path's ``t_min`` to ``t_max`` (``fd.sample(field, x, solver, nfe=n)``'s plan), and the ``n``-th
call is the final denoise: ``step`` then returns :math:`\hat x` at ``t_max``. Each ``step`` turns
the network's output into the field's prediction (:mod:`flowdiff.interop.diffusers`: time map,
prediction type, flow sign) and hands it to the solver as that node's one evaluation, so the
result equals ``fd.sample(from_diffusers(unet, scheduler), x, solver, nfe=n)`` on the same noise.

Only solvers that make exactly one model call per grid step fit this protocol (the multistep
exponential solvers, UniPC, DEIS, DDIM/DDPM, Euler, SDE-DPM-Solver++); the others (Heun, RK4,
singlestep DPM-Solver, adaptive solvers) need several calls between two of the pipeline's, and
are refused with the list of those that fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..fields import Field
from ..solvers import Hooks, available, get_solver
from ..solvers.loop import Run, plan
from .diffusers import DiffusersModel, _config, _is_flow, _num_train_timesteps, path_from_scheduler

__all__ = ["FlowdiffScheduler", "FlowdiffSchedulerOutput", "one_call_solvers"]


@dataclass
class FlowdiffSchedulerOutput:
    """What ``step`` returns (diffusers' ``SchedulerOutput`` fields): the next state and :math:`\\hat x`."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class _Config(dict):
    """A dict whose keys also read as attributes (how pipelines read ``scheduler.config``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def one_call_solvers() -> list[str]:
    """flowdiff solvers that make one model call per grid step: those a pipeline can drive."""
    out = []
    for name in available():
        spec = get_solver(name)
        if not spec.adaptive and spec.evals_per_step == 1:
            out.append(name)
    return out


class _Replay:
    """The model of the scheduler's field: it returns the network output handed to ``step``, once."""

    def __init__(self) -> None:
        self.pending: Tensor | None = None

    def __call__(self, x: Tensor, timestep: Tensor, **cond: Any) -> Tensor:
        if self.pending is None:
            raise RuntimeError("the solver asked for a second model evaluation within one scheduler step")
        out, self.pending = self.pending, None
        return out


class FlowdiffScheduler:
    r"""A flowdiff solver behind diffusers' scheduler protocol (module docstring).

    Arguments:
        scheduler_config: the model's diffusers scheduler or its config (the path, the prediction
            type and ``num_train_timesteps`` come from it, as in :func:`~flowdiff.interop.from_diffusers`).
        solver: a name from :func:`one_call_solvers` (default ``"dpm-solver++"``).
        grid: a flowdiff grid kind (default: the solver's); ``grid_options`` for it (``shift``, ``rho``).
        t_start, t_end: the grid's ends, default the path's safe interval (a flow-matching model's
            starts at pure noise, ``t = 0``, where the exponential solvers need ``t_start > 0``).
        **options: solver options (``order``, ``lower_order_final``, ``eta`` …).

    Attributes diffusers reads: ``timesteps`` (the network's timesteps at the grid nodes, after
    :meth:`set_timesteps`), ``init_noise_sigma = 1``, ``order = 1``, ``config``.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, scheduler_config: Any, solver: str = "dpm-solver++", grid: str | None = None,
                 grid_options: dict | None = None, prediction: str | None = None, t_start: float | None = None,
                 t_end: float | None = None, **options: Any):
        from .diffusers import from_diffusers

        config, class_name = _config(scheduler_config)
        self._replay = _Replay()
        self.field: Field = from_diffusers(self._replay, scheduler_config, prediction=prediction)
        self.path = self.field.path
        self.spec = get_solver(solver)
        fits = one_call_solvers()
        if self.spec.name not in fits and solver not in fits:
            raise ValueError(f"solver {solver!r} makes more than one model call per step, which a diffusers pipeline "
                             f"cannot drive; valid: {', '.join(fits)}")
        self.options = self.spec.resolve(options)
        self.solver, self.grid, self.grid_options = solver, grid, dict(grid_options or {})
        self.t_start = float(self.path.t_min) if t_start is None else check_float("t_start", t_start, self.path.t_min, 1.0)
        self.t_end = float(self.path.t_max) if t_end is None else check_float("t_end", t_end, 0.0, self.path.t_max)
        if not self.t_start < self.t_end:
            raise ValueError(f"need t_start < t_end, got t_start={self.t_start!r}, t_end={self.t_end!r}")
        self.config = _Config({**config, "_class_name": type(self).__name__, "solver": solver, "grid": grid,
                               "solver_options": dict(options)})
        self.num_train_timesteps = _num_train_timesteps(config)
        self._flow = _is_flow(config, class_name)
        self.timesteps: Tensor | None = None
        self.times: list[float] = []
        self.num_inference_steps: int | None = None
        self._index = 0
        self._run: Run | None = None
        self._stepper: Any = None

    @classmethod
    def from_scheduler(cls, scheduler: Any, solver: str = "dpm-solver++", **kwargs: Any) -> FlowdiffScheduler:
        """The flowdiff solver ``solver`` for the model that ``scheduler`` (a diffusers scheduler) was made for."""
        return cls(scheduler, solver, **kwargs)

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return f"FlowdiffScheduler(solver={self.solver!r}, path={self.path!r}, prediction={self.field.prediction!r})"

    # ----- the protocol --------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_: Any) -> None:
        """Plan ``num_inference_steps`` model calls: ``num_inference_steps − 1`` solver steps and the final denoise."""
        n = check_int("num_inference_steps", num_inference_steps, 2)
        planned = plan(self.spec, self.options, self.field, n, self.grid, self.t_start, self.t_end, True,
                       self.grid_options)
        self.times = planned.times.tolist()
        if len(self.times) != n:
            raise ValueError(f"solver {self.solver!r} plans {len(self.times) - 1} steps for nfe={n}; it needs one "
                             "model call per step")
        self._budget = planned.budget
        stamp = DiffusersModel(self._replay, self.num_train_timesteps, flow=self._flow)
        self.timesteps = stamp.timestep(torch.tensor(self.times, dtype=torch.float32)).to(device)
        self.num_inference_steps = n
        self._index, self._run, self._stepper = 0, None, None

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The network takes the state as it is (flowdiff's states are not rescaled)."""
        return sample

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, **_: Any) -> FlowdiffSchedulerOutput | tuple[Tensor, ...]:
        """One solver step from the network's output at the current node (the last call: the final denoise)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i, last = self._index, len(self.times) - 1
        if i > last:
            raise ValueError(f"step() called {i + 1} times after set_timesteps({self.num_inference_steps})")
        if self._run is None:
            self._run = Run(self.solver, self.field, self.times, self._budget, {}, generator, Hooks(), sample)
            self._stepper = self.spec.cls(self._run, self.options)
        self._replay.pending = model_output
        x = sample
        if i == last:
            final = None
            if self.spec.final_denoise:
                x = self._stepper.revise(i, x)
                final = self._stepper.final_denoised
            if final is None:
                final = self._run.evaluate_at(x, self.times[-1])[0]
            out, denoised = final, final
        else:
            if i:
                x = self._stepper.revise(i, x)
            out, denoised = self._stepper.step(i, x)
        self._replay.pending = None
        self._index += 1
        return FlowdiffSchedulerOutput(out, denoised) if return_dict else (out, denoised)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        r""":math:`\alpha x_0 + \sigma\varepsilon` at the network timesteps ``timesteps`` (image-to-image pipelines)."""
        j = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        n = self.num_train_timesteps
        t = 1 - j / n if self._flow else 1 - (j + 1) / n
        table = self.path.table(t.clamp(float(self.path.t_min), float(self.path.t_max)))
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = table.alpha.to(original_samples).view(shape)
        s = table.sigma.to(original_samples).view(shape)
        return a * original_samples + s * noise
