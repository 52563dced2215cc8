"""One entry point for every data set: :func:`load_dataset`.

**Splits.** Every data set has a *train* and a *held-out* split that are disjoint and reproducible
from ``seed``:

* finite data (``digits``, user files): a permutation of the ``N`` rows drawn from ``seed``; the
  first ``round(N · heldout_fraction)`` rows of it are held out, the rest are for training. The
  rows are recorded in :attr:`Dataset.indices`.
* 2-D toy sets (unlimited): the two splits are drawn from two independent random streams derived
  from ``seed`` (numpy ``SeedSequence``), so each is reproducible on its own and, the
  distributions being continuous, they share no point with probability one. The default sizes
  split a pool of :data:`DEFAULT_TOY_SIZE` points by ``heldout_fraction``; ``n`` asks for another
  size. The returned :class:`Dataset` also samples fresh points with :meth:`Dataset.sample`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowdiff._utils import check_float, check_int
from flowdiff.data._generators import derive_seed
from flowdiff.data.dataset import DataError, Dataset
from flowdiff.data.digits import DIGITS_NUM_CLASSES, load_digits
from flowdiff.data.files import load_path
from flowdiff.data.toy import TOY_DATASETS, TOY_NUM_CLASSES

__all__ = ["load_dataset", "available_datasets", "DEFAULT_TOY_SIZE", "DATASET_ALIASES"]

DEFAULT_TOY_SIZE = 10_000
"""Size of the default pool of a toy set (train + held-out)."""

DATASET_ALIASES: dict[str, str] = {
    "8gaussians": "eight_gaussians",
    "8_gaussians": "eight_gaussians",
    "two_spirals": "spirals",
    "2spirals": "spirals",
    "circles": "rings",
    "concentric_circles": "rings",
    "two_moons": "moons",
}
"""Other names accepted for the built-in data sets."""

_SPLITS = {"train": "train", "heldout": "heldout", "test": "heldout", "all": "all"}
_STREAMS = {"train": 0, "heldout": 1}


def available_datasets() -> list[str]:
    """The built-in data set names :func:`load_dataset` accepts (aliases in :data:`DATASET_ALIASES`)."""
    return sorted([*TOY_DATASETS, "digits"])


def _canonical_name(name: str) -> str | None:
    key = name.strip().lower().replace("-", "_")
    key = DATASET_ALIASES.get(key, key)
    return key if key in TOY_DATASETS or key == "digits" else None


def load_dataset(
    name_or_path: str | Path,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> Dataset:
    """Load a built-in data set or user data, as a reproducible train or held-out split.

    Arguments:
        name_or_path: a name of :func:`available_datasets` (or an alias), or the path of a folder
            of images, a ``.npy``/``.npz`` or a ``.pt``/``.pth`` file.
        split: ``"train"``, ``"heldout"`` (alias ``"test"``) or ``"all"``.
        n: number of samples; ``None`` = the whole split (toy sets: ``DEFAULT_TOY_SIZE`` shared
            by the splits according to ``heldout_fraction``). Finite data: the first ``n`` rows of
            the split, an error when it holds fewer.
        seed: non-negative integer fixing the split (and the toy samples).
        heldout_fraction: fraction of the data held out, in ``(0, 1)``.
        dtype, device: of ``x`` (default: torch's default dtype, CPU).
        options: shape parameters of a toy set (e.g. ``noise=0.05`` for ``moons``).

    Returns:
        A :class:`Dataset`.
    """
    if not isinstance(split, str) or split.lower() not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {sorted(_SPLITS)}")
    split = _SPLITS[split.lower()]
    heldout_fraction = check_float("heldout_fraction", heldout_fraction, 0.0, 1.0, low_open=True, high_open=True)
    if n is not None:
        n = check_int("n", n, 0)
    seed = check_int("seed", seed, 0)

    name = _canonical_name(str(name_or_path)) if isinstance(name_or_path, str) else None
    if name in TOY_DATASETS:
        return _load_toy(name, split, n, seed, heldout_fraction, dtype, device, options)
    if options:
        raise TypeError(f"unexpected options {sorted(options)} for {str(name_or_path)!r} (only toy sets take options)")
    if name == "digits":
        x, y = load_digits(dtype=dtype)
        full = Dataset(x=x, y=y, name="digits", num_classes=DIGITS_NUM_CLASSES)
    elif Path(name_or_path).exists():
        full = load_path(name_or_path, dtype=dtype)
    else:
        raise ValueError(
            f"unknown dataset {str(name_or_path)!r}: not a built-in name and not an existing path; "
            f"valid names are {available_datasets()} (aliases: {sorted(DATASET_ALIASES)})"
        )
    return _split_finite(full, split, n, seed, heldout_fraction).to(device=device)


def _split_finite(full: Dataset, split: str, n: int | None, seed: int, heldout_fraction: float) -> Dataset:
    """Seeded permutation split of a finite data set; see the module docstring."""
    size = len(full)
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    if split == "all":
        rows = torch.arange(size)
    else:
        if size < 2:
            raise DataError(f"{full.name!r} has {size} sample(s); a train/held-out split needs at least 2")
        num_heldout = min(max(round(size * heldout_fraction), 1), size - 1)
        rows = permutation[:num_heldout] if split == "heldout" else permutation[num_heldout:]
    if n is not None:
        if n > len(rows):
            raise ValueError(
                f"n={n} exceeds the {len(rows)} samples of the {split!r} split of {full.name!r} "
                f"(heldout_fraction={heldout_fraction})"
            )
        rows = rows[:n]
    return Dataset(
        x=full.x[rows],
        y=full.y[rows] if full.y is not None else None,
        name=full.name,
        num_classes=full.num_classes,
        split=split,
        indices=rows,
        class_names=full.class_names,
    )


def _load_toy(
    name: str,
    split: str,
    n: int | None,
    seed: int,
    heldout_fraction: float,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    options: dict[str, Any],
) -> Dataset:
    """Generate a split of a toy set from its own random stream; see the module docstring."""
    generate = TOY_DATASETS[name]
    num_classes = TOY_NUM_CLASSES[name]
    if name == "pinwheel":
        num_classes = options.get("num_arms", num_classes)
    elif name == "rings":
        num_classes = options.get("num_rings", num_classes)
    dtype = dtype or torch.get_default_dtype()

    def draw(count: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = generate(count, generator, return_labels=True, dtype=dtype, device=device, **options)
        return x, y

    num_heldout = round(DEFAULT_TOY_SIZE * heldout_fraction)
    default_sizes = {"train": DEFAULT_TOY_SIZE - num_heldout, "heldout": num_heldout}
    parts = ["train", "heldout"] if split == "all" else [split]
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor | None] = []
    for part in parts:
        if n is None:
            count = default_sizes[part]
        elif split == "all":  # n shared by the two streams like the default pool
            count = round(n * heldout_fraction) if part == "heldout" else n - round(n * heldout_fraction)
        else:
            count = n
        generator = torch.Generator().manual_seed(derive_seed(seed, _STREAMS[part]))
        x, y = draw(count, generator)
        xs.append(x)
        ys.append(y)
    labels = [y for y in ys if y is not None]
    y = torch.cat(labels) if len(labels) == len(ys) else None
    return Dataset(x=torch.cat(xs), y=y, name=name, num_classes=num_classes, split=split, sampler=draw)
