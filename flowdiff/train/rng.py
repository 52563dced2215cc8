r"""The random streams of a training run, and the process random state a checkpoint holds.

Every random draw of a run comes from a stream identified by ``(seed, stream, index)``:

* stream ``DATA_STREAM``: the batch sampler's generator (the order of the minibatches);
* stream ``SHARD_STREAM``, index :math:`j`: the generator of shard :math:`j` of every global batch
  (times, noise and label dropout inside the loss), whatever process computes it;
* stream ``INIT_STREAM``: the network's initial weights (drawn by torch's global generator,
  seeded with it for the construction only, inside ``torch.random.fork_rng``).

A stream's seed is a 63-bit hash of the triple by numpy's ``SeedSequence`` (whose entropy mixing
follows M. E. O'Neill's ``seed_seq`` design for independent streams), so the streams of one run
are independent and a shard's draws depend on its index only. That is what makes a run on
``W`` processes with ``A`` accumulation steps equal to one on a single process with ``W·A``.

A checkpoint stores each shard generator's state and each process's global states (torch,
Python ``random``, numpy and CUDA), so a resumed run continues every stream where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATA_STREAM",
    "INIT_STREAM",
    "SHARD_STREAM",
    "process_rng_state",
    "restore_shard_generators",
    "set_process_rng_state",
    "shard_generators",
    "stream_seed",
]

#: Stream of the batch sampler's generator.
DATA_STREAM = 0
#: Stream of the per-shard generators (index = the shard's global index).
SHARD_STREAM = 1
#: Stream of the network's initial weights (:func:`flowdiff.pipeline.train_run` seeds torch with it while building the network).
INIT_STREAM = 2


def stream_seed(seed: int, stream: int, index: int = 0) -> int:
    """An independent 63-bit seed for ``(seed, stream, index)`` from numpy's ``SeedSequence`` hashing."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def shard_generators(seed: int, first_shard: int, count: int, device: torch.device) -> list[torch.Generator]:
    """Generators of shards ``first_shard, …, first_shard + count − 1`` (the ones this process computes).

    On CUDA and MPS the generators live on the device (the loss draws there); otherwise on the CPU.
    """
    generator_device = device if device.type in ("cuda", "mps") else torch.device("cpu")
    return [
        torch.Generator(device=generator_device).manual_seed(stream_seed(seed, SHARD_STREAM, first_shard + a))
        for a in range(count)
    ]


def restore_shard_generators(
    generators: Sequence[torch.Generator],
    saved_states: Sequence[Tensor],
    first_shard: int,
    total_shards: int,
    seed: int,
    step: int,
) -> bool:
    """Set this process's shard generators from a checkpoint's states of all shards.

    Returns ``True`` when the checkpoint had the same number of shards per step (the run continues
    exactly). Otherwise the draws cannot continue as before: the generators are reseeded from
    ``(seed, step)`` so that the continuation is at least reproducible, and ``False`` is returned.
    """
    if len(saved_states) == total_shards:
        for a, generator in enumerate(generators):
            generator.set_state(saved_states[first_shard + a])
        return True
    for a, generator in enumerate(generators):
        generator.manual_seed(stream_seed(seed, SHARD_STREAM + 1 + int(step), a))
    return False


def process_rng_state(device: torch.device) -> dict[str, Any]:
    """The process-global random states: torch (CPU), Python ``random``, numpy, and CUDA on a CUDA device.

    Every value loads with ``torch.load(weights_only=True)`` (numpy's key array is stored as an
    int64 tensor, not a numpy array).
    """
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_process_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`process_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
