r"""The :class:`Trainer`: minibatch stochastic optimisation of a flowdiff loss, resumable and data-parallel.

One update :math:`k` (``step`` counts completed updates):

1. draw the global minibatch :math:`x_1^{(1:B)}` (and labels) from a seeded, resumable sampler;
2. split it into ``world_size · grad_accum_steps`` equal *shards*; shard :math:`j` is processed
   by process :math:`\lfloor j / A \rfloor`, and every random draw inside the loss (times, noise,
   label dropout) comes from shard :math:`j`'s own generator, seeded from ``(seed, j)``;
3. gradient :math:`g = \frac{1}{WA}\sum_j \nabla_\theta L_j(\theta)` (accumulated over the
   micro-batches, averaged over processes by ``DistributedDataParallel``'s all-reduce);
4. clip :math:`g \leftarrow g \min(1, c / \lVert g\rVert_2)`; stop with
   :class:`NonFiniteLossError` (before touching the weights) if the loss or
   :math:`\lVert g\rVert` is not finite;
5. AdamW update with the learning rate of :class:`~flowdiff.train.TrainConfig`'s schedule;
6. EMA update :math:`\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta`
   (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``; with
   ``ema_sigma_rel`` the decay grows with the step, EDM2's power-function EMA, :mod:`flowdiff.train.ema`).

Because a shard's randomness depends on its index only, a run on ``W`` processes with ``A``
accumulation steps computes the same updates as a run on one process with ``W·A`` accumulation
steps (up to the order of floating-point sums), and a checkpoint holds every random state, so a
run killed at any moment and resumed reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flowdiff.data import BatchSampler, Dataset
from flowdiff.nn import drop_labels
from flowdiff.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CHECKPOINTS_DIR,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_training_state,
    remove_temporary_files,
    resolve_checkpoint,
    save_checkpoint,
)
from flowdiff.train.config import TrainConfig
from flowdiff.train.ema import power_ema_multi_avg_fn
from flowdiff.train.distributed import DistributedContext, setup_distributed
from flowdiff.train.logs import (
    METRICS_FILE,
    MetricsWindow,
    RunLog,
    describe,
    describe_loss,
    describe_model,
    flowdiff_version,
    json_config,
    Progress,
    truncate_metrics,
)
from flowdiff._utils import check_int, default_threads
from flowdiff.train.rng import (
    DATA_STREAM,
    process_rng_state,
    restore_shard_generators,
    set_process_rng_state,
    shard_generators,
    stream_seed,
)

__all__ = ["METRICS_FILE", "NonFiniteLossError", "TrainSummary", "Trainer", "lr_factor"]

logger = logging.getLogger("flowdiff.train")

_UNSET = object()

Callback = Callable[["Trainer", dict[str, Any]], None]
"""``callback(trainer, record)``, called on the main process after each metrics record."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; training stopped before applying the update.

    Attributes:
        step: the update that failed (1-based: the first update is step 1).
        quantity: ``"loss"`` or ``"grad_norm"``.
        value: the offending value.
        checkpoint: the last good checkpoint folder (untouched), or ``None``.
    """

    def __init__(self, step: int, quantity: str, value: float, checkpoint: Path | None) -> None:
        self.step = step
        self.quantity = quantity
        self.value = value
        self.checkpoint = checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(
            f"non-finite {quantity} ({value}) at step {step}: training stopped before the update; {where}. "
            f"Lower lr, set grad_clip, or check the data and the loss weighting."
        )


@dataclass
class TrainSummary:
    """What :meth:`Trainer.fit` did.

    Attributes:
        step: updates completed in total (the run's step at the end).
        start_step: the step this call started from (``> 0`` when resumed).
        final_loss: loss of the last update (mean over the global batch), ``nan`` if none ran.
        recent_loss: mean loss over the last logging window.
        wall_time: seconds spent in :meth:`Trainer.fit`.
        checkpoint_time: seconds of ``wall_time`` spent writing checkpoints.
        steps_per_second: updates per second in this call (``it/s``, everything included).
        samples_per_second: ``steps_per_second · batch_size``.
        checkpoint: the last checkpoint folder written, or ``None``.
        output_dir: the run's folder.
        world_size: number of data-parallel processes.
        interrupted: the run stopped early on SIGTERM/SIGINT (after a checkpoint of the last update).
        stop_signal: the signal number that stopped it (``signal.SIGINT``, ``signal.SIGTERM``), else ``None``;
            a command-line wrapper exits with ``128 + stop_signal`` (130 for Ctrl-C).
        resumed_from: the checkpoint folder the run continued from, or ``None``.
        skipped_checkpoints: ``(folder, reason)`` of newer checkpoints that did not verify and were
            passed over on resume (the run continued from the newest that did).
    """

    step: int
    start_step: int
    final_loss: float
    recent_loss: float
    wall_time: float
    checkpoint_time: float
    steps_per_second: float
    samples_per_second: float
    checkpoint: Path | None
    output_dir: Path
    world_size: int
    interrupted: bool = False
    stop_signal: int | None = None
    resumed_from: Path | None = None
    skipped_checkpoints: tuple[tuple[Path, str], ...] = ()


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant", min_lr_ratio: float = 0.0) -> float:
    r"""Learning-rate multiplier of update ``step`` (1-based): linear warm-up, then constant or cosine.

    .. math::

        f(k) = \begin{cases} k / W & k \le W \\ 1 & \text{constant} \\
        r + (1 - r)\,\tfrac12\big(1 + \cos(\pi \min(1, \tfrac{k - W}{S - W}))\big) & \text{cosine}\end{cases}

    (Goyal et al., 2017, "Accurate, large minibatch SGD" for the warm-up; Loshchilov & Hutter,
    2017, "SGDR" for the cosine decay.)
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _resolve_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu' or 'auto'")
        if distributed:
            # One GPU per process: the launcher's LOCAL_RANK picks it.
            return torch.device("cuda", local_rank)
    return torch.device(name)


def _clip_gradients(grads: list[Tensor], max_norm: float | None) -> Tensor:
    r"""Global 2-norm :math:`\lVert g\rVert` of the gradients; with ``max_norm = c`` also scale them by
    :math:`\min(1, c / (\lVert g\rVert + 10^{-6}))` in place — ``torch.nn.utils.clip_grad_norm_``'s
    formula.

    Done with one ``_foreach_norm`` and one ``_foreach_mul_`` when the gradients share device and
    dtype: torch's own function falls back to a Python loop over the tensors on CPU, which costs
    a few percent of a small network's update.
    """
    if not grads:
        return torch.zeros(())
    first = grads[0]
    if first.is_sparse or any(g.device != first.device or g.dtype != first.dtype or g.is_sparse for g in grads):
        if max_norm is None:
            return torch.nn.utils.get_total_norm(grads)
        total = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
        return total
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm is not None:
        # Clamped coefficient rather than ``if norm > c``: no host-device synchronisation.
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _pair_tensors(averaged: nn.Module, model: nn.Module) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Parameters and buffers of the EMA copy and of the model, paired and grouped by dtype."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    pairs = zip(
        [*averaged.parameters(), *averaged.buffers()], [*model.parameters(), *model.buffers()], strict=True
    )
    for ema_tensor, tensor in pairs:
        group = groups.setdefault((ema_tensor.device, ema_tensor.dtype), ([], []))
        group[0].append(ema_tensor.detach())
        group[1].append(tensor.detach())
    return list(groups.values())


