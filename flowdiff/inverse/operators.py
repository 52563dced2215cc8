r"""Forward operators :math:`A` of inverse problems :math:`y = A(x) + \sigma_y n`.

Every operator maps a batch ``x`` of shape ``(B, *in_shape)`` to ``y`` of shape
``(B, *out_shape)``; ``forward`` is differentiable (autograd), so a nonlinear operator only
needs ``forward``. A *linear* operator also provides

* ``adjoint(y)``: the exact adjoint for the real inner product,
  :math:`\langle A x, y\rangle = \langle x, A^H y\rangle` (for a complex ``y`` the left side is
  :math:`\mathrm{Re}\sum_i \overline{(Ax)_i}\, y_i`, i.e. complex numbers are pairs of reals);
* ``svd()``: an :class:`SVD` :math:`A = U \operatorname{diag}(s) V^\top` in flattened
  coordinates, or ``None`` when no cheap one exists. SVD-based samplers (DDRM: Kawar, Elad,
  Ermon, Song 2022, "Denoising Diffusion Restoration Models") work coordinate-wise in the
  spectral space :math:`V^\top x`;
* ``pinv(y)``: the pseudo-inverse :math:`A^+ y` (minimum-norm least-squares solution);
* ``gram_solve(y, c, s2)``: :math:`(c\,A A^H + s_2 I)^{-1} y` (the solve of ΠGDM, DiffPIR,
  DAPS' Gaussian step), through the SVD, or conjugate gradients when there is none.

Everything follows the dtype and device of the input: an operator built from a float64 tensor
applied to a float32 ``x`` computes in float32 (the parameters are cast and cached).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SVD", "Operator", "Matrix", "Inpaint", "Blur", "SuperResolution", "Colorize", "SubsampledFourier",
           "ParallelBeam", "Nonlinear"]


# ----------------------------------------------------------------------------------------------
# helpers


def _as_shape(name: str, shape: object) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) == 0:
        raise TypeError(f"{name} must be a non-empty tuple of positive ints, got {shape!r}")
    out = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {tuple(shape)!r}")
        out.append(int(n))
    return tuple(out)


def _check_real_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a real floating tensor (float32/float64), got dtype {value.dtype}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} has {int((~torch.isfinite(value)).sum())} non-finite entries")
    return value


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _rdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample real inner product of two batches (complex entries count as pairs of reals)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.is_complex() or b.is_complex():
        return (a.conj() * b).real.sum(dim=1)
    return (a * b).sum(dim=1)


def _scalar_coefficient(name: str, value: object, like: Tensor) -> Tensor:
    """``value`` (a number, a 0-d tensor or a ``(B,)`` tensor, all >= 0) shaped to broadcast over ``like``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number >= 0 or a tensor of shape () or (B,), got {type(value).__name__}")
    dtype = _real_dtype(like.dtype)
    t = torch.as_tensor(value, dtype=dtype, device=like.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, like.shape[0])):
        raise ValueError(f"{name} must be a scalar or have shape (B,) = ({like.shape[0]},), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {t.flatten()[:4].tolist()}")
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


# ----------------------------------------------------------------------------------------------
# SVD


class SVD:
    r"""A singular value decomposition :math:`A = U \operatorname{diag}(s) V^\top` given as maps.

    Coordinates are flattened: ``d = prod(in_shape)`` and ``m = prod(out_shape)``. ``V`` is a
    full orthogonal ``d x d`` matrix whose first ``k = len(s)`` columns span the row space of
    :math:`A`; ``U`` has ``k`` orthonormal columns (``m x k``; complex for complex outputs, where
    it is orthonormal for the real inner product). Only positive singular values are kept.

    Attributes:
        s: singular values, shape ``(k,)``, all > 0, matching the first ``k`` spectral coordinates.

    Methods (all batched, following the input's dtype and device):
        vt(x): ``(B, *in_shape) -> (B, d)``, the spectral coordinates :math:`V^\top x`.
        v(c): ``(B, d) -> (B, *in_shape)``, the inverse of ``vt``.
        ut(y): ``(B, *out_shape) -> (B, k)``, :math:`U^\top y` (real).
        u(c): ``(B, k) -> (B, *out_shape)``, :math:`U c`.

    The SVD is the tool of DDRM (Kawar et al. 2022, "Denoising Diffusion Restoration Models").
    """

    def __init__(self, s: Tensor, vt: Callable[[Tensor], Tensor], v: Callable[[Tensor], Tensor],
                 ut: Callable[[Tensor], Tensor], u: Callable[[Tensor], Tensor], in_shape: Sequence[int],
                 out_shape: Sequence[int]) -> None:
        self.s = s
        self._vt, self._v, self._ut, self._u = vt, v, ut, u
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    @property
    def rank(self) -> int:
        """``k``, the number of positive singular values."""
        return int(self.s.shape[0])

    def vt(self, x: Tensor) -> Tensor:
        """Spectral coordinates :math:`V^\\top x`, ``(B, *in_shape) -> (B, d)``."""
        return self._vt(x)

    def v(self, c: Tensor) -> Tensor:
        """:math:`V c`, ``(B, d) -> (B, *in_shape)`` (inverse of :meth:`vt`)."""
        return self._v(c)

    def ut(self, y: Tensor) -> Tensor:
        """:math:`U^\\top y`, ``(B, *out_shape) -> (B, k)``."""
        return self._ut(y)

    def u(self, c: Tensor) -> Tensor:
        """:math:`U c`, ``(B, k) -> (B, *out_shape)``."""
        return self._u(c)

    def __repr__(self) -> str:
        return f"SVD(rank={self.rank}, in_shape={self.in_shape}, out_shape={self.out_shape})"


def _relative_tolerance(values: Tensor, size: int) -> float:
    """Singular values at or below ``size * eps * max`` count as zero (the ``numpy.linalg.matrix_rank`` rule)."""
    return size * torch.finfo(values.dtype).eps * (float(values.max()) if values.numel() else 0.0)


