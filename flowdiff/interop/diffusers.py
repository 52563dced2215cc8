r"""diffusers models (``UNet2DModel``, ``UNet2DConditionModel``, transformers) as flowdiff fields.

**DDPM tables** (``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, …; Ho et
al. 2020). diffusers' training timestep :math:`j \in \{0, \dots, N-1\}` has
:math:`\bar\alpha_j = \prod_{i \le j}(1 - \beta_i)` and
:math:`x_j = \sqrt{\bar\alpha_j}\,x_0 + \sqrt{1 - \bar\alpha_j}\,\varepsilon`. flowdiff's
:class:`~flowdiff.paths.Discrete` path holds :math:`\bar\alpha_j` at diffusion time
:math:`\tau = (j + 1)/N`, i.e. at flowdiff time (``t = 0`` noise, ``t = 1`` data)

.. math::

    t(j) = 1 - \frac{j + 1}{N}, \qquad j(t) = N(1 - t) - 1,

so :math:`\alpha(t_j) = \sqrt{\bar\alpha_j}`, :math:`\sigma(t_j) = \sqrt{1 - \bar\alpha_j}`; the safe
interval is ``[0, 1 − 1/N]`` (timesteps N − 1 … 0), and ``t = 1`` (:math:`\bar\alpha = 1`) is the
clean sample that DDIM's ``set_alpha_to_one`` and DPM-Solver's ``final_sigmas_type="zero"`` step
to. The path is built from diffusers' own float32 :math:`\bar\alpha` table (:func:`alphas_cumprod`,
the same arithmetic as the schedulers' constructors), so its nodes carry diffusers' numbers.
Between nodes the model sees the continuous timestep :math:`j(t)`; within round-off of a node,
the exact integer (as diffusers passes it); beyond timestep 0 (only reachable with
``t_max > 1 − 1/N``) it is clamped at 0.

Predictions (``prediction_type``): ``epsilon`` → ``"noise"``, ``sample`` → ``"data"``,
``v_prediction`` → ``"v"`` (:math:`v = \sqrt{\bar\alpha}\,\varepsilon - \sqrt{1-\bar\alpha}\,x_0`,
Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models": flowdiff's
``v``). A model with twice the input channels (learned variance, Nichol & Dhariwal 2021) is
read through its first half, as diffusers' pipelines do.

**Flow matching** (``FlowMatchEulerDiscreteScheduler``; Lipman et al. 2023, "Flow Matching for
Generative Modeling"; Esser et al. 2024, "Scaling Rectified Flow Transformers"). diffusers writes
:math:`x_s = (1 - s)\,x_0 + s\,\varepsilon` with ``s = 1`` the noise, gives the model the
timestep :math:`sN` and trains it on :math:`dx/ds = \varepsilon - x_0`. On flowdiff's
:class:`~flowdiff.paths.Linear` path :math:`t = 1 - s` (α = t, σ = 1 − t) and the
probability-flow velocity is :math:`dx/dt = x_1 - \varepsilon`: minus the model's output
(prediction ``"velocity"``). The resolution shift :math:`s' = ks/(1 + (k-1)s)` is a choice of
time grid, not of path: :func:`scheduler_grid` reads it off the scheduler, and
``fd.sample(..., grid_options={"shift": k})`` gives flowdiff's own grids the same warp.

**Reproducing a diffusers loop.** :func:`scheduler_grid` turns a scheduler's ``timesteps`` (after
``set_timesteps``) into the increasing flowdiff time grid its loop visits, final step included
(``timestep_spacing`` "linspace"/"leading"/"trailing", ``steps_offset``, ``set_alpha_to_one``,
``final_sigmas_type``, the flow shift); :func:`sample_kwargs` adds the matching flowdiff solver and
options (DDIM → ``ddim``; DPM-Solver(++) multistep → ``dpm-solver(++)-{k}m`` with diffusers'
``lower_order_final`` rule; flow-matching Euler → ``euler``). A last step into σ = 0 is first
order, and a first-order step into σ = 0 is exactly :math:`\hat x` at its start (DDIM:
:math:`\sqrt{1}\,\hat x + 0\cdot\hat\varepsilon`; Euler on the linear path:
:math:`x - s(\hat\varepsilon - \hat x) = \hat x`): it becomes flowdiff's final denoise, so the grid
stays inside the safe interval. ``fd.sample(field, x_T, **sample_kwargs(scheduler))`` then runs
diffusers' sampler with flowdiff's solvers (float64 coefficients) and the same number of model
calls; the results agree to float32 round-off (tests/test_interop.py, benchmarks/interop.py).

``diffusers`` is never imported here: models, schedulers and pipelines are used through their
public attributes, so this module costs nothing when diffusers is absent.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..fields import Field
from ..paths import PREDICTIONS, Discrete, GaussianPath, Linear
from ..solvers import Hooks

__all__ = [
    "DIFFUSERS_BETA_SCHEDULES", "DIFFUSERS_PREDICTIONS", "DiffusersModel", "alphas_cumprod", "from_diffusers",
    "path_from_scheduler", "sample_kwargs", "scheduler_grid",
]

#: diffusers ``prediction_type`` → flowdiff prediction (the flow-matching velocity is handled apart).
DIFFUSERS_PREDICTIONS = {"epsilon": "noise", "sample": "data", "v_prediction": "v"}
#: ``beta_schedule`` values whose β table :func:`alphas_cumprod` rebuilds as diffusers does.
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
#: Schedulers :func:`sample_kwargs` translates into a flowdiff solver.
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
#: diffusers' last step to ᾱ ≈ 0 with zero-terminal-SNR betas (DPMSolverMultistepScheduler's value).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


# ----------------------------------------------------------------------------------------------
# Reading configs
# ----------------------------------------------------------------------------------------------


def _config(scheduler: Any) -> tuple[dict, str | None]:
    """``(config dict, class name or None)`` of a scheduler object or a config mapping."""
    if hasattr(scheduler, "config") and isinstance(scheduler.config, Mapping):
        return dict(scheduler.config), type(scheduler).__name__
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        return cfg, cfg.get("_class_name")
    raise TypeError(
        f"scheduler must be a diffusers scheduler (with .config) or its config dict, got {type(scheduler).__name__}"
    )


def _is_flow(config: dict, class_name: str | None) -> bool:
    """A flow-matching scheduler: by class name, or (an in-memory config has no ``_class_name``) by
    its keys: a shift and no β table."""
    no_betas = not any(k in config for k in ("beta_schedule", "beta_start", "trained_betas"))
    return bool(
        (class_name and class_name.startswith("FlowMatch"))
        or (class_name is None and no_betas and ("shift" in config or "use_dynamic_shifting" in config))
        or config.get("use_flow_sigmas")
        or config.get("prediction_type") == "flow_prediction"
    )


def _num_train_timesteps(config: dict) -> int:
    return check_int("num_train_timesteps", config.get("num_train_timesteps", 1000), 2)


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1 (diffusers' code)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])


def _alpha_bar_betas(n: int) -> Tensor:
    """``betas_for_alpha_bar(n, "cosine")`` of diffusers: the iDDPM cosine table (Nichol & Dhariwal
    2021), β capped at 0.999, computed in Python floats and stored in float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32)


