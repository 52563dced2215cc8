r"""Training flow maps: consistency distillation, consistency training and self-consistent two-time maps.

All three draw :math:`x_1` from the data, :math:`\varepsilon \sim N(0, I)` and grid nodes
:math:`\tau_0 < \dots < \tau_N` of ``[t_start, t_end]`` (noise → data), put
:math:`x_{\tau_n} = \alpha_{\tau_n}x_1 + \sigma_{\tau_n}\varepsilon` on the path, and regress the
student on a target built without gradient (:math:`\theta^-`: the current weights under stop-grad,
as in Song & Dhariwal 2023 "Improved Techniques for Training Consistency Models", or their EMA
with ``target_ema > 0``, as in Song et al. 2023):

* :func:`consistency_distillation` (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
  Algorithm 2): :math:`\hat x_{\tau_{n+1}}` = one step of the **teacher's ODE solver** (any name of
  :func:`flowdiff.solvers.available`, ``substeps`` steps per interval) from :math:`x_{\tau_n}`;
  loss :math:`d\big(f_\theta(x_{\tau_n}, \tau_n),\ f_{\theta^-}(\hat x_{\tau_{n+1}}, \tau_{n+1})\big)`,
  where :math:`f(x, s) = X_{s\to t_{end}}(x)` (for a two-time student, the map to ``t_end``).
* :func:`consistency_training` (Song et al. 2023, Algorithm 3; the improved recipe of Song &
  Dhariwal 2023: pseudo-Huber loss, stop-grad target, ``N`` doubling during training): no
  teacher; :math:`x_{\tau_{n+1}} = \alpha_{\tau_{n+1}}x_1 + \sigma_{\tau_{n+1}}\varepsilon` with the
  same :math:`(x_1, \varepsilon)` (the one-sample estimate of the ODE step).
* :func:`flow_map_distillation` — a two-time map :math:`X_{s\to t}` by **self-consistency**
  (the semigroup property :math:`X_{u\to t}\circ X_{s\to u} = X_{s\to t}`; Frans, Hafner, Levine &
  Abbeel 2025, "One Step Diffusion via Shortcut Models"; Boffi, Albergo & Vanden-Eijnden 2025,
  "How to build a consistency model: learning flow maps via self-distillation"): jumps of
  :math:`2^m` grid intervals, ``m = 0 … log2 N`` drawn uniformly; a jump ``i → j`` with
  ``m ≥ 1`` is regressed on :math:`X_{\theta^-}(\cdot, u \to j)\circ X_{\theta^-}(\cdot, i \to u)`,
  ``u = (i + j)/2``; a single interval (``m = 0``) on the teacher's solver step — or, with
  ``teacher=None``, on the model's own DDIM step with its diagonal data prediction
  :math:`g_{\theta^-}(x, s, s)`, which is itself trained by the denoising (flow-matching)
  regression :math:`\lVert g_\theta(x_s, s, s) - x_1\rVert^2` (shortcut models' teacher-free recipe).

Every function returns a :class:`FlowMapTraining` with the trained model, the loss curve and
the cost (CPU seconds of this process, wall seconds, teacher model calls).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..fields import Field
from ..solvers import make_grid, validate_grid
from ..solvers import sample as solve
from ..train import NonFiniteLossError
from .model import FlowMap

__all__ = ["FlowMapTraining", "LOSSES", "OBJECTIVES", "TARGET_SUBSTEPS", "consistency_distillation", "consistency_training",
           "direct_target_substeps", "flow_map_distillation"]

#: Objectives of :func:`flow_map_distillation`.
OBJECTIVES = ("self-consistency", "direct")
#: Distances ``d(prediction, target)``.
LOSSES = ("l2", "pseudo-huber")

Data = Tensor | Callable[[int, torch.Generator], Any]


@dataclass
class FlowMapTraining:
    """What a training function returns.

    Attributes:
        model: the trained :class:`~flowdiff.flowmaps.FlowMap` (the student object, trained in place;
            its ``grid`` attribute is the training grid, which :func:`~flowdiff.flowmaps.sample` uses).
        method: ``"consistency-distillation"``, ``"consistency-training"``, ``"flow-map-distillation"``
            or ``"flow-map-training"`` (no teacher).
        losses: the loss of every update.
        grid: the final training grid (float64, ``N + 1`` times).
        cpu_seconds, wall_seconds: process CPU time and wall time of the training.
        teacher_nfe: teacher model calls (0 without a teacher).
    """

    model: FlowMap
    method: str
    losses: list[float]
    grid: Tensor
    cpu_seconds: float
    wall_seconds: float
    teacher_nfe: int = 0
    options: dict = field(default_factory=dict)


class _Draws:
    """Draws ``(x_1, cond)`` batches from a tensor (with optional labels) or a callable."""

    def __init__(self, data: Data, labels: Tensor | None, dtype: torch.dtype, device: torch.device):
        if isinstance(data, Tensor):
            if not data.is_floating_point() or data.ndim < 2 or data.shape[0] < 1:
                raise TypeError(f"data must be a floating-point tensor (N, *shape) with N >= 1, got dtype {data.dtype}, "
                                f"shape {tuple(data.shape)}")
            if not bool(torch.isfinite(data).all()):
                raise ValueError(f"data has {int((~torch.isfinite(data)).sum())} non-finite entries")
            if labels is not None:
                if not isinstance(labels, Tensor) or labels.shape != (data.shape[0],):
                    raise ValueError(f"labels must be a tensor of shape ({data.shape[0]},) (one per data row), got "
                                     f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        elif callable(data):
            if labels is not None:
                raise ValueError("labels go with a data tensor; a data callable returns (x, cond) itself")
        else:
            raise TypeError(f"data must be a tensor (N, *shape) or a callable data(batch, generator), got {type(data).__name__}")
        self.data, self.labels, self.dtype, self.device = data, labels, dtype, device

    def __call__(self, batch: int, generator: torch.Generator) -> tuple[Tensor, dict]:
        if isinstance(self.data, Tensor):
            idx = torch.randint(self.data.shape[0], (batch,), generator=generator)
            x = self.data[idx.to(self.data.device)]
            cond = {} if self.labels is None else {"y": self.labels[idx.to(self.labels.device)].to(self.device)}
        else:
            out = self.data(batch, generator)
            x, cond = out if isinstance(out, tuple) else (out, {})
            if not isinstance(x, Tensor) or x.shape[0] != batch:
                raise ValueError(f"data(batch, generator) must return a tensor of batch {batch} (or (tensor, cond)), got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return x.to(device=self.device, dtype=self.dtype), dict(cond)


def _model_dtype(model: FlowMap, data: Data) -> tuple[torch.dtype, torch.device]:
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params:
        return params[0].dtype, params[0].device
    if isinstance(data, Tensor):
        return data.dtype, data.device
    return torch.get_default_dtype(), torch.device("cpu")


def _select(cond: dict, index: Tensor, batch: int) -> dict:
    return {k: (v[index] if isinstance(v, Tensor) and v.ndim and v.shape[0] == batch else v) for k, v in cond.items()}


def _check_student(student: FlowMap, teacher: Field | None, x: Tensor, cond: dict, two_time_needed: bool) -> None:
    """A clear error when the student cannot take the teacher's data or returns another shape."""
    if not isinstance(student, FlowMap):
        raise TypeError(f"student must be a fd.flowmaps.FlowMap, got {type(student).__name__}")
    if two_time_needed and not student.two_time:
        raise ValueError("flow_map_distillation trains a two-time map X_{s->t}; got a consistency model (two_time=False)")
    s = student.t_start
    probe, pc = x[:2], _select(cond, torch.arange(min(2, x.shape[0]), device=x.device), x.shape[0])
    if teacher is not None:
        if not isinstance(teacher, Field):
            raise TypeError(f"teacher must be a fd.Field on a Gaussian path, got {type(teacher).__name__}")
        if type(teacher.path) is not type(student.path) or repr(teacher.path) != repr(student.path):
            raise ValueError(f"the student's path {student.path!r} differs from the teacher's {teacher.path!r}")
        with torch.no_grad():
            try:
                out = teacher.predict(probe, s, **pc)
            except (ValueError, TypeError, RuntimeError) as error:
                raise ValueError(f"the teacher does not accept the data of shape {tuple(x.shape[1:])}: {error}") from None
        if out.shape != probe.shape:
            raise ValueError(f"the teacher returns shape {tuple(out.shape[1:])} for data of shape {tuple(x.shape[1:])}")
    with torch.no_grad():
        try:
            y = student(probe, s, student.t_end, **pc)
        except (ValueError, TypeError, RuntimeError) as error:
            what = "the teacher's data" if teacher is not None else "the data"
            raise ValueError(f"the student does not match {what} of shape {tuple(x.shape[1:])} "
                             f"(a student of a different shape than the teacher?): {error}") from None
    if y.shape != probe.shape:
        raise ValueError(f"the student returns shape {tuple(y.shape[1:])} for data of shape {tuple(x.shape[1:])}")


