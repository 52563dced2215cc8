"""Forward operators of flowdiff.inverse: adjoints, SVDs, pseudo-inverses, Gram solves against dense truth."""

from __future__ import annotations

import pytest
import torch

from flowdiff.inverse.operators import SVD, Matrix, Operator

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
    torch.testing.assert_close(got, _flat_real(y) @ torch.linalg.pinv(2.0 * G).T, atol=1e-6, rtol=1e-6)


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
