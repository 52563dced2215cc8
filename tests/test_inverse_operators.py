"""Forward operators of flowdiff.inverse: adjoints, SVDs, pseudo-inverses, Gram solves against dense truth."""

from __future__ import annotations

import pytest
import torch

import math

from flowdiff.inverse.operators import (
    SVD,
    Blur,
    Colorize,
    Inpaint,
    Matrix,
    Nonlinear,
    Operator,
    ParallelBeam,
    SubsampledFourier,
    SuperResolution,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _rdot(a, b):
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a.conj() * b).real.sum(1) if (a.is_complex() or b.is_complex()) else (a * b).sum(1)


def _rand_y(op: Operator, batch: int, seed: int):
    y = _rand((batch, *op.out_shape), seed)
    if op.complex_output:
        y = torch.complex(y, _rand((batch, *op.out_shape), seed + 100))
    return y


def _real_matrix(op: Operator) -> torch.Tensor:
    """The operator as a real (m', d) matrix (complex outputs stacked as real; imaginary parts)."""
    M = op.to_matrix(DT)
    return torch.cat([M.real, M.imag], 0) if M.is_complex() else M


def _flat_real(y):
    y = y.reshape(y.shape[0], -1)
    return torch.cat([y.real, y.imag], 1) if y.is_complex() else y


# ------------------------------------------------------------------------------------------------
# generic checks every linear operator must pass


def check_linear_operator(op: Operator, batch: int = 3, atol: float = 1e-10) -> None:
    x = _rand((batch, *op.in_shape), 1)
    y = _rand_y(op, batch, 2)
    ax = op.forward(x)
    assert tuple(ax.shape) == (batch, *op.out_shape)
    assert ax.dtype == (torch.complex128 if op.complex_output else DT)
    # adjoint identity <Ax, y> = <x, A^H y>
    aty = op.adjoint(y)
    assert tuple(aty.shape) == (batch, *op.in_shape) and aty.dtype == DT
    torch.testing.assert_close(_rdot(ax, y), _rdot(x, aty), atol=atol, rtol=1e-10)
    # linearity
    torch.testing.assert_close(op.forward(2 * x - x.flip(0)), 2 * ax - ax.flip(0), atol=atol, rtol=1e-10)
    M = _real_matrix(op)
    dec = op.svd()
    if dec is not None:
        assert isinstance(dec, SVD)
        s = dec.s.to(DT)
        assert (s > 0).all()
        k = dec.rank
        # s are the nonzero singular values of the dense matrix
        s_dense = torch.linalg.svdvals(M)
        s_dense = s_dense[s_dense > 1e-9 * s_dense.max()]
        torch.testing.assert_close(torch.sort(s, descending=True).values, s_dense, atol=1e-9, rtol=1e-9)
        c = dec.vt(x)
        assert tuple(c.shape) == (batch, op.in_dim)
        torch.testing.assert_close(dec.v(c), x, atol=atol, rtol=1e-10)  # V orthogonal
        torch.testing.assert_close(dec.vt(dec.v(c)), c, atol=atol, rtol=1e-10)
        torch.testing.assert_close(c.norm(dim=1), x.reshape(batch, -1).norm(dim=1))
        torch.testing.assert_close(dec.u(s * c[:, :k]), ax, atol=atol, rtol=1e-10)  # U diag(s) V^T x = A x
        coeff = dec.ut(y)
        assert tuple(coeff.shape) == (batch, k) and not coeff.is_complex()
        torch.testing.assert_close(dec.ut(dec.u(coeff)), coeff, atol=atol, rtol=1e-10)  # U^T U = I
    # pseudo-inverse: A^+ A x = projection of x on the row space
    Mp = torch.linalg.pinv(M)
    proj = x.reshape(batch, -1) @ (Mp @ M).T
    torch.testing.assert_close(op.pinv(ax).reshape(batch, -1), proj, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(_flat_real(op.pinv(y)).reshape(batch, -1), _flat_real(y) @ Mp.T, atol=1e-8, rtol=1e-8)
    # gram solve against a dense solve (real representation)
    G = M @ M.T
    eye = torch.eye(G.shape[0], dtype=DT)
    for c_, s2 in [(1.0, 0.3), (2.5, 1e-3), (0.0, 0.7)]:
        want = torch.linalg.solve(c_ * G + s2 * eye, _flat_real(y).T).T
        got = _flat_real(op.gram_solve(y, c_, s2))
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-7)
    # per-sample coefficients
    cs, s2s = torch.tensor([0.5, 1.0, 2.0], dtype=DT)[:batch], torch.tensor([0.1, 0.2, 0.3], dtype=DT)[:batch]
    got = _flat_real(op.gram_solve(y, cs, s2s))
    for b in range(batch):
        want = torch.linalg.solve(cs[b] * G + s2s[b] * eye, _flat_real(y)[b])
        torch.testing.assert_close(got[b], want, atol=1e-7, rtol=1e-7)
    # s2 = 0: pseudo-inverse of c A A^H
    got = _flat_real(op.gram_solve(y, 2.0, 0.0))
    torch.testing.assert_close(got, _flat_real(y) @ (Mp.T @ Mp).T / 2.0, atol=1e-6, rtol=1e-6)  # (M M^T)^+ = M^+T M^+


