"""Exact squared 2-Wasserstein distance between the 2-D histograms of two sample sets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from flowdiff._utils import check_int

__all__ = ["histogram_w2"]


def histogram_w2(x: Tensor, y: Tensor, bins: int = 64, box: float | Sequence[float] = 4.0) -> tuple[float, float, float]:
    r"""Exact W2² between the 2-D histograms of two sample sets (Deveney et al. 2025, §8.4 protocol).

    Both sets are binned on a ``bins × bins`` grid over ``[-box, box]²`` (samples outside are
    dropped, and each histogram renormalised); W2² is the optimal-transport cost between the
    histograms with the squared Euclidean distance between bin centres, solved exactly by POT's
    network simplex (``ot.emd2``; Bonneel et al. 2011) over the non-empty bins.

    Returns:
        ``(W2², fraction of x outside, fraction of y outside)``.
    """
    try:
        import ot  # type: ignore[import-untyped]
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("histogram_w2 needs POT (pip install POT, or flowdiff[train])") from error
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, Tensor) or v.ndim != 2 or v.shape[1] != 2:
            raise ValueError(f"histogram_w2 needs 2-D samples of shape (n, 2); {name} has shape {getattr(v, 'shape', v)}")
    bins = check_int("bins", bins, 2)
    if isinstance(box, (int, float)):
        lo, hi = -float(box), float(box)
    else:
        lo, hi = float(box[0]), float(box[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"box must be a positive half-width or (lo, hi) with lo < hi, got {box!r}")
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)

    def hist(v: Tensor) -> tuple[Tensor, float]:
        v = v.detach().double().cpu()
        idx = torch.floor((v - lo) / width).long()
        inside = ((idx >= 0) & (idx < bins)).all(-1)
        flat = idx[inside, 0] * bins + idx[inside, 1]
        h = torch.bincount(flat, minlength=bins * bins).double()
        if h.sum() == 0:
            raise ValueError(f"no sample falls inside the box [{lo}, {hi}]²")
        return h / h.sum(), 1.0 - float(inside.double().mean())

    hx, out_x = hist(x)
    hy, out_y = hist(y)
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    ix, iy = hx.nonzero().flatten(), hy.nonzero().flatten()
    cost = torch.cdist(grid[ix], grid[iy]).pow(2).numpy()
    value = ot.emd2(hx[ix].numpy(), hy[iy].numpy(), cost, numItermax=max(100_000, 50 * (len(ix) + len(iy)) ** 2))
    return float(value), out_x, out_y