class _IndexCache:
    """An index tensor copied to each device it is used on (cached)."""

    def __init__(self, index: Tensor) -> None:
        self.index = index
        self._on: dict = {index.device: index}

    def on(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = self.index.to(device)
        return self._on[device]


def _dense_svd(matrix: Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...], channels: int = 1) -> SVD:
    """:class:`SVD` of a real ``(m0, d0)`` matrix applied to each of ``channels`` channels
    (``x`` viewed as ``(B, channels, d0)``, ``y`` as ``(B, channels, m0)``), by ``torch.linalg.svd`` in the
    matrix's dtype. Spectral coordinates are ordered ``index * channels + channel`` so that the
    ``k * channels`` nonzero ones come first."""
    u_full, s_all, vh = torch.linalg.svd(matrix, full_matrices=True)
    top_tol = _relative_tolerance(s_all, max(matrix.shape))
    k0 = int((s_all > top_tol).sum()) if s_all.numel() else 0
    s = s_all[:k0].repeat_interleave(channels)
    u_k = u_full[:, :k0].contiguous()
    cache: dict = {}

    def factors(like: Tensor) -> tuple[Tensor, Tensor]:
        key = (_real_dtype(like.dtype), like.device)
        if key not in cache:
            cache[key] = (u_k.to(dtype=key[0], device=key[1]), vh.to(dtype=key[0], device=key[1]))
        return cache[key]

    def vt(x: Tensor) -> Tensor:
        c = x.reshape(x.shape[0], channels, -1) @ factors(x)[1].T
        return c.transpose(1, 2).reshape(x.shape[0], -1)

    def v(c: Tensor) -> Tensor:
        x = c.reshape(c.shape[0], -1, channels).transpose(1, 2) @ factors(c)[1]
        return x.reshape(c.shape[0], *in_shape)

    def ut(y: Tensor) -> Tensor:
        c = y.reshape(y.shape[0], channels, -1) @ factors(y)[0]
        return c.transpose(1, 2).reshape(y.shape[0], -1)

    def u(c: Tensor) -> Tensor:
        y = c.reshape(c.shape[0], k0, channels).transpose(1, 2) @ factors(c)[0].T
        return y.reshape(c.shape[0], *out_shape)

    return SVD(s, vt, v, ut, u, in_shape, out_shape)


def _permuted_svd(s_full: Tensor, vt_full: Callable[[Tensor], Tensor], v_full: Callable[[Tensor], Tensor],
                  ut_full: Callable[[Tensor], Tensor], u_full: Callable[[Tensor], Tensor],
                  in_shape: tuple[int, ...], out_shape: tuple[int, ...], tol: float | None = None) -> SVD:
    """An :class:`SVD` from an orthogonal coordinate map with per-coordinate singular values.

    ``vt_full``/``v_full``: an orthogonal map ``x <-> (B, D)`` (``D = prod(in_shape)``);
    ``s_full`` ``(D,)``: the singular value of each coordinate (0 where unobserved);
    ``ut_full(y) -> (B, D)``: :math:`U^\top y` at the observed coordinates (anything elsewhere);
    ``u_full(c) -> y`` for ``c`` ``(B, D)`` zero at the unobserved coordinates.
    The coordinates are sorted by decreasing singular value (stable), so the ``k`` observed ones
    come first, as :class:`SVD` requires.
    """
    if tol is None:
        tol = _relative_tolerance(s_full, s_full.numel())
    order = torch.sort(s_full, descending=True, stable=True).indices
    k = int((s_full > tol).sum())
    s = s_full[order[:k]].clone()
    order_c, kept_c = _IndexCache(order), _IndexCache(order[:k].clone())
    d = s_full.numel()

    def vt(x: Tensor) -> Tensor:
        return vt_full(x)[:, order_c.on(x.device)]

    def v(c: Tensor) -> Tensor:
        full = torch.zeros(c.shape[0], d, dtype=c.dtype, device=c.device)
        full = full.index_copy(1, order_c.on(c.device), c)
        return v_full(full)

    def ut(y: Tensor) -> Tensor:
        return ut_full(y)[:, kept_c.on(y.device)]

    def u(c: Tensor) -> Tensor:
        full = torch.zeros(c.shape[0], d, dtype=c.dtype, device=c.device)
        full = full.index_copy(1, kept_c.on(c.device), c)
        return u_full(full)

    return SVD(s, vt, v, ut, u, in_shape, out_shape)


# ----------------------------------------------------------------------------------------------
# base class