class _Loop:
    """Optimiser, cosine learning-rate decay, gradient clipping, stop-grad/EMA target, costs."""

    def __init__(self, student: FlowMap, data: Data, labels: Tensor | None, steps: int, batch_size: int, lr: float,
                 loss: str, huber_c: float | None, target_ema: float, grad_clip: float | None, seed: int,
                 callback: Callable[[int, float], None] | None):
        self.steps = check_int("steps", steps, 1)
        self.batch = check_int("batch_size", batch_size, 2)
        lr = check_float("lr", lr, 0.0, low_open=True)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.target_ema = check_float("target_ema", target_ema, 0.0, 1.0, high_open=True)
        self.grad_clip = None if grad_clip is None else check_float("grad_clip", grad_clip, 0.0, low_open=True)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable(step, loss), got {type(callback).__name__}")
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        self.student, self.params, self.loss_kind, self.callback = student, params, loss, callback
        self.dtype, self.device = _model_dtype(student, data)
        self.draw = _Draws(data, labels, self.dtype, self.device)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, self.steps) / self.steps)))
        self.target = copy.deepcopy(student).requires_grad_(False) if self.target_ema > 0 else student
        self.huber_c = huber_c
        self.losses: list[float] = []
        self.teacher_nfe = 0
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def randn(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def randint(self, high: int | Tensor, size: int) -> Tensor:
        """Uniform integers in ``[0, high)`` (``high`` may be a per-sample tensor)."""
        if isinstance(high, Tensor):
            return (torch.rand(size, generator=self.generator, dtype=torch.float64) * high.double()).long().clamp_max(high - 1)
        return torch.randint(high, (size,), generator=self.generator)

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-sample distance (mean over the sample's entries for l2; iCT's pseudo-Huber on the norm)."""
        diff = (pred - target).flatten(1)
        if self.loss_kind == "l2":
            return diff.pow(2).mean(1)
        c = 0.00054 * math.sqrt(diff.shape[1]) if self.huber_c is None else self.huber_c
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c

    def update(self, step: int, loss: Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(step + 1, "loss", value, None)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            if not math.isfinite(float(norm)):
                raise NonFiniteLossError(step + 1, "grad_norm", float(norm), None)
        self.optimizer.step()
        self.scheduler.step()
        if self.target is not self.student:
            with torch.no_grad():
                for p_t, p in zip(self.target.parameters(), self.student.parameters()):
                    p_t.lerp_(p.detach(), 1.0 - self.target_ema)
        self.losses.append(value)
        if self.callback is not None:
            self.callback(step, value)

    def result(self, method: str, grid: Tensor, options: dict) -> FlowMapTraining:
        self.student.grid = grid.clone()  # what flowmaps.sample uses by default
        self.student.nfe = 0
        return FlowMapTraining(self.student, method, self.losses, grid, time.process_time() - self.cpu0,
                               time.perf_counter() - self.wall0, self.teacher_nfe, options)


def _grid(student: FlowMap, bins: int, grid: str | Sequence[float] | Tensor) -> Tensor:
    if isinstance(grid, str):
        return make_grid(student.path, grid, bins, student.t_start, student.t_end)
    g = validate_grid(grid, student.t_start, student.t_end)
    if len(g) != bins + 1:
        raise ValueError(f"an explicit grid must have bins + 1 = {bins + 1} times, got {len(g)}")
    return g


def _on_path(path: Any, x1: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    c = path.table(t)
    shape = (-1,) + (1,) * (x1.ndim - 1)
    a = c.alpha.to(x1.dtype).to(x1.device).reshape(shape)
    s = c.sigma.to(x1.dtype).to(x1.device).reshape(shape)
    return a * x1 + s * eps


class _TeacherStep:
    """One ODE step of the teacher over grid interval ``n`` by a library solver, grouped by interval."""

    def __init__(self, teacher: Field, solver: str, substeps: int, options: dict):
        from ..solvers import available

        if solver not in available():
            raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(available())}")
        self.teacher, self.solver = teacher, solver
        self.substeps = check_int("substeps", substeps, 1)
        self.options = dict(options)

    def __call__(self, loop: _Loop, x: Tensor, n: Tensor, grid: Tensor, cond: dict) -> Tensor:
        out = torch.empty_like(x)
        batch = x.shape[0]
        for b in torch.unique(n).tolist():
            sel = (n == b).nonzero().squeeze(1)
            s, t = float(grid[b]), float(grid[b + 1])
            times = make_grid(self.teacher.path, "logsnr", self.substeps, s, t) if self.substeps > 1 else [s, t]
            res = solve(self.teacher, x[sel.to(x.device)], solver=self.solver, grid=times, denoise_final=False,
                        cond=_select(cond, sel.to(x.device), batch), **self.options)
            loop.teacher_nfe += res.nfe
            out[sel.to(x.device)] = res.state
        return out


def _bins_for_groups(loop: _Loop, bins: int, groups: int | None, size: int) -> Tensor:
    """Per-sample interval indices; with ``groups``, from ``groups`` distinct intervals drawn for this update."""
    if groups is None or groups >= bins:
        return loop.randint(bins, size)
    chosen = torch.randperm(bins, generator=loop.generator)[:groups]
    return chosen[loop.randint(groups, size)]


def _consistency(student: FlowMap, data: Data, teacher: Field | None, *, labels: Tensor | None, steps: int,
                 batch_size: int, lr: float, bins: int | tuple[int, int], grid: Any, solver: str, substeps: int,
                 groups: int | None, loss: str, huber_c: float | None, target_ema: float, grad_clip: float | None,
                 seed: int, callback: Any, solver_options: dict) -> FlowMapTraining:
    loop = _Loop(student, data, labels, steps, batch_size, lr, loss, huber_c, target_ema, grad_clip, seed, callback)
    if isinstance(bins, tuple):
        if len(bins) != 2:
            raise ValueError(f"bins must be an int or (start, end), got {bins!r}")
        n0, n1 = (check_int("bins", b, 1) for b in bins)
        if n1 < n0 or not isinstance(grid, str):
            raise ValueError(f"bins=(start, end) needs start <= end and a grid kind, got bins={bins!r}, grid={grid!r}")
    else:
        n0 = n1 = check_int("bins", bins, 1)
    step_fn = _TeacherStep(teacher, solver, substeps, solver_options) if teacher is not None else None
    x1, cond = loop.draw(loop.batch, loop.generator)
    _check_student(student, teacher, x1, cond, two_time_needed=False)
    doublings = int(round(math.log2(n1 / n0))) if n1 > n0 else 0
    current, g = None, None
    end = student.t_end
    for step in range(loop.steps):
        # Song & Dhariwal 2023: N doubles from start to end in equal stages of training.
        n_bins = min(n1, n0 * 2 ** (step * (doublings + 1) // loop.steps)) if doublings else n0
        if n_bins != current:
            current, g = n_bins, _grid(student, n_bins, grid)
        x1, cond = loop.draw(loop.batch, loop.generator)
        eps = loop.randn(x1)
        n = _bins_for_groups(loop, n_bins, groups if teacher is not None else None, loop.batch)
        s, s_next = g[n], g[n + 1]
        x_s = _on_path(student.path, x1, eps, s)
        with torch.no_grad():
            if step_fn is not None:
                x_next = step_fn(loop, x_s, n, g, cond)
            else:
                x_next = _on_path(student.path, x1, eps, s_next)
            target = loop.target(x_next, s_next.to(x1.dtype), end, **cond)
        pred = student(x_s, s.to(x1.dtype), end, **cond)
        loop.update(step, loop.distance(pred, target).mean())
    method = "consistency-distillation" if teacher is not None else "consistency-training"
    return loop.result(method, g, {"bins": bins, "solver": solver if teacher is not None else None, "loss": loss})


def consistency_distillation(teacher: Field, student: FlowMap, data: Data, *, labels: Tensor | None = None,
                             steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, bins: int = 18,
                             grid: str | Sequence[float] = "logsnr", solver: str = "heun", substeps: int = 1,
                             groups: int | None = 4, loss: str = "l2", huber_c: float | None = None,
                             target_ema: float = 0.95, grad_clip: float | None = 1.0, seed: int = 0,
                             callback: Callable[[int, float], None] | None = None,
                             solver_options: dict | None = None) -> FlowMapTraining:
    r"""Consistency distillation (Song et al. 2023, Algorithm 2) from a teacher field with any of its solvers.

    Arguments:
        teacher: a trained :class:`~flowdiff.Field` (Gaussian path).
        student: a :class:`~flowdiff.flowmaps.FlowMap` on the teacher's path (consistency model or
            two-time map; the latter is trained towards ``t_end``), e.g. :func:`student_from_teacher`.
            A student that does not take the teacher's data shape, or returns another, is a ValueError.
        data: training data ``(N, *shape)`` or ``data(batch, generator) -> x`` / ``(x, cond)``.
        labels: class labels ``(N,)`` of a data tensor (passed as ``y=`` to teacher and student).
        steps, batch_size, lr: Adam updates, batch, initial learning rate (cosine decay to 0).
        bins: ``N``, the intervals of the training grid; ``grid``: its kind
            (:func:`flowdiff.solvers.make_grid`) or explicit ``N + 1`` times.
        solver: the teacher's ODE step over one interval (a name of :func:`flowdiff.solvers.available`),
            ``substeps`` steps of it per interval, ``solver_options`` passed to it.
        groups: intervals per update (the batch is split among them; each is one solver call);
            ``None``: every sample its own interval.
        loss: ``"l2"`` (mean square) or ``"pseudo-huber"`` (constant ``huber_c``, default
            :math:`0.00054\sqrt{d}`, Song & Dhariwal 2023).
        target_ema: the EMA rate μ of the target weights θ⁻ (default 0.95, Song et al. 2023's value
            for distillation); ``0``: the current weights under stop-grad (Song & Dhariwal 2023's
            choice for consistency training).
        grad_clip, seed, callback: gradient-norm clip, seed of every draw, ``callback(step, loss)``.

    Returns:
        :class:`FlowMapTraining` (the student trained in place).
    """
    return _consistency(student, data, teacher, labels=labels, steps=steps, batch_size=batch_size, lr=lr, bins=bins,
                        grid=grid, solver=solver, substeps=substeps, groups=groups, loss=loss, huber_c=huber_c,
                        target_ema=target_ema, grad_clip=grad_clip, seed=seed, callback=callback,
                        solver_options=dict(solver_options or {}))


def consistency_training(student: FlowMap, data: Data, *, labels: Tensor | None = None, steps: int = 2000,
                         batch_size: int = 256, lr: float = 1e-3, bins: int | tuple[int, int] = (10, 80),
                         grid: str | Sequence[float] = "logsnr", loss: str = "pseudo-huber",
                         huber_c: float | None = None, target_ema: float = 0.0, grad_clip: float | None = 1.0,
                         seed: int = 0, callback: Callable[[int, float], None] | None = None) -> FlowMapTraining:
    r"""Consistency training without a teacher (Song et al. 2023, Algorithm 3; Song & Dhariwal 2023).

    Arguments as :func:`consistency_distillation` (no teacher, no solver); ``bins`` may be
    ``(start, end)``: ``N`` doubles from ``start`` towards ``end`` in equal stages of training
    (iCT's curriculum; default ``(10, 80)``), and the default loss is the pseudo-Huber distance.
    """
    return _consistency(student, data, None, labels=labels, steps=steps, batch_size=batch_size, lr=lr, bins=bins,
                        grid=grid, solver="", substeps=1, groups=None, loss=loss, huber_c=huber_c,
                        target_ema=target_ema, grad_clip=grad_clip, seed=seed, callback=callback, solver_options={})


def _self_step(model: FlowMap, x: Tensor, s: Tensor, t: Tensor, cond: dict, order: int) -> Tensor:
    r"""The model's own ODE step from ``s`` to ``t`` with its diagonal data prediction :math:`g(x, s, s)`.

    Order 1 is DDIM. Order 2 takes :math:`D` linear in λ between :math:`D_s = g(x_s, s, s)` and
    :math:`D_t = g(\tilde x_t, t, t)` at the DDIM prediction :math:`\tilde x_t`; integrating
    :math:`x_t = (\sigma_t/\sigma_s)x_s + \sigma_t\int e^{\lambda}D\,d\lambda` exactly gives the data
    prediction :math:`D_s + \varphi(h)(D_t - D_s)`, :math:`\varphi(h) = (h - 1 + e^{-h})/(h(1 - e^{-h}))`,
    ``h = λ_t − λ_s`` (Lu et al. 2022, "DPM-Solver++", the trapezoidal second-order step).
    """
    data = model.data_prediction(x, s, s, **cond)
    if order == 2:
        predicted = model.jump(x, s, t, data)
        data_t = model.data_prediction(predicted, t, t, **cond)
        lam = model.path.table(torch.stack([s, t]).double().cpu()).log_snr.reshape(2, -1)
        h = (lam[1] - lam[0]).clamp_min(1e-12)
        phi = (h - 1 + torch.exp(-h)) / (h * -torch.expm1(-h))
        phi = phi.to(x.dtype).to(x.device).reshape((-1,) + (1,) * (x.ndim - 1))
        data = data + phi * (data_t - data)
    return model.jump(x, s, t, data)


def flow_map_distillation(teacher: Field | None, student: FlowMap, data: Data, *, labels: Tensor | None = None,
                          steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, bins: int = 16,
                          grid: str | Sequence[float] = "logsnr", solver: str | None = None,
                          substeps: int | None = None, groups: int | None = 4, loss: str = "l2",
                          huber_c: float | None = None, target_ema: float = 0.99, grad_clip: float | None = 1.0,
                          denoise_weight: float = 1.0, base_order: int = 2, aligned: bool = True,
                          objective: str | None = None, target_tol: float = 1e-3,
                          jumps: Sequence[int] | None = None, seed: int = 0, callback: Callable[[int, float], None] | None = None,
                          solver_options: dict | None = None) -> FlowMapTraining:
    r"""A two-time flow map :math:`X_{s\to t}` trained by self-consistency (module docstring).

    Arguments as :func:`consistency_distillation` (``target_ema`` default 0.99: with ``0`` the
    bootstrapped long jumps fed back into their own targets and diverged on a Gaussian mixture), plus:
        teacher: a :class:`~flowdiff.Field` whose solver step anchors single-interval jumps, or
            ``None`` (teacher-free, shortcut-style: the model's own diagonal, trained by the
            denoising regression with weight ``denoise_weight``).
        student: a **two-time** :class:`~flowdiff.flowmaps.FlowMap`.
        aligned: jumps of :math:`2^m` intervals start at multiples of :math:`2^m` (the jumps of the
            1-, 2-, 4-, … step samplers and their halves: ``2N − 1`` maps to learn); ``False``: any start.
        base_order: teacher-free only: the single-interval target is the model's own DDIM step
            (``1``) or the second-order exponential-integrator step (``2``, default: its diagonal
            data prediction at both ends, linear in λ, as DPM-Solver-2 / EDM's Heun; two target
            calls). The finest interval's step error is the floor of a teacher-free map.
        bins: ``N`` intervals; jumps of :math:`2^m` intervals for ``m = 0 … ⌊log2 N⌋`` (use a power
            of two so that 1-, 2-, 4-step sampling lands on grid nodes).
        objective: ``"direct"`` (the default with a teacher): every jump ``i → j`` regressed on the
            teacher's own ODE solve over it (``solver``, ``substeps`` steps per grid interval,
            log-SNR spaced; Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative
            Models", applied to every jump of the two-time map); ``groups`` distinct jumps per
            update, one solver call each. ``"self-consistency"`` (the default and only choice
            without a teacher): long jumps regressed on the composition of their two halves by θ⁻.
            On the 2-D exact mixture the self-consistent map stalled at the fit of the mid-SNR
            single intervals (2-step error 0.29), the direct one does not compound them
            (docs/flowmaps.md).
        solver, substeps: the teacher's solver and its steps per grid interval. Defaults:
            self-consistency ``"heun"``, 1 step (single intervals only); direct ``"unipc"`` with
            ``substeps`` chosen before training (:func:`direct_target_substeps`): the smallest of
            2, 4, 8, 16 whose solve of the whole range differs from the solve with twice the steps
            by at most ``target_tol`` × the data's RMS (RMS over a pilot batch) — the student can
            only be as accurate as its targets (heun with 1 step per interval, the old default, left
            0.11 RMS error in the targets of a 16-interval grid on an anisotropic 2-D mixture).
        target_tol: the direct objective's target accuracy, relative to the data's RMS.
        jumps: ``objective="direct"`` only: the jump lengths (in grid intervals, powers of two up to
            ``N``) to train, e.g. ``(N, N // 2, N // 4)`` for the maps of the 1-, 2- and 4-step
            samplers alone; default every :math:`2^m`.
    """
    if objective is None:
        objective = "direct" if teacher is not None else "self-consistency"
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "direct" and teacher is None:
        raise ValueError("objective='direct' regresses every jump on the teacher's ODE solve: it needs a teacher "
                         "(teacher=None trains by self-consistency)")
    loop = _Loop(student, data, labels, steps, batch_size, lr, loss, huber_c, target_ema, grad_clip, seed, callback)
    bins = check_int("bins", bins, 1)
    denoise_weight = check_float("denoise_weight", denoise_weight, 0.0)
    base_order = check_int("base_order", base_order, 1, 2)
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be True or False, got {aligned!r}")
    target_tol = check_float("target_tol", target_tol, 0.0, low_open=True)
    direct = objective == "direct"
    solver = solver if solver is not None else ("unipc" if direct else "heun")
    auto_substeps = direct and substeps is None
    target_check = None
    substeps = 1 if substeps is None else substeps
    step_fn = _TeacherStep(teacher, solver, substeps, dict(solver_options or {})) if teacher is not None else None
    g = _grid(student, bins, grid)
    x1, cond = loop.draw(loop.batch, loop.generator)
    _check_student(student, teacher, x1, cond, two_time_needed=True)
    levels = int(math.floor(math.log2(bins))) + 1
    if jumps is not None:
        if objective != "direct":
            raise ValueError("jumps= selects the jumps of objective='direct'; self-consistency needs every halving")
        try:
            jumps = sorted({int(j) for j in jumps})
        except (TypeError, ValueError):
            raise TypeError(f"jumps must be a sequence of integers, got {jumps!r}") from None
        bad = [j for j in jumps if j < 1 or j > bins or j & (j - 1)]
        if not jumps or bad:
            raise ValueError(f"jumps must be powers of two from 1 to bins={bins}, got {list(jumps)}")
    if auto_substeps:
        pilot = min(64, x1.shape[0])
        step_fn.substeps, target_check = direct_target_substeps(
            teacher, student, x1[:pilot], _select(cond, torch.arange(pilot, device=x1.device), x1.shape[0]), g, solver,
            step_fn.options, target_tol, loop)
    if objective == "direct":
        allowed = torch.tensor([int(math.log2(j)) for j in jumps] if jumps is not None else list(range(levels)))
        return _direct_flow_map(loop, teacher, student, step_fn, g, bins, allowed, aligned, groups, solver, target_check)
    for step in range(loop.steps):
        x1, cond = loop.draw(loop.batch, loop.generator)
        eps = loop.randn(x1)
        batch = x1.shape[0]
        m = loop.randint(levels, batch)
        d = 2 ** m
        # aligned: jumps i -> i + d start at multiples of d (the jumps a 1-, 2-, 4-, ... step sampler makes,
        # and the halves their targets are made of; shortcut models draw t on the multiples of d too)
        i = loop.randint(bins // d, batch) * d if aligned else loop.randint(bins - d + 1, batch)
        base = (m == 0).nonzero().squeeze(1)
        if step_fn is not None and base.numel():  # single intervals: from `groups` intervals, one solver call each
            i[base] = _bins_for_groups(loop, bins, groups, base.numel())
        j = i + d
        s, t = g[i].to(x1.dtype), g[j].to(x1.dtype)
        x_s = _on_path(student.path, x1, eps, g[i])
        target = torch.empty_like(x1)
        with torch.no_grad():
            long = (m > 0).nonzero().squeeze(1)
            if long.numel():
                u = g[i[long] + d[long] // 2].to(x1.dtype)
                cl = _select(cond, long.to(x1.device), batch)
                y = loop.target(x_s[long], s[long], u, **cl)
                target[long] = loop.target(y, u, t[long], **cl)
            if base.numel():
                cb = _select(cond, base.to(x1.device), batch)
                if step_fn is not None:
                    target[base] = step_fn(loop, x_s[base], i[base], g, cb)
                else:
                    target[base] = _self_step(loop.target, x_s[base], s[base], t[base], cb, base_order)
        pred = student(x_s, s, t, **cond)
        total = loop.distance(pred, target).mean()
        if step_fn is None and denoise_weight > 0:
            data_pred = student.data_prediction(x_s, s, s, **cond)
            total = total + denoise_weight * (data_pred - x1).flatten(1).pow(2).mean(1).mean()
        loop.update(step, total)
    method = "flow-map-distillation" if teacher is not None else "flow-map-training"
    return loop.result(method, g, {"bins": bins, "solver": solver if teacher is not None else None, "loss": loss})


def _direct_flow_map(loop: _Loop, teacher: Field, student: FlowMap, step_fn: _TeacherStep, g: Tensor, bins: int,
                     levels: Tensor, aligned: bool, groups: int | None, solver: str,
                     target_check: dict | None) -> FlowMapTraining:
    """``flow_map_distillation(objective="direct")``: each jump regressed on the teacher's solve over it."""
    n_groups = 4 if groups is None else int(groups)
    for step in range(loop.steps):
        x1, cond = loop.draw(loop.batch, loop.generator)
        eps = loop.randn(x1)
        batch = x1.shape[0]
        # `n_groups` jumps (level uniform, start uniform among the allowed ones), the batch split among them
        m = levels[loop.randint(len(levels), n_groups)]
        d = 2 ** m
        i = loop.randint(bins // d, n_groups) * d if aligned else loop.randint(bins - d + 1, n_groups)
        which = loop.randint(n_groups, batch)
        i_s, j_s = i[which], (i + d)[which]
        s, t = g[i_s].to(x1.dtype), g[j_s].to(x1.dtype)
        x_s = _on_path(student.path, x1, eps, g[i_s])
        target = torch.empty_like(x1)
        with torch.no_grad():
            for k in torch.unique(which).tolist():
                sel = (which == k).nonzero().squeeze(1).to(x1.device)
                a, b = int(i[k]), int(i[k] + d[k])
                times = make_grid(teacher.path, "logsnr", step_fn.substeps * (b - a), float(g[a]), float(g[b]))
                res = solve(teacher, x_s[sel], solver=step_fn.solver, grid=times, denoise_final=False,
                            cond=_select(cond, sel, batch), **step_fn.options)
                loop.teacher_nfe += res.nfe
                target[sel] = res.state
        pred = student(x_s, s, t, **cond)
        loop.update(step, loop.distance(pred, target).mean())
    return loop.result("flow-map-direct-distillation", g, {"bins": bins, "solver": solver, "loss": loop.loss_kind,
                                                           "objective": "direct", "substeps": step_fn.substeps,
                                                           "target_check": target_check})


#: The substeps per grid interval that :func:`direct_target_substeps` tries, in order.
TARGET_SUBSTEPS = (2, 4, 8, 16)


def direct_target_substeps(teacher: Field, student: FlowMap, x1: Tensor, cond: dict, grid: Tensor, solver: str,
                           options: dict, tol: float, loop: _Loop | None = None) -> tuple[int, dict]:
    r"""Steps per grid interval for the direct objective's teacher solves: a convergence check.

    From a pilot batch put on the path at the grid's first node, the teacher's solve of the whole
    range with ``k`` steps per interval is compared with the solve with ``2k`` (log-SNR spaced);
    the first ``k`` of :data:`TARGET_SUBSTEPS` whose RMS difference is at most ``tol`` × the data's
    RMS is returned (the last one, with a warning, if none is), with the measured differences.
    The difference estimates the error of the ``k``-step targets when the solver converges.
    """
    import warnings

    x_s = _on_path(student.path, x1, torch.randn(x1.shape, generator=torch.Generator().manual_seed(0),
                                                  dtype=x1.dtype).to(x1.device), grid[:1].expand(x1.shape[0]))
    scale = float(x1.flatten(1).pow(2).mean().sqrt())
    bins = len(grid) - 1

    def run(k: int) -> Tensor:
        times = make_grid(teacher.path, "logsnr", k * bins, float(grid[0]), float(grid[-1]))
        with torch.no_grad():
            res = solve(teacher, x_s, solver=solver, grid=times, denoise_final=False, cond=cond, **options)
        if loop is not None:
            loop.teacher_nfe += res.nfe
        return res.state

    diffs: dict[int, float] = {}
    previous = run(TARGET_SUBSTEPS[0])
    for k in TARGET_SUBSTEPS:
        finer = run(2 * k)
        diffs[k] = float((previous - finer).flatten(1).pow(2).mean().sqrt()) / max(scale, 1e-12)
        if diffs[k] <= tol:
            return k, {"relative_difference": diffs, "tol": tol}
        previous = finer
    k = TARGET_SUBSTEPS[-1]
    warnings.warn(f"the teacher's {solver} solve did not converge to target_tol={tol} (relative differences "
                  f"{ {kk: round(v, 6) for kk, v in diffs.items()} }); using substeps={k}", RuntimeWarning, stacklevel=3)
    return k, {"relative_difference": diffs, "tol": tol}
