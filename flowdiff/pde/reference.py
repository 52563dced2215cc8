r"""Reference solvers (numpy) for the built-in problems of Random Grid Neural Processes.

Vadeboncoeur et al., *Random Grid Neural Processes for Parametric PDEs*, ICML 2023 (the problems, §5); the
paper's references used FEniCS. Here, our own finite-difference solvers, batched over instances:

* :func:`poisson_solve`: :math:`-(\kappa(u,x)u')' = w` on [-1, 1], :math:`u(\pm1)=0`,
  :math:`\kappa = \log(1+e^{u s(x)}) + 0.1`, :math:`s = \sum_n z_n T_n(x)`; conservative finite differences
  (κ at midpoints) solved by Newton with the exact tridiagonal Jacobian (a batched Thomas algorithm).
* :func:`burgers_solve`: :math:`u_t + z_1 u u_x - z_0 u_{xx} = 0` on [0,1]×(0,1], :math:`u(0)=u(1)=0`,
  :math:`u(x,0)=\sin(2\pi w x)\sin(\pi x)`; central differences in x, Crank–Nicolson in t, Newton per step.
* :func:`cavity_solve`: the transient lid-driven cavity, :math:`\rho(u_t + u\cdot\nabla u) + \nabla p - \mu\Delta u = 0`,
  :math:`\nabla\cdot u = 0`, lid speed :math:`w(1-(2x-1)^6)t`, by Chorin's projection on a staggered (MAC) grid
  at reduced size, with implicit diffusion.

Each returns the solution on its mesh; :func:`interp_1d`, :func:`interp_grid` evaluate it at arbitrary points.
"""

from __future__ import annotations

import numpy as np

__all__ = ["thomas", "poisson_solve", "burgers_solve", "cavity_solve", "interp_1d", "interp_linear", "interp_grid", "chebyshev_sum"]


