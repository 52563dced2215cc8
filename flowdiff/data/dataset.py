"""The :class:`Dataset` container returned by every loader of :mod:`flowdiff.data`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from flowdiff._utils import check_int
from flowdiff.data._generators import as_generator, draw_device

__all__ = ["DataError", "Dataset", "Sampler"]


class DataError(ValueError):
    """User data that cannot be trained on: unreadable, not a numeric array, empty, too few rows for
    a split, or holding NaN/Inf. A ``ValueError`` (existing handlers keep working); the command
    line reports it in one line with exit status 1 (a data error, not a usage error)."""

Sampler = Callable[[int, "torch.Generator | None"], "tuple[Tensor, Tensor | None]"]
"""``sampler(n, generator) -> (x, y)``: fresh draws from a data distribution known in closed form."""


@dataclass
class Dataset:
    """Samples ``x`` of shape ``(N, *shape)`` with optional integer labels ``y`` of shape ``(N,)``.

    Attributes:
        x: the samples, floating point.
        y: labels in ``[0, num_classes)``, ``torch.long``, or ``None``.
        name: where the data came from (a built-in name or a path).
        num_classes: number of classes when labelled, else ``None``.
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        indices: for finite data sets, the rows of the full source that this split holds (so two
            splits can be checked for overlap); ``None`` for generated toy sets.
        class_names: names of the classes (image folders), else ``None``.
        sampler: for distributions that can be sampled without limit (the 2-D toy sets), a
            function ``(n, generator) -> (x, y)`` giving fresh samples; see :meth:`sample`.
    """

    x: Tensor
    y: Tensor | None = None
    name: str = "data"
    num_classes: int | None = None
    split: str = "all"
    indices: Tensor | None = None
    class_names: list[str] | None = None
    sampler: Sampler | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.ndim < 2:
            shape = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise ValueError(f"x must be a Tensor of shape (N, *shape) with at least 2 dimensions, got {shape}")
        if not self.x.dtype.is_floating_point:
            raise TypeError(f"x must be floating point, got dtype {self.x.dtype}")
        if self.y is not None:
            if not isinstance(self.y, Tensor) or self.y.shape != (self.x.shape[0],):
                shape = tuple(self.y.shape) if isinstance(self.y, Tensor) else type(self.y).__name__
                raise ValueError(f"y must be a Tensor of shape ({self.x.shape[0]},), got {shape}")
            if self.y.dtype != torch.long:
                raise TypeError(f"y must have dtype torch.long, got {self.y.dtype}")
            if self.num_classes is None:
                raise ValueError("a labelled Dataset needs num_classes")
        if self.num_classes is not None:
            self.num_classes = check_int("num_classes", self.num_classes, 1)

    def __repr__(self) -> str:
        labels = f"{self.num_classes} classes" if self.y is not None else "unlabelled"
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, shape={self.shape}, "
            f"dtype={self.x.dtype}, device={self.x.device}, {labels}, sampler={self.has_sampler})"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape ``x.shape[1:]``."""
        return tuple(self.x.shape[1:])

    @property
    def has_sampler(self) -> bool:
        """Whether :meth:`sample` draws fresh samples from the true distribution."""
        return self.sampler is not None

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x[index], y[index])`` (``y`` part ``None`` when unlabelled)."""
        return self.x[index], (self.y[index] if self.y is not None else None)

    def sample_with_labels(
        self, n: int, generator: torch.Generator | int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``n`` samples and their labels: fresh draws when :attr:`has_sampler`, else rows of ``x``
        drawn uniformly with replacement (a bootstrap sample of the finite data set)."""
        n = check_int("n", n, 0)
        generator = as_generator(generator)
        if self.sampler is not None:
            x, y = self.sampler(n, generator)
            return x.to(dtype=self.x.dtype, device=self.x.device), (y.to(self.x.device) if y is not None else None)
        rows = torch.randint(0, len(self), (n,), generator=generator, device=draw_device(generator))
        return self[rows.to(self.x.device)]

    def sample(self, n: int, generator: torch.Generator | int | None = None) -> Tensor:
        """``n`` samples ``(n, *shape)``; see :meth:`sample_with_labels`."""
        return self.sample_with_labels(n, generator)[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """A copy with ``x`` (and ``y``) moved to ``device`` and ``x`` cast to ``dtype``."""
        return replace(
            self,
            x=self.x.to(device=device, dtype=dtype),
            y=self.y.to(device=device) if self.y is not None else None,
        )
