r"""Parametric PDE problems with hard Dirichlet constraints, as in Random Grid Neural Processes.

Vadeboncoeur, Kazlauskaite, Papandreou, Cirak, Girolami, Akyildiz, *Random Grid Neural Processes for
Parametric PDEs*, ICML 2023. A problem is

.. math::  G^w_z(u)(x) = 0,\ x\in\Omega, \qquad u = B(x, w) + D(x)\,\tilde u(x),

where :math:`B` (``lift``) meets the Dirichlet data, :math:`D` (``factor``) vanishes on the boundary,
``z`` are the unknown parameters (their prior is the law of ``sample_params``) and ``w`` the known inputs.
``residual(u, x, z, w)`` is the strong-form residual :math:`G^w_z(u)` computed with autograd derivatives of
``u`` with respect to ``x`` (``x`` requires grad).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Problem", "sensors", "grad"]


def grad(u: Tensor, x: Tensor) -> Tensor:
    """:math:`\\partial u/\\partial x` of a field ``u`` (B, N) computed from points ``x`` (B, N, d), shape (B, N, d).

    Each ``u[b, i]`` depends only on ``x[b, i]`` (a pointwise network), so the gradient of the sum gives every
    point's own derivative. The graph is kept, so second derivatives follow by calling ``grad`` again.
    """
    return torch.autograd.grad(u.sum(), x, create_graph=True)[0]


class Problem:
    """A parametric PDE with hard Dirichlet constraints (RGNP, Vadeboncoeur et al. 2023).

    Arguments:
        domain: ``[(lo, hi), ...]`` one finite interval per coordinate of ``x`` (``d`` intervals).
        residual: ``residual(u, x, z, w) -> (B, N)`` or ``(B, N, k)``; ``u`` is ``(B, N)`` (or ``(B, N, c)`` for
            ``c`` unknown fields) computed from ``x`` ``(B, N, d)``, which requires grad.
        lift: ``lift(x, w) -> (B, N)`` (or ``(B, N, c)``), the Dirichlet data :math:`B`.
        factor: ``factor(x) -> (B, N)`` (or ``(B, N, c)``), vanishing on the Dirichlet boundary.
        sample_params: ``sample_params(n, generator) -> (z, w)`` with ``z`` ``(n, dz)`` and ``w`` ``(n, dw)``
            (``w`` may be ``None`` when there are no known inputs). The prior of ``z`` is the law of these draws.
        log_prior: optional ``log_prior(z) -> (B,)``, the prior log-density of ``z`` up to a constant.
        support: optional ``[(lo, hi), ...]`` per coordinate of ``z``; the prior is taken uniform on it when
            ``log_prior`` is not given.
        reference: optional solver ``reference(z, w, x) -> u`` at points ``x`` (used by benchmarks and the
            gold posterior).
        name: a label.

    The constructor checks everything it can at once: the domain, ``sample_params`` (a draw of 256 rows, every
    row finite), and one call of ``lift``, ``factor`` and ``residual`` on a smooth test field (shapes and
    finiteness). A mistake gives a one-line ``ValueError``/``TypeError``.
    """

    def __init__(
        self,
        domain: Sequence[Sequence[float]],
        residual: Callable[..., Tensor],
        lift: Callable[..., Tensor],
        factor: Callable[..., Tensor],
        sample_params: Callable[..., tuple],
        *,
        log_prior: Optional[Callable[[Tensor], Tensor]] = None,
        support: Optional[Sequence[Sequence[float]]] = None,
        reference: Optional[Callable[..., Tensor]] = None,
        name: str = "problem",
    ) -> None:
        self.domain = _check_box(domain, "domain")
        for label, fn in (("residual", residual), ("lift", lift), ("factor", factor), ("sample_params", sample_params)):
            if not callable(fn):
                raise TypeError(f"{label} must be callable, got {type(fn).__name__}")
        if log_prior is not None and not callable(log_prior):
            raise TypeError(f"log_prior must be callable or None, got {type(log_prior).__name__}")
        if reference is not None and not callable(reference):
            raise TypeError(f"reference must be callable or None, got {type(reference).__name__}")
        self.residual_fn = residual
        self.lift_fn = lift
        self.factor_fn = factor
        self.sample_params_fn = sample_params
        self.log_prior_fn = log_prior
        self.reference = reference
        self.name = str(name)
        self.dim = len(self.domain)
        self.lo = torch.tensor([a for a, _ in self.domain], dtype=torch.float64)
        self.hi = torch.tensor([b for _, b in self.domain], dtype=torch.float64)
        z, w = self.sample_params(256, torch.Generator().manual_seed(12345))
        self.dz, self.dw = z.shape[1], w.shape[1]
        self.support = None if support is None else _check_box(support, "support")
        if self.support is not None and len(self.support) != self.dz:
            raise ValueError(f"support must give one interval per coordinate of z (dz={self.dz}), got {len(self.support)}")
        self._probe(z[:4], w[:4])

    # -- the user's functions, checked ------------------------------------------------------------
    def sample_params(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``n`` draws ``(z (n, dz), w (n, dw))`` from the user's ``sample_params``, float tensors, every row finite."""
        out = self.sample_params_fn(int(n), generator)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"sample_params must return a pair (z, w), got {type(out).__name__}")
        z, w = out
        z = _as_2d(z, n, "z from sample_params")
        w = torch.zeros(n, 0, dtype=z.dtype, device=z.device) if w is None else _as_2d(w, n, "w from sample_params")
        for label, value in (("z", z), ("w", w)):
            bad = ~torch.isfinite(value).all(dim=1)
            if bad.any():
                row = int(bad.nonzero()[0])
                raise ValueError(f"sample_params returned a non-finite {label} in row {row} of {n}: {value[row].tolist()}")
        if z.shape[1] == 0:
            raise ValueError("sample_params must return at least one unknown parameter (z of shape (n, dz>=1)), got dz=0")
        return z, w

    def lift(self, x: Tensor, w: Tensor) -> Tensor:
        return self._field(self.lift_fn(x, w), x, "lift")

    def factor(self, x: Tensor) -> Tensor:
        return self._field(self.factor_fn(x), x, "factor")

    def compose(self, u_tilde: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """:math:`u = B(x,w) + D(x)\\tilde u`, shapes (B, N) or (B, N, c)."""
        return self.lift(x, w) + self.factor(x) * u_tilde

    def residual(self, u: Tensor, x: Tensor, z: Tensor, w: Tensor) -> Tensor:
        """The user's residual as (B, N, k) (k = 1 for a scalar residual), shape and finiteness checked."""
        r = self.residual_fn(u, x, z, w)
        if not isinstance(r, Tensor):
            raise TypeError(f"residual must return a tensor, got {type(r).__name__}")
        b, n = x.shape[:2]
        if r.ndim == 2 and tuple(r.shape) == (b, n):
            r = r.unsqueeze(-1)
        elif not (r.ndim == 3 and tuple(r.shape[:2]) == (b, n)):
            raise ValueError(f"residual must return shape (B, N) = ({b}, {n}) or (B, N, k), got {tuple(r.shape)}")
        return r

    def n_fields(self) -> int:
        return self._n_fields

    # -- points ----------------------------------------------------------------------------------
    def uniform_points(self, b: int, n: int, generator=None, margin: float = 1e-5, dtype=torch.float32,
                       device=None) -> Tensor:
        """``b`` independent grids of ``n`` iid uniform points each, (b, n, d), pulled in by ``margin`` (relative)."""
        u = torch.rand(b, n, self.dim, generator=generator, dtype=torch.float64)
        lo, hi = self.lo, self.hi
        width = hi - lo
        x = lo + width * margin + u * width * (1 - 2 * margin)
        return x.to(dtype=dtype, device=device)

    def check_points(self, x: Tensor, name: str = "x", tol: float = 1e-6) -> None:
        """ValueError when a point of ``x`` (B, N, d) lies outside the domain or is not finite."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape (B, N, d={self.dim}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} must be finite")
        lo = self.lo.to(x) - tol * (self.hi - self.lo).to(x)
        hi = self.hi.to(x) + tol * (self.hi - self.lo).to(x)
        out = (x < lo) | (x > hi)
        if out.any():
            idx = out.nonzero()[0].tolist()
            raise ValueError(f"{name}[{idx[0]}, {idx[1]}] = {x[idx[0], idx[1]].tolist()} lies outside the domain {self.domain}")

    def log_prior(self, z: Tensor) -> Optional[Tensor]:
        """The user's ``log_prior(z)`` (B,), or the uniform log-density on ``support``, or None when neither is known."""
        if self.log_prior_fn is not None:
            out = self.log_prior_fn(z)
            return out.reshape(z.shape[0])
        if self.support is not None:
            lo = torch.tensor([a for a, _ in self.support], dtype=z.dtype, device=z.device)
            hi = torch.tensor([b for _, b in self.support], dtype=z.dtype, device=z.device)
            inside = ((z >= lo) & (z <= hi)).all(dim=-1)
            return torch.where(inside, torch.zeros_like(z[..., 0]), torch.full_like(z[..., 0], -math.inf))
        return None

    # -- internals -------------------------------------------------------------------------------
    def _field(self, value: Tensor, x: Tensor, label: str) -> Tensor:
        if not isinstance(value, Tensor):
            if isinstance(value, (int, float)):
                return torch.full(x.shape[:2], float(value), dtype=x.dtype, device=x.device)
            raise TypeError(f"{label} must return a tensor, got {type(value).__name__}")
        b, n = x.shape[:2]
        if value.ndim == 2 and tuple(value.shape) == (b, n):
            return value
        if value.ndim == 3 and tuple(value.shape[:2]) == (b, n):
            return value
        if value.ndim == 3 and value.shape[0] in (1, b) and value.shape[1] == n:
            return value.expand(b, *value.shape[1:])
        raise ValueError(f"{label} must return shape (B, N) = ({b}, {n}) or (B, N, c), got {tuple(value.shape)}")

    def _probe(self, z: Tensor, w: Tensor) -> None:
        z = z.to(torch.float32)
        w = w.to(torch.float32)
        x = self.uniform_points(z.shape[0], 7, torch.Generator().manual_seed(0), margin=0.05).requires_grad_(True)
        lift = self.lift(x, w)
        factor = self.factor(x)
        self._n_fields = 1 if lift.ndim == 2 else lift.shape[2]
        if factor.ndim == 3 and factor.shape[2] not in (1, self._n_fields):
            raise ValueError(f"factor must have {self._n_fields} fields like lift, got shape {tuple(factor.shape)}")
        if not (torch.isfinite(lift).all() and torch.isfinite(factor).all()):
            raise ValueError("lift and factor must be finite inside the domain")
        xs = (x - self.lo.to(x)) / (self.hi - self.lo).to(x)
        smooth = 0.1 * torch.sin(3.0 * xs.sum(-1))
        if self._n_fields > 1:
            smooth = smooth.unsqueeze(-1).expand(*smooth.shape, self._n_fields)
        u = lift + factor * smooth
        try:
            r = self.residual(u, x, z, w)
        except (ValueError, TypeError):
            raise
        except RuntimeError as error:
            raise ValueError(f"residual failed on a test field: {str(error).splitlines()[0]}") from None
        if not torch.isfinite(r).all():
            raise ValueError("residual returned non-finite values on a smooth test field inside the domain")
        self.n_residuals = r.shape[2]


def sensors(problem: Problem, n: int, b: int = 1, *, generator=None, margin: float = 0.05, x: Optional[Tensor] = None,
            u: Optional[Callable[[Tensor], Tensor]] = None, noise: float = 0.0,
            dtype=torch.float32) -> tuple[Tensor, Optional[Tensor]]:
    """Sensor locations and noisy readings.

    Arguments:
        problem: the :class:`Problem`.
        n: sensors per case (ignored when ``x`` is given).
        b: number of cases.
        margin: sensors are drawn uniformly at least ``margin`` (relative to the domain width) from each wall.
        x: given locations (b, n, d) instead of random ones (checked against the domain).
        u: ``u(x) -> (b, n)`` the true field at the sensors (a reference solver); None returns no readings.
        noise: standard deviation of the Gaussian noise added to the readings (>= 0).

    Returns:
        ``(x, y)``: locations (b, n, d) and readings (b, n) or None.
    """
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    if x is None:
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must lie in [0, 0.5), got {margin}")
        x = problem.uniform_points(b, int(n), generator, margin=margin, dtype=dtype)
    problem.check_points(x, "sensor locations")
    if u is None:
        return x, None
    y = u(x)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y)
    return x, y