class Trainer:
    """Train ``model`` by minimising ``loss`` on minibatches of ``data``.

    Arguments:
        model: the network, called by the loss as ``model(x, t, y=...)``. Moved to the device.
        loss: a callable ``loss(model, x1, *, y=None, generator=None)`` returning an object with
            a scalar ``.loss`` (e.g. :class:`flowdiff.losses.GaussianPathLoss`'s ``LossOutput``)
            or a scalar tensor. Every random draw must use ``generator``: that makes the run
            reproducible and exactly resumable.
        data: a :class:`flowdiff.data.Dataset` or a tensor ``(N, ...)`` (a seeded
            :class:`~flowdiff.data.BatchSampler` of the *global* batch size is built), a
            ``BatchSampler`` (its batch size must equal ``config.batch_size``), or any iterator of
            ``x`` or ``(x, y)`` batches (exactly resumable only if it has ``state_dict`` and
            ``load_state_dict``).
        config: a :class:`TrainConfig` or a dict for :meth:`TrainConfig.from_dict`.
        resume: continue from the latest checkpoint of ``config.output_dir`` if there is one
            (otherwise start fresh) — the same command can be re-run after any interruption.
        resume_from: a checkpoint folder (or run folder) to continue from; overrides ``resume``.
        overwrite: with neither ``resume`` nor ``resume_from``, delete the checkpoints and metrics
            of a previous run in ``output_dir`` (by default their presence is an error).
        progress: report progress on the main process: a bar when stderr is a terminal, else one
            line on stderr every ten seconds (:class:`~flowdiff.train.logs.Progress`).
        threads: CPU threads torch uses during :meth:`fit` (restored afterwards); ``None`` picks
            :func:`flowdiff._utils.default_threads` for the model (1 for small networks, never
            more than the cores this process may use, at most 4); ``0`` leaves torch's setting alone.
        model_config: how to rebuild the network, recorded in the checkpoint;
            ``{"name", "data_shape", "kwargs"}`` for :func:`flowdiff.nn.build_network` lets
            :func:`~flowdiff.train.load_model` rebuild it. Defaults to ``model.config()`` if any.
        extra_config: more JSON-serialisable information for the checkpoint's ``config.json``.
        optimizer: an optimizer over ``model``'s parameters to use instead of AdamW built from
            the config (the schedule multiplies its learning rates).
        callbacks: ``callback(trainer, record)`` called on the main process after each metrics record.
        ddp_kwargs: extra arguments for ``torch.nn.parallel.DistributedDataParallel``
            (e.g. ``{"find_unused_parameters": True}``).

    Data-parallel training needs no change to the script: launched with
    ``torchrun --nproc_per_node N script.py`` or ``accelerate launch --multi_gpu --num_processes N
    script.py`` (also on a machine without GPU: the processes then use the CPU and ``gloo``),
    each process computes its shards of every global batch, gradients are averaged, and only the
    main process writes checkpoints and logs. (``accelerate launch --cpu`` starts a single process:
    accelerate runs several CPU processes only through MPI.)
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[..., Any],
        data: Dataset | Tensor | BatchSampler | Iterable[Any],
        config: TrainConfig | dict[str, Any] | None = None,
        *,
        resume: bool = False,
        resume_from: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = True,
        model_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        callbacks: Sequence[Callback] = (),
        ddp_kwargs: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        elif not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(model, x1, y=..., generator=...), got {type(loss).__name__}")
        config.validate()
        self.config = config
        self.loss = loss
        self.progress = bool(progress)
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)

        # ---- processes and device ----------------------------------------------------------
        device_name = config.device
        if device_name == "auto" and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            device_name = "cpu"  # ``accelerate launch --cpu`` asks for the CPU
        wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        self.dist: DistributedContext = setup_distributed("cuda" if wants_cuda else "cpu")
        self.device = _resolve_device(device_name, self.dist.local_rank, self.dist.enabled)
        if config.mixed_precision != "no" and self.device.type != "cuda":
            raise ValueError(
                f"mixed_precision={config.mixed_precision!r} needs a CUDA device, but the device is "
                f"{self.device}; use mixed_precision='no'"
            )
        if config.batch_size % (self.dist.world_size * config.grad_accum_steps) != 0:
            raise ValueError(
                f"batch_size={config.batch_size} must be divisible by world_size × grad_accum_steps = "
                f"{self.dist.world_size} × {config.grad_accum_steps}"
            )
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._shards_per_process = config.grad_accum_steps
        self._shard_size = config.batch_size // (self.dist.world_size * config.grad_accum_steps)

        # ---- model, loss -------------------------------------------------------------------
        floating = [p for p in model.parameters() if p.is_floating_point()]
        if not floating:
            raise ValueError("model has no floating-point parameters to train")
        model.to(self.device)
        self.model = model
        self.dtype = floating[0].dtype
        if isinstance(loss, nn.Module):
            loss.to(self.device)
        self._train_model: nn.Module = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Wrapping broadcasts rank 0's weights, so every process starts from the same point.
            self._train_model = DistributedDataParallel(model, device_ids=device_ids, **(ddp_kwargs or {}))
        self._params = [p for p in model.parameters() if p.requires_grad]

        # ---- data --------------------------------------------------------------------------
        self.dataset: Dataset | None = None
        self._data_source: Any = None
        self._batches: Iterator[Any]
        if isinstance(data, Tensor):
            data = Dataset(x=data if data.ndim >= 2 else data[:, None])
        if isinstance(data, Dataset):
            self.dataset = data.to(device=self.device, dtype=self.dtype)
            data_generator = torch.Generator().manual_seed(stream_seed(config.seed, DATA_STREAM))
            self.sampler: Any = BatchSampler(self.dataset, config.batch_size, generator=data_generator)
        elif isinstance(data, BatchSampler):
            if data.batch_size != config.batch_size:
                raise ValueError(
                    f"the BatchSampler's batch_size={data.batch_size} differs from config.batch_size="
                    f"{config.batch_size} (the global batch); make them equal"
                )
            self.dataset = data.dataset
            self.sampler = data
        elif isinstance(data, (Iterable, Iterator)):
            # A re-iterable source (a DataLoader) starts a new pass when one ends; an iterator cannot.
            self._data_source = data
            self.sampler = data if isinstance(data, Iterator) else iter(data)
            if not hasattr(self.sampler, "state_dict"):
                logger.warning("the data iterator has no state_dict(): a resumed run will not see the same batches")
        else:
            raise TypeError(
                f"data must be a flowdiff Dataset, a Tensor, a BatchSampler or an iterator of batches, "
                f"got {type(data).__name__}"
            )
        self._batches = self.sampler

        # Labels go to the loss when the data has them and the network takes them.
        network_classes = getattr(model, "num_classes", _UNSET)
        labelled = self.dataset.y is not None if self.dataset is not None else True
        self._pass_labels = labelled and network_classes is not None
        if self.dataset is not None and self.dataset.y is not None and network_classes is None:
            logger.info("the data is labelled but the network is unconditional (num_classes=None): labels are ignored")
        self._null_label: int | None = network_classes if isinstance(network_classes, int) else None
        if config.label_dropout > 0:
            if self.dataset is not None and self.dataset.y is None:
                raise ValueError(f"label_dropout={config.label_dropout} needs labelled data; the data has no labels")
            if self._null_label is None:
                raise ValueError(
                    f"label_dropout={config.label_dropout} needs a conditional network with an integer "
                    f"num_classes attribute (its null label); got num_classes={network_classes if network_classes is not _UNSET else 'missing'}"
                )

        # ---- random streams: one generator per shard this process computes -----------------
        first_shard = self.dist.rank * self._shards_per_process
        self.generators = shard_generators(config.seed, first_shard, self._shards_per_process, self.device)

        # ---- optimisation ------------------------------------------------------------------
        if optimizer is None:
            # foreach=True: multi-tensor kernels also on CPU, where torch's default is a Python
            # loop over the parameters (measured 1.6× slower optimizer steps for a small MLP).
            optimizer = torch.optim.AdamW(
                self._params,
                lr=config.lr,
                betas=config.betas,
                eps=config.eps,
                weight_decay=config.weight_decay,
                foreach=True,
            )
        self.optimizer = optimizer
        schedule = (config.warmup_steps, config.steps, config.lr_schedule, config.min_lr_ratio)
        # LambdaLR's argument is the number of scheduler steps taken, i.e. update k - 1.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: lr_factor(done + 1, *schedule))
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)

        # The EMA starts from the (synchronised) initial weights: θ̄_0 = θ_0.
        self.ema: AveragedModel | None = None
        if config.ema_decay is not None:
            sigma_rel = getattr(config, "ema_sigma_rel", None)
            # EDM2's power-function EMA (flowdiff.train.ema) when a relative width is set.
            average = power_ema_multi_avg_fn(sigma_rel) if sigma_rel is not None else get_ema_multi_avg_fn(config.ema_decay)
            self.ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
            self.ema.update_parameters(model)
            # AveragedModel.update_parameters rebuilds and regroups its tensor lists on every call
            # (about as costly as the optimizer step of a small network); the lists never change,
            # so group them once and call the same EMA function on them.
            self._ema_groups = _pair_tensors(self.ema.module, model)

        # ---- bookkeeping -------------------------------------------------------------------
        self.step = 0
        self._last_lr = float("nan")
        self._stop_requested = self._stop_agreed = False
        self._stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.skipped_checkpoints: list[tuple[Path, str]] = []
        self.threads = default_threads(model, self.device) if threads is None else check_int("threads", threads, 0)
        self._model_config = describe_model(model, model_config)
        self._extra_config = json_config(extra_config or {})
        self._log = RunLog(self.output_dir, tensorboard=config.tensorboard, enabled=self.dist.is_main)
        self._prepare_output(resume=resume, resume_from=resume_from, overwrite=overwrite)

    # ------------------------------------------------------------------------------------------
    # Public helpers
    # ------------------------------------------------------------------------------------------

    @property
    def ema_model(self) -> nn.Module:
        """The network with the EMA weights (the trained network itself when ``ema_decay=None``)."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        """The learning rate the next update will use (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes checkpoints and logs."""
        return self.dist.is_main

    # ------------------------------------------------------------------------------------------
    # Output folder, resume
    # ------------------------------------------------------------------------------------------

    def _prepare_output(self, resume: bool, resume_from: str | Path | None, overwrite: bool) -> None:
        source: Path | None = None
        candidates: list[Path] = []
        if resume_from is not None:
            source = resolve_checkpoint(resume_from)
            candidates = [source]
        elif resume:
            if list_checkpoints(self.output_dir):
                source = resolve_checkpoint(self.output_dir)
                # the newest first, then the older ones as fall-backs
                candidates = [source] + [f for _, f in reversed(list_checkpoints(self.output_dir)) if f != source]
            else:
                logger.info("resume=True but %s holds no checkpoint: starting a new run", self.output_dir)
                if self.dist.is_main:
                    truncate_metrics(self.output_dir, 0)  # records of a run killed before its first checkpoint
        elif not overwrite and (list_checkpoints(self.output_dir) or (self.output_dir / METRICS_FILE).exists()):
            raise FileExistsError(
                f"{self.output_dir} already holds a training run; pass resume=True to continue it "
                f"or overwrite=True to start over"
            )
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_temporary_files(self.output_dir)
            if source is None and overwrite:
                shutil.rmtree(self.output_dir / CHECKPOINTS_DIR, ignore_errors=True)
                (self.output_dir / METRICS_FILE).unlink(missing_ok=True)
        self.dist.barrier()
        if source is not None:
            for folder in candidates:
                try:
                    read = self._read_checkpoint(folder)
                except CheckpointError as error:
                    # A truncated or corrupt checkpoint (a copy cut short, a full disk): fall back
                    # to the newest older one that verifies, and say so.
                    self.skipped_checkpoints.append((folder, str(error)))
                    continue
                self._load(folder, read)
                break
            else:
                raise CheckpointError(
                    f"no checkpoint in {self.output_dir} verifies; the newest: {self.skipped_checkpoints[0][1]}"
                )
            if self.skipped_checkpoints:
                logger.warning("resuming from %s (step %d): the newer %s did not verify (%s)", self.resumed_from,
                               self.step, ", ".join(f.name for f, _ in self.skipped_checkpoints),
                               self.skipped_checkpoints[0][1])
            if self.dist.is_main:
                truncate_metrics(self.output_dir, self.step)

    def _read_checkpoint(self, folder: Path) -> tuple[Any, ...]:
        """Every file of a checkpoint, read and verified (a ``CheckpointError`` if one is missing or corrupt)."""
        model_state, ema_state, config = load_checkpoint(folder, device=self.device)
        state = load_training_state(folder, device="cpu")
        if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
            raise CheckpointError(f"corrupt checkpoint file {folder / 'training_state.pt'}: no step/optimizer state")
        return model_state, ema_state, config, state

    def _load(self, folder: Path, read: tuple[Any, ...] | None = None) -> None:
        model_state, ema_state, config, state = read if read is not None else self._read_checkpoint(folder)
        self.model.load_state_dict(model_state)
        if self.ema is not None:
            self.ema.module.load_state_dict(ema_state)
            self.ema.n_averaged.fill_(int(state.get("ema_n_averaged") or 1))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        shard_states = state.get("shard_generators", [])
        total_shards = self.dist.world_size * self._shards_per_process
        first = self.dist.rank * self._shards_per_process
        if not restore_shard_generators(self.generators, shard_states, first, total_shards, self.config.seed, state["step"]):
            warnings.warn(
                f"the checkpoint was written with {len(shard_states)} shards per step, this run uses "
                f"{total_shards} (world_size × grad_accum_steps): the run continues reproducibly but "
                f"not identically to an uninterrupted one",
                stacklevel=3,
            )
        process_states = state.get("process_rng", [])
        if self.dist.rank < len(process_states):
            set_process_rng_state(process_states[self.dist.rank], self.device)
        self.step = int(state["step"])
        self.last_checkpoint = self.resumed_from = folder
        logger.info("resumed from %s at step %d", folder, self.step)
        # The optimizer and scheduler states of the checkpoint win (lr, betas, ... included):
        # say so when the settings were changed, instead of ignoring the change silently.
        saved = config.get("train", {})
        free = {"steps", "output_dir", "log_every", "checkpoint_every", "keep_last", "tensorboard"}
        changed = sorted(k for k, v in self.config.to_dict().items() if k not in free and k in saved and saved[k] != v)
        if changed:
            warnings.warn(
                f"resuming {folder} with changed settings {changed}; the checkpoint's optimizer and schedule "
                f"state are used, so the run is not the one these settings would give from scratch",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def _checkpoint_config(self) -> dict[str, Any]:
        dataset = self.dataset
        data = None
        if dataset is not None:
            data = {
                "name": dataset.name,
                "shape": list(dataset.shape),
                "num_classes": dataset.num_classes,
                "size": len(dataset),
                "dtype": str(dataset.x.dtype).replace("torch.", ""),
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "train": self.config.to_dict(),
            "model": self._model_config,
            "loss": describe_loss(self.loss),
            "path": describe(getattr(self.loss, "path", None)),
            "data": data,
            "extra": self._extra_config,
            "world_size": self.dist.world_size,
            "versions": {"flowdiff": flowdiff_version(), "torch": torch.__version__},
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (collective: every process must call it).

        Returns:
            The checkpoint folder on the main process, ``None`` on the others.
        """
        local = {"generators": [g.get_state() for g in self.generators], "rng": process_rng_state(self.device)}
        gathered = self.dist.all_gather_object(local)
        folder = None
        if self.dist.is_main:
            training_state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else None,
                "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
                "shard_generators": [s for process in gathered for s in process["generators"]],
                "process_rng": [process["rng"] for process in gathered],
                "world_size": self.dist.world_size,
                "grad_accum_steps": self._shards_per_process,
            }
            folder = save_checkpoint(
                self.output_dir,
                self.step,
                self.model.state_dict(),
                self.ema_model.state_dict(),
                self._checkpoint_config(),
                training_state,
                keep_last=self.config.keep_last,
            )
            self.last_checkpoint = folder
        return folder

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[Tensor, Tensor | None]:
        try:
            batch = next(self._batches)
        except StopIteration:
            if self._data_source is None or isinstance(self._data_source, Iterator):
                raise ValueError(
                    f"the data iterator ran out after {self.step} updates of the {self.config.steps} asked; "
                    f"pass a Dataset, a BatchSampler or a re-iterable loader"
                ) from None
            self.sampler = self._batches = iter(self._data_source)
            batch = next(self._batches)
        if isinstance(batch, Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
            x, y = batch[0], (batch[1] if len(batch) == 2 else None)
        else:
            raise TypeError(f"a data batch must be a Tensor x or a pair (x, y), got {type(batch).__name__}")
        if x.shape[0] != self.config.batch_size:
            raise ValueError(f"the data gave a batch of {x.shape[0]} samples, config.batch_size is {self.config.batch_size}")
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=True)
        if y is not None:
            y = y.to(device=self.device, non_blocking=True) if self._pass_labels else None
        return x, y

    def _train_step(self) -> tuple[float, float]:
        """One update; returns ``(loss, grad_norm)`` averaged over the global batch."""
        x, y = self._next_batch()
        accum = self._shards_per_process
        size = self._shard_size
        first = self.dist.rank * accum
        sharded = self.dist.world_size * accum > 1
        total: Tensor | None = None
        for a in range(accum):
            if sharded:
                lo = (first + a) * size
                x_shard = x[lo : lo + size]
                y_shard = y[lo : lo + size] if y is not None else None
            else:
                x_shard, y_shard = x, y
            generator = self.generators[a]
            if y_shard is not None and self.config.label_dropout > 0:
                y_shard = drop_labels(y_shard, self.config.label_dropout, self._null_label, generator=generator)  # type: ignore[arg-type]
            # Only the last micro-batch all-reduces the gradients (the others accumulate locally).
            no_sync = self.dist.enabled and a < accum - 1
            with self._train_model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                with self._autocast():
                    if y_shard is None:
                        output = self.loss(self._train_model, x_shard, generator=generator)
                    else:
                        output = self.loss(self._train_model, x_shard, y=y_shard, generator=generator)
                value = output if isinstance(output, Tensor) else output.loss
                if value.ndim != 0:
                    raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(value.shape)}")
                scaled = value / accum if accum > 1 else value
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total = value.detach() if total is None else total + value.detach()

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = _clip_gradients([p.grad for p in self._params if p.grad is not None], self.config.grad_clip)
        # Every process sees the same mean loss and the same verdict on finiteness (all-reduced below).
        stats = torch.stack([total.float() / accum, grad_norm.float().to(total.device)])  # type: ignore[union-attr]
        if self.dist.enabled:
            # The stop request (SIGTERM/SIGINT) travels with the statistics, so that every process
            # stops after the same update even if the signal reached them at different moments.
            stats = torch.cat([stats, stats.new_tensor([1.0 if self._stop_requested else 0.0])])
            self.dist.all_reduce_sum(stats)
            loss_value, grad_value, stop = stats.tolist()
            loss_value, grad_value = loss_value / self.dist.world_size, grad_value / self.dist.world_size
            self._stop_agreed = stop > 0
        else:
            loss_value, grad_value = stats.tolist()
            self._stop_agreed = self._stop_requested
        step = self.step + 1
        if not math.isfinite(loss_value) or (not math.isfinite(grad_value) and self.scaler is None):
            self.optimizer.zero_grad(set_to_none=True)
            quantity, value_ = ("loss", loss_value) if not math.isfinite(loss_value) else ("grad_norm", grad_value)
            raise NonFiniteLossError(step, quantity, value_, self.last_checkpoint)

        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self._update_ema(step)
        return loss_value, grad_value

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        r"""$\bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta$ (a copy up to ``ema_start``), as ``AveragedModel.update_parameters``."""
        if self.ema is None:
            return
        for averaged, current in self._ema_groups:
            if step <= self.config.ema_start or not averaged[0].is_floating_point():
                torch._foreach_copy_(averaged, current)
            else:
                self.ema.multi_avg_fn(averaged, current, self.ema.n_averaged)  # type: ignore[misc]
        self.ema.n_averaged += 1

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Make SIGTERM and SIGINT request a clean stop; returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_requested = True
            self._stop_signal = signum
            logger.warning("received %s: stopping after this update, with a checkpoint", signal.Signals(signum).name)

        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    def fit(self) -> TrainSummary:
        """Train until ``config.steps`` updates are done, checkpointing and logging on the way.

        Returns:
            A :class:`TrainSummary`.

        SIGTERM (what schedulers send before preempting a job) or a first Ctrl-C stop the run
        cleanly after the current update, with a checkpoint; re-running with ``resume=True``
        continues it exactly. A second Ctrl-C interrupts at once.

        Raises:
            NonFiniteLossError: the loss or gradient norm became non-finite (the weights and the
                last checkpoint are those of the last good step).
        """
        config = self.config
        self._stop_requested = self._stop_agreed = False
        interrupted = False
        previous_handlers = self._install_signal_handlers()
        start_step = self.step
        start = time.perf_counter()
        final_loss = recent_loss = float("nan")
        checkpoint_time = 0.0
        window = MetricsWindow(start)
        self._log.open()
        bar = Progress(config.steps, "train", enabled=self.progress and self.dist.is_main, initial=start_step)
        threads_before = torch.get_num_threads()
        if self.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        self._train_model.train()
        try:
            while self.step < config.steps:
                try:
                    loss_value, grad_value = self._train_step()
                except NonFiniteLossError as error:
                    self._log.write(
                        {"step": error.step, "event": "non_finite", "quantity": error.quantity, "value": str(error.value)}
                    )
                    raise
                self.step += 1
                final_loss = loss_value
                window.add(loss_value, grad_value)
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    record = window.record(self.step, self._last_lr)
                    recent_loss = record["loss"]
                    if isinstance(self.sampler, BatchSampler):
                        record["epoch"] = self.sampler.epoch
                    if self.dist.is_main:
                        self._log.write(record)
                        bar.set_postfix(loss=f"{recent_loss:.4g}", lr=f"{record['lr']:.3g}")
                        for callback in self.callbacks:
                            callback(self, record)
                due = config.checkpoint_every is not None and self.step % config.checkpoint_every == 0
                # One process acts on its own flag at once; several wait for the all-reduced one.
                stop = self._stop_agreed or (self._stop_requested and not self.dist.enabled)
                if due or self.step == config.steps or stop:
                    saving = time.perf_counter()
                    self.save_checkpoint()
                    checkpoint_time += time.perf_counter() - saving
                if stop and self.step < config.steps:
                    interrupted = True
                    logger.warning("stopped at step %d on request; checkpoint %s", self.step, self.last_checkpoint)
                    break
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            bar.close()
            self._log.close()
            torch.set_num_threads(threads_before)
        self.dist.barrier()
        wall = time.perf_counter() - start
        done = self.step - start_step
        rate = done / wall if done > 0 and wall > 0 else 0.0
        return TrainSummary(
            step=self.step,
            start_step=start_step,
            final_loss=final_loss,
            recent_loss=recent_loss,
            wall_time=wall,
            checkpoint_time=checkpoint_time,
            steps_per_second=rate,
            samples_per_second=rate * config.batch_size,
            checkpoint=self.last_checkpoint,
            output_dir=self.output_dir,
            world_size=self.dist.world_size,
            interrupted=interrupted,
            stop_signal=self._stop_signal if interrupted else None,
            resumed_from=self.resumed_from,
            skipped_checkpoints=tuple(self.skipped_checkpoints),
        )
