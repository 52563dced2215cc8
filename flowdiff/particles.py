r"""Particle-system primitives: log-weight normalisation, effective sample size, resampling.

A weighted particle population :math:`\{(x_i, \ell_i)\}_{i \le K}` with log-weights :math:`\ell_i`
represents :math:`\sum_i w_i\,\delta_{x_i}`, :math:`w_i = e^{\ell_i}/\sum_j e^{\ell_j}`. These are the
pieces every sequential Monte Carlo sampler of the library shares (reward steering in
:mod:`flowdiff.steer`; the posterior samplers of :mod:`flowdiff.inverse` have their own copy):

* :func:`normalize_log_weights` / :func:`log_normalize`: :math:`w` (or :math:`\log w`) by the
  log-sum-exp shift, stable for any finite :math:`\ell`.
* :func:`effective_sample_size`: Kish's :math:`(\sum w)^2/\sum w^2 \in [1, K]`.
* :func:`systematic_resample` (Kitagawa 1996; Douc, Cappé & Moulines 2005, "Comparison of
  resampling schemes for particle filtering"): one uniform per group, particle ``i`` gets
  :math:`\lfloor Kw_i\rfloor` or :math:`\lceil Kw_i\rceil` copies; optionally after ordering the
  particles (:func:`principal_order`) so that each *region* also gets its share to within one copy
  (Gerber & Chopin 2015's ordered resampling, in one dimension).
* :func:`multinomial_resample`: i.i.d. draws from :math:`w` (higher variance; the textbook scheme).

Non-finite log-weights are **reported, never silently zeroed**: a NaN or :math:`+\infty` always
raises ``FloatingPointError`` naming how many and where; :math:`-\infty` (a weight of exactly zero)
is refused too unless the caller says it is intended (``allow_zero=True``), because in a sampler
it usually means a reward or likelihood overflowed. Everything works on batches of ``G``
independent groups (shape ``(G, K)``) and on a single population (shape ``(K,)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_log_weights",
    "normalize_log_weights",
    "log_normalize",
    "effective_sample_size",
    "systematic_resample",
    "multinomial_resample",
    "resample",
    "principal_order",
    "RESAMPLING_SCHEMES",
]

#: the resampling schemes :func:`resample` accepts.
RESAMPLING_SCHEMES = ("systematic", "multinomial")


def check_log_weights(log_w: Tensor, allow_zero: bool = False, name: str = "log-weights") -> None:
    """Raise ``FloatingPointError`` if ``log_w`` holds NaN or ``+inf`` (or ``-inf`` unless ``allow_zero``).

    The message names the count and the first offending index, so a sampler's caller can tell a
    bad reward from a bad model.
    """
    if not isinstance(log_w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(log_w).__name__}")
    bad = torch.isnan(log_w) | (log_w == float("inf"))
    if not allow_zero:
        bad = bad | (log_w == float("-inf"))
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        value = float(log_w[first])
        allowed = "finite values or -inf" if allow_zero else "finite values"
        raise FloatingPointError(f"{name} contain {int(bad.sum())} non-finite value(s) (first at index {first}: "
                                 f"{value}); allowed: {allowed}. A particle's weight is never silently set to zero")


def log_normalize(log_w: Tensor, dim: int = -1, allow_zero: bool = False) -> Tensor:
    r"""Normalised log-weights :math:`\ell_i - \log\sum_j e^{\ell_j}` along ``dim``.

    Raises ``FloatingPointError`` for non-finite entries (see :func:`check_log_weights`) and when a
    group has no particle of positive weight.
    """
    check_log_weights(log_w, allow_zero)
    total = torch.logsumexp(log_w, dim=dim, keepdim=True)
    if not bool(torch.isfinite(total).all()):
        raise FloatingPointError("every particle of a group has weight zero (log-weight -inf): the population collapsed")
    return log_w - total


def normalize_log_weights(log_w: Tensor, dim: int = -1, allow_zero: bool = False) -> Tensor:
    """Normalised weights :math:`w_i = e^{\\ell_i}/\\sum_j e^{\\ell_j}` along ``dim`` (sum to one)."""
    return torch.exp(log_normalize(log_w, dim, allow_zero))


def effective_sample_size(log_w: Tensor, dim: int = -1, allow_zero: bool = False) -> Tensor:
    """Kish's effective sample size :math:`(\\sum w)^2/\\sum w^2` along ``dim`` (between 1 and K)."""
    w = normalize_log_weights(log_w, dim, allow_zero)
    return 1.0 / (w * w).sum(dim=dim)


