"""Small shared helpers: time validation and broadcasting (no flowdiff imports)."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

TimeLike = Union[float, int, Tensor]


def as_time_tensor(t: TimeLike, like: Tensor | None = None, name: str = "t") -> Tensor:
    """Return ``t`` as a floating tensor on the device/dtype of ``like`` (if given).

    Python scalars become 0-d tensors. Integer tensors are promoted to the
    default floating dtype (or ``like``'s dtype).
    """
    if isinstance(t, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool {t!r}")
    if isinstance(t, (int, float)):
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
        device = like.device if like is not None else None
        return torch.tensor(float(t), dtype=dtype, device=device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
        t = t.to(dtype)
    if like is not None:
        target_dtype = like.dtype if like.is_floating_point() else t.dtype
        t = t.to(device=like.device, dtype=target_dtype)
    return t


def check_time_range(t: Tensor, low: float = 0.0, high: float = 1.0, name: str = "t") -> None:
    """Raise ValueError if any entry of ``t`` is outside ``[low, high]`` or not finite."""
    if t.numel() == 0:
        return
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.flatten()[:5].tolist()}")
    t_lo, t_hi = float(t.min()), float(t.max())
    # A few ulps of slack so that e.g. 1 - 1e-3 computed in float32 passes.
    eps = 4 * torch.finfo(t.dtype).eps
    if t_lo < low - eps or t_hi > high + eps:
        bad = t_lo if t_lo < low - eps else t_hi
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], got {name}={bad:.6g}")


def batch_time(t: TimeLike, x: Tensor, name: str = "t") -> Tensor:
    """Broadcast ``t`` to shape ``(B,)`` for a batch ``x`` of shape ``(B, *)``.

    Accepts a Python number, a 0-d tensor, a tensor of shape ``(1,)`` or ``(B,)``.
    Raises ValueError naming the shapes when they do not match.
    """
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    t = as_time_tensor(t, like=x, name=name)
    batch = x.shape[0]
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        return t.reshape(()).expand(batch)
    if t.ndim == 1 and t.shape[0] == batch:
        return t
    raise ValueError(
        f"{name} must be a scalar or have shape (B,) = ({batch},) to match x of shape "
        f"{tuple(x.shape)}, got {name} of shape {tuple(t.shape)}"
    )


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape ``(B,)`` or ``()`` to broadcast against ``x`` ``(B, *)``."""
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` (an integral float such as ``3.0`` is accepted), checked against
    ``[low, high]``; a ``ValueError`` naming the value and the allowed range otherwise.

    The one integer validator of the package: every option that counts something goes through it.
    """
    ok = not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    )
    if ok:
        value = int(value)  # type: ignore[arg-type]
        ok = (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name} must be an integer {_describe_range(low, high)}, got {name}={value!r}")
    return value  # type: ignore[return-value]


def check_float(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high`` (closed unless
    ``low_open``/``high_open``); a ``ValueError`` naming the value and the allowed range otherwise.

    The one real-number validator of the package (bools, strings, NaN and infinities are refused).
    """
    import math

    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        value = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
    if not ok:
        rng = _describe_range(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a finite number {rng}, got {name}={value!r}")
    return value  # type: ignore[return-value]


def _describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


#: Parameter count below which one CPU thread is the default: measured on a 2-core machine shared
#: with other jobs, a 184k-parameter MLP (batch 256) trained at 108 steps/s on one thread and
#: 5.3 steps/s on two (docs/cli.md); intra-op parallelism only pays for larger networks.
SMALL_MODEL_PARAMETERS = 2_000_000

#: The most CPU threads chosen by default (more rarely pays for the networks of this library).
MAX_DEFAULT_THREADS = 4


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads(model: object = None, device: object = None) -> int:
    """The CPU threads a long job uses unless told otherwise: 1 for a network of fewer than
    ``SMALL_MODEL_PARAMETERS`` parameters (or on an accelerator, where the CPU only feeds it),
    else ``min(available_cores() // 2 or 1, MAX_DEFAULT_THREADS)``; never more than the cores
    this process may use. torch's own default (one thread per core) oversubscribes a machine
    that runs anything else: the measurements are in docs/cli.md.
    """
    if device is not None and getattr(torch.device(device), "type", "cpu") != "cpu":
        return 1
    if model is not None:
        try:
            count = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            count = None
        if count is not None and count < SMALL_MODEL_PARAMETERS:
            return 1
    return max(1, min(available_cores() // 2, MAX_DEFAULT_THREADS))
