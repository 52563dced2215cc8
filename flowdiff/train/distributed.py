"""Data-parallel process group set-up, found from the launcher's environment.

``torchrun --nproc_per_node N script.py`` and ``accelerate launch --num_processes N script.py``
both start ``N`` copies of the script with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`setup_distributed` reads them and joins the
process group (``gloo`` on CPU, ``nccl`` on CUDA), so the same user script trains on one process
or on many with no change.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "setup_distributed"]


@dataclass
class DistributedContext:
    """Where this process stands in the data-parallel group (``world_size = 1``: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and logs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op on one process)."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes in place and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def _environment_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer, got {value!r}") from None


def setup_distributed(device_type: str) -> DistributedContext:
    """Join (or reuse) the default process group when a launcher asked for several processes.

    Arguments:
        device_type: ``"cpu"`` or ``"cuda"``; picks the ``gloo`` or ``nccl`` backend.

    Returns:
        The :class:`DistributedContext`; ``world_size = 1`` when not launched data-parallel.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    world_size = _environment_world_size()
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} asks for data-parallel training but torch.distributed is unavailable")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} is set but {name} is not; launch with torchrun or accelerate launch"
            )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    # Leave the group at interpreter exit: torch warns about (and may hang on) a group never destroyed.
    atexit.register(_destroy)
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, initialized_here=True
    )


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
