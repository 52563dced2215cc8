"""Atomic safetensors files with JSON settings: what EMS statistics and tuned grids are stored as."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor


def save_tensors(path: str | Path, tensors: dict[str, Tensor], file_format: str, settings: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``{"format", "settings"}`` metadata, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    meta = {"format": file_format, "settings": json.dumps(settings)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(out)  # a reader never sees half a file
    return out


def load_tensors(path: str | Path, file_format: str, required: set[str], what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; ValueError naming the file if it is not a ``what`` file."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no {what} file at {str(p)!r}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{str(p)!r} is not a readable safetensors file: {err}") from err
    if meta.get("format") != file_format or not required <= tensors.keys():
        raise ValueError(f"{str(p)!r} is not a flowdiff {what} file (format {meta.get('format')!r}, expected {file_format!r})")
    return tensors, json.loads(meta["settings"])