def alphas_cumprod(scheduler: Any) -> Tensor:
    r""":math:`\bar\alpha_j`, ``j = 0 … N−1``, float32, as the diffusers scheduler computes it.

    Arguments:
        scheduler: a diffusers scheduler (its own ``alphas_cumprod`` is returned) or a config
            mapping (``num_train_timesteps``, ``beta_schedule`` ∈ :data:`DIFFUSERS_BETA_SCHEDULES`,
            ``beta_start``, ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``).

    Returns:
        float32 tensor ``(N,)``; with ``rescale_betas_zero_snr`` the last entry is
        :data:`ZERO_SNR_ALPHA_CUMPROD` (as DPMSolverMultistepScheduler sets it) instead of 0.
    """
    table = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(table, Tensor):
        ac = table.detach().to("cpu", torch.float32).clone()
        if ac[-1] <= 0:
            ac[-1] = ZERO_SNR_ALPHA_CUMPROD
        return ac
    config, _ = _config(scheduler)
    n = _num_train_timesteps(config)
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        if betas.shape != (n,):
            raise ValueError(f"trained_betas must have num_train_timesteps={n} entries, got shape {tuple(betas.shape)}")
    else:
        schedule = config.get("beta_schedule", "linear")
        start = check_float("beta_start", config.get("beta_start", 1e-4), 0.0, 1.0, low_open=True, high_open=True)
        end = check_float("beta_end", config.get("beta_end", 0.02), 0.0, 1.0, low_open=True, high_open=True)
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _alpha_bar_betas(n)
        elif schedule == "sigmoid":  # DDPMScheduler's GeoDiff table
            betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (end - start) + start
        else:
            raise ValueError(f"unknown beta_schedule {schedule!r}; valid: {', '.join(DIFFUSERS_BETA_SCHEDULES)} "
                             "(or trained_betas)")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if ac[-1] <= 0:
        ac[-1] = ZERO_SNR_ALPHA_CUMPROD
    return ac


