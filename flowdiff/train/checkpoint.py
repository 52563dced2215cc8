"""Checkpoints: safetensors weights + a JSON config + the training state, written atomically.

Layout of ``output_dir``::

    output_dir/
      metrics.jsonl
      checkpoints/
        latest                      # one line: the name of the newest complete checkpoint
        step_00001000/
          model.safetensors         # the trained weights
          ema.safetensors           # the EMA weights (what sampling uses)
          config.json               # {"format", "version", "step", "train", "model", "loss", "path", "data", ...}
          training_state.pt         # optimizer, scheduler, EMA count, data order, every RNG state

**Atomicity.** Every file is written to a temporary name in its final folder, flushed and
``fsync``-ed, then renamed with ``os.replace`` (atomic on POSIX and Windows); a checkpoint folder
is assembled under a temporary name (``.tmp-step_...``) and renamed into place in one step, and
only then is ``latest`` replaced. A crash at any moment leaves either the old checkpoint or the
new one, never a half-written file under a name that a reader would open. Leftover temporary
folders are removed by the next :class:`~flowdiff.train.Trainer` that opens the folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "resolve_checkpoint",
]

CHECKPOINT_FORMAT = "flowdiff-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or corrupt; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------
# Atomic file writing
# ----------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the folder's entry table: fsync the folder so it survives a
    # power loss. Not possible on Windows (folders cannot be opened), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, fsync it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}-", dir=path.parent)
    os.close(fd)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        _fsync_file(temporary_path)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    def write(temporary: Path) -> None:
        temporary.write_bytes(data)

    _atomic_write(Path(path), write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint
# ----------------------------------------------------------------------------------------------


def _portable_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors needs contiguous CPU tensors that share no memory (tied weights would).
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}


def _safetensors_bytes(state: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of ``state`` with its metadata keys in sorted order.

    safetensors writes the metadata map in the iteration order of a Rust ``HashMap``, which is
    randomised per process: two runs with identical weights would give different files. The
    header (8-byte little-endian length, then JSON padded with spaces) is rewritten with the
    metadata sorted; the tensor entries and their offsets are unchanged, so the length is too.
    """
    import struct

    from safetensors.torch import save

    raw = save(_portable_state(state), metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length].decode("utf-8"), object_pairs_hook=dict)
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:  # cannot happen for a pure reordering; keep the library's bytes then
        return raw
    return raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :]


