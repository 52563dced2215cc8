"""Train, save and load an image-restoration model of the IR-SDE (``flowdiff restore-train`` /
``flowdiff restore --method mrs``).

:func:`train_restoration` is the recipe of ``benchmarks/mrs.py`` (docs/mean_reverting.md): one
μ-conditioned UNet (:class:`~flowdiff.mean_reverting.MeanConditioned`) for all the tasks of
:func:`~flowdiff.mean_reverting.degrade`, each training image degraded by a task drawn uniformly;
the loss is :func:`~flowdiff.mean_reverting.mean_reverting_loss` (Luo et al. 2023, IR-SDE);
Adam with warm-up and cosine decay, gradient clipping, an EMA of the weights (the saved model).
:func:`save_restoration_model` writes ``folder/mean_reverting.pt`` (weights and settings) and
:func:`load_restoration_model` rebuilds ``(model, path, meta)`` for :func:`~flowdiff.mean_reverting.mrs_sample`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import check_float, check_int
from .sde import IRSDE
from .train import DEGRADATIONS, MeanConditioned, degrade, mean_reverting_loss

__all__ = ["RESTORATION_FILE", "build_restoration_model", "is_restoration_folder", "load_restoration_model",
           "save_restoration_model", "train_restoration"]

#: The file in a restoration model's folder.
RESTORATION_FILE = "mean_reverting.pt"
_FORMAT = "flowdiff-mean-reverting-1"


def build_restoration_model(channels: int, widths: Sequence[int] = (32, 64), num_res_blocks: int = 1) -> MeanConditioned:
    """``MeanConditioned(UNet(in_channels=2C))`` for images with ``channels`` = C channels."""
    from ..nn import UNet

    return MeanConditioned(UNet(in_channels=2 * check_int("channels", channels, 1), channels=tuple(int(w) for w in widths),
                                num_res_blocks=check_int("num_res_blocks", num_res_blocks, 1)))


def _degrade_mixed(x: Tensor, tasks: Sequence[str], generator: torch.Generator) -> Tensor:
    task = torch.randint(0, len(tasks), (x.shape[0],), generator=generator)
    mu = torch.empty_like(x)
    for k, name in enumerate(tasks):
        sel = task == k
        if sel.any():
            mu[sel] = degrade(x[sel], name, generator)
    return mu


def train_restoration(images: Tensor, *, tasks: Sequence[str] = DEGRADATIONS, steps: int = 2000, batch_size: int = 128,
                      lr: float = 2e-3, stationary_std: float = 0.5, prediction: str = "noise",
                      widths: Sequence[int] = (32, 64), ema: float = 0.995, seed: int = 0,
                      callback: Callable[[int, float], None] | None = None) -> tuple[MeanConditioned, dict[str, Any]]:
    """Train one restoration model for ``tasks`` on clean ``images`` ``(N, C, H, W)`` in ``[-1, 1]``.

    Returns ``(ema_model, meta)``; ``meta`` holds the settings and the cost (pass it to
    :func:`save_restoration_model`). Measured (docs/mean_reverting.md): 2000 steps of batch 128 on
    the digits, 454 CPU s, PSNR 18-21 dB at 10 NFE.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in DEGRADATIONS]
    if not tasks or bad:
        raise ValueError(f"unknown restoration task(s) {bad or tasks!r}; valid: {', '.join(DEGRADATIONS)}")
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    lr = check_float("lr", lr, 0.0, low_open=True)
    ema = check_float("ema", ema, 0.0, 1.0, high_open=True)
    torch.manual_seed(int(seed))
    g = torch.Generator().manual_seed(int(seed))
    path = IRSDE(stationary_std=stationary_std)
    model = build_restoration_model(images.shape[1], widths)
    average = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    wall, cpu = time.perf_counter(), time.process_time()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        loss = mean_reverting_loss(model, path, x0, _degrade_mixed(x0, tasks, g), prediction, generator=g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_restoration: the loss became {float(loss)} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(average.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema)
        if callback is not None:
            callback(step, float(loss))
    average.eval()
    meta = {"tasks": list(tasks), "steps": steps, "batch_size": batch_size, "lr": lr, "ema": ema, "seed": int(seed),
            "stationary_std": float(stationary_std), "schedule": path.schedule, "terminal_alpha": path.terminal_alpha,
            "prediction": prediction, "widths": [int(w) for w in widths], "data_shape": list(images.shape[1:]),
            "final_loss": float(loss), "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    return average, meta


def is_restoration_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model written by :func:`save_restoration_model`."""
    return (Path(folder) / RESTORATION_FILE).is_file()


def save_restoration_model(model: MeanConditioned, folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model`` and ``meta`` (from :func:`train_restoration`) to ``folder/mean_reverting.pt`` (+ ``.json``)."""
    if not isinstance(model, MeanConditioned):
        raise TypeError(f"model must be a fd.mean_reverting.MeanConditioned, got {type(model).__name__}")
    need = {"stationary_std", "prediction", "widths", "data_shape"}
    if not need <= set(meta):
        raise ValueError(f"meta must hold {sorted(need)} (train_restoration returns it), missing {sorted(need - set(meta))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / RESTORATION_FILE
    tmp = file.with_suffix(".pt.tmp")
    torch.save({"meta": {"format": _FORMAT, **meta}, "state_dict": model.state_dict()}, tmp)
    tmp.replace(file)
    (folder / "mean_reverting.json").write_text(json.dumps({"format": _FORMAT, **meta}, indent=1, default=str))
    return file


def load_restoration_model(folder: str | Path) -> tuple[MeanConditioned, IRSDE, dict[str, Any]]:
    """``(model, path, meta)`` of a folder written by :func:`save_restoration_model`."""
    folder = Path(folder)
    file = folder / RESTORATION_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no {RESTORATION_FILE}: not a mean-reverting restoration model "
                                "(train one with `flowdiff restore-train` or fd.mean_reverting.train_restoration)")
    blob = torch.load(file, map_location="cpu", weights_only=False)
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{file}: not a flowdiff mean-reverting model file")
    model = build_restoration_model(int(meta["data_shape"][0]), meta["widths"])
    model.load_state_dict(blob["state_dict"])
    model.requires_grad_(False)
    model.eval()
    path = IRSDE(stationary_std=float(meta["stationary_std"]), schedule=meta.get("schedule", "cosine"),
                 terminal_alpha=float(meta.get("terminal_alpha", 0.01)))
    return model, path, meta