# ------------------------------------------------------------------------------------------------
# Matrix


@pytest.mark.parametrize("m,d", [(3, 8), (8, 8), (10, 4)])
def test_matrix_operator(m, d):
    H = _rand((m, d), 5)
    check_linear_operator(Matrix(H))


def test_matrix_rank_deficient_and_shapes():
    H = _rand((6, 2), 3) @ _rand((2, 16), 4)  # rank 2
    op = Matrix(H, in_shape=(1, 4, 4), out_shape=(2, 3))
    assert op.svd().rank == 2
    check_linear_operator(op)


def test_matrix_values_and_dtype_following():
    H = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]], dtype=DT)
    op = Matrix(H)
    x = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float32)
    y = op(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[3.0, 0.0]]))
    assert op.svd().s.dtype == DT
    # differentiable
    x = x.double().requires_grad_()
    op(x).sum().backward()
    torch.testing.assert_close(x.grad, H.sum(0, keepdim=True))
    # float32 gram_solve / pinv follow the input
    assert op.pinv(torch.ones(2, 2)).dtype == torch.float32
    assert op.gram_solve(torch.ones(2, 2), 1.0, 0.1).dtype == torch.float32


def test_matrix_bad_input():
    with pytest.raises(TypeError, match="H must be a torch.Tensor"):
        Matrix([[1.0]])
    with pytest.raises(ValueError, match="2-D"):
        Matrix(torch.ones(3))
    with pytest.raises(TypeError, match="real floating"):
        Matrix(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-finite"):
        Matrix(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="in_shape"):
        Matrix(torch.ones(2, 6), in_shape=(2, 2))
    with pytest.raises(ValueError, match="out_shape"):
        Matrix(torch.ones(2, 6), out_shape=(3,))
    op = Matrix(torch.ones(2, 3, dtype=DT))
    with pytest.raises(ValueError, match=r"shape \(B, \*in_shape\)"):
        op(torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"shape \(B, \*in_shape\)"):
        op(torch.ones(1, 4, dtype=DT))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"shape \(B, \*out_shape\)"):
        op.adjoint(torch.ones(1, 3, dtype=DT))
    with pytest.raises(ValueError, match="c > 0 or s2 > 0"):
        op.gram_solve(torch.ones(1, 2, dtype=DT), 0.0, 0.0)
    with pytest.raises(ValueError, match="s2 must be finite and >= 0"):
        op.gram_solve(torch.ones(1, 2, dtype=DT), 1.0, -1.0)
    with pytest.raises(ValueError, match="c must be a scalar or have shape"):
        op.gram_solve(torch.ones(2, 2, dtype=DT), torch.ones(3), 1.0)


def test_cg_fallback_matches_svd():
    """An operator without an SVD solves by conjugate gradients; same answers as the SVD route."""
    H = _rand((5, 9), 7)

    class NoSVD(Matrix):
        def _svd(self, dtype, device):
            return None

    op = NoSVD(H)
    assert op.svd() is None
    check_linear_operator(op)


# ------------------------------------------------------------------------------------------------
# Inpaint


def _mask(shape, seed=0, p=0.5):
    return torch.rand(*shape, generator=_gen(seed)) < p


@pytest.mark.parametrize("shape", [(8,), (2, 4, 4)])
def test_inpaint_operator(shape):
    op = Inpaint(_mask(shape, 3))
    check_linear_operator(op)
    assert op.svd().rank == op.out_dim
    torch.testing.assert_close(op.svd().s, torch.ones(op.out_dim, dtype=op.svd().s.dtype))


def test_inpaint_values_and_shared_mask():
    x = torch.arange(12, dtype=DT).reshape(1, 3, 4)
    mask = torch.tensor([True, False, False, True])  # broadcast over rows
    op = Inpaint(mask, in_shape=(3, 4))
    assert op.out_shape == (6,)
    torch.testing.assert_close(op(x), torch.tensor([[0.0, 3.0, 4.0, 7.0, 8.0, 11.0]], dtype=DT))
    back = op.adjoint(op(x))
    torch.testing.assert_close(back, x * mask)
    check_linear_operator(op)