def _check_box(box, name: str) -> list[tuple[float, float]]:
    try:
        pairs = [tuple(float(v) for v in pair) for pair in box]
    except TypeError:
        raise TypeError(f"{name} must be a list of (lo, hi) pairs, got {box!r}") from None
    if len(pairs) == 0:
        raise ValueError(f"{name} must hold at least one (lo, hi) interval, got an empty {name}")
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"{name}[{i}] must be a pair (lo, hi), got {pair!r}")
        lo, hi = pair
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name}[{i}] must be finite, got {pair!r}")
        if not lo < hi:
            raise ValueError(f"{name}[{i}] = {pair!r} is empty or inverted: need lo < hi")
    return pairs


def _as_2d(value, n: int, label: str) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception:
            raise TypeError(f"{label} must be a tensor, got {type(value).__name__}") from None
    if not value.is_floating_point():
        value = value.to(torch.get_default_dtype())
    if value.ndim == 1:
        value = value.unsqueeze(1)
    if value.ndim != 2 or value.shape[0] != n:
        raise ValueError(f"{label} must have shape (n, d) with n={n}, got {tuple(value.shape)}")
    return value


def check_known_inputs(w, b: int, dw: int) -> Tensor:
    """``w`` as a ``(b, dw)`` tensor (``None`` allowed when ``dw == 0``; a ``(b,)`` vector when ``dw == 1``);
    TypeError/ValueError naming the expected shape otherwise."""
    if w is None and dw == 0:
        return torch.zeros(b, 0)
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a tensor of shape ({b}, {dw}), got {type(w).__name__}")
    if w.ndim == 1 and dw == 1 and w.shape[0] == b:
        w = w.unsqueeze(1)
    if tuple(w.shape) != (b, dw):
        raise ValueError(f"w must have shape ({b}, {dw}), got {tuple(w.shape)}")
    return w