def _as_groups(log_w: Tensor, num: int) -> tuple[Tensor, bool]:
    if not isinstance(log_w, Tensor):
        raise TypeError(f"log_w must be a torch.Tensor of shape (K,) or (G, K), got {type(log_w).__name__}")
    if log_w.ndim not in (1, 2) or log_w.shape[-1] < 1:
        raise ValueError(f"log_w must have shape (K,) or (G, K) with K >= 1, got {tuple(log_w.shape)}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1 (how many indices to draw), got {num!r}")
    single = log_w.ndim == 1
    return (log_w[None] if single else log_w), single


def _uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Drawn on the generator's device (CPU by default), so a seed gives the same indices on any device.
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_dev).to(device)


def systematic_resample(log_w: Tensor, num: int, generator: torch.Generator | None = None,
                        order: Tensor | None = None, allow_zero: bool = False) -> Tensor:
    """Systematic resampling: ancestor indices.

    Arguments:
        log_w: ``(K,)`` or ``(G, K)`` log-weights (``G`` independent groups of ``K`` particles).
        num: how many indices to draw per group.
        generator: for reproducible draws (one uniform per group).
        order: optional permutation of ``[0, K)`` per group (shape of ``log_w``): the particles are
            laid out in this order before the systematic grid is applied (see :func:`principal_order`).
        allow_zero: accept ``-inf`` log-weights (particles that must not be drawn).

    Returns:
        Long tensor of indices in ``[0, K)``, shape ``(num,)`` or ``(G, num)``; with ``num = K``
        index ``i`` appears ``floor(K w_i)`` or ``ceil(K w_i)`` times.
    """
    groups, single = _as_groups(log_w, num)
    w = normalize_log_weights(groups.to(torch.float64), 1, allow_zero)
    if order is not None:
        order = order[None] if single else order
        if order.shape != w.shape:
            raise ValueError(f"order must have the shape of log_w {tuple(log_w.shape)}, got {tuple(order.shape)}")
        w = torch.gather(w, 1, order)
    g, k = w.shape
    u = _uniforms((g, 1), generator, w.device)
    positions = (u + torch.arange(num, dtype=torch.float64, device=w.device)[None]) / num
    cdf = torch.cumsum(w, dim=1)
    cdf[:, -1] = 1.0  # round-off: the last bin closes at exactly 1
    idx = torch.searchsorted(cdf, positions.contiguous(), right=True).clamp_(max=k - 1)
    if order is not None:
        idx = torch.gather(order, 1, idx)
    return idx[0] if single else idx


def multinomial_resample(log_w: Tensor, num: int, generator: torch.Generator | None = None,
                         allow_zero: bool = False) -> Tensor:
    """Multinomial resampling: ``num`` i.i.d. ancestor indices per group, drawn with probabilities ``w``.

    Same shapes as :func:`systematic_resample`.
    """
    groups, single = _as_groups(log_w, num)
    w = normalize_log_weights(groups.to(torch.float64), 1, allow_zero)
    cdf = torch.cumsum(w, dim=1)
    cdf[:, -1] = 1.0
    u = _uniforms((w.shape[0], num), generator, w.device)
    idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=w.shape[1] - 1)
    return idx[0] if single else idx


def resample(log_w: Tensor, num: int, scheme: str = "systematic", generator: torch.Generator | None = None,
             order: Tensor | None = None, allow_zero: bool = False) -> Tensor:
    """Ancestor indices by ``scheme`` (one of :data:`RESAMPLING_SCHEMES`); ``order`` only for systematic."""
    if scheme == "systematic":
        return systematic_resample(log_w, num, generator, order, allow_zero)
    if scheme == "multinomial":
        return multinomial_resample(log_w, num, generator, allow_zero)
    raise ValueError(f"unknown resampling scheme {scheme!r}; valid: {', '.join(RESAMPLING_SCHEMES)}")


def principal_order(points: Tensor, iters: int = 8) -> Tensor:
    """An ordering of the rows of ``points`` ``(K, D)`` (or ``(G, K, D)``) along their leading principal direction.

    Laying the particles out in this order before systematic resampling keeps particles of one
    mode next to each other, so each mode receives its weighted share of copies to within one
    (ordered resampling, Gerber & Chopin 2015, in one dimension). The power iteration starts from
    a fixed vector: the order consumes no random numbers of the caller's generator.
    """
    if not isinstance(points, Tensor) or points.ndim not in (2, 3):
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"points must be a tensor of shape (K, D) or (G, K, D), got {shape}")
    single = points.ndim == 2
    p = (points[None] if single else points).reshape(points.shape[0] if not single else 1, points.shape[-2], -1)
    p = p.to(torch.float64)
    c = p - p.mean(1, keepdim=True)
    v = torch.linspace(1.0, 2.0, c.shape[-1], dtype=torch.float64, device=c.device)[None, :, None].expand(c.shape[0], -1, 1)
    for _ in range(iters):
        v = c.transpose(1, 2) @ (c @ v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    order = torch.argsort((c @ v)[..., 0], dim=1)
    return order[0] if single else order
