"""The :class:`TrainConfig` dataclass: every knob of a training run, validated, JSON round-trippable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flowdiff._utils import check_float, check_int

__all__ = ["LR_SCHEDULES", "MIXED_PRECISION", "TrainConfig"]

MIXED_PRECISION = ("no", "bf16", "fp16")
"""Values of :attr:`TrainConfig.mixed_precision`; ``"bf16"``/``"fp16"`` need a CUDA device."""

LR_SCHEDULES = ("constant", "cosine")
"""Values of :attr:`TrainConfig.lr_schedule` (both after the linear warm-up)."""


def _or_none(check: Callable[..., Any], name: str, value: Any, *args: Any, hint: str, **kwargs: Any) -> Any:
    """``None``, or ``check(name, value, ...)`` with the meaning of ``None`` added to its error."""
    if value is None:
        return None
    try:
        return check(name, value, *args, **kwargs)
    except ValueError as error:
        raise ValueError(f"{error} (or None: {hint})") from None


@dataclass
class TrainConfig:
    r"""Settings of a training run (the ``"train"`` entry of every checkpoint's ``config.json``).

    Optimisation is AdamW (Loshchilov & Hutter, 2019, "Decoupled weight decay regularization")
    with a linear warm-up to ``lr`` over ``warmup_steps`` updates, then a constant rate or a
    cosine decay to ``min_lr_ratio · lr`` (Loshchilov & Hutter, 2017, "SGDR"): the learning rate
    of update :math:`k = 1, 2, \dots` is

    .. math::

        \eta_k = \eta \cdot \begin{cases}
            k / W & k \le W \\
            1 & \text{constant} \\
            r + (1 - r)\,\tfrac12\big(1 + \cos(\pi\,\tfrac{k - W}{S - W})\big) & \text{cosine}
        \end{cases}

    with :math:`W` = ``warmup_steps``, :math:`S` = ``steps``, :math:`r` = ``min_lr_ratio``.

    The exponential moving average of the weights (Polyak & Juditsky, 1992) is
    :math:`\bar\theta_k = \theta_k` for :math:`k \le` ``ema_start`` and
    :math:`\bar\theta_k = d\,\bar\theta_{k-1} + (1 - d)\,\theta_k` after, :math:`d` = ``ema_decay``.

    Attributes:
        steps: total number of optimizer updates of the run (a resumed run continues to it).
        batch_size: *global* batch per update, over all processes and accumulation micro-batches.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's epsilon.
        warmup_steps: updates of linear warm-up, in ``[0, steps]``.
        lr_schedule: ``"constant"`` or ``"cosine"`` after the warm-up.
        min_lr_ratio: final learning rate of the cosine schedule as a fraction of ``lr``.
        grad_clip: maximal global gradient 2-norm, or ``None`` for no clipping.
        grad_accum_steps: micro-batches per update on each process (the global batch is split into
            ``world_size · grad_accum_steps`` equal shards).
        ema_decay: decay of the EMA of the weights in ``[0, 1)``, or ``None`` for no EMA (the
            checkpoint's EMA weights are then the weights themselves).
        ema_start: the EMA equals the weights for the first ``ema_start`` updates.
        ema_sigma_rel: ``None`` (the fixed decay ``ema_decay``), or the relative width in
            ``(0, 0.28)`` of EDM2's power-function EMA (Karras et al. 2024; :mod:`flowdiff.train.ema`),
            whose decay grows with the step, :math:`d_k = (1 - 1/(k+1))^{\gamma+1}`, so the average
            always covers the same fraction of the run. Needs ``ema_decay`` not ``None``.
        label_dropout: probability of replacing a label by the network's null label (classifier-free
            guidance training, Ho & Salimans, 2022); needs labelled data and a conditional network.
        checkpoint_every: save a checkpoint every this many updates (and at the end); ``None``
            saves only at the end.
        keep_last: number of most recent checkpoints kept on disk.
        log_every: write a metrics record (and refresh the progress bar) every this many updates.
        seed: seed of every random stream the trainer owns (data order, the loss's draws, label dropout).
        output_dir: folder for checkpoints and ``metrics.jsonl``.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 adds a gradient
            scaler). The last two need a CUDA device.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        deterministic: call ``torch.use_deterministic_algorithms(True)`` (needed for bitwise
            exact resume on CUDA; CPU kernels used here are deterministic already).
        tensorboard: also write TensorBoard scalars to ``output_dir/tensorboard`` (needs the
            ``tensorboard`` package: ``pip install flowdiff[tensorboard]``; tested against the JSONL log).
    """

    steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    ema_decay: float | None = 0.999
    ema_start: int = 0
    ema_sigma_rel: float | None = None
    label_dropout: float = 0.0
    checkpoint_every: int | None = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    output_dir: str = "runs/flowdiff"
    mixed_precision: str = "no"
    device: str = "auto"
    deterministic: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, Path):
            self.output_dir = str(self.output_dir)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad setting and its allowed range."""
        for name in ("steps", "batch_size", "grad_accum_steps", "keep_last", "log_every"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        for name in ("warmup_steps", "ema_start", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), 0))
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        self.checkpoint_every = _or_none(check_int, "checkpoint_every", self.checkpoint_every, 1, hint="checkpoint only at the end")
        self.lr = check_float("lr", self.lr, 0.0, low_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0)
        self.eps = check_float("eps", self.eps, 0.0, low_open=True)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2) with each in [0, 1), got {self.betas!r}")
        self.betas = tuple(check_float(f"betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(self.betas))  # type: ignore[assignment]
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        self.min_lr_ratio = check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        self.grad_clip = _or_none(check_float, "grad_clip", self.grad_clip, 0.0, low_open=True, hint="no clipping")
        self.ema_decay = _or_none(check_float, "ema_decay", self.ema_decay, 0.0, 1.0, high_open=True, hint="no EMA")
        self.ema_sigma_rel = _or_none(check_float, "ema_sigma_rel", self.ema_sigma_rel, 0.0, 0.28, low_open=True,
                                      high_open=True, hint="the fixed decay ema_decay")
        if self.ema_sigma_rel is not None and self.ema_decay is None:
            raise ValueError(f"ema_sigma_rel={self.ema_sigma_rel} needs an EMA; ema_decay is None (no EMA)")
        self.label_dropout = check_float("label_dropout", self.label_dropout, 0.0, 1.0)
        if self.batch_size % self.grad_accum_steps != 0:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by grad_accum_steps={self.grad_accum_steps}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        for name in ("deterministic", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the settings (``betas`` as a list)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict`'s output (or a YAML/JSON mapping); unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"from_dict needs a dict, got {type(data).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys are {valid}")
        data = dict(data)
        if "betas" in data and isinstance(data["betas"], list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some settings changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

