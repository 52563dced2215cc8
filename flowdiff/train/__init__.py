"""Training: the :class:`Trainer`, its :class:`TrainConfig`, and checkpoint I/O.

* :class:`Trainer` — AdamW with warm-up (constant or cosine), gradient clipping, EMA of the
  weights, mixed precision on CUDA, atomic safetensors checkpoints with exact resume, a progress
  bar, a JSONL metrics log (TensorBoard optional), non-finite detection, and data-parallel
  training under ``torchrun`` / ``accelerate launch`` with no change to the script.
* :class:`TrainConfig` — the validated settings; :func:`lr_factor` — the schedule.
* :func:`load_checkpoint`, :func:`load_weights`, :func:`load_model` — read checkpoints for
  sampling (EMA weights by default); :class:`CheckpointError` — a missing or corrupt checkpoint.

Example::

    import flowdiff as fd
    from flowdiff.train import TrainConfig, Trainer, load_model

    data = fd.data.load_dataset("moons")
    spec = {"name": "mlp", "data_shape": list(data.shape), "kwargs": {"hidden": 128, "depth": 3}}
    model = fd.nn.build_network(spec["name"], data.shape, **spec["kwargs"])
    loss = fd.losses.GaussianPathLoss(fd.paths.Linear(), prediction="velocity")
    config = TrainConfig(steps=2000, batch_size=256, warmup_steps=100, output_dir="runs/moons")
    summary = Trainer(model, loss, data, config, model_config=spec, resume=True).fit()
    ema = load_model("runs/moons")          # the EMA network, ready for fd.Field(ema, path, "velocity")

The same script trains data-parallel under ``torchrun --nproc_per_node 2 script.py`` or
``accelerate launch --multi_gpu --num_processes 2 script.py``; re-running it after a kill
(SIGKILL included) continues from the last checkpoint to the same weights.
"""

from flowdiff.train.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_weights,
    resolve_checkpoint,
)
from flowdiff.train.config import LR_SCHEDULES, MIXED_PRECISION, TrainConfig
from flowdiff.train.trainer import (
    METRICS_FILE,
    NonFiniteLossError,
    Trainer,
    TrainSummary,
    lr_factor,
)

__all__ = [
    "LR_SCHEDULES",
    "METRICS_FILE",
    "MIXED_PRECISION",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainSummary",
    "Trainer",
    "atomic_write_bytes",
    "atomic_write_text",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "lr_factor",
    "resolve_checkpoint",
]