def thomas(lower: np.ndarray, diag: np.ndarray, upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve a batch of tridiagonal systems (B, n): ``lower[:, 0]`` and ``upper[:, -1]`` are ignored."""
    n = diag.shape[1]
    c = np.empty_like(diag)
    d = np.empty_like(rhs)
    c[:, 0] = upper[:, 0] / diag[:, 0]
    d[:, 0] = rhs[:, 0] / diag[:, 0]
    for i in range(1, n):
        m = diag[:, i] - lower[:, i] * c[:, i - 1]
        c[:, i] = upper[:, i] / m
        d[:, i] = (rhs[:, i] - lower[:, i] * d[:, i - 1]) / m
    x = np.empty_like(rhs)
    x[:, -1] = d[:, -1]
    for i in range(n - 2, -1, -1):
        x[:, i] = d[:, i] - c[:, i] * x[:, i + 1]
    return x


def chebyshev_sum(z: np.ndarray, x: np.ndarray) -> np.ndarray:
    """:math:`\\sum_n z_n T_n(x)` for z (B, K) and x (M,) or (B, M), shape (B, M)."""
    x = np.broadcast_to(x, (z.shape[0],) + np.shape(x)[-1:])
    t_prev, t_cur = np.ones_like(x), x
    out = z[:, :1] * t_prev
    if z.shape[1] > 1:
        out = out + z[:, 1:2] * t_cur
    for k in range(2, z.shape[1]):
        t_prev, t_cur = t_cur, 2 * x * t_cur - t_prev
        out = out + z[:, k:k + 1] * t_cur
    return out


def _softplus(a):
    return np.logaddexp(0.0, a)


def _sigmoid(a):
    return 0.5 * (1 + np.tanh(0.5 * a))


def poisson_solve(z: np.ndarray, w: np.ndarray, nodes: int = 201, tol: float = 1e-11, max_iter: int = 50):
    """Nonlinear Poisson problem of RGNP (Chebyshev conductivity), batched.

    Arguments:
        z: (B, K) Chebyshev coefficients; w: (B,) or (B, 1) constant source.
        nodes: mesh nodes on [-1, 1] (boundary included).

    Returns:
        ``(x, u)``: the mesh (nodes,) and the solution (B, nodes), float64.
    """
    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    b = z.shape[0]
    x = np.linspace(-1.0, 1.0, nodes)
    h = x[1] - x[0]
    xm = 0.5 * (x[1:] + x[:-1])
    s = chebyshev_sum(z, xm)  # (B, nodes-1) at midpoints
    u = np.zeros((b, nodes))
    for _ in range(max_iter):
        um = 0.5 * (u[:, 1:] + u[:, :-1])
        kappa = _softplus(um * s) + 0.1
        dkappa = _sigmoid(um * s) * s
        du = (u[:, 1:] - u[:, :-1]) / h
        flux = kappa * du  # (B, nodes-1)
        res = -(flux[:, 1:] - flux[:, :-1]) / h - w[:, None]  # interior (B, nodes-2)
        # dflux_{i+1/2}/du_i and /du_{i+1}
        d_left = 0.5 * dkappa * du - kappa / h
        d_right = 0.5 * dkappa * du + kappa / h
        # res_i = -(flux_{i+1/2} - flux_{i-1/2})/h, interior i = 1..n-2
        diag = -(d_left[:, 1:] - d_right[:, :-1]) / h
        upper = -d_right[:, 1:] / h
        lower = d_left[:, :-1] / h
        step = thomas(lower, diag, upper, -res)
        # damped Newton: no update larger than 0.5 in max norm (full steps overshoot for extreme conductivities)
        big = np.abs(step).max(axis=1, keepdims=True)
        step = step * np.minimum(1.0, 0.5 / np.maximum(big, 1e-300))
        u[:, 1:-1] += step
        if np.max(np.abs(step)) < tol:
            break
    else:
        raise RuntimeError(f"poisson_solve: Newton did not converge in {max_iter} iterations (last step {np.abs(step).max():.2e})")
    return x, u


def burgers_solve(z: np.ndarray, w: np.ndarray, nx: int = 201, nt: int = 200, tol: float = 1e-11, max_iter: int = 30):
    """Viscous Burgers of RGNP, batched: ``z = (viscosity z0, advection z1)``, ``w`` the initial frequency.

    Returns ``(x (nx,), t (nt+1,), u (B, nt+1, nx))``, float64.
    """
    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    nu, adv = z[:, 0:1], z[:, 1:2]
    x = np.linspace(0.0, 1.0, nx)
    t = np.linspace(0.0, 1.0, nt + 1)
    h, dt = x[1] - x[0], t[1] - t[0]
    u = np.sin(2 * np.pi * w[:, None] * x) * np.sin(np.pi * x)
    u[:, 0] = u[:, -1] = 0.0
    out = [u.copy()]

    def operator(v):  # F(v) = z1 v v_x - z0 v_xx on interior nodes
        vx = (v[:, 2:] - v[:, :-2]) / (2 * h)
        vxx = (v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]) / h**2
        return adv * v[:, 1:-1] * vx - nu * vxx

    for _ in range(nt):
        f_old = operator(u)
        v = u.copy()
        for _ in range(max_iter):
            res = (v[:, 1:-1] - u[:, 1:-1]) / dt + 0.5 * (operator(v) + f_old)
            vi = v[:, 1:-1]
            vx = (v[:, 2:] - v[:, :-2]) / (2 * h)
            diag = 1.0 / dt + 0.5 * (adv * vx + 2 * nu / h**2)
            upper = 0.5 * (adv * vi / (2 * h) - nu / h**2)
            lower = 0.5 * (-adv * vi / (2 * h) - nu / h**2)
            step = thomas(lower, diag, upper, -res)
            v[:, 1:-1] += step
            if np.max(np.abs(step)) < tol:
                break
        else:
            raise RuntimeError("burgers_solve: Newton did not converge")
        u = v
        out.append(u.copy())
    return x, t, np.stack(out, axis=1)


def cavity_solve(z: np.ndarray, w: np.ndarray, n: int = 24, nt: int = 100, t_end: float = 1.0):
    """Transient lid-driven cavity (RGNP's NS problem) at reduced size, one instance at a time.

    ``z = (rho, mu)``, ``w`` the lid speed. Chorin projection on a MAC grid with ``n`` x ``n`` cells, semi-implicit
    (implicit diffusion, explicit advection), ``nt`` steps to ``t_end``. Returns ``(xc (n,), tc (nt+1,), fields)``
    with ``fields`` (B, nt+1, n, n, 3): (u, v, p) at cell centres (p shifted to 0 at the corner cell (0, 0)).
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    h = 1.0 / n
    dt = t_end / nt
    xc = (np.arange(n) + 0.5) * h
    xf = np.arange(n + 1) * h

    def lap1d(m, kind):
        # kind 'dir_face': Dirichlet at faces (ghost reflection for cell-centred), 'neu': Neumann
        main = -2.0 * np.ones(m)
        off = np.ones(m - 1)
        a = sp.diags([off, main, off], [-1, 0, 1], format="lil")
        if kind == "ghost":  # cell-centred unknowns, wall value imposed via ghost u_g = 2 u_w - u_0
            a[0, 0] = -3.0
            a[m - 1, m - 1] = -3.0
        elif kind == "neu":
            a[0, 0] = -1.0
            a[m - 1, m - 1] = -1.0
        return a.tocsr() / h**2

    # u lives on vertical faces (n+1, n): interior faces i=1..n-1 unknown; v on horizontal faces (n, n+1).
    iu, iv = sp.identity(n - 1), sp.identity(n)
    lap_u = sp.kron(lap1d(n - 1, "dir"), sp.identity(n)) + sp.kron(sp.identity(n - 1), lap1d(n, "ghost"))
    lap_v = sp.kron(lap1d(n, "ghost"), sp.identity(n - 1)) + sp.kron(sp.identity(n), lap1d(n - 1, "dir"))
    lap_p = (sp.kron(lap1d(n, "neu"), sp.identity(n)) + sp.kron(sp.identity(n), lap1d(n, "neu"))).tolil()
    lap_p[0, :] = 0.0
    lap_p[0, 0] = 1.0  # pin p at cell (0, 0)
    solve_p = spla.factorized(lap_p.tocsc())
    del iu, iv
    results = []
    tc = np.linspace(0, t_end, nt + 1)
    for b in range(z.shape[0]):
        rho, mu = z[b, 0], z[b, 1]
        lid_speed = w[b]
        solve_u = spla.factorized((sp.identity((n - 1) * n) - dt * mu / rho * lap_u).tocsc())
        solve_v = spla.factorized((sp.identity(n * (n - 1)) - dt * mu / rho * lap_v).tocsc())
        u = np.zeros((n + 1, n))  # u[i, j] at (xf[i], xc[j])
        v = np.zeros((n, n + 1))  # v[i, j] at (xc[i], xf[j])
        p = np.zeros((n, n))
        frames = [np.zeros((n, n, 3))]
        for k in range(nt):
            t_new = (k + 1) * dt
            lid = lid_speed * (1 - (2 * xf - 1) ** 6) * t_new  # on u faces at y = 1
            lid_old = lid_speed * (1 - (2 * xf - 1) ** 6) * (k * dt)
            # advection (explicit, central) of u at interior u faces
            ug = np.zeros((n + 1, n + 2))
            ug[:, 1:-1] = u
            ug[:, 0] = -u[:, 0]
            ug[:, -1] = 2 * lid_old - u[:, -1]
            vg = np.zeros((n + 2, n + 1))
            vg[1:-1, :] = v
            vg[0, :] = -v[0, :]
            vg[-1, :] = -v[-1, :]
            ui = u[1:-1, :]
            dudx = (u[2:, :] - u[:-2, :]) / (2 * h)
            dudy = (ug[1:-1, 2:] - ug[1:-1, :-2]) / (2 * h)
            v_at_u = 0.25 * (v[:-1, :-1] + v[1:, :-1] + v[:-1, 1:] + v[1:, 1:])
            adv_u = ui * dudx + v_at_u * dudy
            vi = v[:, 1:-1]
            dvdy = (v[:, 2:] - v[:, :-2]) / (2 * h)
            dvdx = (vg[2:, 1:-1] - vg[:-2, 1:-1]) / (2 * h)
            u_at_v = 0.25 * (u[:-1, :-1] + u[1:, :-1] + u[:-1, 1:] + u[1:, 1:])
            adv_v = u_at_v * dvdx + vi * dvdy
            # implicit diffusion with the new lid value in the ghost cells
            rhs_u = ui - dt * adv_u
            rhs_u[:, -1] += dt * mu / rho * 2 * lid[1:-1] / h**2
            u_star = solve_u(rhs_u.reshape(-1)).reshape(n - 1, n)
            v_star = solve_v((vi - dt * adv_v).reshape(-1)).reshape(n, n - 1)
            us = np.zeros((n + 1, n))
            us[1:-1] = u_star
            vs = np.zeros((n, n + 1))
            vs[:, 1:-1] = v_star
            div = (us[1:, :] - us[:-1, :]) / h + (vs[:, 1:] - vs[:, :-1]) / h
            rhs = (rho / dt * div).reshape(-1)
            rhs[0] = 0.0
            p = solve_p(rhs).reshape(n, n)
            u = us.copy()
            v = vs.copy()
            u[1:-1] -= dt / rho * (p[1:] - p[:-1]) / h
            v[:, 1:-1] -= dt / rho * (p[:, 1:] - p[:, :-1]) / h
            uc = 0.5 * (u[1:] + u[:-1])
            vc = 0.5 * (v[:, 1:] + v[:, :-1])
            frames.append(np.stack([uc, vc, p - p[0, 0]], axis=-1))
        results.append(np.stack(frames))
    return xc, tc, np.stack(results)


def interp_linear(mesh: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Linear interpolation (vectorised) of fields (B, nodes) on a uniform ``mesh`` at points x (B, M)."""
    x = np.asarray(x, dtype=np.float64)
    h = mesh[1] - mesh[0]
    pos = np.clip((x - mesh[0]) / h, 0, len(mesh) - 1 - 1e-9)
    i = np.floor(pos).astype(np.int64)
    frac = pos - i
    left = np.take_along_axis(values, i, axis=1)
    right = np.take_along_axis(values, i + 1, axis=1)
    return (1 - frac) * left + frac * right


def interp_1d(mesh: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Piecewise-cubic (Hermite-free, natural spline) values (B, M) of fields (B, nodes) at points x (B, M)."""
    from scipy.interpolate import CubicSpline

    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape)
    for b in range(values.shape[0]):
        out[b] = CubicSpline(mesh, values[b])(x[b])
    return out


def interp_grid(axes: tuple, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Multilinear interpolation of fields (B, *grid) on the tensor grid ``axes`` at points x (B, M, d)."""
    from scipy.interpolate import RegularGridInterpolator

    out = np.empty(x.shape[:2])
    for b in range(values.shape[0]):
        f = RegularGridInterpolator(axes, values[b], bounds_error=False, fill_value=None)
        out[b] = f(x[b])
    return out