class Operator:
    r"""Base class of forward operators :math:`x \mapsto A(x)`.

    Subclasses set ``in_shape``, ``out_shape`` and ``linear`` and implement ``_forward`` (and
    for linear operators ``_adjoint`` and, when cheap, ``_svd``). The public methods check the
    shapes and dispatch. ``__call__`` is ``forward``.

    The defaults of the linear algebra:

    * ``pinv``: through the SVD, :math:`A^+ y = V_{:k} \operatorname{diag}(1/s) U^\top y`;
      without an SVD, conjugate gradients on the normal equations :math:`A^H A x = A^H y` from
      zero (the minimum-norm least-squares solution; ``cg_iterations`` steps).
    * ``gram_solve(y, c, s2)``: through the SVD,
      :math:`U \operatorname{diag}(1/(c s^2 + s_2)) U^\top y + (y - U U^\top y)/s_2`;
      without one, conjugate gradients (``cg_iterations``, default 50) on
      :math:`c A A^H + s_2 I`, which is symmetric positive (semi)definite.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    linear: bool = True
    #: conjugate-gradient iterations of ``pinv``/``gram_solve`` when there is no SVD.
    cg_iterations: int = 50

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], linear: bool = True) -> None:
        self.in_shape = _as_shape("in_shape", in_shape)
        self.out_shape = _as_shape("out_shape", out_shape)
        self.linear = bool(linear)
        self._svd_cache: dict = {}

    # -- shape checks ---------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        """``d = prod(in_shape)``."""
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        """``m = prod(out_shape)`` (complex entries count once)."""
        return math.prod(self.out_shape)

    @property
    def complex_output(self) -> bool:
        """Whether ``y`` is complex (SubsampledFourier)."""
        return False

    def _check_x(self, x: object, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, *{self.in_shape}), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a real floating tensor, got dtype {x.dtype}")
        if x.ndim != len(self.in_shape) + 1 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"{name} must have shape (B, *in_shape) = (B, *{self.in_shape}) for "
                             f"{type(self).__name__}, got {tuple(x.shape)}")
        return x

    def _check_y(self, y: object, name: str = "y") -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, *{self.out_shape}), got {type(y).__name__}")
        if self.complex_output:
            if not (y.is_complex() or y.is_floating_point()):
                raise TypeError(f"{name} must be a complex (or real floating) tensor, got dtype {y.dtype}")
            if not y.is_complex():
                y = torch.complex(y, torch.zeros_like(y))
        elif not y.is_floating_point():
            raise TypeError(f"{name} must be a real floating tensor, got dtype {y.dtype}")
        if y.ndim != len(self.out_shape) + 1 or tuple(y.shape[1:]) != self.out_shape:
            raise ValueError(f"{name} must have shape (B, *out_shape) = (B, *{self.out_shape}) for "
                             f"{type(self).__name__}, got {tuple(y.shape)}")
        return y

    def _require_linear(self, what: str) -> None:
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is nonlinear: it has no {what}; use forward() and autograd "
                            "(methods such as DPS, DAPS or RED-diff accept nonlinear operators)")

    # -- public API -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """:math:`A(x)`, ``(B, *in_shape) -> (B, *out_shape)``; differentiable."""
        return self._forward(self._check_x(x))

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`A^H y`, ``(B, *out_shape) -> (B, *in_shape)``: :math:`\langle Ax, y\rangle = \langle x, A^H y\rangle` (real inner product)."""
        self._require_linear("adjoint")
        return self._adjoint(self._check_y(y))

    def svd(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SVD | None:
        """The :class:`SVD` of the operator (cached), or ``None`` when none is available.

        Arguments:
            dtype, device: in which the decomposition is computed and ``s`` is stored (the maps
                follow their inputs anyway); default: the dtype/device of the operator's own
                floating parameters (``H``, ``kernel``), else float64 (exact index maps and
                closed-form values need no lower precision), on the parameters' device.
        """
        self._require_linear("SVD")
        dtype = dtype or self._default_dtype()
        device = torch.device(device) if device is not None else self._default_device()
        key = (dtype, device)
        if key not in self._svd_cache:
            self._svd_cache[key] = self._svd(dtype, device)
        return self._svd_cache[key]

    def pinv(self, y: Tensor) -> Tensor:
        """The pseudo-inverse :math:`A^+ y` (minimum-norm least-squares solution), ``(B, *out_shape) -> (B, *in_shape)``."""
        self._require_linear("pseudo-inverse")
        y = self._check_y(y)
        dec = self.svd()
        if dec is None:
            return self._cg_pinv(y)
        coeff = dec.ut(y) / dec.s.to(device=y.device, dtype=_real_dtype(y.dtype))
        full = torch.zeros(y.shape[0], self.in_dim, dtype=coeff.dtype, device=coeff.device)
        full[:, : dec.rank] = coeff
        return dec.v(full)

    def gram_solve(self, y: Tensor, c: float | Tensor, s2: float | Tensor) -> Tensor:
        r""":math:`(c\,A A^H + s_2 I)^{-1} y`, ``(B, *out_shape) -> (B, *out_shape)``.

        ``c`` and ``s2`` are numbers >= 0 or tensors of shape ``()``/``(B,)``. With ``s2 = 0`` the
        inverse is the pseudo-inverse of :math:`c A A^H` (the part of ``y`` outside the range of
        :math:`A` is dropped); ``c = s2 = 0`` is an error. Through the SVD when there is one,
        else ``cg_iterations`` conjugate-gradient steps.
        """
        self._require_linear("gram_solve")
        y = self._check_y(y)
        c_t = _scalar_coefficient("c", c, y)
        s2_t = _scalar_coefficient("s2", s2, y)
        if bool(((c_t == 0) & (s2_t == 0)).any()):
            raise ValueError("gram_solve needs c > 0 or s2 > 0 (c = s2 = 0 is the zero matrix)")
        dec = self.svd()
        if dec is None:
            return self._cg_gram_solve(y, c_t, s2_t)
        s = dec.s.to(device=y.device, dtype=_real_dtype(y.dtype))
        coeff = dec.ut(y)
        c_2, s2_2 = c_t.reshape(-1, 1) if c_t.ndim else c_t, s2_t.reshape(-1, 1) if s2_t.ndim else s2_t
        in_range = dec.u(coeff / (c_2 * s**2 + s2_2))
        if self._range_is_everything(dec):
            return in_range
        rest = y - dec.u(coeff)
        safe = torch.where(s2_t > 0, s2_t, torch.ones_like(s2_t))
        return in_range + torch.where(s2_t > 0, rest / safe, torch.zeros_like(rest))

    def to_matrix(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """The dense ``(m, d)`` matrix of a linear operator (for tests and small problems; complex
        for complex outputs), built by applying ``forward`` to the standard basis."""
        self._require_linear("matrix")
        eye = torch.eye(self.in_dim, dtype=dtype, device=device).reshape(self.in_dim, *self.in_shape)
        return self._forward(eye).reshape(self.in_dim, -1).T.contiguous()

    # -- to implement ---------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD | None:
        return None

    def _default_dtype(self) -> torch.dtype:
        return torch.float64

    def _default_device(self) -> torch.device:
        return torch.device("cpu")

    def _range_is_everything(self, dec: SVD) -> bool:
        """Whether ``U`` spans the whole output space (then ``gram_solve`` skips the complement)."""
        return dec.rank == self.out_dim * (2 if self.complex_output else 1)

    # -- conjugate gradients --------------------------------------------------------------
    def _cg(self, b: Tensor, apply: Callable[[Tensor], Tensor]) -> Tensor:
        """Solve ``apply(w) = b`` for a symmetric positive (semi)definite ``apply`` by conjugate
        gradients in the real inner product, from ``w = 0``, for at most ``cg_iterations`` steps
        (stopping once ``|r| <= tol |b|``, ``tol`` = 1e-10 in float64, 1e-5 in float32). From zero the
        iterates stay in the range of ``apply``, so for a consistent singular system CG converges
        to the minimum-norm solution. Convergence needs about ``sqrt(condition number)`` steps."""
        tol = (1e-10 if _real_dtype(b.dtype) == torch.float64 else 1e-5) ** 2
        w = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rr = _rdot(r, r)
        stop = tol * rr
        shape = (-1,) + (1,) * (b.ndim - 1)
        for _ in range(self.cg_iterations):
            if bool((rr <= stop).all()):
                break
            ap = apply(p)
            pap = _rdot(p, ap)
            alpha = torch.where(pap > 0, rr / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            w = w + alpha.reshape(shape) * p
            r = r - alpha.reshape(shape) * ap
            rr_new = _rdot(r, r)
            beta = torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
            p = r + beta.reshape(shape) * p
            rr = rr_new
        return w

    def _cg_pinv(self, y: Tensor) -> Tensor:
        """:math:`A^+ y` as the minimum-norm solution of the normal equations :math:`A^H A x = A^H y` (CGNR)."""
        return self._cg(self._adjoint(y), lambda x: self._adjoint(self._forward(x)))

    def _cg_gram_solve(self, y: Tensor, c: Tensor, s2: Tensor) -> Tensor:
        """:math:`(c A A^H + s_2 I)^{-1} y` by CG; where ``s2 = 0`` (singular system, ``y`` possibly
        outside the range) the pseudo-inverse :math:`(A A^H)^+ y / c = (A^+)^H A^+ y / c`, two CG solves."""
        def normal(w: Tensor) -> Tensor:
            return self._forward(self._adjoint(w)).to(w.dtype)

        singular = (s2 == 0).reshape(-1)
        w = y if bool(singular.all()) else self._cg(y, lambda v: c * normal(v) + s2 * v)
        if bool(singular.any()):
            z = self._cg_pinv(y)  # A^+ y, in the row space
            safe_c = torch.where(c > 0, c, torch.ones_like(c))
            w_pinv = self._cg(self._forward(z).to(y.dtype), normal) / safe_c  # min-norm solution of A^H w = z
            mask = singular.expand(y.shape[0]).reshape(-1, *([1] * (y.ndim - 1)))
            w = torch.where(mask, w_pinv, w)
        return w

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={self.in_shape}, out_shape={self.out_shape})"


# ----------------------------------------------------------------------------------------------
# dense matrix


class Matrix(Operator):
    r"""A dense matrix :math:`H` of shape ``(m, d)``: :math:`A x = H\,\mathrm{vec}(x)`.

    Arguments:
        H: real ``(m, d)`` tensor (finite).
        in_shape: shape of one ``x`` (default ``(d,)``; any shape with ``prod = d``).
        out_shape: shape of one ``y`` (default ``(m,)``).

    ``svd()`` is ``torch.linalg.svd(H)`` in ``H``'s dtype (singular values below
    ``max(m, d) * eps * s_max`` are dropped as zero). Computation follows the input's dtype and
    device (``H`` is cast and cached).
    """

    def __init__(self, H: Tensor, in_shape: Sequence[int] | None = None, out_shape: Sequence[int] | None = None) -> None:
        H = _check_real_tensor("H", H)
        if H.ndim != 2:
            raise ValueError(f"H must be a 2-D (m, d) matrix, got shape {tuple(H.shape)}")
        m, d = H.shape
        in_shape = (d,) if in_shape is None else _as_shape("in_shape", in_shape)
        out_shape = (m,) if out_shape is None else _as_shape("out_shape", out_shape)
        if math.prod(in_shape) != d:
            raise ValueError(f"in_shape {in_shape} has {math.prod(in_shape)} entries, but H has d = {d} columns")
        if math.prod(out_shape) != m:
            raise ValueError(f"out_shape {out_shape} has {math.prod(out_shape)} entries, but H has m = {m} rows")
        super().__init__(in_shape, out_shape, linear=True)
        self.H = H.detach()
        self._cast: dict = {}

    def _matrix(self, like: Tensor) -> Tensor:
        key = (_real_dtype(like.dtype), like.device)
        if key not in self._cast:
            self._cast[key] = self.H.to(dtype=key[0], device=key[1])
        return self._cast[key]

    def _forward(self, x: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], -1) @ self._matrix(x).T).reshape(x.shape[0], *self.out_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        return (y.reshape(y.shape[0], -1) @ self._matrix(y)).reshape(y.shape[0], *self.in_shape)

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD:
        return _dense_svd(self.H.to(dtype=dtype, device=device), self.in_shape, self.out_shape)

    def _default_dtype(self) -> torch.dtype:
        return self.H.dtype

    def _default_device(self) -> torch.device:
        return self.H.device

    def to_matrix(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        return self.H.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# inpainting


def _check_mask(name: str, mask: object) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (True = observed), got dtype {mask.dtype}; "
                        "convert with mask.bool() or mask > 0.5")
    if mask.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")
    if not bool(mask.any()):
        raise ValueError(f"{name} observes nothing (no True entry); an operator needs at least one observation")
    return mask.detach()


class Inpaint(Operator):
    r"""Inpainting: observe the entries of ``x`` where ``mask`` is True, :math:`y = x[\text{mask}]`.

    ``y`` is the flat vector of the observed entries (row-major order), ``out_shape = (n,)``
    with ``n`` the number of observed entries. The adjoint puts ``y`` back and fills zeros;
    the SVD is trivial (Kawar et al. 2022, DDRM, App.: inpainting): ``s = 1``, ``U = I``, and
    :math:`V^\top` a permutation that lists the observed entries first. Score-SDE's
    replacement inpainting (Song et al. 2021, "Score-Based Generative Modeling through
    Stochastic Differential Equations") works with the same mask.

    Arguments:
        mask: boolean tensor, True = observed. Either of shape ``in_shape``, or broadcastable to
            a given ``in_shape`` (e.g. an ``(H, W)`` mask shared by the channels of ``(C, H, W)``).
        in_shape: shape of one ``x`` (default ``mask.shape``).
    """

    def __init__(self, mask: Tensor, in_shape: Sequence[int] | None = None) -> None:
        mask = _check_mask("mask", mask)
        if in_shape is None:
            in_shape = tuple(mask.shape)
        in_shape = _as_shape("in_shape", in_shape)
        try:
            ok = mask.ndim <= len(in_shape) and torch.broadcast_shapes(mask.shape, in_shape) == torch.Size(in_shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to in_shape {in_shape}")
        full = mask.expand(in_shape).reshape(-1)
        self.mask = mask.expand(in_shape).clone()
        index = torch.nonzero(full).flatten()
        super().__init__(in_shape, (int(index.numel()),), linear=True)
        self._index = _IndexCache(index)

    def _forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)[:, self._index.on(x.device)]

    def _adjoint(self, y: Tensor) -> Tensor:
        x = torch.zeros(y.shape[0], self.in_dim, dtype=y.dtype, device=y.device)
        return x.index_copy(1, self._index.on(y.device), y).reshape(y.shape[0], *self.in_shape)

    def pinv(self, y: Tensor) -> Tensor:
        """Zero-filling: the observed entries from ``y``, zeros elsewhere (``A^+ = A^H``)."""
        return self.adjoint(y)

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD:
        s_full = self.mask.reshape(-1).to(dtype=dtype, device=device)
        index = self._index

        def ut_full(y: Tensor) -> Tensor:
            full = torch.zeros(y.shape[0], self.in_dim, dtype=y.dtype, device=y.device)
            return full.index_copy(1, index.on(y.device), y)

        def u_full(c: Tensor) -> Tensor:
            return c[:, index.on(c.device)]

        return _permuted_svd(s_full, lambda x: x.reshape(x.shape[0], -1),
                             lambda c: c.reshape(c.shape[0], *self.in_shape), ut_full, u_full,
                             self.in_shape, self.out_shape, tol=0.5)

    def _default_device(self) -> torch.device:
        return self.mask.device


# ----------------------------------------------------------------------------------------------
# real Fourier coordinates (for Blur and SubsampledFourier)


def _image_shape(name: str, in_shape: object, min_ndim: int = 2) -> tuple[int, ...]:
    shape = _as_shape(name, in_shape)
    if len(shape) < min_ndim:
        raise ValueError(f"{name} must be an image shape (..., H, W) with at least {min_ndim} dimensions, got {shape}")
    return shape


class _RealFourier:
    r"""An orthogonal map between real ``(…, H, W)`` images and real Fourier coordinates.

    The orthonormal 2-D DFT :math:`X = F x` of a real image is Hermitian
    (:math:`X_{-k} = \overline{X_k}`). Its independent real content: :math:`X_k` (real) at the
    self-conjugate frequencies (:math:`k = -k`), and :math:`\sqrt2\,\mathrm{Re}\,X_k`,
    :math:`\sqrt2\,\mathrm{Im}\,X_k` at one representative of each pair :math:`\{k, -k\}`. By
    Parseval these ``H W`` numbers are an orthonormal coordinate system of the image.
    Coordinates are ordered ``[self-conjugate, Re of pairs, Im of pairs]`` per channel.
    """

    def __init__(self, height: int, width: int) -> None:
        k1 = torch.arange(height).reshape(-1, 1)
        k2 = torch.arange(width).reshape(1, -1)
        flat = (k1 * width + k2).reshape(-1)
        conj = (((-k1) % height) * width + (-k2) % width).reshape(-1)
        self.height, self.width = height, width
        self.self_idx = _IndexCache(flat[flat == conj])
        self.rep_idx = _IndexCache(flat[flat < conj])
        self.conj_idx = _IndexCache(conj[flat < conj])
        self.n_self = int((flat == conj).sum())
        self.n_rep = int((flat < conj).sum())

    def spectrum(self, x: Tensor) -> Tensor:
        """Orthonormal DFT of ``(…, H, W)``, flattened to ``(…, H W)``."""
        return torch.fft.fft2(x, norm="ortho").reshape(*x.shape[:-2], -1)

    def image(self, spectrum: Tensor) -> Tensor:
        """Real part of the inverse orthonormal DFT of a flattened ``(…, H W)`` spectrum."""
        return torch.fft.ifft2(spectrum.reshape(*spectrum.shape[:-1], self.height, self.width), norm="ortho").real

    def coords(self, spectrum: Tensor) -> Tensor:
        """Real coordinates ``(…, H W)`` of a Hermitian spectrum ``(…, H W)``."""
        dev = spectrum.device
        rep = spectrum[..., self.rep_idx.on(dev)] * math.sqrt(2.0)
        return torch.cat([spectrum[..., self.self_idx.on(dev)].real, rep.real, rep.imag], dim=-1)

    def from_coords(self, c: Tensor) -> Tensor:
        """The Hermitian spectrum ``(…, H W)`` of real coordinates ``(…, H W)`` (inverse of :meth:`coords`)."""
        dev = c.device
        n_s, n_r = self.n_self, self.n_rep
        z = torch.complex(c[..., n_s:n_s + n_r], c[..., n_s + n_r:]) / math.sqrt(2.0)
        out = torch.zeros(*c.shape[:-1], n_s + 2 * n_r, dtype=z.dtype, device=dev)
        out[..., self.self_idx.on(dev)] = c[..., :n_s].to(z.dtype)
        out[..., self.rep_idx.on(dev)] = z
        out[..., self.conj_idx.on(dev)] = z.conj()
        return out

    def per_coordinate(self, values: Tensor) -> Tensor:
        """A per-frequency real quantity ``(H W,)`` (even: ``v_{-k} = v_k``) laid out like :meth:`coords`."""
        dev = values.device
        rep = values[self.rep_idx.on(dev)]
        return torch.cat([values[self.self_idx.on(dev)], rep, rep])


# ----------------------------------------------------------------------------------------------
# blur


class Blur(Operator):
    r"""Circular 2-D convolution of each channel with a kernel: :math:`y = k \circledast x`.

    :math:`y_{c,i,j} = \sum_{a,b} k_{a,b}\, x_{c,\,(i-a+a_0) \bmod H,\,(j-b+b_0) \bmod W}` with the
    kernel's centre :math:`(a_0, b_0) = (k_h // 2, k_w // 2)`. The boundary is **circular**
    (periodic): then :math:`A` is diagonalised by the 2-D DFT, :math:`A = F^H \operatorname{diag}(K) F`
    with :math:`K` the DFT of the zero-padded, centred kernel, which gives an exact SVD at the cost
    of FFTs (Kawar et al. 2022, DDRM, App. on deblurring, use separable kernels instead; the
    circular one is exact for any kernel). Benchmarks that use reflect or zero padding (DPS) differ
    near the border by up to the kernel's radius.

    SVD: in the real Fourier coordinates (orthonormal; cosine and sine pairs) the singular values
    are :math:`|K_k|` (each pair :math:`\{k, -k\}` twice) and :math:`U` rotates each pair by the
    phase of :math:`K_k`. Values ``<= H W * eps * max|K|`` count as zero.

    Arguments:
        kernel: real 2-D tensor ``(k_h, k_w)`` with ``k_h <= H``, ``k_w <= W``.
        in_shape: ``(H, W)`` or ``(C, H, W)`` (any leading axes; the same kernel for every channel).
    """

    def __init__(self, kernel: Tensor, in_shape: Sequence[int]) -> None:
        kernel = _check_real_tensor("kernel", kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be a 2-D tensor (k_h, k_w), got shape {tuple(kernel.shape)}")
        in_shape = _image_shape("in_shape", in_shape)
        height, width = in_shape[-2:]
        if kernel.shape[0] > height or kernel.shape[1] > width:
            raise ValueError(f"kernel of shape {tuple(kernel.shape)} is larger than the image ({height}, {width})")
        super().__init__(in_shape, in_shape, linear=True)
        self.kernel = kernel.detach()
        padded = torch.zeros(height, width, dtype=kernel.dtype, device=kernel.device)
        padded[: kernel.shape[0], : kernel.shape[1]] = self.kernel
        padded = torch.roll(padded, shifts=(-(kernel.shape[0] // 2), -(kernel.shape[1] // 2)), dims=(0, 1))
        self._padded = padded
        self._rfft_cache: dict = {}
        self._fourier = _RealFourier(height, width)

    def _transfer(self, like: Tensor) -> Tensor:
        key = (_real_dtype(like.dtype), like.device)
        if key not in self._rfft_cache:
            self._rfft_cache[key] = torch.fft.rfft2(self._padded.to(dtype=key[0], device=key[1]))
        return self._rfft_cache[key]

    def _apply(self, x: Tensor, transfer: Tensor) -> Tensor:
        size = self.in_shape[-2:]
        return torch.fft.irfft2(torch.fft.rfft2(x) * transfer, s=size)

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply(x, self._transfer(x))

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply(y, self._transfer(y).conj())

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD:
        fourier = self._fourier
        transfer = torch.fft.fft2(self._padded.to(dtype=dtype, device=device)).reshape(-1)
        magnitude = transfer.abs()
        # the phase of K (1 where K = 0; those coordinates are not in U)
        phase = torch.where(magnitude > 0, transfer / magnitude.clamp_min(torch.finfo(dtype).tiny),
                            torch.ones_like(transfer))
        channels = self.in_dim // (fourier.height * fourier.width)
        s_full = fourier.per_coordinate(magnitude).repeat(channels)
        phase_cache: dict = {}

        def phase_on(like: Tensor) -> Tensor:
            key = (like.dtype, like.device)
            if key not in phase_cache:
                phase_cache[key] = phase.to(dtype=like.dtype, device=like.device)
            return phase_cache[key]

        lead = self.in_shape[:-2]

        def vt_full(x: Tensor) -> Tensor:
            return fourier.coords(fourier.spectrum(x)).reshape(x.shape[0], -1)

        def v_full(c: Tensor) -> Tensor:
            spec = fourier.from_coords(c.reshape(c.shape[0], *lead, -1))
            return fourier.image(spec).reshape(c.shape[0], *self.in_shape)

        def ut_full(y: Tensor) -> Tensor:
            spec = fourier.spectrum(y)
            return fourier.coords(spec * phase_on(spec).conj()).reshape(y.shape[0], -1)

        def u_full(c: Tensor) -> Tensor:
            spec = fourier.from_coords(c.reshape(c.shape[0], *lead, -1))
            return fourier.image(spec * phase_on(spec)).reshape(c.shape[0], *self.out_shape)

        return _permuted_svd(s_full, vt_full, v_full, ut_full, u_full, self.in_shape, self.out_shape)

    def _default_dtype(self) -> torch.dtype:
        return self.kernel.dtype

    def _default_device(self) -> torch.device:
        return self.kernel.device


# ----------------------------------------------------------------------------------------------
# group means: super-resolution by average pooling, colourisation


def _mean_basis(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An orthogonal ``(n, n)`` matrix whose first column is the constant ``1/sqrt(n)``."""
    start = torch.eye(n, dtype=torch.float64)
    start[:, 0] = 1.0
    q, _ = torch.linalg.qr(start)
    q = q * torch.sign(q[0, 0])  # orthogonal either way; the mean direction positive
    return q.to(dtype=dtype, device=device)


class _GroupMean(Operator):
    r"""``y`` = the mean of each group of ``n`` entries of ``x``. One row :math:`\frac1n \mathbf 1^\top`
    per group has the singular value :math:`\|\frac1n\mathbf 1\| = 1/\sqrt n`; :math:`V` is a
    fixed orthogonal basis per group whose first vector is :math:`\mathbf 1/\sqrt n`, :math:`U = I`."""

    group_size: int

    def _groups(self, x: Tensor) -> Tensor:  # (B, *in_shape) -> (B, G, n)
        raise NotImplementedError

    def _ungroup(self, g: Tensor) -> Tensor:  # (B, G, n) -> (B, *in_shape)
        raise NotImplementedError

    def _forward(self, x: Tensor) -> Tensor:
        return self._groups(x).mean(dim=-1).reshape(x.shape[0], *self.out_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        g = y.reshape(y.shape[0], -1, 1) / self.group_size
        return self._ungroup(g.expand(-1, -1, self.group_size))

    def pinv(self, y: Tensor) -> Tensor:
        """Copy each mean to every entry of its group (``A^+ = n A^H``)."""
        return self.adjoint(y) * self.group_size

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD:
        n = self.group_size
        groups = self.out_dim
        basis = _mean_basis(n, torch.float64, device)  # cast per input: float64 stays exact
        cache: dict = {}

        def basis_on(like: Tensor) -> Tensor:
            key = (like.dtype, like.device)
            if key not in cache:
                cache[key] = basis.to(dtype=like.dtype, device=like.device)
            return cache[key]

        def vt(x: Tensor) -> Tensor:  # coordinates (B, n, G) flattened: the G mean directions first
            return (self._groups(x) @ basis_on(x)).transpose(1, 2).reshape(x.shape[0], -1)

        def v(c: Tensor) -> Tensor:
            g = c.reshape(c.shape[0], n, groups).transpose(1, 2) @ basis_on(c).T
            return self._ungroup(g)

        s = torch.full((groups,), 1.0 / math.sqrt(n), dtype=dtype, device=device)
        return SVD(s, vt, v, lambda y: y.reshape(y.shape[0], -1), lambda c: c.reshape(c.shape[0], *self.out_shape),
                   self.in_shape, self.out_shape)


class SuperResolution(_GroupMean):
    r"""Downsampling by average pooling over non-overlapping ``factor x factor`` blocks.

    ``x`` of shape ``(…, H, W)`` gives ``y`` of shape ``(…, H/factor, W/factor)``. Each block
    mean is a row :math:`\frac{1}{f^2}\mathbf 1^\top` with singular value :math:`1/f` (on the
    block-mean direction :math:`\mathbf 1/f`); the other :math:`f^2 - 1` directions of each block
    are unobserved, :math:`U = I` (Kawar et al. 2022, DDRM: super-resolution by block averaging).
    This is the pooling of the notes' small test-bed; DPS' bicubic resizer is a different operator.

    Arguments:
        factor: integer >= 1 dividing ``H`` and ``W``.
        in_shape: ``(H, W)`` or ``(C, H, W)`` (any leading axes).
    """

    def __init__(self, factor: int, in_shape: Sequence[int]) -> None:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        in_shape = _image_shape("in_shape", in_shape)
        height, width = in_shape[-2:]
        if height % factor or width % factor:
            raise ValueError(f"factor {factor} must divide the image size ({height}, {width})")
        self.factor = factor
        self.group_size = factor * factor
        super().__init__(in_shape, (*in_shape[:-2], height // factor, width // factor), linear=True)

    def _groups(self, x: Tensor) -> Tensor:
        f = self.factor
        h, w = self.out_shape[-2:]
        g = x.reshape(x.shape[0], -1, h, f, w, f).permute(0, 1, 2, 4, 3, 5)
        return g.reshape(x.shape[0], -1, f * f)

    def _ungroup(self, g: Tensor) -> Tensor:
        f = self.factor
        h, w = self.out_shape[-2:]
        x = g.reshape(g.shape[0], -1, h, w, f, f).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(g.shape[0], *self.in_shape)


class Colorize(_GroupMean):
    r"""Colourisation: the grey image :math:`y = \frac1C \sum_c x_c`, the average of the channels.

    ``x`` of shape ``(C, H, W)`` (RGB: ``C = 3``) gives ``y`` of shape ``(1, H, W)``. The row
    :math:`\frac1C(1, \dots, 1)` has the singular value :math:`1/\sqrt C` (:math:`1/\sqrt3 \approx
    0.577` for RGB) on the grey direction :math:`\mathbf 1/\sqrt C`; :math:`U = I`. This is
    RED-diff's/DDRM's ``Colorization`` (Kawar et al. 2022); Song et al. 2021 (score SDE)
    decouple the grey channel with an orthogonal colour basis, the same :math:`V` up to the
    choice of the colour directions.

    Arguments:
        in_shape: ``(C, H, W)`` with ``C >= 2``.
    """

    def __init__(self, in_shape: Sequence[int]) -> None:
        in_shape = _image_shape("in_shape", in_shape, min_ndim=3)
        if len(in_shape) != 3 or in_shape[0] < 2:
            raise ValueError(f"in_shape must be (C, H, W) with C >= 2 channels, got {in_shape}")
        self.group_size = in_shape[0]
        super().__init__(in_shape, (1, *in_shape[1:]), linear=True)

    def _groups(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.group_size, -1).transpose(1, 2)

    def _ungroup(self, g: Tensor) -> Tensor:
        return g.transpose(1, 2).reshape(g.shape[0], *self.in_shape)


# ----------------------------------------------------------------------------------------------
# MRI: subsampled Fourier


class SubsampledFourier(Operator):
    r"""MRI-style measurement: the orthonormal 2-D DFT of a real image at the frequencies in ``mask``.

    :math:`y = (F x)[\text{mask}]` with :math:`F` the orthonormal DFT (``torch.fft.fft2(...,
    norm="ortho")``) over the last two axes; ``y`` is **complex**, of shape ``(…, n)`` for ``x`` of
    shape ``(…, H, W)`` and ``n`` the number of True entries of the ``(H, W)`` mask (row-major,
    unshifted frequency layout: index ``(0, 0)`` is the DC term; use ``torch.fft.ifftshift`` on a
    centred mask). Measurement noise is real and imaginary, each :math:`N(0, \sigma_y^2)`.

    Adjoint for the real inner product :math:`\mathrm{Re}\langle A x, y\rangle = \langle x, A^H y\rangle`:
    :math:`A^H y = \mathrm{Re}\,F^{-1}(\text{zero-filled } y)` (``x`` is real, so only the real
    part of the complex adjoint survives).

    Hermitian symmetry: :math:`(F x)_{-k} = \overline{(F x)_k}`, so observing both :math:`k` and
    :math:`-k` is redundant, and the imaginary part at a self-conjugate frequency (DC, Nyquist) is
    always zero. The SVD (in the real Fourier coordinates, cosine/sine pairs) accounts for it: a
    pair :math:`\{k, -k\}` with both observed has two singular values 1, with one of them observed
    two singular values :math:`1/\sqrt2`; an observed self-conjugate frequency has one singular
    value 1. So the rank (``svd().rank``, real dimensions) is below ``2 n`` in general, and
    ``pinv``/``gram_solve`` treat the directions of ``y`` outside the range (inconsistent
    conjugate pairs, imaginary parts at self-conjugate frequencies) as the pseudo-inverse does.

    Arguments:
        mask: boolean ``(H, W)`` tensor of observed frequencies (unshifted layout).
        in_shape: ``(H, W)`` (default: ``mask.shape``) or ``(C, H, W)`` (the same mask per channel).
    """

    def __init__(self, mask: Tensor, in_shape: Sequence[int] | None = None) -> None:
        mask = _check_mask("mask", mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be a 2-D (H, W) frequency mask, got shape {tuple(mask.shape)}")
        in_shape = tuple(mask.shape) if in_shape is None else _image_shape("in_shape", in_shape)
        if tuple(in_shape[-2:]) != tuple(mask.shape):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the image size {tuple(in_shape[-2:])} "
                             f"of in_shape {tuple(in_shape)}")
        self.mask = mask
        index = torch.nonzero(mask.reshape(-1)).flatten()
        super().__init__(in_shape, (*in_shape[:-2], int(index.numel())), linear=True)
        self._index = _IndexCache(index)
        self._fourier = _RealFourier(*mask.shape)

    @property
    def complex_output(self) -> bool:
        return True

    def _forward(self, x: Tensor) -> Tensor:
        return self._fourier.spectrum(x)[..., self._index.on(x.device)]

    def _zero_filled(self, y: Tensor) -> Tensor:
        full = torch.zeros(*y.shape[:-1], self._fourier.height * self._fourier.width, dtype=y.dtype, device=y.device)
        return full.index_copy(full.ndim - 1, self._index.on(y.device), y)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._fourier.image(self._zero_filled(y))

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD:
        fourier = self._fourier
        observed = self.mask.reshape(-1).to(device)
        self_obs = observed[fourier.self_idx.on(device)].to(dtype)
        obs_f = observed[fourier.rep_idx.on(device)]
        obs_g = observed[fourier.conj_idx.on(device)]
        both, one = obs_f & obs_g, obs_f ^ obs_g
        r2 = 1.0 / math.sqrt(2.0)
        pair_s = both.to(dtype) + one.to(dtype) * r2
        s_full = torch.cat([self_obs, pair_s, pair_s]).repeat(self.in_dim // observed.numel())
        # weights of U^T on (Re, Im) of y at k and at -k; see the class docstring
        wa_f = torch.where(both, r2, obs_f.to(dtype))
        wa_g = torch.where(both, r2, obs_g.to(dtype))
        wb_f = wa_f
        wb_g = -wa_g
        weights = torch.stack([wa_f, wa_g, wb_f, wb_g]).to(dtype)
        cache: dict = {}

        def weights_on(like: Tensor) -> Tensor:
            key = (_real_dtype(like.dtype), like.device)
            if key not in cache:
                cache[key] = weights.to(dtype=key[0], device=key[1])
            return cache[key]

        lead = self.in_shape[:-2]
        n_s, n_r = fourier.n_self, fourier.n_rep

        def vt_full(x: Tensor) -> Tensor:
            return fourier.coords(fourier.spectrum(x)).reshape(x.shape[0], -1)

        def v_full(c: Tensor) -> Tensor:
            return fourier.image(fourier.from_coords(c.reshape(c.shape[0], *lead, -1))).reshape(c.shape[0], *self.in_shape)

        def ut_full(y: Tensor) -> Tensor:
            z = self._zero_filled(y)
            dev = z.device
            w = weights_on(z)
            zf, zg = z[..., fourier.rep_idx.on(dev)], z[..., fourier.conj_idx.on(dev)]
            a = w[0] * zf.real + w[1] * zg.real
            b = w[2] * zf.imag + w[3] * zg.imag
            return torch.cat([z[..., fourier.self_idx.on(dev)].real, a, b], dim=-1).reshape(y.shape[0], -1)

        def u_full(c: Tensor) -> Tensor:
            c = c.reshape(c.shape[0], *lead, -1)
            dev = c.device
            w = weights_on(c)
            c_s, c_a, c_b = c[..., :n_s], c[..., n_s:n_s + n_r], c[..., n_s + n_r:]
            cdtype = torch.complex(c_s[..., :0], c_s[..., :0]).dtype
            z = torch.zeros(*c.shape[:-1], n_s + 2 * n_r, dtype=cdtype, device=dev)
            z[..., fourier.self_idx.on(dev)] = c_s.to(cdtype)
            z[..., fourier.rep_idx.on(dev)] = torch.complex(w[0] * c_a, w[2] * c_b)
            z[..., fourier.conj_idx.on(dev)] = torch.complex(w[1] * c_a, w[3] * c_b)
            return z[..., self._index.on(dev)]

        return _permuted_svd(s_full, vt_full, v_full, ut_full, u_full, self.in_shape, self.out_shape, tol=0.5 * r2)

    def _default_device(self) -> torch.device:
        return self.mask.device


# ----------------------------------------------------------------------------------------------
# CT: parallel-beam projection


def _parallel_beam_matrix(angles: Tensor, size: int, detectors: int, samples_per_pixel: int) -> Tensor:
    """Sparse ``(len(angles) * detectors, size * size)`` float64 matrix of ray sums by bilinear sampling."""
    centre = (size - 1) / 2.0
    half = (size - 1) / math.sqrt(2.0) + 1.0
    step = 1.0 / samples_per_pixel
    n_samples = int(math.ceil(2 * half / step)) + 1
    s = torch.linspace(-half, half, n_samples, dtype=torch.float64)
    step = float(s[1] - s[0]) if n_samples > 1 else 1.0
    t = torch.arange(detectors, dtype=torch.float64) - (detectors - 1) / 2.0
    theta = angles.to(torch.float64)
    cos, sin = torch.cos(theta).reshape(-1, 1, 1), torch.sin(theta).reshape(-1, 1, 1)
    t, s = t.reshape(1, -1, 1), s.reshape(1, 1, -1)
    # point t * (cos, sin) + s * (-sin, cos) in image coordinates (u right, v up, origin at the centre)
    u = t * cos - s * sin
    v = t * sin + s * cos
    col = u + centre
    row = centre - v
    c0, r0 = torch.floor(col), torch.floor(row)
    fc, fr = col - c0, row - r0
    ray = torch.arange(angles.numel() * detectors).reshape(angles.numel(), detectors, 1).expand_as(col)
    rows_idx, cols_idx, vals = [], [], []
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size) & (weight > 0)
        rows_idx.append(ray[inside])
        cols_idx.append((rr[inside] * size + cc[inside]).long())
        vals.append(weight[inside] * step)
    index = torch.stack([torch.cat(rows_idx), torch.cat(cols_idx)])
    return torch.sparse_coo_tensor(index, torch.cat(vals), (angles.numel() * detectors, size * size),
                                   check_invariants=True).coalesce()


class ParallelBeam(Operator):
    r"""CT-style parallel-beam projection (a discrete Radon transform) of square ``n x n`` images.

    For each angle :math:`\theta` and detector offset :math:`t_j` (spacing one pixel, centred),
    :math:`y_{\theta,j} \approx \int x(t_j e_\theta + s e_\theta^\perp)\,ds` with
    :math:`e_\theta = (\cos\theta, \sin\theta)`, computed as :math:`\Delta s \sum_i x(p_i)` over
    points every ``1/samples_per_pixel`` pixels along the ray, :math:`x(p)` by bilinear
    interpolation (zero outside the image; image centre at the rotation centre, ``u`` to the
    right along columns, ``v`` up). The operator is the resulting sparse matrix, the adjoint its
    exact transpose (a discrete back-projection).

    ``svd()``: a dense ``torch.linalg.svd`` of the matrix when ``n * n <= svd_max_dim`` (default
    1024, i.e. 32 x 32; the SVD is cubic in ``n^2``), else ``None`` (``pinv``/``gram_solve`` then
    use conjugate gradients).

    Arguments:
        angles: 1-D tensor (or sequence) of projection angles in radians.
        in_shape: ``(n, n)`` or ``(C, n, n)`` (each channel projected alike).
        detectors: detector bins per angle (default ``ceil(n * sqrt 2)``, covering the diagonal).
        samples_per_pixel: ray sampling density (default 2).
        svd_max_dim: the largest ``n * n`` for which ``svd()`` computes a dense SVD.

    ``y`` has shape ``(len(angles), detectors)`` (with the leading channel axis for ``(C, n, n)``).
    """

    def __init__(self, angles: Tensor | Sequence[float], in_shape: Sequence[int], detectors: int | None = None,
                 samples_per_pixel: int = 2, svd_max_dim: int = 1024) -> None:
        if not isinstance(angles, Tensor):
            try:
                angles = torch.as_tensor(angles, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"angles must be a 1-D tensor or sequence of numbers (radians), got {angles!r}") from err
        angles = _check_real_tensor("angles", angles.to(torch.float64) if not angles.is_floating_point() else angles)
        if angles.ndim != 1 or angles.numel() == 0:
            raise ValueError(f"angles must be a non-empty 1-D tensor of radians, got shape {tuple(angles.shape)}")
        in_shape = _image_shape("in_shape", in_shape)
        if len(in_shape) > 3 or in_shape[-1] != in_shape[-2]:
            raise ValueError(f"in_shape must be (n, n) or (C, n, n) (square images), got {in_shape}")
        size = in_shape[-1]
        if detectors is None:
            detectors = int(math.ceil(size * math.sqrt(2.0)))
        for name, value in (("detectors", detectors), ("samples_per_pixel", samples_per_pixel),
                            ("svd_max_dim", svd_max_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        super().__init__(in_shape, (*in_shape[:-2], angles.numel(), detectors), linear=True)
        self.angles = angles.detach().cpu()
        self.detectors, self.samples_per_pixel, self.svd_max_dim = detectors, samples_per_pixel, svd_max_dim
        self.matrix = _parallel_beam_matrix(self.angles, size, detectors, samples_per_pixel)
        self._cast: dict = {}

    def _matrices(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (_real_dtype(like.dtype), like.device)
        if key not in self._cast:
            mat = self.matrix.to(dtype=key[0], device=key[1])
            self._cast[key] = (mat, mat.t().coalesce())
        return self._cast[key]

    def _apply(self, matrix: Tensor, x: Tensor, out_shape: tuple[int, ...]) -> Tensor:
        flat = x.reshape(-1, matrix.shape[1])  # (B * C, d0)
        return torch.sparse.mm(matrix, flat.T).T.reshape(x.shape[0], *out_shape)

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply(self._matrices(x)[0], x, self.out_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply(self._matrices(y)[1], y, self.in_shape)

    def _svd(self, dtype: torch.dtype, device: torch.device) -> SVD | None:
        size = self.in_shape[-1]
        if size * size > self.svd_max_dim:
            return None
        channels = self.in_dim // (size * size)
        return _dense_svd(self.matrix.to_dense().to(dtype=dtype, device=device), self.in_shape, self.out_shape, channels)



# ----------------------------------------------------------------------------------------------
# nonlinear


class Nonlinear(Operator):
    r"""A nonlinear forward model :math:`y = f(x)` given by a differentiable function.

    ``fn`` maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)`` (checked on every call) and
    must be differentiable with autograd (methods such as DPS, DAPS or RED-diff differentiate
    :math:`\|y - f(x)\|^2`). ``linear`` is False: ``adjoint``, ``svd``, ``pinv`` and
    ``gram_solve`` raise ``TypeError``.

    Arguments:
        fn: callable ``(B, *in_shape) -> (B, *out_shape)``, e.g. phase retrieval ``|FFT(x)|``.
        in_shape, out_shape: shapes of one ``x`` and one ``y``.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a callable (B, *in_shape) -> (B, *out_shape), got {type(fn).__name__}")
        super().__init__(in_shape, out_shape, linear=False)
        self.fn = fn

    def _forward(self, x: Tensor) -> Tensor:
        y = self.fn(x)
        if not isinstance(y, Tensor):
            raise TypeError(f"fn must return a torch.Tensor, got {type(y).__name__}")
        if tuple(y.shape) != (x.shape[0], *self.out_shape):
            raise ValueError(f"fn returned shape {tuple(y.shape)} for x of shape {tuple(x.shape)}; "
                             f"expected (B, *out_shape) = {(x.shape[0], *self.out_shape)}")
        return y
