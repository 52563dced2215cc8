r"""Calibration sets for post-training quantisation of a diffusion network.

Activation ranges drift with the time step, so where the calibration inputs come from decides
how well a quantised network holds up over the whole trajectory. Every strategy here runs the
**full-precision sampler from noise** (``fd.sample``) and records each model call's exact input
``(x_t, t)``: the generation distribution, not :math:`q(x_t \mid x_1)`, and every :math:`x_t` paired
with the :math:`t` it was evaluated at. (PTQ4DM's released ``backward_t_calib_data_generator``
matches the drawn integer against the reverse loop's *iteration counter* but feeds it to the model
as the timestep, so its pairs appear mismatched — notes/modalities.md §5.2; here the pair is the
call itself.)

With ``K`` recorded calls (call 0 at the noise end) and ``M`` trajectories, each trajectory
contributes one pair:

* ``"single"``: every pair at one call, the middle one (``K // 2``) by default — naive PTQ.
* ``"ndtc"`` (PTQ4DM, Shang et al., CVPR 2023, "Post-training Quantization on Diffusion Models"):
  normally distributed time-step calibration. PTQ4DM draws the DDPM index
  :math:`k \sim N(\mu T, \sigma T)` (:math:`\mu = \sigma = 0.4`), clipped to :math:`[0, T-1]`, where
  :math:`k = T - 1` is pure noise: a fraction :math:`u = k/T` of the way from the data end. Here
  :math:`u \sim N(\mu, \sigma)` clipped to :math:`[0, 1]` picks call :math:`\mathrm{round}((1-u)(K-1))`.
* ``"uniform"`` (Q-Diffusion, Li et al., ICCV 2023): ``steps`` uniformly spaced calls, the
  trajectories dealt out evenly among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Any

import torch
from torch import Tensor, nn

from flowdiff._utils import check_float, check_int
from flowdiff.fields import Field

__all__ = ["CALIBRATIONS", "CalibrationSet", "calibration_set", "record_trajectory"]

#: The strategy names :func:`calibration_set` accepts.
CALIBRATIONS = ("single", "ndtc", "uniform")


@dataclass
class CalibrationSet:
    """Model inputs for calibration: ``x`` ``(N, *shape)``, ``t`` ``(N,)`` and keyword conditioning rows."""

    x: Tensor
    t: Tensor
    cond: dict[str, Tensor] = dataclass_field(default_factory=dict)
    strategy: str = "given"

    def __len__(self) -> int:
        return self.x.shape[0]

    def chunks(self, size: int) -> Any:
        """``(x, t, cond)`` in chunks of ``size`` rows."""
        for start in range(0, len(self), size):
            stop = start + size
            yield self.x[start:stop], self.t[start:stop], {k: v[start:stop] for k, v in self.cond.items()}


class _Recorder(nn.Module):
    """Calls the model and keeps each call's ``(x, t, cond)``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[Tensor, Tensor, dict]] = []

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        self.calls.append((x.detach().clone(), t.detach().clone(),
                           {k: v.detach().clone() for k, v in cond.items() if isinstance(v, Tensor)}))
        return self.model(x, t, **cond)


@torch.no_grad()
def record_trajectory(field: Field, shape: tuple[int, ...], count: int, *, solver: str | None = None, nfe: int = 50,
                      seed: int = 0, cond: dict | None = None) -> list[tuple[Tensor, Tensor, dict]]:
    """Sample ``count`` trajectories with the full-precision sampler and return every model call's inputs."""
    count = check_int("num_samples", count, 1)
    recorder = _Recorder(field.model)
    parameters = [p for p in field.model.parameters()] if isinstance(field.model, nn.Module) else []
    device = parameters[0].device if parameters else torch.device("cpu")
    dtype = parameters[0].dtype if parameters else torch.get_default_dtype()
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = field.path.prior_sample((count, *shape), generator=generator, dtype=torch.float32, device=device).to(dtype)
    from flowdiff.solvers import sample

    sample(Field(recorder, field.path, field.prediction), noise, solver=solver, nfe=nfe, generator=generator, cond=cond)
    return recorder.calls


def calibration_set(field: Field, shape: tuple[int, ...], strategy: str = "ndtc", *, num_samples: int = 256,
                    solver: str | None = None, nfe: int = 50, seed: int = 0, mean: float = 0.4, std: float = 0.4,
                    steps: int = 16, call: int | None = None, cond: dict | None = None) -> CalibrationSet:
    """``num_samples`` calibration pairs ``(x_t, t)`` from the full-precision sampler's own trajectories.

    Arguments:
        field: the full-precision model.
        shape: one sample's shape.
        strategy: ``"single"``, ``"ndtc"`` or ``"uniform"`` (module docstring).
        num_samples: trajectories sampled (one pair each).
        solver, nfe: the sampler (``fd.sample``'s names).
        mean, std: NDTC's normal over the fraction of the way from the data end.
        steps: the number of calls ``"uniform"`` spreads over.
        call: the call ``"single"`` uses (default the middle one).
        cond: conditioning passed to the sampler (rows per trajectory).
    """
    if strategy not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {strategy!r}; valid: {', '.join(CALIBRATIONS)} "
                         f"(or a CalibrationSet / (x, t) pair)")
    mean = check_float("mean", mean)
    std = check_float("std", std, 0.0)
    calls = record_trajectory(field, shape, num_samples, solver=solver, nfe=nfe, seed=seed, cond=cond)
    count, rows = len(calls), calls[0][0].shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    if strategy == "single":
        index = torch.full((rows,), count // 2 if call is None else check_int("call", call, 0, count - 1))
    elif strategy == "ndtc":
        fraction = (mean + std * torch.randn(rows, generator=generator, dtype=torch.float64)).clamp(0.0, 1.0)
        index = torch.round((1 - fraction) * (count - 1)).long()
    else:
        steps = check_int("steps", steps, 1)
        grid = torch.linspace(0, count - 1, min(steps, count)).round().long()
        index = grid[torch.randperm(rows, generator=generator) % len(grid)]
    row = torch.arange(rows)
    x = torch.stack([c[0] for c in calls])[index, row]
    t = torch.stack([c[1] for c in calls])[index, row]
    keys = calls[0][2].keys()
    conditions = {k: torch.stack([c[2][k] for c in calls])[index, row] for k in keys}
    return CalibrationSet(x, t, conditions, strategy)
