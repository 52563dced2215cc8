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

__all__ = ["SVD", "Operator", "Matrix"]


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


def _dense_svd(matrix: Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...], rtol: float | None = None) -> SVD:
    """:class:`SVD` of a dense real ``(m, d)`` matrix by ``torch.linalg.svd`` (in its dtype)."""
    u_full, s_all, vh = torch.linalg.svd(matrix, full_matrices=True)
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(matrix.dtype).eps
    top = float(s_all.max()) if s_all.numel() else 0.0
    k = int((s_all > rtol * top).sum()) if top > 0 else 0
    s, u_k = s_all[:k].clone(), u_full[:, :k].contiguous()
    cache: dict = {}

    def factors(like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = (u_k.to(dtype=like.dtype, device=like.device), vh.to(dtype=like.dtype, device=like.device))
        return cache[key]

    def vt(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ factors(x)[1].T

    def v(c: Tensor) -> Tensor:
        return (c @ factors(c)[1]).reshape(c.shape[0], *in_shape)

    def ut(y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1) @ factors(y)[0]

    def u(c: Tensor) -> Tensor:
        return (c @ factors(c)[0].T).reshape(c.shape[0], *out_shape)

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
      without an SVD, :math:`A^H w` with :math:`w` from conjugate gradients on
      :math:`A A^H w = y` (the minimum-norm solution for a consistent ``y``).
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
                parameters (``H``, ``kernel``, ``mask``), else the default dtype on the CPU.
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
            w = self._cg(y, 1.0, 0.0)
            return self._adjoint(w)
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
            return self._cg(y, c_t, s2_t)
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
        return torch.get_default_dtype()

    def _default_device(self) -> torch.device:
        return torch.device("cpu")

    def _range_is_everything(self, dec: SVD) -> bool:
        """Whether ``U`` spans the whole output space (then ``gram_solve`` skips the complement)."""
        return dec.rank == self.out_dim * (2 if self.complex_output else 1)

    # -- conjugate gradients --------------------------------------------------------------
    def _cg(self, y: Tensor, c: float | Tensor, s2: float | Tensor) -> Tensor:
        """Solve :math:`(c A A^H + s_2 I) w = y` by conjugate gradients in the real inner product,
        from ``w = 0``, for at most ``cg_iterations`` steps (stops when the residual is below
        ``1e-10``/float32-eps times ``|y|``). From zero, CG stays in the range of :math:`A A^H`, so
        with ``s2 = 0`` it converges to the minimum-norm solution."""
        def apply(w: Tensor) -> Tensor:
            return c * self._forward(self._adjoint(w)).to(w.dtype) + s2 * w

        tol = (1e-10 if _real_dtype(y.dtype) == torch.float64 else 1e-5) ** 2
        w = torch.zeros_like(y)
        r = y.clone()
        p = r.clone()
        rr = _rdot(r, r)
        stop = tol * rr.clamp_min(torch.finfo(rr.dtype).tiny)
        shape = (-1,) + (1,) * (y.ndim - 1)
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
