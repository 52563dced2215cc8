"""scikit-learn's 8×8 handwritten digits (Alpaydin & Kaynak, 1998, UCI "Optical recognition of handwritten digits").

1797 grey-scale images of the digits 0–9 with pixel values 0..16; they ship inside scikit-learn,
so no download is needed. Here they are scaled to ``[-1, 1]`` by ``x / 8 - 1`` and shaped
``(N, 1, 8, 8)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits", "DIGITS_NUM_CLASSES"]

DIGITS_NUM_CLASSES = 10


def load_digits(dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """All 1797 digits: images ``(1797, 1, 8, 8)`` in ``[-1, 1]`` and labels ``(1797,)`` in ``0..9``.

    Requires scikit-learn (the ``train`` extra of flowdiff).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' dataset needs scikit-learn: pip install scikit-learn (or flowdiff[train])"
        ) from error
    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)
    # Pixel values are integers 0..16; x/8 - 1 maps them affinely onto [-1, 1].
    x = (images / 8.0 - 1.0).unsqueeze(1).to(dtype or torch.get_default_dtype())
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    return x, y