def path_from_scheduler(scheduler: Any, t_max: float | None = None) -> GaussianPath:
    r"""The flowdiff path of a diffusers scheduler (module docstring).

    Arguments:
        scheduler: a diffusers scheduler or its config mapping.
        t_max: end of the safe interval, in ``[1 − 1/N, 1]``; default ``1 − 1/N``, diffusers'
            timestep 0 (its smallest noise level, σ > 0 so that every conversion is finite).
            ``t_max=1`` (ᾱ = 1, σ = 0) admits grids that step into the clean sample; only the
            exponential solvers (DDIM, DPM-Solver, …) take such a step (exactly: x = x̂).

    Returns:
        :class:`~flowdiff.paths.Discrete` on diffusers' float32 :math:`\bar\alpha` table (its β
        recovered in float64 as :math:`1 - \bar\alpha_j/\bar\alpha_{j-1}`), ``t_min = 0``
        (timestep N − 1); or, for flow-matching schedulers, ``Linear(t_min=0, t_max)`` (``t = 0``
        is pure noise there, which velocity solvers start from).
    """
    config, name = _config(scheduler)
    n = _num_train_timesteps(config)
    t_max = 1 - 1 / n if t_max is None else check_float("t_max", t_max, 1 - 1 / n, 1.0)
    if _is_flow(config, name):
        return Linear(t_min=0.0, t_max=t_max)
    ac = alphas_cumprod(scheduler).double()
    if not bool((ac[1:] < ac[:-1]).all()) or not 0 < float(ac[-1]) <= float(ac[0]) < 1:
        raise ValueError("the scheduler's alphas_cumprod must decrease strictly inside (0, 1)")
    if ac.numel() != n:
        raise ValueError(f"the scheduler's alphas_cumprod has {ac.numel()} entries, num_train_timesteps={n}")
    betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return Discrete(betas, t_min=0.0, t_max=t_max)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DiffusersModel(torch.nn.Module):
    r"""A diffusers network seen as a flowdiff model ``model(x, t, **cond)`` (module docstring).

    Arguments:
        model: the diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, a transformer) or
            any callable ``model(x, timestep, **cond)`` returning a tensor, a tuple or an object
            with ``.sample``.
        num_train_timesteps: N of the scheduler.
        flow: a flow-matching model (timestep :math:`N(1-t)`, output negated: flowdiff velocity).
        learned_variance: ``"auto"`` reads the first half of an output with twice the input
            channels; ``False`` never splits.
        guidance_scale: classifier-free guidance :math:`w` (Ho & Salimans 2022, "Classifier-Free
            Diffusion Guidance"), as diffusers' pipelines apply it to the raw output:
            :math:`f_u + w(f_c - f_u)`, one network call on the doubled batch. The unconditional
            keywords come in the conditioning under ``"uncond"``:
            ``cond={"encoder_hidden_states": emb, "uncond": {"encoder_hidden_states": null_emb}}``
            (keywords missing there are shared). Every prediction type is affine in every other at
            fixed (x, t), so guiding the raw output guides the field (flowdiff.guidance).

    The input is cast to the model's dtype and the output back to the input's; conditioning
    keywords (``encoder_hidden_states``, ``class_labels``, ``added_cond_kwargs`` …) go to the
    network unchanged.
    """

    def __init__(self, model: Any, num_train_timesteps: int, flow: bool = False, learned_variance: bool | str = "auto",
                 guidance_scale: float | None = None):
        super().__init__()
        self.guidance_scale = None if guidance_scale is None else check_float("guidance_scale", guidance_scale, 0.0)
        if not callable(model):
            raise TypeError(f"model must be a diffusers model (callable), got {type(model).__name__}")
        if learned_variance not in ("auto", False):
            raise ValueError(f"learned_variance must be 'auto' or False, got {learned_variance!r}")
        self.model = model
        self.num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 2)
        self.flow, self.learned_variance = bool(flow), learned_variance
        try:
            params = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model).parameters
        except (TypeError, ValueError):
            params = {}
        self._return_dict = "return_dict" in params

    def extra_repr(self) -> str:
        return f"num_train_timesteps={self.num_train_timesteps}, flow={self.flow}"

    def timestep(self, t: Tensor) -> Tensor:
        """The diffusers timestep of flowdiff times ``t`` ``(B,)``: :math:`N(1-t)` (flow) or
        :math:`N(1-t) - 1` snapped to the integer within round-off and clamped to ``[0, N−1]``
        (an int64 tensor when all are integers, as diffusers passes them)."""
        n = self.num_train_timesteps
        tol = min(0.5, 8 * n * torch.finfo(t.dtype).eps)  # t's own round-off, magnified by N
        if t.ndim == 1 and t.shape[0] > 0 and t.stride(0) == 0:  # one time for the batch (a sampler's step):
            v = float(t[0])  # the arithmetic in Python floats, once
            if self.flow:
                return torch.full(t.shape, (1 - v) * n, dtype=t.dtype, device=t.device)
            j = min(max((1 - v) * n - 1, 0.0), n - 1.0)
            if abs(j - round(j)) <= tol:
                return torch.full(t.shape, round(j), dtype=torch.long, device=t.device)
            return torch.full(t.shape, j, dtype=t.dtype, device=t.device)
        tt = t.detach().to(torch.float64)
        if self.flow:
            return ((1 - tt) * n).to(t.dtype)
        j = ((1 - tt) * n - 1).clamp(0, n - 1)
        nearest = j.round()
        j = torch.where((j - nearest).abs() <= tol, nearest, j)
        return j.long() if bool((j == j.round()).all()) else j.to(t.dtype)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        dtype = getattr(self.model, "dtype", None)
        inp = x.to(dtype) if isinstance(dtype, torch.dtype) and dtype != x.dtype else x
        timestep = self.timestep(t).to(x.device)
        uncond = cond.pop("uncond", None)
        if self.guidance_scale is None:
            if uncond is not None:
                raise ValueError("cond has 'uncond' keywords but the model has no guidance_scale")
            out = self._network(inp, timestep, cond)
        else:
            if not isinstance(uncond, Mapping):
                raise ValueError("guidance_scale needs the unconditional keywords as cond['uncond'] (a dict), "
                                 f"got {type(uncond).__name__}")
            batch = x.shape[0]
            both = {}
            for key, value in cond.items():
                other = uncond.get(key, value)
                both[key] = torch.cat([other, value]) if isinstance(value, Tensor) and value.ndim else value
            for key, value in uncond.items():
                if key not in cond:
                    raise ValueError(f"cond['uncond'] has {key!r}, which the conditional keywords lack")
            out = self._network(torch.cat([inp, inp]), torch.cat([timestep, timestep]), both)
            unconditional, conditional = out[:batch], out[batch:]
            out = unconditional + self.guidance_scale * (conditional - unconditional)
        if self.learned_variance == "auto" and out.ndim > 1 and x.ndim > 1 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        out = out.to(x.dtype)
        return -out if self.flow else out

    def _network(self, x: Tensor, timestep: Tensor, cond: dict) -> Tensor:
        out = self.model(x, timestep, **cond, return_dict=False) if self._return_dict else self.model(x, timestep, **cond)
        if not isinstance(out, Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        return out


def _unpack(model: Any, scheduler: Any) -> tuple[Any, Any]:
    """``(network, scheduler)`` from a pipeline, a ``(network, scheduler)`` pair or both given."""
    if scheduler is not None:
        return model, scheduler
    if isinstance(model, (tuple, list)) and len(model) == 2:
        return model[0], model[1]
    if hasattr(model, "scheduler"):
        for name in ("unet", "transformer", "prior", "decoder"):
            net = getattr(model, name, None)
            if net is not None:
                return net, model.scheduler
        raise TypeError(f"the pipeline {type(model).__name__} has no unet or transformer")
    raise TypeError(
        "from_diffusers needs a scheduler: from_diffusers(model, scheduler_or_config), "
        f"from_diffusers((model, scheduler)) or from_diffusers(pipeline); got {type(model).__name__} alone"
    )


def from_diffusers(model: Any, scheduler: Any = None, *, prediction: str | None = None, t_max: float | None = None,
                   learned_variance: bool | str = "auto", guidance_scale: float | None = None) -> Field:
    r"""A diffusers model as a :class:`~flowdiff.Field` on the path its scheduler defines (module docstring).

    Arguments:
        model: a diffusers network, a pipeline (its ``unet``/``transformer`` and ``scheduler``) or a
            ``(network, scheduler)`` pair.
        scheduler: a diffusers scheduler or its config mapping (``scheduler.config``, a loaded
            ``scheduler_config.json``); omitted for a pipeline or a pair.
        prediction: override the config's ``prediction_type`` (diffusers' or flowdiff's name).
        t_max: see :func:`path_from_scheduler`.
        learned_variance, guidance_scale: see :class:`DiffusersModel` (classifier-free guidance of
            text- or class-conditional models, with ``cond["uncond"]``).

    Returns:
        ``Field(DiffusersModel(...), path, prediction)``. Conditioning goes through flowdiff's
        ``cond``: ``fd.sample(field, x, cond={"encoder_hidden_states": emb})`` or
        ``field.denoise(x, t, class_labels=y)``.
    """
    net, scheduler = _unpack(model, scheduler)
    config, name = _config(scheduler)
    flow = _is_flow(config, name)
    kind = config.get("prediction_type", "flow_prediction" if flow else "epsilon") if prediction is None else prediction
    if flow:
        if kind not in ("flow_prediction", "velocity"):
            raise ValueError(f"unknown prediction_type {kind!r} for a flow-matching scheduler; valid: flow_prediction")
        pred = "velocity"
    elif kind in DIFFUSERS_PREDICTIONS:
        pred = DIFFUSERS_PREDICTIONS[kind]
    elif prediction is not None and kind in PREDICTIONS:
        pred = kind
    else:
        raise ValueError(f"unknown prediction_type {kind!r}; valid: {', '.join(DIFFUSERS_PREDICTIONS)}"
                         + (f" or flowdiff's {', '.join(PREDICTIONS)}" if prediction is not None else ""))
    path = path_from_scheduler(scheduler, t_max=t_max)
    wrapped = DiffusersModel(net, _num_train_timesteps(config), flow=flow, learned_variance=learned_variance,
                             guidance_scale=guidance_scale)
    return Field(wrapped, path, pred)


# ----------------------------------------------------------------------------------------------
# Grids and solvers that reproduce diffusers' loops
# ----------------------------------------------------------------------------------------------


def _node(j: Tensor | int, n: int) -> Tensor:
    """flowdiff times of integer timesteps ``j``: ``1 − (j + 1)/N`` (bitwise the Discrete table's nodes)."""
    return 1 - (torch.as_tensor(j, dtype=torch.float64) + 1) / n


def scheduler_grid(scheduler: Any, num_inference_steps: int | None = None) -> Tensor:
    r"""The increasing flowdiff time grid that a diffusers scheduler's loop visits, final step included.

    Arguments:
        scheduler: a diffusers scheduler object (not a config: the grid is its ``timesteps``).
        num_inference_steps: if given, ``scheduler.set_timesteps(num_inference_steps)`` is called first.

    Returns:
        float64 tensor ``(steps + 1,)``. DDPM-table schedulers: the nodes :math:`1 - (j+1)/N` of the
        scheduler's timesteps, then the time its last step reaches (``t = 1`` for ᾱ = 1,
        ``set_alpha_to_one`` / ``final_sigmas_type="zero"``; the first training step's node
        otherwise). Flow matching: :math:`1 - s` for the scheduler's ``sigmas`` (shift included).

    A ValueError when the scheduler's steps are not a grid of its own timesteps (DDIMScheduler
    with ``timestep_spacing="linspace"`` steps from ``j`` to ``j − N//n``, not to the next
    timestep; Karras/exponential/beta sigmas evaluate the model at rounded timesteps).
    """
    if not hasattr(scheduler, "config") or not hasattr(scheduler, "set_timesteps"):
        raise TypeError(f"scheduler_grid needs a diffusers scheduler object, got {type(scheduler).__name__}")
    if num_inference_steps is not None:
        scheduler.set_timesteps(check_int("num_inference_steps", num_inference_steps, 1))
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(n) first, or pass num_inference_steps")
    config, name = _config(scheduler)
    n = _num_train_timesteps(config)
    timesteps = torch.as_tensor(scheduler.timesteps).detach().cpu()
    sigmas = getattr(scheduler, "sigmas", None)
    if _is_flow(config, name):
        if sigmas is None:
            raise ValueError(f"{name}: a flow-matching scheduler without sigmas")
        s = torch.as_tensor(sigmas).detach().cpu().double()
        if config.get("invert_sigmas"):
            raise ValueError(f"{name}: invert_sigmas=True runs from data to noise; flowdiff samples from noise to data")
        if not torch.allclose(timesteps.double(), s[:-1] * n, rtol=1e-5, atol=1e-3):
            raise ValueError(f"{name}: the timesteps given to the model are not sigmas * num_train_timesteps "
                             f"({timesteps[:3].tolist()} for sigmas {s[:3].tolist()}; DPMSolverMultistepScheduler with "
                             "use_flow_sigmas truncated to integers); no grid reproduces that loop; sample the field "
                             "with flowdiff's solvers instead")
        return _increasing(1 - s, name)
    if timesteps.is_floating_point() and not bool((timesteps == timesteps.round()).all()):
        raise ValueError(f"{name}: fractional timesteps {timesteps[:4].tolist()}…; only integer DDPM timesteps are supported")
    j = timesteps.long()
    ac = alphas_cumprod(scheduler).double()
    if sigmas is not None and len(sigmas) == len(j) + 1:  # sigma-based multistep schedulers (DPM-Solver, UniPC, DEIS)
        s = torch.as_tensor(sigmas).detach().cpu().double()
        table = ((1 - ac[j]) / ac[j]).sqrt()
        if not torch.allclose(s[:-1], table, rtol=1e-5, atol=0.0):
            raise ValueError(
                f"{name}: its sigmas are not the table's at its timesteps (use_karras_sigmas, use_lu_lambdas, "
                "use_exponential_sigmas or use_beta_sigmas round the model's timesteps); build a flowdiff grid instead, "
                "e.g. fd.sample(field, x, grid='karras')"
            )
        last = float(s[-1])
        if last == 0.0:
            final = torch.ones(1, dtype=torch.float64)
        else:  # final_sigmas_type="sigma_min": the table's first step
            k = int(torch.argmin(((1 - ac) / ac).sqrt().sub(last).abs()))
            final = _node(torch.tensor([k]), n)
        return _increasing(torch.cat([_node(j, n), final]), name)
    # DDIM/DDPM-style: each step goes from j to j - N // n (DDIM and its kin, which hold
    # final_alpha_cumprod) or to the next timestep (DDPM)
    if hasattr(scheduler, "final_alpha_cumprod"):
        stride = n // scheduler.num_inference_steps
        prev = j - stride
        if len(j) > 1 and not bool((prev[:-1] == j[1:]).all()):
            raise ValueError(
                f"{name}: with timestep_spacing={config.get('timestep_spacing')!r} its steps go from timestep j to "
                f"j - {stride}, not to its next timestep ({j[:3].tolist()}…); no grid reproduces that loop "
                "(use timestep_spacing='leading' or 'trailing')"
            )
        if int(prev[-1]) >= 0:
            final = _node(prev[-1:], n)
        elif config.get("set_alpha_to_one", True):
            final = torch.ones(1, dtype=torch.float64)
        else:
            final = _node(torch.tensor([0]), n)
    else:
        final = torch.ones(1, dtype=torch.float64)  # DDPMScheduler: the last step reaches ᾱ = 1
    times = torch.cat([_node(j, n), final])
    if times[-1] == times[-2]:  # a last step of length zero (set_alpha_to_one=False from j = 0): x stays
        times = times[:-1]
    return _increasing(times, name)


def _increasing(times: Tensor, name: str | None) -> Tensor:
    if times.numel() < 2 or not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"{name}: its timesteps do not give an increasing flowdiff grid: {times.tolist()}")
    return times


