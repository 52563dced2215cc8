r"""What a training run reports: the JSON-lines metrics log, TensorBoard scalars, the progress bar,
and the description of the run (network, loss, path) that its checkpoints' ``config.json`` holds.

Every ``log_every`` updates (and after the last) the main process writes one record to
``output_dir/metrics.jsonl``: the means over the updates since the previous record,

.. math::

    \text{loss} = \frac1n\sum_{k} L_k,\qquad \text{grad\_norm} = \frac1n\sum_k \lVert g_k\rVert,

with the learning rate of the last update, the updates per second of the window (``it_per_s``),
the seconds since :meth:`~flowdiff.train.Trainer.fit` started (``wall``) and the sampler's epoch
when there is one. A failed update writes ``{"step", "event": "non_finite", "quantity", "value"}``.
One line per record, flushed, so a run killed at any moment leaves a readable file; a resumed run
first drops the records after its checkpoint (they are written again), keeping one record per step.
With ``tensorboard=True`` the same scalars go to ``output_dir/tensorboard`` as ``train/<key>``.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from flowdiff.train.checkpoint import atomic_write_text

__all__ = [
    "METRICS_FILE",
    "TENSORBOARD_DIR",
    "MetricsWindow",
    "Progress",
    "RunLog",
    "describe",
    "describe_loss",
    "describe_model",
    "flowdiff_version",
    "json_config",
    "progress_bar",
    "truncate_metrics",
]

METRICS_FILE = "metrics.jsonl"
"""Name of the JSON-lines metrics log in ``output_dir``."""

TENSORBOARD_DIR = "tensorboard"
"""Folder of the TensorBoard event files in ``output_dir``."""

#: The record keys written as TensorBoard scalars.
TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "it_per_s")


class MetricsWindow:
    """Running sums of the updates since the last record; :meth:`record` turns them into one record."""

    def __init__(self, run_start: float) -> None:
        self.run_start = run_start
        self._reset(run_start)

    def _reset(self, now: float) -> None:
        self.start, self.steps, self.loss, self.grad_norm = now, 0, 0.0, 0.0

    def add(self, loss: float, grad_norm: float) -> None:
        """Account for one update."""
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm

    def record(self, step: int, lr: float) -> dict[str, Any]:
        """The record of the window ending at ``step`` (window means, rate, wall time); starts a new window."""
        now = time.perf_counter()
        record = {
            "step": step,
            "loss": self.loss / self.steps,
            "lr": lr,
            "grad_norm": self.grad_norm / self.steps,
            "it_per_s": self.steps / max(now - self.start, 1e-12),
            "wall": now - self.run_start,
        }
        self._reset(now)
        return record


class RunLog:
    """The metrics file (and TensorBoard writer) of a run folder, on the main process only.

    :meth:`open` at the start of ``fit()``, :meth:`write` per record, :meth:`close` in its
    ``finally``. On other processes (``enabled=False``) every method does nothing. The TensorBoard
    writer, created on the first :meth:`open`, stays open across ``fit()`` calls (flushed on close).
    """

    def __init__(self, output_dir: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.tensorboard = tensorboard
        self.enabled = enabled
        self._file: Any = None
        self._writer: Any = None

    def open(self) -> None:
        if not self.enabled:
            return
        # Kept open for the whole fit(): one flushed line per record.
        self._file = open(self.output_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if self.tensorboard and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR))
            except ImportError:
                warnings.warn("tensorboard=True but the tensorboard package is not installed; skipping it", stacklevel=3)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the metrics file (and its scalars to TensorBoard)."""
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None and "loss" in record:
            for key in TENSORBOARD_SCALARS:
                self._writer.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.flush()


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop the records after ``step`` from ``output_dir``'s metrics file (and lines cut by a kill).

    Records after the checkpoint came from the interrupted part of the run: the resumed run writes
    them again, so dropping them keeps one record per step.
    """
    file = Path(output_dir) / METRICS_FILE
    if not file.exists():
        return
    kept = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_text(file, "".join(line + "\n" for line in kept))


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """A ``tqdm`` bar of ``total`` updates from ``initial`` when ``enabled``, stderr is a terminal and
    tqdm is installed; ``None`` otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