def test_inpaint_bad_input():
    with pytest.raises(TypeError, match="boolean"):
        Inpaint(torch.ones(4))
    with pytest.raises(TypeError, match="boolean"):
        Inpaint([True, False])
    with pytest.raises(ValueError, match="observes nothing"):
        Inpaint(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        Inpaint(torch.ones(3, dtype=torch.bool), in_shape=(2, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        Inpaint(torch.ones(2, 2, 2, dtype=torch.bool), in_shape=(2, 2))


# ------------------------------------------------------------------------------------------------
# Blur


def _circular_conv_reference(x, kernel):
    """Direct circular convolution sum_{a,b} k[a,b] x[i - a + a0, j - b + b0] (independent of the FFT)."""
    kh, kw = kernel.shape
    out = torch.zeros_like(x)
    for a in range(kh):
        for b in range(kw):
            out = out + kernel[a, b] * torch.roll(x, shifts=(a - kh // 2, b - kw // 2), dims=(-2, -1))
    return out


@pytest.mark.parametrize("in_shape,ksize", [((6, 6), (3, 3)), ((2, 5, 6), (3, 2)), ((1, 4, 4), (4, 4))])
def test_blur_operator(in_shape, ksize):
    kernel = _rand(ksize, 11).abs()
    op = Blur(kernel, in_shape)
    x = _rand((2, *in_shape), 12)
    torch.testing.assert_close(op(x), _circular_conv_reference(x, kernel))
    check_linear_operator(op)


def test_blur_known_values_and_rank():
    x = _rand((1, 5, 5), 1)
    delta = torch.zeros(3, 3, dtype=DT)
    delta[1, 1] = 1.0
    torch.testing.assert_close(Blur(delta, (5, 5))(x), x)
    shift = torch.zeros(3, 3, dtype=DT)
    shift[2, 1] = 1.0  # y[i, j] = x[i - 1, j]
    torch.testing.assert_close(Blur(shift, (5, 5))(x), torch.roll(x, 1, dims=1))
    # a 2x1 box [1, 1] kills the alternating row pattern at the Nyquist frequency of an even size: rank drops
    op = Blur(torch.ones(2, 1, dtype=DT) / 2, (4, 4))
    assert op.svd().rank == 16 - 4
    check_linear_operator(op)
    # constant image preserved by a normalised kernel
    k = _rand((3, 3), 2).abs()
    torch.testing.assert_close(Blur(k / k.sum(), (6, 6))(torch.ones(1, 6, 6, dtype=DT)), torch.ones(1, 6, 6, dtype=DT))


def test_blur_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        Blur(torch.ones(3, dtype=DT), (4, 4))
    with pytest.raises(ValueError, match="larger than the image"):
        Blur(torch.ones(5, 3, dtype=DT), (4, 4))
    with pytest.raises(ValueError, match="image shape"):
        Blur(torch.ones(3, 3, dtype=DT), (4,))
    with pytest.raises(ValueError, match="non-finite"):
        Blur(torch.full((3, 3), float("inf")), (4, 4))


# ------------------------------------------------------------------------------------------------
# SuperResolution and Colorize


@pytest.mark.parametrize("factor,in_shape", [(2, (4, 6)), (3, (2, 6, 3)), (1, (3, 3))])
def test_super_resolution_operator(factor, in_shape):
    op = SuperResolution(factor, in_shape)
    assert op.out_shape == (*in_shape[:-2], in_shape[-2] // factor, in_shape[-1] // factor)
    check_linear_operator(op)
    torch.testing.assert_close(op.svd().s, torch.full((op.out_dim,), 1.0 / factor, dtype=op.svd().s.dtype))


def test_super_resolution_values():
    op = SuperResolution(2, (1, 4, 4))
    torch.testing.assert_close(op(torch.full((2, 1, 4, 4), 0.7, dtype=DT)), torch.full((2, 1, 2, 2), 0.7, dtype=DT))
    x = torch.arange(16, dtype=DT).reshape(1, 1, 4, 4)
    want = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=DT)
    torch.testing.assert_close(op(x), want)
    torch.testing.assert_close(op.pinv(want), torch.nn.functional.interpolate(want, scale_factor=2, mode="nearest"))
    with pytest.raises(ValueError, match="must divide"):
        SuperResolution(3, (4, 6))
    with pytest.raises(ValueError, match="factor must be an integer"):
        SuperResolution(0, (4, 4))
    with pytest.raises(ValueError, match="factor must be an integer"):
        SuperResolution(2.0, (4, 4))


@pytest.mark.parametrize("in_shape", [(3, 2, 3), (2, 1, 4)])
def test_colorize_operator(in_shape):
    op = Colorize(in_shape)
    assert op.out_shape == (1, *in_shape[1:])
    check_linear_operator(op)
    torch.testing.assert_close(op.svd().s, torch.full((op.out_dim,), 1 / math.sqrt(in_shape[0]), dtype=DT))


def test_colorize_values():
    grey = _rand((2, 1, 4, 4), 3)
    op = Colorize((3, 4, 4))
    torch.testing.assert_close(op(grey.expand(-1, 3, -1, -1)), grey)
    torch.testing.assert_close(op.pinv(grey), grey.expand(-1, 3, -1, -1))
    x = _rand((1, 3, 4, 4), 4)
    torch.testing.assert_close(op(x), x.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="C >= 2"):
        Colorize((1, 4, 4))
    with pytest.raises(ValueError, match="image shape"):
        Colorize((4, 4))


# ------------------------------------------------------------------------------------------------
# SubsampledFourier


@pytest.mark.parametrize("in_shape,seed", [((6, 6), 0), ((5, 4), 1), ((2, 4, 5), 2)])
def test_subsampled_fourier_operator(in_shape, seed):
    mask = _mask(in_shape[-2:], seed, p=0.5)
    mask[0, 0] = True
    op = SubsampledFourier(mask, in_shape)
    assert op.out_shape == (*in_shape[:-2], int(mask.sum()))
    check_linear_operator(op)
    # rank counted by hand: self-conjugate frequencies give 1, a pair with k, -k observed gives 2 (one or both)
    h, w = in_shape[-2:]
    rank = 0
    for i in range(h):
        for j in range(w):
            ci, cj = (-i) % h, (-j) % w
            if (i, j) == (ci, cj):
                rank += int(mask[i, j])
            elif (i * w + j) < (ci * w + cj):
                rank += 2 * int(bool(mask[i, j] or mask[ci, cj]))
    channels = math.prod(in_shape[:-2])
    assert op.svd().rank == rank * channels


def test_subsampled_fourier_values():
    x = _rand((2, 4, 4), 5)
    full = SubsampledFourier(torch.ones(4, 4, dtype=torch.bool))
    y = full(x)
    assert y.dtype == torch.complex128
    torch.testing.assert_close(y, torch.fft.fft2(x, norm="ortho").reshape(2, -1))
    torch.testing.assert_close(full.adjoint(y), x)  # the full transform is orthogonal
    torch.testing.assert_close(full.pinv(y), x)
    assert full.svd().rank == 16
    # float32 input gives complex64
    assert full(x.float()).dtype == torch.complex64
    with pytest.raises(ValueError, match="2-D"):
        SubsampledFourier(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match the image size"):
        SubsampledFourier(torch.ones(4, 4, dtype=torch.bool), (4, 5))
    with pytest.raises(TypeError, match="boolean"):
        SubsampledFourier(torch.ones(4, 4))


# ------------------------------------------------------------------------------------------------
# ParallelBeam


def test_parallel_beam_operator():
    angles = torch.linspace(0, math.pi, 7)[:-1]
    op = ParallelBeam(angles, (6, 6))
    assert op.out_shape == (6, 9)
    check_linear_operator(op, atol=1e-9)
    op2 = ParallelBeam(angles.tolist(), (2, 5, 5), detectors=5)
    check_linear_operator(op2, atol=1e-9)


def _gaussian_blob(n, u0, v0, width):
    centre = (n - 1) / 2
    r = torch.arange(n, dtype=DT)
    u, v = (r - centre).reshape(1, -1), (centre - r).reshape(-1, 1)
    return torch.exp(-((u - u0) ** 2 + (v - v0) ** 2) / (2 * width**2))[None]


def test_parallel_beam_values():
    n = 32
    x = _gaussian_blob(n, 3.0, -2.0, 3.0) + 0.1 * _rand((1, n, n), 4).abs()
    # axis-aligned rays through pixel centres: the line integral of the bilinear interpolant is the
    # column sum (angle 0, rays along v) and the row sum, bottom row first (angle pi/2, rays along -u)
    y = ParallelBeam([0.0, math.pi / 2], (n, n), detectors=n, samples_per_pixel=4)(x)
    torch.testing.assert_close(y[0, 0], x[0].sum(0), atol=2e-3, rtol=0)
    torch.testing.assert_close(y[0, 1], x[0].sum(1).flip(0), atol=2e-3, rtol=0)
    # oblique angles: the projection of a Gaussian blob is a 1-D Gaussian centred at u0 cos + v0 sin
    x = _gaussian_blob(n, 3.0, -2.0, 3.0)
    angles = [0.3, 1.0, 2.5, 4.0]
    op = ParallelBeam(angles, (n, n))
    y = op(x)[0]
    t = torch.arange(op.detectors, dtype=DT) - (op.detectors - 1) / 2
    for i, theta in enumerate(angles):
        centre = 3.0 * math.cos(theta) - 2.0 * math.sin(theta)
        want = math.sqrt(2 * math.pi) * 3.0 * torch.exp(-((t - centre) ** 2) / 18.0)
        torch.testing.assert_close(y[i], want, atol=0.1, rtol=0)  # bilinear smoothing ~ 1 % of the peak 7.5
    # no SVD above svd_max_dim: conjugate gradients for pinv / gram_solve
    big = ParallelBeam([0.0, 1.0], (8, 8), svd_max_dim=32)
    assert big.svd() is None
    # differentiable
    x = torch.ones(1, n, n, dtype=DT, requires_grad=True)
    op(x).sum().backward()
    torch.testing.assert_close(x.grad, op.adjoint(torch.ones(1, *op.out_shape, dtype=DT)))


def test_parallel_beam_bad_input():
    with pytest.raises(ValueError, match="square"):
        ParallelBeam([0.0], (4, 5))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ParallelBeam(torch.zeros(2, 2), (4, 4))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ParallelBeam([], (4, 4))
    with pytest.raises(TypeError, match="angles"):
        ParallelBeam("abc", (4, 4))
    with pytest.raises(ValueError, match="detectors"):
        ParallelBeam([0.0], (4, 4), detectors=0)
    with pytest.raises(ValueError, match="non-finite"):
        ParallelBeam([float("nan")], (4, 4))


def test_parallel_beam_cg_fallback():
    # 12 angles on 6 x 6: full column rank, condition number ~ 70 (CG cannot resolve near-null
    # directions that a dense pseudo-inverse keeps, so the comparison needs a well-posed matrix)
    op = ParallelBeam(torch.linspace(0, math.pi, 13)[:-1], (6, 6), svd_max_dim=1)
    assert op.svd() is None
    check_linear_operator(op, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Nonlinear


def test_nonlinear_operator():
    op = Nonlinear(lambda x: torch.fft.fft2(x).abs(), (4, 4), (4, 4))
    assert not op.linear
    x = _rand((2, 4, 4), 1).requires_grad_()
    y = op(x)
    torch.testing.assert_close(y, torch.fft.fft2(x).abs())
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for call in (lambda: op.adjoint(y), lambda: op.svd(), lambda: op.pinv(y), lambda: op.gram_solve(y, 1.0, 1.0),
                 lambda: op.to_matrix()):
        with pytest.raises(TypeError, match="nonlinear"):
            call()
    with pytest.raises(TypeError, match="callable"):
        Nonlinear(3, (4,), (4,))
    bad = Nonlinear(lambda x: x.sum(-1), (4, 4), (4, 4))
    with pytest.raises(ValueError, match="fn returned shape"):
        bad(torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="in_shape"):
        Nonlinear(lambda x: x, (0, 4), (4,))


# ------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("make", [
    lambda: Inpaint(_mask((2, 4, 4), 1)),
    lambda: Blur(torch.ones(3, 3) / 9, (2, 4, 4)),
    lambda: SuperResolution(2, (2, 4, 4)),
    lambda: Colorize((2, 4, 4)),
    lambda: SubsampledFourier(_mask((4, 4), 2) | torch.eye(4, dtype=torch.bool), (2, 4, 4)),
    lambda: ParallelBeam([0.0, 1.0], (2, 4, 4)),
    lambda: Matrix(torch.randn(5, 32, generator=_gen(1)), in_shape=(2, 4, 4)),
])
def test_operators_follow_input_dtype(make):
    op = make()
    for dtype in (torch.float32, torch.float64):
        x = _rand((2, 2, 4, 4), 1, dtype=dtype)
        y = op(x)
        assert y.dtype in (dtype, torch.complex64 if dtype == torch.float32 else torch.complex128)
        assert op.adjoint(y).dtype == dtype
        assert op.pinv(y).dtype == dtype
        assert op.gram_solve(y, 1.0, 0.5).dtype == y.dtype
        dec = op.svd()
        assert dec.vt(x).dtype == dtype and dec.v(dec.vt(x)).dtype == dtype
        assert dec.ut(y).dtype == dtype and dec.u(dec.ut(y)).dtype == y.dtype
