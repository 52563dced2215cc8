r"""A spectral collocation solver built from a :class:`~flowdiff.pde.Problem`'s own residual (1-D problems).

The unknown is :math:`\tilde u(x) = \sum_{k<K} c_k T_k(\hat x)` (Chebyshev polynomials of the mapped coordinate
:math:`\hat x\in[-1,1]`), so :math:`u = B + D\tilde u` meets the Dirichlet data exactly; the coefficients solve
:math:`\min_c \sum_j R[u](x_j)^2` over :math:`M = 2K` Chebyshev–Gauss points by Gauss–Newton with Levenberg
damping, with the Jacobian from finite differences in ``c`` (the residual uses ``torch.autograd.grad`` in x,
which the functional transforms cannot differentiate through). Spectral collocation: Boyd, *Chebyshev and
Fourier Spectral Methods* (2001), ch. 3–4. RGNP uses it to calibrate its predictive standard deviation on a
handful of solves (no user solver is needed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .problem import Problem

__all__ = ["collocation_solve"]


def _chebyshev_basis(xh: Tensor, k: int) -> Tensor:
    """T_0..T_{k-1} at xh (..., ), shape (..., k); differentiable in xh."""
    # T_k(x) = cos(k arccos x): one vectorised op (a short autograd graph); points stay strictly inside (-1, 1)
    theta = torch.arccos(xh.clamp(-1 + 1e-12, 1 - 1e-12))
    return torch.cos(theta.unsqueeze(-1) * torch.arange(k, dtype=xh.dtype, device=xh.device))


class Solution:
    """Coefficients (B, K) of a collocation solution; ``__call__(x (B, N, 1)) -> u (B, N)``."""

    def __init__(self, problem: Problem, coef: Tensor, w: Tensor, converged: Tensor, residual_rms: Tensor) -> None:
        self.problem, self.coef, self.w = problem, coef, w
        self.converged, self.residual_rms = converged, residual_rms

    def u_tilde(self, x: Tensor) -> Tensor:
        lo, hi = self.problem.lo.to(x), self.problem.hi.to(x)
        xh = 2 * (x[..., 0] - lo[0]) / (hi[0] - lo[0]) - 1
        return (_chebyshev_basis(xh, self.coef.shape[1]) * self.coef[:, None, :].to(x)).sum(-1)

    def __call__(self, x: Tensor) -> Tensor:
        w = self.w.to(x)
        return self.problem.compose(self.u_tilde(x), x, w)


def collocation_solve(problem: Problem, z: Tensor, w: Tensor, *, degree: int = 48, initial=None, iterations: int = 40,
                      tol: float = 1e-10, dtype=torch.float64) -> Solution:
    """Solve ``problem`` for every row of ``(z, w)`` by Chebyshev collocation (1-D domains, one field).

    Arguments:
        z, w: (B, dz), (B, dw).
        degree: number of Chebyshev modes ``K``.
        initial: optional ``u_tilde(x) -> (B, N)`` to start Gauss–Newton from (e.g. a trained network's mean).

    Returns:
        a :class:`Solution` with ``converged`` (B,) flags (relative step < tol and a residual that stopped falling).
    """
    if problem.dim != 1 or problem.n_fields() != 1:
        raise ValueError(f"collocation_solve handles 1-D problems with one field; this one has d={problem.dim}, "
                         f"{problem.n_fields()} fields")
    b = z.shape[0]
    k = int(degree)
    m = 2 * k
    z = z.to(dtype)
    w = w.to(dtype)
    lo, hi = problem.lo.to(dtype), problem.hi.to(dtype)
    xh = torch.cos(math.pi * (torch.arange(m, dtype=dtype) + 0.5) / m)
    x = (lo + (hi - lo) * (xh + 1) / 2).reshape(1, m, 1).expand(b, m, 1)
    basis = _chebyshev_basis(xh, k)  # (m, k)
    if initial is not None:
        target = initial(x.to(torch.float32)).to(dtype)
        coef = torch.linalg.lstsq(basis.expand(b, m, k), target.unsqueeze(-1)).solution.squeeze(-1)
    else:
        coef = torch.zeros(b, k, dtype=dtype)

    def residual(c: Tensor, reps: int) -> Tensor:
        # c (b*reps, k): evaluate R at the collocation points for every row
        xr = x.repeat_interleave(reps, dim=0).clone().requires_grad_(True)
        xhr = 2 * (xr[..., 0] - lo[0]) / (hi[0] - lo[0]) - 1
        ut = (_chebyshev_basis(xhr, k) * c[:, None, :]).sum(-1)
        zr, wr = z.repeat_interleave(reps, dim=0), w.repeat_interleave(reps, dim=0)
        u = problem.compose(ut, xr, wr)
        return problem.residual(u, xr, zr, wr).reshape(c.shape[0], -1).detach()

    eye = torch.eye(k, dtype=dtype)
    lam = torch.full((b,), 1e-6, dtype=dtype)
    r = residual(coef, 1)
    cost = (r**2).sum(-1)
    converged = torch.zeros(b, dtype=torch.bool)
    for _ in range(iterations):
        delta = math.sqrt(torch.finfo(dtype).eps) * (1 + coef.abs().amax(-1, keepdim=True))  # (b, 1)
        pert = coef[:, None, :] + delta[:, :, None] * eye[None]  # (b, k, k)
        r_pert = residual(pert.reshape(b * k, k), k).reshape(b, k, -1)
        jac = ((r_pert - r[:, None, :]) / delta[:, :, None]).transpose(1, 2)  # (b, M, k)
        jtj = jac.transpose(1, 2) @ jac
        jtr = (jac.transpose(1, 2) @ r.unsqueeze(-1)).squeeze(-1)
        diag = torch.diagonal(jtj, dim1=1, dim2=2)
        step = -torch.linalg.solve(jtj + lam[:, None, None] * torch.diag_embed(diag + 1e-12), jtr)
        new = coef + step
        r_new = residual(new, 1)
        cost_new = (r_new**2).sum(-1)
        better = torch.isfinite(cost_new) & (cost_new <= cost)
        coef = torch.where(better[:, None], new, coef)
        r = torch.where(better[:, None], r_new, r)
        rel = step.norm(dim=-1) / (1e-12 + coef.norm(dim=-1))
        converged = converged | (rel < tol)
        cost = torch.where(better, cost_new, cost)
        lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-12, 1e8)
        if bool(converged.all()):
            break
    Solution.iterations = _ + 1
    return Solution(problem, coef, w, converged, (cost / m).sqrt())