#: Seconds between two progress lines when stderr is not a terminal (``FLOWDIFF_PROGRESS_EVERY`` overrides).
PROGRESS_EVERY = 10.0


class Progress:
    """Progress of a long job on stderr: a ``tqdm`` bar on a terminal, otherwise one line every
    ``every`` seconds (``"train: 400/2000 step (20%), 45.1 step/s, 35 s left, loss=0.12"``), and
    nothing when ``enabled`` is false. Use as a context manager; :meth:`update` advances it.

    Log files and CI jobs (stderr not a terminal) thus still see the job move, without the
    carriage-return noise of a bar.
    """

    def __init__(self, total: int | None, desc: str, *, enabled: bool = True, initial: int = 0, unit: str = "step",
                 every: float | None = None, stream: Any = None) -> None:
        import os

        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.every = float(os.environ.get("FLOWDIFF_PROGRESS_EVERY", PROGRESS_EVERY)) if every is None else float(every)
        self.postfix: dict[str, Any] = {}
        self._bar = None
        if self.enabled and total and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm.auto import tqdm  # type: ignore[import-untyped]

                self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=self.stream)
            except ImportError:  # pragma: no cover - tqdm is a dependency of the train extra
                pass
        self._start = self._last = time.perf_counter()
        self._initial = initial

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` units; ``postfix`` values are shown next to the count."""
        self.count += n
        if postfix:
            self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def set_postfix(self, **postfix: Any) -> None:
        """Values shown next to the count from now on (e.g. ``loss``)."""
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def line(self, now: float | None = None) -> str:
        """The one-line record of the current state."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.count - self._initial) / elapsed
        text = f"{self.desc}: {self.count}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.count / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            text += f", {max(0.0, (self.total - self.count) / rate):.0f} s left"
        extra = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text + (f", {extra}" if extra else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def json_config(obj: Any) -> Any:
    """``obj`` as it reads back from JSON."""
    # Round-trip through JSON (tuples -> lists, anything exotic -> str) so saving never fails late.
    return json.loads(json.dumps(obj, default=str))


def describe_model(model: Any, model_config: dict[str, Any] | None) -> dict[str, Any]:
    """The network's entry of ``config.json``: ``model_config`` if given, else ``model.config()``, else its class."""
    if model_config is not None:
        return json_config(model_config)
    described = getattr(model, "config", None)
    if callable(described):
        described = described()
    if isinstance(described, dict):
        return json_config(described)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}"}


def describe(obj: Any) -> dict[str, Any] | None:
    """``obj.config()`` when it has one (JSON-safe), else its class; ``None`` for ``None``."""
    if obj is None:
        return None
    described = getattr(obj, "config", None)
    if callable(described):
        try:
            described = described()
        except TypeError:
            described = None
    if isinstance(described, dict):
        return json_config(described)
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}


def describe_loss(loss: Any) -> dict[str, Any]:
    """The loss's entry of ``config.json``: its ``config()``, or what identifies the objective."""
    described = describe(loss) or {}
    if set(described) == {"class"}:
        # No config() method: record what identifies the objective for a reader of the checkpoint.
        for attribute in ("prediction", "kind", "objective", "weighting", "time_sampler"):
            value = getattr(loss, attribute, None)
            if value is not None:
                described[attribute] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        described["repr"] = repr(loss)
    return described


def flowdiff_version() -> str:
    """The installed flowdiff's version, for the checkpoint's ``versions`` entry.

    Read from the distribution's metadata rather than ``flowdiff.__version__``: importing the root
    package from here would make the training layer depend on every layer the root imports.
    """
    try:
        return importlib.metadata.version("flowdiff")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"