def _clip_hook(limit: float):
    def clip(x: Tensor, t: Tensor, denoised: Tensor) -> Tensor:
        return denoised.clamp(-limit, limit)

    return clip


def sample_kwargs(scheduler: Any, num_inference_steps: int | None = None, eta: float = 0.0) -> dict[str, Any]:
    r"""Keyword arguments of :func:`flowdiff.sample` that run a diffusers scheduler's loop.

    ``fd.sample(field, x_T, **sample_kwargs(scheduler, n))`` with ``field = from_diffusers(model,
    scheduler)`` and the same initial noise gives diffusers' result to float32 round-off, with as
    many model calls.

    A last step into ᾱ = 1 (σ = 0: DDIM's ``set_alpha_to_one``, DPM-Solver's
    ``final_sigmas_type="zero"``, the flow-matching Euler step to ``s = 0``) is first order, and a
    first-order step into σ = 0 is exactly the data prediction :math:`\hat x` at its start: it
    becomes flowdiff's final denoise (``denoise_final=True``, the grid ends at the last timestep,
    inside the path's safe interval). One case keeps it as a step to ``t = 1`` and needs
    ``from_diffusers(..., t_max=1.0)``: third-order DPM-Solver below 15 steps, whose last two
    orders (1 at ``t = 1``, 2 before) flowdiff's ``lower_order_final`` gives only so.

    Arguments:
        scheduler: a diffusers scheduler object: one of :data:`SUPPORTED_SCHEDULERS`.
        num_inference_steps: passed to ``scheduler.set_timesteps`` first, if given.
        eta: DDIM's η (``scheduler.step(..., eta=eta)``): 0 is ``ddim``, η > 0 the ``ddpm`` solver
            with that η; with the same ``generator`` the random draws are diffusers' too.

    Returns:
        ``{"solver", "grid", "denoise_final", **options}``:

        * ``DDIMScheduler`` → ``ddim`` (η = 0) or ``ddpm`` with ``eta``; ``clip_sample`` becomes a
          denoiser hook clamping x̂, which equals diffusers' ``step(..., use_clipped_model_output=True)``
          (ε̂ re-derived from the clipped x̂).
        * ``DDPMScheduler`` → ``ddpm`` (η = 1, the posterior of Ho et al. 2020: diffusers'
          ``variance_type="fixed_small"``); ``clip_sample`` as for DDIM.
        * ``DPMSolverMultistepScheduler`` → ``dpm-solver++{k}m`` / ``dpm-solver-{k}m``
          (``algorithm_type`` ``dpmsolver++`` / ``dpmsolver``; order 1 is ``ddim``),
          ``solver_type`` midpoint → ``"dpmsolver"``, heun → ``"taylor"``, and diffusers'
          rule for lowering the order of the last steps.
        * ``FlowMatchEulerDiscreteScheduler`` → ``euler``.
    """
    grid = scheduler_grid(scheduler, num_inference_steps)
    config, name = _config(scheduler)
    if config.get("thresholding"):
        raise ValueError(f"{name}: thresholding=True (dynamic thresholding) has no flowdiff counterpart here; "
                         "pass a denoiser hook (fd.solvers.Hooks) yourself")
    to_data = float(grid[-1]) == 1.0  # the last step reaches sigma = 0
    out: dict[str, Any] = {}
    eta = check_float("eta", eta, 0.0, 1.0)
    if name in ("DDIMScheduler", "DDPMScheduler"):
        if name == "DDPMScheduler":
            variance = config.get("variance_type", "fixed_small")
            if variance != "fixed_small":
                raise ValueError(f"{name}: variance_type {variance!r} is not translated; valid: fixed_small")
            eta = 1.0
        if eta > 0:
            out.update(solver="ddpm", eta=eta)
        else:
            out["solver"] = "ddim"
        if config.get("clip_sample", True):
            out["hooks"] = Hooks(denoiser=_clip_hook(float(config.get("clip_sample_range", 1.0))))
    elif name == "DPMSolverMultistepScheduler":
        order = check_int("solver_order", config.get("solver_order", 2), 1, 3)
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in ("dpmsolver++", "dpmsolver"):
            raise ValueError(f"{name}: algorithm_type {algorithm!r} is not translated; valid: dpmsolver++, dpmsolver "
                             "(the SDE variants draw their own noise)")
        solver_type = config.get("solver_type", "midpoint")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{name}: unknown solver_type {solver_type!r}; valid: midpoint, heun")
        steps = grid.numel() - 1  # diffusers' steps
        lower = bool(config.get("lower_order_final", True) and steps < 15)  # its last two steps (order 3)
        if order == 1:
            out["solver"] = "ddim"
        else:
            out["solver"] = f"dpm-solver{'++' if algorithm == 'dpmsolver++' else '-'}{order}m"
            out["solver_type"] = "dpmsolver" if solver_type == "midpoint" else "taylor"
            if to_data and not (order == 3 and lower):
                out["lower_order_final"] = False  # the last step is the final denoise; the one before keeps its order
            elif order == 3 and not lower and config.get("euler_at_final", False):
                raise ValueError(f"{name}: euler_at_final with solver_order=3 and {steps} steps lowers only the last "
                                 "step; flowdiff lowers the last two")
            else:
                out["lower_order_final"] = lower or bool(config.get("euler_at_final", False))
            if order == 3 and lower and to_data:
                to_data = False  # keep the step to t = 1 (docstring)
    elif name == "FlowMatchEulerDiscreteScheduler":
        if config.get("stochastic_sampling"):
            raise ValueError(f"{name}: stochastic_sampling=True is not translated; valid: False")
        out["solver"] = "euler"
    else:
        raise ValueError(f"unsupported scheduler {name!r}; valid: {', '.join(SUPPORTED_SCHEDULERS)} "
                         "(any scheduler's model still works through from_diffusers with flowdiff's own solvers)")
    if to_data and grid.numel() > 2:  # (one step: keep it, a grid needs two times)
        grid = grid[:-1]
    else:
        to_data = False
    out.update(grid=grid, denoise_final=to_data)
    return out
