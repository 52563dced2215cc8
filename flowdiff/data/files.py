"""Loaders for user data: a folder of images, a ``.npy``/``.npz`` array or a ``.pt`` file.

* **Folder** (:func:`load_folder`): image files (PNG, JPEG, BMP, GIF, TIFF, WebP, read with
  Pillow). Either directly in the folder (unlabelled) or in one sub-folder per class, as
  torchvision's ``ImageFolder`` (labels ``0..K-1`` in the sorted order of the sub-folder names).
  8-bit pixels are scaled to ``[-1, 1]`` by ``p / 127.5 - 1``; the result is ``(N, C, H, W)`` with
  ``C = 1`` when every image is grey-scale, ``C = 3`` otherwise.
* **NumPy** (:func:`load_array`): ``.npy`` holding ``x`` of shape ``(N, ...)``, or ``.npz`` with
  arrays ``x`` and optionally ``y``. ``uint8`` arrays are treated as images and scaled to
  ``[-1, 1]``; other arrays are kept as they are (cast to floating point).
* **Torch** (:func:`load_tensor_file`): ``.pt``/``.pth`` holding a tensor ``x``, a tuple
  ``(x, y)`` or a dict with ``"x"`` and optional ``"y"`` and ``"num_classes"``; loaded with
  ``weights_only=True`` (no arbitrary code runs).

Labels must be integers ``>= 0``; ``num_classes`` defaults to ``max(y) + 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowdiff.data.dataset import DataError, Dataset

__all__ = ["load_folder", "load_array", "load_tensor_file", "load_path", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _labels_and_classes(
    y: Any, num_items: int, source: str, num_classes: int | None
) -> tuple[Tensor | None, int | None]:
    if y is None:
        return None, None
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels y in {source} must be integers, got dtype {y.dtype}")
    if y.shape != (num_items,):
        raise ValueError(f"labels y in {source} must have shape ({num_items},), got shape {tuple(y.shape)}")
    y = y.long()
    if num_items > 0 and int(y.min()) < 0:
        raise ValueError(f"labels y in {source} must be >= 0, got {int(y.min())}")
    inferred = int(y.max()) + 1 if num_items > 0 else 0
    if num_classes is None:
        num_classes = inferred
    elif inferred > num_classes:
        raise ValueError(f"label {inferred - 1} in {source} is out of range for num_classes={num_classes}")
    return y, int(num_classes)


def _as_float(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    dtype = dtype or torch.get_default_dtype()
    if x.dtype == torch.uint8:
        # 8-bit images: p/127.5 - 1 maps 0..255 affinely onto [-1, 1].
        return x.to(torch.float64).div(127.5).sub(1.0).to(dtype)
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"data must be real numbers, got dtype {x.dtype}")
    return x.to(dtype)


def load_folder(
    path: str | Path,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    dtype: torch.dtype | None = None,
) -> Dataset:
    """Load a folder of images (flat, or one sub-folder per class) as a :class:`Dataset`.

    Arguments:
        path: the folder.
        size: ``(H, W)`` to resize every image to (bicubic); ``None`` requires equal sizes.
        channels: 1 (grey) or 3 (RGB); ``None`` picks 1 when every image is grey-scale.
        dtype: floating dtype of ``x`` (default: torch's default dtype).

    Returns:
        A :class:`Dataset` with ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` and, for class sub-folders,
        labels ``y`` and ``class_names``.
    """
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("loading a folder of images needs Pillow: pip install pillow") from error
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if size is not None and (len(size) != 2 or any(int(s) < 1 for s in size)):
        raise ValueError(f"size must be a pair (H, W) of positive integers, got {size!r}")

    files = _image_files(folder)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p))
    if files and class_dirs:
        raise ValueError(
            f"{str(folder)!r} holds both image files and class sub-folders "
            f"({[d.name for d in class_dirs]}); use one layout"
        )
    class_names: list[str] | None = None
    labels: list[int] | None = None
    if not files:
        if not class_dirs:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {str(folder)!r}")
        class_names = [d.name for d in class_dirs]
        labels = []
        for label, class_dir in enumerate(class_dirs):
            class_files = _image_files(class_dir)
            files.extend(class_files)
            labels.extend([label] * len(class_files))

    images = []
    for file in files:
        with Image.open(file) as image:
            image.load()
            images.append(image.copy())
    if channels is None:
        channels = 1 if all(image.mode in _GREY_MODES for image in images) else 3
    arrays = []
    reference: tuple[Path, tuple[int, int]] | None = None
    for file, original in zip(files, images, strict=True):
        converted = original.convert("L" if channels == 1 else "RGB")
        if size is not None:
            converted = converted.resize((int(size[1]), int(size[0])), Image.Resampling.BICUBIC)
        if reference is None:
            reference = (file, converted.size)
        elif converted.size != reference[1]:
            raise ValueError(
                f"image {str(file)!r} has size {converted.size[0]}x{converted.size[1]} (WxH) but "
                f"{str(reference[0])!r} has {reference[1][0]}x{reference[1][1]}; pass size=(H, W) to resize"
            )
        array = np.asarray(converted, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    x = _as_float(torch.from_numpy(np.stack(arrays)), dtype)
    y, num_classes = _labels_and_classes(labels, len(files), repr(str(folder)), None)
    return Dataset(x=x, y=y, name=str(folder), num_classes=num_classes, class_names=class_names)


def load_array(path: str | Path, dtype: torch.dtype | None = None) -> Dataset:
    """Load ``x`` (and ``y``) from a ``.npy`` file or a ``.npz`` file with arrays ``x`` (and ``y``)."""
    file = Path(path)
    if file.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"expected a .npy or .npz file, got {str(file)!r}")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # pickled objects, truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read {str(file)!r} as a NumPy array of numbers: {reason}") from error
    y = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if "x" in keys:
                x, y = loaded["x"], (loaded["y"] if "y" in keys else None)
            elif len(keys) == 1:
                x = loaded[keys[0]]
            else:
                raise ValueError(f"{str(file)!r} must hold an array 'x' (and optionally 'y'), found {keys}")
    else:
        x = loaded
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{str(file)!r} must hold an array of numbers (bool, int, uint or float), got {kind}")
    return _dataset_from_arrays(torch.from_numpy(np.ascontiguousarray(x)), y, None, str(file), dtype)


def load_tensor_file(path: str | Path, dtype: torch.dtype | None = None) -> Dataset:
    """Load a ``.pt``/``.pth`` file holding a tensor, a tuple ``(x, y)`` or a dict ``{"x", "y"?, "num_classes"?}``."""
    file = Path(path)
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip, EOF and weights_only errors all mean "not a tensor file"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot read {str(file)!r} as a torch tensor file: {reason}") from error
    num_classes = None
    if isinstance(content, Tensor):
        x, y = content, None
    elif isinstance(content, (tuple, list)) and len(content) in (1, 2) and isinstance(content[0], Tensor):
        x, y = content[0], (content[1] if len(content) == 2 else None)
    elif isinstance(content, dict) and isinstance(content.get("x"), Tensor):
        x, y, num_classes = content["x"], content.get("y"), content.get("num_classes")
    else:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataError(
            f"{str(file)!r} must hold a Tensor, a tuple (x, y) or a dict with a Tensor 'x' "
            f"(and optional 'y', 'num_classes'); found {found}"
        )
    return _dataset_from_arrays(x, y, num_classes, str(file), dtype)


def _dataset_from_arrays(
    x: Tensor, y: Any, num_classes: int | None, source: str, dtype: torch.dtype | None
) -> Dataset:
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{source!r} holds no samples: x has shape {tuple(x.shape)}; it needs at least 2 rows")
    if x.ndim == 1:
        x = x[:, None]  # N scalars: a 1-D data set
    try:
        x = _as_float(x, dtype)
    except TypeError as error:
        raise DataError(f"{source!r}: {error}") from error
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        row = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0, 0])
        raise DataError(f"{source!r} holds {bad} non-finite value(s) (NaN or Inf), the first in row {row}; "
                        f"the data must be finite")
    y, num_classes = _labels_and_classes(y, x.shape[0], repr(source), num_classes)
    return Dataset(x=x, y=y, name=source, num_classes=num_classes)


def load_path(path: str | Path, dtype: torch.dtype | None = None) -> Dataset:
    """Load user data from a folder of images, a ``.npy``/``.npz`` or a ``.pt``/``.pth`` file."""
    file = Path(path)
    if file.is_dir():
        return load_folder(file, dtype=dtype)
    if not file.is_file():
        raise DataError(f"{str(file)!r} does not exist")
    suffix = file.suffix.lower()
    if suffix in (".npy", ".npz"):
        return load_array(file, dtype=dtype)
    if suffix in (".pt", ".pth"):
        return load_tensor_file(file, dtype=dtype)
    raise DataError(f"cannot load {str(file)!r}: expected a folder of images, .npy, .npz, .pt or .pth")
