r"""The three built-in problems of Random Grid Neural Processes (Vadeboncoeur et al., ICML 2023), each with its
own reference solver (:mod:`flowdiff.pde.reference`).

* :func:`poisson`: :math:`-(\kappa(u,x)u')' = w` on [-1,1], :math:`u(\pm1)=0`,
  :math:`\kappa=\log(1+e^{u\sum_{n<5} z_nT_n(x)})+0.1`, :math:`z\sim U[-1,1]^5`, :math:`w\sim U[1,2]`;
  :math:`u = \cos(\pi x/2)\tilde u`.
* :func:`burgers`: :math:`u_t + z_1uu_x - z_0u_{xx}=0` on [0,1]×[0,1], :math:`u(x,0)=\sin(2\pi wx)\sin(\pi x)`,
  :math:`z_0\sim U[0.01,0.1]`, :math:`z_1\sim U[0.5,1]`, :math:`w\sim U[0.5,2]`;
  :math:`u=\sin(2\pi wx)\sin(\pi x)+\sin(\pi x)\,t\,\tilde u`.
* :func:`cavity`: transient lid-driven cavity on [0,1]²×[0,1], :math:`z=(\rho,\mu)\sim U[0.8,1]\times U[0.1,1]`,
  lid speed :math:`w=1`; residuals [momentum-x, momentum-y, 10·divergence] as in the paper's code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .problem import Problem, grad

__all__ = ["poisson", "burgers", "cavity", "get", "available", "chebyshev"]


def chebyshev(z: Tensor, x: Tensor) -> Tensor:
    """:math:`\\sum_n z_n T_n(x)` for z (B, K) and x (B, N), shape (B, N) (differentiable in x)."""
    t_prev, t_cur = torch.ones_like(x), x
    out = z[:, :1] * t_prev
    if z.shape[1] > 1:
        out = out + z[:, 1:2] * t_cur
    for k in range(2, z.shape[1]):
        t_prev, t_cur = t_cur, 2 * x * t_cur - t_prev
        out = out + z[:, k:k + 1] * t_cur
    return out


def _uniform(n, generator, lo, hi):
    lo = torch.tensor(lo, dtype=torch.float32)
    hi = torch.tensor(hi, dtype=torch.float32)
    return lo + (hi - lo) * torch.rand(n, lo.numel(), generator=generator)


# -- Poisson ------------------------------------------------------------------------------------------
def _poisson_residual(u, x, z, w):
    s = chebyshev(z, x[..., 0])
    kappa = torch.nn.functional.softplus(u * s) + 0.1
    du = grad(u, x)[..., 0]
    flux = kappa * du
    return -grad(flux, x)[..., 0] - w[:, :1]


def _poisson_reference(z, w, x, nodes: int = 801):
    from .reference import interp_linear, poisson_solve

    mesh, u = poisson_solve(_np(z), _np(w), nodes=nodes)
    return torch.as_tensor(interp_linear(mesh, u, _np(x)[..., 0]), dtype=x.dtype)


def poisson(nodes: int = 801) -> Problem:
    """The 1-D nonlinear Poisson problem with Chebyshev conductivity (RGNP §5), reference: FD Newton on ``nodes``
    (second order: 801 nodes are within about 3e-5 of the limit), linear interpolation between nodes."""
    return Problem(
        domain=[(-1.0, 1.0)],
        residual=_poisson_residual,
        lift=lambda x, w: torch.zeros_like(x[..., 0]),
        factor=lambda x: torch.cos(0.5 * math.pi * x[..., 0]),
        sample_params=lambda n, g: (_uniform(n, g, [-1.0] * 5, [1.0] * 5), _uniform(n, g, [1.0], [2.0])),
        support=[(-1.0, 1.0)] * 5,
        reference=lambda z, w, x: _poisson_reference(z, w, x, nodes),
        name="poisson",
    )


# -- Burgers ------------------------------------------------------------------------------------------
def _burgers_residual(u, x, z, w):
    g = grad(u, x)
    u_x, u_t = g[..., 0], g[..., 1]
    u_xx = grad(u_x, x)[..., 0]
    return u_t + z[:, 1:2] * u * u_x - z[:, 0:1] * u_xx


def _burgers_lift(x, w):
    return torch.sin(2 * math.pi * w[:, :1] * x[..., 0]) * torch.sin(math.pi * x[..., 0])


def _burgers_reference(z, w, x, nx: int = 201, nt: int = 200):
    from .reference import burgers_solve, interp_grid

    mesh, times, u = burgers_solve(_np(z), _np(w), nx=nx, nt=nt)
    # u is (B, t, x): interpolate at (x, t) points
    pts = _np(x)[..., ::-1].copy()  # (t, x) order
    return torch.as_tensor(interp_grid((times, mesh), u, pts), dtype=x.dtype)


def burgers(nx: int = 201, nt: int = 200) -> Problem:
    """Viscous Burgers in x–t (RGNP §5), reference: central differences + Crank–Nicolson/Newton."""
    return Problem(
        domain=[(0.0, 1.0), (0.0, 1.0)],
        residual=_burgers_residual,
        lift=_burgers_lift,
        factor=lambda x: torch.sin(math.pi * x[..., 0]) * x[..., 1],
        sample_params=lambda n, g: (_uniform(n, g, [0.01, 0.5], [0.1, 1.0]), _uniform(n, g, [0.5], [2.0])),
        support=[(0.01, 0.1), (0.5, 1.0)],
        reference=lambda z, w, x: _burgers_reference(z, w, x, nx, nt),
        name="burgers",
    )


# -- lid-driven cavity --------------------------------------------------------------------------------
def _cavity_residual(u, x, z, w):
    rho, mu = z[:, 0:1], z[:, 1:2]
    vel_u, vel_v, p = u[..., 0], u[..., 1], u[..., 2]
    gu, gv, gp = grad(vel_u, x), grad(vel_v, x), grad(p, x)
    u_xx = grad(gu[..., 0], x)[..., 0]
    u_yy = grad(gu[..., 1], x)[..., 1]
    v_xx = grad(gv[..., 0], x)[..., 0]
    v_yy = grad(gv[..., 1], x)[..., 1]
    mom_x = rho * (gu[..., 2] + vel_u * gu[..., 0] + vel_v * gu[..., 1]) + gp[..., 0] - mu * (u_xx + u_yy)
    mom_y = rho * (gv[..., 2] + vel_u * gv[..., 0] + vel_v * gv[..., 1]) + gp[..., 1] - mu * (v_xx + v_yy)
    div = gu[..., 0] + gv[..., 1]
    return torch.stack([mom_x, mom_y, 10.0 * div], dim=-1)


def _cavity_lift(x, w):
    lid = w[:, :1] * (1 - (2 * x[..., 0] - 1) ** 6) * x[..., 1] * x[..., 2]
    zero = torch.zeros_like(lid)
    return torch.stack([lid, zero, zero], dim=-1)


def _cavity_factor(x):
    bubble = torch.sin(math.pi * x[..., 0]) * torch.sin(math.pi * x[..., 1]) * x[..., 2]
    return torch.stack([bubble, bubble, x[..., 0] + x[..., 1]], dim=-1)


def _cavity_reference(z, w, x, n: int = 24, nt: int = 100):
    from .reference import cavity_solve, interp_grid

    xc, tc, fields = cavity_solve(_np(z), _np(w), n=n, nt=nt)
    pts = _np(x)[..., [2, 0, 1]].copy()  # (t, x, y)
    out = [interp_grid((tc, xc, xc), fields[..., k], pts) for k in range(3)]
    return torch.as_tensor(np.stack(out, axis=-1), dtype=x.dtype)


def cavity(n: int = 24, nt: int = 100) -> Problem:
    """Transient lid-driven cavity (RGNP §5) at reduced size; fields (u, v, p); reference: MAC projection."""
    return Problem(
        domain=[(0.0, 1.0), (0.0, 1.0), (0.0, 1.0)],
        residual=_cavity_residual,
        lift=_cavity_lift,
        factor=_cavity_factor,
        sample_params=lambda n_, g: (_uniform(n_, g, [0.8, 0.1], [1.0, 1.0]), torch.ones(n_, 1)),
        support=[(0.8, 1.0), (0.1, 1.0)],
        reference=lambda z, w, x: _cavity_reference(z, w, x, n, nt),
        name="cavity",
    )


_PROBLEMS = {"poisson": poisson, "burgers": burgers, "cavity": cavity}


def available() -> list[str]:
    return sorted(_PROBLEMS)


def get(name: str, **kwargs) -> Problem:
    """A built-in problem by name (``poisson``, ``burgers``, ``cavity``)."""
    if name not in _PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; available: {', '.join(available())}")
    return _PROBLEMS[name](**kwargs)


def _np(t) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)
