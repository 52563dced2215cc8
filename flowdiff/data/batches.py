"""An infinite, seeded, resumable minibatch iterator.

Each epoch visits a fresh random permutation of the data set in consecutive minibatches; the last
incomplete minibatch of an epoch is dropped (``drop_last=True``, so every batch has the same size
and every sample is equally likely within an epoch) or returned short (``drop_last=False``).

**Resuming.** :meth:`BatchSampler.state_dict` records the epoch, the position inside it and the
random generator's state *before* the current epoch's permutation was drawn.
:meth:`BatchSampler.load_state_dict` restores that state, redraws the same permutation and jumps
to the same position, so a training run restarted from a checkpoint sees exactly the minibatches
it would have seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor

from flowdiff._utils import check_int
from flowdiff.data._generators import as_generator
from flowdiff.data.dataset import Dataset

__all__ = ["BatchSampler", "batches"]


class BatchSampler(Iterator[tuple[Tensor, Tensor | None]]):
    """Infinite iterator over minibatches ``(x, y)`` of a :class:`Dataset` (``y`` is ``None`` when unlabelled).

    Arguments:
        dataset: a :class:`Dataset`, or a Tensor ``x`` of shape ``(N, ...)``.
        batch_size: samples per batch.
        generator: a CPU ``torch.Generator`` (used and advanced in place) or an int seed; ``None``
            means seed 0, so that runs are reproducible by default.
        drop_last: drop the last incomplete batch of each epoch.

    Attributes:
        epoch: number of completed epochs.
        position: index in the current epoch's permutation of the next sample to return.
    """

    def __init__(
        self,
        dataset: Dataset | Tensor,
        batch_size: int,
        generator: torch.Generator | int | None = None,
        drop_last: bool = True,
    ) -> None:
        if isinstance(dataset, Tensor):
            dataset = Dataset(x=dataset if dataset.ndim >= 2 else dataset[:, None])
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a flowdiff Dataset or a Tensor, got {type(dataset).__name__}")
        batch_size = check_int("batch_size", batch_size, 1)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        if drop_last and batch_size > len(dataset):
            raise ValueError(
                f"batch_size={batch_size} exceeds the {len(dataset)} samples of the dataset; "
                f"lower it or pass drop_last=False"
            )
        generator = cast(torch.Generator, as_generator(0 if generator is None else generator))
        if generator.device.type != "cpu":
            raise ValueError(f"generator must live on the CPU (the permutation is drawn there), got {generator.device}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        # Remember the state that produces this epoch's permutation: it is all a resume needs.
        self._epoch_generator_state = self.generator.get_state()
        self._permutation = torch.randperm(len(self.dataset), generator=self.generator)
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def next_indices(self) -> Tensor:
        """Indices (into the dataset) of the next batch; advances the iterator."""
        remaining = len(self.dataset) - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self._start_epoch()
        indices = self._permutation[self.position : self.position + self.batch_size]
        self.position += len(indices)
        return indices

    def __next__(self) -> tuple[Tensor, Tensor | None]:
        indices = self.next_indices().to(self.dataset.x.device)
        return self.dataset[indices]

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The iterator's position.

        Returns:
            ``{"epoch", "position", "generator_state", "batch_size", "dataset_size", "drop_last"}``.
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator_state": self._epoch_generator_state.clone(),
            "batch_size": self.batch_size,
            "dataset_size": len(self.dataset),
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next batches are those the saved iterator would have returned."""
        missing = {"epoch", "position", "generator_state"} - set(state)
        if missing:
            raise ValueError(f"state is missing the keys {sorted(missing)}")
        if state.get("dataset_size", len(self.dataset)) != len(self.dataset):
            raise ValueError(
                f"state was saved for a dataset of {state['dataset_size']} samples, this one has {len(self.dataset)}"
            )
        for key in ("batch_size", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]}, this sampler has {key}={getattr(self, key)}"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self.dataset):
            raise ValueError(f"position {position} out of range [0, {len(self.dataset)}]")
        self.generator.set_state(state["generator_state"])
        self.epoch = int(state["epoch"])
        self._start_epoch()
        self.position = position


def batches(
    dataset: Dataset | Tensor,
    batch_size: int,
    generator: torch.Generator | int | None = None,
    drop_last: bool = True,
) -> BatchSampler:
    """An infinite, reshuffling, resumable iterator of minibatches ``(x, y)``; see :class:`BatchSampler`."""
    return BatchSampler(dataset, batch_size, generator, drop_last)
