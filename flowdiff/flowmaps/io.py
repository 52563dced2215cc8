"""Saving and loading a distilled flow map / consistency model next to the teacher run it came from.

The student is a copy of the teacher's network (:func:`~flowdiff.flowmaps.student_from_teacher`), so the
file holds its weights and settings and names the teacher's checkpoint; :func:`load_flow_map` rebuilds the
network from that checkpoint and loads the student's weights. ``flowdiff distill`` writes it and
``flowdiff sample -c FOLDER --nfe 1|2|4`` samples it (docs/flowmaps.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .model import FlowMap, student_from_teacher

__all__ = ["FLOW_MAP_FILE", "is_flow_map_folder", "load_flow_map", "save_flow_map"]

#: The file in a distilled model's folder.
FLOW_MAP_FILE = "flowmap.pt"
_FORMAT = "flowdiff-flowmap-1"


def is_flow_map_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model written by :func:`save_flow_map`."""
    return (Path(folder) / FLOW_MAP_FILE).is_file()


def save_flow_map(model: FlowMap, folder: str | Path, teacher_checkpoint: str | Path, **info: Any) -> Path:
    """Write ``model`` (a student of the teacher at ``teacher_checkpoint``) to ``folder/flowmap.pt`` and
    its settings (``info`` too, JSON-serialisable) to ``folder/flowmap.json``; returns the ``.pt`` file."""
    if not isinstance(model, FlowMap):
        raise TypeError(f"model must be a fd.flowmaps.FlowMap, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grid = getattr(model, "grid", None)
    meta = {"format": _FORMAT, "teacher": str(Path(teacher_checkpoint).resolve()), "two_time": bool(model.two_time),
            "grid": None if grid is None else [float(v) for v in grid], **info}
    file = folder / FLOW_MAP_FILE
    tmp = file.with_suffix(".pt.tmp")
    torch.save({"meta": meta, "state_dict": model.network.state_dict()}, tmp)
    tmp.replace(file)
    (folder / "flowmap.json").write_text(json.dumps(meta, indent=1, default=str))
    return file


def load_flow_map(folder: str | Path, device: str | torch.device = "cpu") -> tuple[FlowMap, dict[str, Any]]:
    """Rebuild a model written by :func:`save_flow_map`: ``(model, meta)``. The teacher's checkpoint must
    still exist (its configuration rebuilds the network). Errors name the folder and what is missing."""
    from ..pipeline import load_field

    folder = Path(folder)
    file = folder / FLOW_MAP_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no {FLOW_MAP_FILE} (write one with `flowdiff distill` or fd.flowmaps.save_flow_map)")
    blob = torch.load(file, map_location="cpu", weights_only=False)
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{file}: not a flowdiff flow-map file (format {None if meta is None else meta.get('format')!r})")
    teacher_dir = Path(meta["teacher"])
    if not teacher_dir.exists():
        raise FileNotFoundError(f"{file}: its teacher checkpoint {teacher_dir} is gone (the student's network is rebuilt from it)")
    teacher, _ = load_field(teacher_dir, device=device, unlabeled="null")
    model = student_from_teacher(teacher, two_time=bool(meta["two_time"]))
    model.network.load_state_dict(blob["state_dict"])
    model.requires_grad_(False)
    model.eval()
    if meta.get("grid") is not None:
        model.grid = torch.tensor(meta["grid"], dtype=torch.float64)
    return model, meta
