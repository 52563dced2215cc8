r"""Distances between two sample sets, for judging a generator against data.

Every function takes two sample sets ``x`` of shape ``(N, *shape)`` and ``y``
of shape ``(M, *shape)``, flattens them to ``(N, D)`` and ``(M, D)`` and
returns a 0-d tensor in the promoted dtype of the inputs, on ``x``'s device.
Pairwise statistics are accumulated in float64 over blocks, so that
``N = M = 10\,000`` runs in a few hundred MB at most.

* :func:`sliced_wasserstein` — the sliced Wasserstein distance
  :math:`\mathrm{SW}_p(\mu,\nu) = \big(\mathbb E_{\theta\sim U(S^{D-1})}
  W_p^p(\theta_\#\mu, \theta_\#\nu)\big)^{1/p}`, each 1-D :math:`W_p` computed
  exactly from sorted projections (Rabin, Peyré, Delon & Bernot, 2011,
  "Wasserstein Barycenter and its Application to Texture Mixing";
  Bonneel, Rabin, Peyré & Pfister, 2015, "Sliced and Radon Wasserstein
  Barycenters of Measures").
* :func:`energy_distance` — :math:`\mathcal E(X,Y) = 2\mathbb E\|X-Y\|
  - \mathbb E\|X-X'\| - \mathbb E\|Y-Y'\|` (Székely & Rizzo, 2013,
  "Energy statistics: A class of statistics based on distances").
* :func:`mmd` — the squared maximum mean discrepancy
  :math:`\mathrm{MMD}^2 = \mathbb E k(X,X') + \mathbb E k(Y,Y') - 2\mathbb E k(X,Y)`
  (Gretton, Borgwardt, Rasch, Schölkopf & Smola, 2012, "A Kernel Two-Sample
  Test").
* :func:`wasserstein2_exact` — the exact :math:`W_2` between the two
  empirical measures by linear programming (POT's ``ot.emd2``).
* :func:`data_floor` — the same metric between two disjoint real samples of
  the model's sample size: the value a perfect generator would reach, to be
  printed next to the model's value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flowdiff._utils import check_float, check_int
from flowdiff.metrics._validation import as_sample_matrix, as_sample_pair

__all__ = [
    "DataFloor",
    "data_floor",
    "energy_distance",
    "median_bandwidth",
    "mmd",
    "sliced_wasserstein",
    "wasserstein2_exact",
]

# Elements per block of a pairwise matrix or of the projected samples: 2**20
# float64 values are 8 MiB, small enough for any machine, large enough that the
# Python loop costs nothing next to the matrix products.
_BLOCK_ELEMENTS = 2**20


# --------------------------------------------------------------------------
# Sliced Wasserstein
# --------------------------------------------------------------------------


def _random_directions(
    dim: int, num: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``num`` directions uniform on the unit sphere :math:`S^{D-1}`, as the columns of a ``(D, num)`` matrix.

    A standard Gaussian vector divided by its norm is uniform on the sphere.
    They are drawn in float64 on the generator's device, so that float32 and
    float64 inputs see the same directions for the same seed.
    """
    draw_device = generator.device if generator is not None else device
    theta = torch.randn(dim, num, generator=generator, dtype=torch.float64, device=draw_device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return theta.to(device=device, dtype=dtype)


def _quantile_intervals(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    r"""Common refinement of the quantile grids of two empirical measures with ``n`` and ``m`` atoms.

    The quantile function of ``n`` sorted atoms is constant on each
    :math:`((i-1)/n, i/n]`. On the union of the breakpoints :math:`\{i/n\}
    \cup \{j/m\}` both quantile functions are constant, so the 1-D
    Wasserstein distance is an exact finite sum
    :math:`W_p^p = \sum_k w_k |x_{(i_k)} - y_{(j_k)}|^p`.
    Breakpoints are kept as integers over the common denominator ``n*m``
    so that no rounding can put an interval in the wrong block.

    Returns:
        ``(index_x, index_y, weights)``: 0-based indices into the sorted
        samples and the interval lengths (float64, summing to 1).
    """
    break_x = torch.arange(1, n + 1, device=device, dtype=torch.int64) * m
    break_y = torch.arange(1, m + 1, device=device, dtype=torch.int64) * n
    upper = torch.unique(torch.cat([break_x, break_y]), sorted=True)
    lower = torch.cat([upper.new_zeros(1), upper[:-1]])
    # Interval (lower, upper] lies inside x-block lower // m and y-block lower // n.
    index_x = torch.div(lower, m, rounding_mode="floor")
    index_y = torch.div(lower, n, rounding_mode="floor")
    weights = (upper - lower).to(torch.float64) / float(n * m)
    return index_x, index_y, weights


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 256,
    p: float = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Monte Carlo sliced Wasserstein-p distance between two sample sets.

    .. math::
        \widehat{\mathrm{SW}}_p(x, y) = \Big(\frac1L \sum_{l=1}^{L}
        W_p^p\big(\theta_l^\top x,\ \theta_l^\top y\big)\Big)^{1/p},
        \qquad \theta_l \sim U(S^{D-1}),

    where each 1-D :math:`W_p^p = \int_0^1 |F_x^{-1}(u) - F_y^{-1}(u)|^p du`
    between the projected empirical measures is computed exactly by sorting:
    for ``N == M`` it is :math:`\frac1N\sum_i |x_{(i)} - y_{(i)}|^p`; for
    unequal sizes the two quantile functions are compared on the common
    refinement of their quantile levels :math:`\{i/N\} \cup \{j/M\}`.

    This returns the **distance**, not its p-th power: for ``p=2`` it is the
    square root of the mean squared 1-D :math:`W_2` over projections. For
    :math:`N(0, I_D)` against :math:`N(m, I_D)`,
    :math:`\mathrm{SW}_2^2 = \|m\|^2/D`.

    Reference: Bonneel, Rabin, Peyré & Pfister (2015), "Sliced and Radon
    Wasserstein Barycenters of Measures".

    Arguments:
        x: samples of shape ``(N, *shape)``.
        y: samples of shape ``(M, *shape)``, the same ``*shape`` up to flattening.
        num_projections: the number ``L >= 1`` of random directions.
        p: the order ``p >= 1``.
        generator: draws the directions (reproducible when given; on any
            device); the global RNG when ``None``.

    Returns:
        A 0-d tensor :math:`\widehat{\mathrm{SW}}_p \ge 0`, in the promoted
        dtype of ``x`` and ``y``, on ``x``'s device.
    """
    x, y = as_sample_pair(x, y)
    num_projections = check_int("num_projections", num_projections, 1)
    p = check_float("p", p, 1.0)
    n, dim = x.shape
    m = y.shape[0]
    theta = _random_directions(dim, num_projections, generator, x.dtype, x.device)
    index_x, index_y, weights = _quantile_intervals(n, m, x.device)
    # Projected values held at once: both sorted sets, plus the gathered pairs when n != m.
    rows = n + m + (0 if n == m else 2 * len(weights))
    chunk = max(1, min(num_projections, _BLOCK_ELEMENTS // rows))
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for directions in theta.split(chunk, dim=1):
        proj_x = torch.sort(x @ directions, dim=0).values
        proj_y = torch.sort(y @ directions, dim=0).values
        if n == m:
            gaps = (proj_x - proj_y).abs().to(torch.float64)
            total = total + gaps.pow(p).mean(dim=0).sum()
        else:
            gaps = (proj_x[index_x] - proj_y[index_y]).abs().to(torch.float64)
            total = total + (weights[:, None] * gaps.pow(p)).sum()
    return (total / num_projections).pow(1.0 / p).to(x.dtype)


# --------------------------------------------------------------------------
# Pairwise statistics: energy distance and MMD
# --------------------------------------------------------------------------


def _pairwise_sum(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor], same: bool) -> Tensor:
    r"""Compute :math:`\sum_{i,j} f(\|a_i - b_j\|^2)` in float64, block by block.

    Squared distances come from :math:`\|a\|^2 + \|b\|^2 - 2a^\top b` on
    float64 copies. When ``same`` (``a is b``), the diagonal is set to exactly
    0 (the formula leaves round-off there) and only the upper block triangle is
    computed, off-diagonal blocks counting twice by symmetry.
    """
    n, m = a.shape[0], b.shape[0]
    block = max(1, math.isqrt(_BLOCK_ELEMENTS))
    sq_a = (a * a).sum(dim=1)
    sq_b = sq_a if same else (b * b).sum(dim=1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, n, block):
        a_i, sq_a_i = a[i : i + block], sq_a[i : i + block]
        for j in range(i if same else 0, m, block):
            b_j, sq_b_j = b[j : j + block], sq_b[j : j + block]
            sq_dist = (sq_a_i[:, None] + sq_b_j[None, :] - 2.0 * (a_i @ b_j.T)).clamp_min_(0.0)
            if same and i == j:
                sq_dist.fill_diagonal_(0.0)
                total = total + fn(sq_dist).sum()
            else:
                total = total + (2.0 if same else 1.0) * fn(sq_dist).sum()
    return total


def _centered_float64(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 copies of ``x`` and ``y`` minus their pooled mean.

    Distances are translation invariant; centering shrinks the norms that
    cancel in :math:`\\|a\\|^2 + \\|b\\|^2 - 2a^\\top b` and so the round-off.
    """
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    center = torch.cat([x64, y64]).mean(dim=0)
    return x64 - center, y64 - center


def energy_distance(x: Tensor, y: Tensor, unbiased: bool = True) -> Tensor:
    r"""Energy distance between two sample sets (Székely & Rizzo).

    .. math::
        \mathcal E(X, Y) = 2\,\mathbb E\|X - Y\| - \mathbb E\|X - X'\| - \mathbb E\|Y - Y'\|,

    which is 0 if and only if the two distributions are equal (for finite
    first moments). Note that :math:`\mathcal E` is the *square* of a metric
    (it scales like a length, not a squared length: :math:`\mathcal E(cX, cY)
    = |c|\,\mathcal E(X, Y)`); this function returns :math:`\mathcal E` itself.

    With ``unbiased=True`` (default) the within-sample means exclude the
    diagonal, :math:`\frac{1}{N(N-1)}\sum_{i\ne j}`: the U-statistic, an
    unbiased estimate of :math:`\mathcal E` that can be slightly negative when
    the two distributions are equal. With ``unbiased=False`` it is the
    V-statistic (diagonal zeros included, divide by :math:`N^2`): the exact
    energy distance between the two empirical measures, always :math:`\ge 0`
    but biased upwards by :math:`\mathbb E\|X-X'\|/N + \mathbb E\|Y-Y'\|/M`.

    Reference: Székely & Rizzo (2013), "Energy statistics: A class of
    statistics based on distances", J. Stat. Plan. Inference 143(8).

    Arguments:
        x: samples of shape ``(N, *shape)``, ``N >= 2`` when ``unbiased``.
        y: samples of shape ``(M, *shape)``, ``M >= 2`` when ``unbiased``.
        unbiased: U-statistic (``True``) or V-statistic (``False``).

    Returns:
        A 0-d tensor in the promoted dtype of ``x`` and ``y``, on ``x``'s device.
    """
    x, y = as_sample_pair(x, y, min_samples=2 if unbiased else 1)
    n, m = x.shape[0], y.shape[0]
    x64, y64 = _centered_float64(x, y)
    between = _pairwise_sum(x64, y64, torch.sqrt, same=False) / (n * m)
    # The diagonal terms are exactly 0, so the U- and V-statistics differ only in the divisor.
    within_x = _pairwise_sum(x64, x64, torch.sqrt, same=True) / (n * (n - 1) if unbiased else n * n)
    within_y = _pairwise_sum(y64, y64, torch.sqrt, same=True) / (m * (m - 1) if unbiased else m * m)
    return (2.0 * between - within_x - within_y).to(x.dtype)


def median_bandwidth(x: Tensor, y: Tensor, max_samples: int = 1000) -> float:
    r"""Median heuristic for a kernel bandwidth: the median pairwise distance of the pooled sample.

    :math:`h = \mathrm{median}\{\|z_i - z_j\| : i < j\}` over
    :math:`z = x \cup y` (Gretton et al., 2012, "A Kernel Two-Sample Test",
    section 8). When the pooled sample has more than ``max_samples`` points,
    a fixed (seed 0) random subset of that size is used, so the result is
    reproducible and the cost bounded.

    Raises:
        ValueError: the median distance is 0 (most points coincide); pass an
            explicit bandwidth then.
    """
    x, y = as_sample_pair(x, y)
    max_samples = check_int("max_samples", max_samples, 2)
    pooled = torch.cat([x, y]).to(torch.float64)
    if pooled.shape[0] < 2:
        raise ValueError(f"the median heuristic needs at least 2 pooled samples, got {pooled.shape[0]}")
    if pooled.shape[0] > max_samples:
        subset = torch.randperm(pooled.shape[0], generator=torch.Generator().manual_seed(0))[:max_samples]
        pooled = pooled[subset.to(pooled.device)]
    # quantile(0.5) interpolates between the two middle values, as numpy.median does.
    median = float(torch.quantile(torch.pdist(pooled), 0.5))
    if median <= 0.0:
        raise ValueError(
            "the median pairwise distance of the pooled samples is 0 (most samples coincide); "
            "pass an explicit bandwidth > 0"
        )
    return median


def _check_bandwidths(bandwidth: float | Sequence[float]) -> list[float]:
    values = [bandwidth] if isinstance(bandwidth, (int, float)) else list(bandwidth)
    if not values:
        raise ValueError("bandwidth must be a positive number or a non-empty sequence of them, got an empty sequence")
    return [check_float("bandwidth", value, 0.0, low_open=True) for value in values]


_KERNELS = ("rbf", "laplacian")


def mmd(
    x: Tensor,
    y: Tensor,
    kernel: str = "rbf",
    bandwidth: float | Sequence[float] | None = None,
    unbiased: bool = True,
) -> Tensor:
    r"""Squared maximum mean discrepancy :math:`\mathrm{MMD}^2` between two sample sets.

    .. math::
        \mathrm{MMD}^2_u = \frac{1}{N(N-1)}\sum_{i\ne j} k(x_i, x_j)
        + \frac{1}{M(M-1)}\sum_{i\ne j} k(y_i, y_j)
        - \frac{2}{NM}\sum_{i,j} k(x_i, y_j)

    with ``unbiased=True`` (default; Gretton et al. 2012, eq. 3, the
    U-statistic: unbiased, can be slightly negative when the distributions
    are equal), or the V-statistic (diagonals included, divide by
    :math:`N^2`, :math:`M^2`; always :math:`\ge 0`, biased upwards) when
    ``unbiased=False``. The value returned is :math:`\mathrm{MMD}^2`, not its
    square root (the unbiased estimate may be negative).

    Kernels, for a bandwidth :math:`h`:
    ``"rbf"`` :math:`k = \exp(-\|a-b\|^2 / (2h^2))`;
    ``"laplacian"`` :math:`k = \exp(-\|a-b\| / h)`.
    With several bandwidths the kernel is their average (a multi-bandwidth
    kernel, still characteristic and with :math:`k(a, a) = 1`). With
    ``bandwidth=None`` the median heuristic :func:`median_bandwidth` picks
    one; for a multi-scale kernel around it, pass e.g.
    ``[s * median_bandwidth(x, y) for s in (0.5, 1, 2)]``.

    Reference: Gretton, Borgwardt, Rasch, Schölkopf & Smola (2012), "A Kernel
    Two-Sample Test", JMLR 13.

    Arguments:
        x: samples of shape ``(N, *shape)``, ``N >= 2`` when ``unbiased``.
        y: samples of shape ``(M, *shape)``, ``M >= 2`` when ``unbiased``.
        kernel: ``"rbf"`` or ``"laplacian"``.
        bandwidth: ``None`` (median heuristic), a number ``> 0`` or a
            sequence of them.
        unbiased: U-statistic (``True``) or V-statistic (``False``).

    Returns:
        A 0-d tensor :math:`\mathrm{MMD}^2` in the promoted dtype of ``x`` and
        ``y``, on ``x``'s device.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got kernel={kernel!r}")
    x, y = as_sample_pair(x, y, min_samples=2 if unbiased else 1)
    bandwidths = _check_bandwidths(median_bandwidth(x, y) if bandwidth is None else bandwidth)

    def kernel_of_sq_dist(sq_dist: Tensor) -> Tensor:
        if kernel == "rbf":
            values = [torch.exp(sq_dist * (-0.5 / h**2)) for h in bandwidths]
        else:
            dist = torch.sqrt(sq_dist)
            values = [torch.exp(dist * (-1.0 / h)) for h in bandwidths]
        return torch.stack(values).mean(dim=0) if len(values) > 1 else values[0]

    n, m = x.shape[0], y.shape[0]
    x64, y64 = _centered_float64(x, y)
    sum_xx = _pairwise_sum(x64, x64, kernel_of_sq_dist, same=True)
    sum_yy = _pairwise_sum(y64, y64, kernel_of_sq_dist, same=True)
    sum_xy = _pairwise_sum(x64, y64, kernel_of_sq_dist, same=False)
    if unbiased:
        # Both kernels have k(a, a) = 1: the diagonal contributes exactly N (resp. M).
        mean_xx = (sum_xx - n) / (n * (n - 1))
        mean_yy = (sum_yy - m) / (m * (m - 1))
    else:
        mean_xx = sum_xx / (n * n)
        mean_yy = sum_yy / (m * m)
    return (mean_xx + mean_yy - 2.0 * sum_xy / (n * m)).to(x.dtype)


# --------------------------------------------------------------------------
# Exact W2 on small sets
# --------------------------------------------------------------------------


def wasserstein2_exact(x: Tensor, y: Tensor, max_samples: int = 5000) -> Tensor:
    r"""Exact 2-Wasserstein distance between the empirical measures of two small sample sets.

    .. math::
        W_2(\hat\mu, \hat\nu) = \Big(\min_{P \in \Pi(\frac1N \mathbf 1, \frac1M \mathbf 1)}
        \sum_{i,j} P_{ij}\,\|x_i - y_j\|^2\Big)^{1/2}

    solved as a linear program by the network simplex of POT
    (``ot.emd2``; Bonneel, van de Panne, Paris & Heidrich, 2011, "Displacement
    Interpolation Using Lagrangian Mass Transport"), in float64. The cost
    matrix takes :math:`8NM` bytes and the solver time grows roughly
    cubically, hence ``max_samples``. Returns the distance (square root of the
    optimal cost), not its square.

    Arguments:
        x: samples of shape ``(N, *shape)``.
        y: samples of shape ``(M, *shape)``.
        max_samples: the largest ``N`` and ``M`` accepted.

    Returns:
        A 0-d tensor in the promoted dtype of ``x`` and ``y``, on ``x``'s device.

    Raises:
        ImportError: POT is not installed (``pip install POT``).
        ValueError: more than ``max_samples`` samples on either side.
        RuntimeError: the solver stopped before optimality.
    """
    try:
        import ot
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "wasserstein2_exact needs the POT package (Python Optimal Transport): "
            "pip install POT, or install flowdiff[train]"
        ) from error
    x, y = as_sample_pair(x, y)
    max_samples = check_int("max_samples", max_samples, 1)
    if max(x.shape[0], y.shape[0]) > max_samples:
        raise ValueError(
            f"wasserstein2_exact solves an N x M linear program; got N={x.shape[0]}, M={y.shape[0]}, "
            f"more than max_samples={max_samples}. Use sliced_wasserstein for large sets or raise max_samples."
        )
    x64 = x.detach().to("cpu", torch.float64).numpy()
    y64 = y.detach().to("cpu", torch.float64).numpy()
    n, m = x64.shape[0], y64.shape[0]
    cost_matrix = ot.dist(x64, y64, metric="sqeuclidean")
    weights_x = ot.unif(n)
    weights_y = ot.unif(m)
    # The default iteration cap (1e5) is too low beyond a few hundred points.
    cost, log = ot.emd2(weights_x, weights_y, cost_matrix, numItermax=max(100_000, 100 * (n + m) ** 2), log=True)
    if log.get("warning") is not None:
        raise RuntimeError(f"ot.emd2 did not reach the optimum for N={n}, M={m}: {log['warning']}")
    return torch.tensor(math.sqrt(max(float(cost), 0.0)), dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------
# Data-vs-data floor
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFloor:
    """The value of a metric between disjoint real samples: what a perfect generator reaches.

    Attributes:
        mean: the metric's mean over the repeats.
        std: its sample standard deviation over the repeats (0 for one repeat).
        values: the metric's value for each repeat.
        num_samples: the size of each of the two real samples compared.
    """

    mean: float
    std: float
    values: tuple[float, ...]
    num_samples: int


def data_floor(
    metric: Callable[[Tensor, Tensor], Tensor | float],
    data: Tensor,
    reference: Tensor | None = None,
    *,
    num_samples: int,
    num_repeats: int = 1,
    generator: torch.Generator | None = None,
) -> DataFloor:
    """The data-vs-data floor of a metric: the metric between two disjoint real samples of the model's size.

    A sample-based metric is not 0 for a perfect generator: two finite real
    samples differ too. Report the model's ``metric(samples, reference)``
    next to this floor, computed with the same ``num_samples`` as the model's
    sample (and the same reference size).

    * ``reference=None``: each repeat draws ``2 * num_samples`` distinct rows
      of ``data`` and compares the first half with the second.
    * ``reference`` given: each repeat draws ``num_samples`` rows of ``data``
      and ``num_samples`` rows of ``reference`` (each without replacement);
      the caller keeps the two disjoint, e.g. the training and the held-out
      split.

    Arguments:
        metric: called as ``metric(a, b)``; returns a number or a 0-d tensor.
        data: real samples of shape ``(N, *shape)``.
        reference: other real samples of shape ``(M, *shape)``, or ``None``.
        num_samples: the size of each compared sample, ``>= 1``.
        num_repeats: how many random draws to average, ``>= 1``.
        generator: CPU generator for the draws (reproducible when given).

    Returns:
        A :class:`DataFloor` with the mean, standard deviation and values.
    """
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(a, b), got {type(metric).__name__}")
    data_rows = as_sample_matrix(data, "data").shape[0]
    num_samples = check_int("num_samples", num_samples, 1)
    num_repeats = check_int("num_repeats", num_repeats, 1)
    if reference is None:
        if 2 * num_samples > data_rows:
            raise ValueError(
                f"two disjoint samples of num_samples={num_samples} need 2*num_samples <= N, got N={data_rows}"
            )
    else:
        reference_rows = as_sample_matrix(reference, "reference").shape[0]
        if num_samples > min(data_rows, reference_rows):
            raise ValueError(
                f"num_samples={num_samples} exceeds the available rows: data has {data_rows}, "
                f"reference has {reference_rows}"
            )
    values = []
    for _ in range(num_repeats):
        if reference is None:
            order = torch.randperm(data_rows, generator=generator).to(data.device)
            first, second = data[order[:num_samples]], data[order[num_samples : 2 * num_samples]]
        else:
            order_a = torch.randperm(data_rows, generator=generator)[:num_samples].to(data.device)
            order_b = torch.randperm(reference.shape[0], generator=generator)[:num_samples].to(reference.device)
            first, second = data[order_a], reference[order_b]
        value = metric(first, second)
        values.append(float(value.item() if isinstance(value, Tensor) else value))
    mean = sum(values) / num_repeats
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (num_repeats - 1)) if num_repeats > 1 else 0.0
    return DataFloor(mean=mean, std=std, values=tuple(values), num_samples=num_samples)
