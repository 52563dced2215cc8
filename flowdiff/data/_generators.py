"""Seeding helpers shared by the data layer."""

from __future__ import annotations

import numpy as np
import torch

from flowdiff._utils import check_int

__all__ = ["as_generator", "derive_seed", "draw_device"]


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """Accept a ``torch.Generator``, an integer seed (a fresh CPU generator) or ``None`` (torch's global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def draw_device(generator: torch.Generator | None) -> torch.device:
    """The device random numbers must be drawn on: torch requires the generator's own device."""
    return generator.device if generator is not None else torch.device("cpu")


def derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for ``stream`` derived from ``seed`` (numpy ``SeedSequence``).

    Used to give the train and held-out splits of a toy set their own random streams, so that the
    two are independent and each is reproducible on its own.
    """
    seed = check_int("seed", int(seed) if isinstance(seed, np.integer) else seed, 0)
    state = np.random.SeedSequence([seed, int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1