def _save_safetensors(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    Path(path).write_bytes(_safetensors_bytes(state, metadata))
    _fsync_file(path)


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of update ``step`` (``step_00001000``)."""
    return f"step_{step:08d}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model_state: dict[str, Tensor],
    ema_state: dict[str, Tensor],
    config: dict[str, Any],
    training_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of update ``step`` under ``output_dir/checkpoints`` atomically.

    The folder is assembled under a temporary name, each file fsync-ed, renamed into place, then
    ``latest`` is replaced; finally all but the ``keep_last`` newest checkpoints are removed.

    Returns:
        The checkpoint folder.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    temporary = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        metadata = {"format": CHECKPOINT_FORMAT, "step": str(step)}
        _save_safetensors(temporary / MODEL_FILE, model_state, {**metadata, "weights": "model"})
        _save_safetensors(temporary / EMA_FILE, ema_state, {**metadata, "weights": "ema"})
        torch.save(training_state, temporary / STATE_FILE)
        _fsync_file(temporary / STATE_FILE)
        (temporary / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        _fsync_file(temporary / CONFIG_FILE)
        _fsync_dir(temporary)
        if final.exists():
            # Re-saving a step (rare: a run resumed at its last step). Move the old folder out of
            # the way first; ``latest`` keeps naming ``name``, valid again after the rename below.
            stale = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{name}-", dir=root))
            os.replace(final, stale / name)
            os.replace(temporary, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(temporary, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, name + "\n")
    prune_checkpoints(output_dir, keep_last)
    return final


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoint folders of ``output_dir`` as ``(step, folder)``, oldest first."""
    return _step_folders(Path(output_dir) / CHECKPOINTS_DIR)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints; never the one ``latest`` names."""
    checkpoints = list_checkpoints(output_dir)
    latest = _read_latest(Path(output_dir) / CHECKPOINTS_DIR)
    for _, folder in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if folder.name != latest:
            shutil.rmtree(folder, ignore_errors=True)


def remove_temporary_files(output_dir: str | Path) -> None:
    """Remove the temporary folders and files a crash may have left in ``output_dir/checkpoints``."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint
# ----------------------------------------------------------------------------------------------


def _read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder that ``path`` designates.

    ``path`` may be a checkpoint folder (holding ``config.json``), a run's ``output_dir`` or its
    ``checkpoints`` folder: then the newest checkpoint is taken. It is the one ``latest`` names,
    except after a crash between a checkpoint's rename and the update of ``latest`` — a
    ``step_*`` folder only ever appears complete (atomic rename), so the newest one is used.

    Raises:
        CheckpointError: nothing usable at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        # A file inside a checkpoint folder (e.g. .../ema.safetensors) designates its folder.
        if path.name in (MODEL_FILE, EMA_FILE, CONFIG_FILE, STATE_FILE):
            return path.parent
        raise CheckpointError(f"not a checkpoint folder: {path}")
    if (path / CONFIG_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        folders = _step_folders(root)
        if folders:
            return folders[-1][1]
        if (root / LATEST_FILE).exists():
            raise CheckpointError(f"{root / LATEST_FILE} names {_read_latest(root)!r} but {root} holds no checkpoint")
    raise CheckpointError(f"no checkpoint in {path} (expected {CONFIG_FILE} or {CHECKPOINTS_DIR}/{LATEST_FILE})")


def _load_safetensors(file: Path, device: torch.device | str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    try:
        return load_file(str(file), device=str(device))
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"corrupt checkpoint file {file}: {_first_line(error)}") from error


def _load_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"corrupt checkpoint file {file}: {_first_line(error)}") from error
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a flowdiff checkpoint config: {file}")
    if int(config.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{file} has checkpoint version {config.get('version')}, this flowdiff reads up to {CHECKPOINT_VERSION}"
        )
    return config


def load_training_state(folder: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The optimizer/scheduler/RNG/data-order state of a checkpoint folder."""
    file = folder / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as error:  # pickle, zip and EOF errors all mean a damaged file
        raise CheckpointError(f"corrupt checkpoint file {file}: {_first_line(error)}") from error


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint's weights and configuration.

    Arguments:
        path: a checkpoint folder, or a run's ``output_dir`` (its latest checkpoint is read).
        device: where the tensors are loaded.

    Returns:
        ``(model_state, ema_state, config)``: the state dicts of the trained and the EMA weights
        (same keys, loadable into the network) and the parsed ``config.json`` (``step``,
        ``train``, ``model``, ``loss``, ``path``, ``data``, ``extra``).

    Raises:
        CheckpointError: the checkpoint is missing or a file is corrupt (one-line message).
    """
    folder = resolve_checkpoint(path)
    config = _load_config(folder)
    model_state = _load_safetensors(folder / MODEL_FILE, device)
    ema_state = _load_safetensors(folder / EMA_FILE, device)
    config["checkpoint_dir"] = str(folder)
    return model_state, ema_state, config


def load_weights(model: nn.Module, path: str | Path, which: str = "ema", strict: bool = True) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (built with the same architecture) and return it in eval mode.

    Arguments:
        model: the network to fill.
        path: a checkpoint folder or a run's ``output_dir``.
        which: ``"ema"`` (the averaged weights, what sampling should use) or ``"model"``.
        strict: passed to ``load_state_dict``.

    Raises:
        CheckpointError: missing/corrupt checkpoint, or weights that do not fit ``model``.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model_state, ema_state, config = load_checkpoint(path, device=device)
    state = ema_state if which == "ema" else model_state
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        file = Path(config["checkpoint_dir"]) / (EMA_FILE if which == "ema" else MODEL_FILE)
        raise CheckpointError(f"weights in {file} do not fit the network: {_first_line(error)}") from error
    return model.eval()


def load_model(path: str | Path, which: str = "ema", device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the network recorded in a checkpoint and load its EMA (or trained) weights.

    The checkpoint's ``config["model"]`` must hold ``{"name", "data_shape", "kwargs"}`` for
    :func:`flowdiff.nn.build_network` (the :class:`~flowdiff.train.Trainer` records it when given
    ``model_config``, or when the network has a ``config()`` method returning it).

    Returns:
        The network in eval mode on ``device``, with ``which`` weights (``"ema"`` by default).

    Raises:
        CheckpointError: missing/corrupt checkpoint, or no buildable model description in it.
    """
    from flowdiff.nn import build_network

    folder = resolve_checkpoint(path)
    config = _load_config(folder)
    description = config.get("model")
    if not isinstance(description, dict) or "name" not in description or "data_shape" not in description:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} has no buildable 'model' entry ({{'name', 'data_shape', 'kwargs'}}); "
            f"build the network yourself and call load_weights(network, path)"
        )
    try:
        network = build_network(description["name"], description["data_shape"], **description.get("kwargs", {}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"cannot rebuild the network of {folder / CONFIG_FILE}: {_first_line(error)}") from error
    network.to(device)
    return load_weights(network, folder, which=which)
