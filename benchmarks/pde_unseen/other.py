"""A 1-D nonlinear elliptic problem NOT in the repo, with an independent FD reference (scipy root)."""
import math, sys, time, numpy as np, torch
import flowdiff as fd
from flowdiff.pde import grad
from scipy.optimize import root

def residual(u, x, z, w):
    du = grad(u, x)[..., 0]
    k = torch.exp(z[:, 0:1] * u) + z[:, 1:2] * x[..., 0] ** 2
    return -grad(k * du, x)[..., 0] + z[:, 2:3] * u**3 - w[:, 1:2] * (1 + x[..., 0])

def sample(n, g):
    z = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 1.0, 2.0]) + torch.tensor([-1.0, 0.5, 0.0])
    w = torch.rand(n, 2, generator=g) * torch.tensor([1.0, 2.0]) + torch.tensor([-0.5, 1.0])
    return z, w

problem = fd.pde.Problem(domain=[(0.0, 2.0)], residual=residual,
                         lift=lambda x, w: w[:, :1] * (2 - x[..., 0]) / 2, factor=lambda x: x[..., 0] * (2 - x[..., 0]),
                         sample_params=sample)

def fd_solve(z, w, nodes=401):
    x = np.linspace(0, 2, nodes); h = x[1] - x[0]; xm = 0.5 * (x[1:] + x[:-1])
    out = []
    for zb, wb in zip(np.asarray(z, float), np.asarray(w, float)):
        def F(ui):
            u = np.concatenate([[wb[0]], ui, [0.0]])
            um = 0.5 * (u[1:] + u[:-1])
            k = np.exp(zb[0] * um) + zb[1] * xm**2
            flux = k * (u[1:] - u[:-1]) / h
            return -(flux[1:] - flux[:-1]) / h + zb[2] * ui**3 - wb[1] * (1 + x[1:-1])
        guess = wb[0] * (2 - x[1:-1]) / 2
        sol = root(F, guess, method="hybr", tol=1e-12)
        assert sol.success, sol.message
        out.append(np.concatenate([[wb[0]], sol.x, [0.0]]))
    return x, np.array(out)
