r"""A flowdiff diffusion prior over the joint vector (z, w, u on a mesh), trained on reference-solver pairs.

The comparison arm of issue 21 (notes ``pde-fields.md`` §5, method 5). Unlike RGNP this model **uses solver data**:
``fit`` draws ``pairs`` parameters from the problem's prior, solves each with ``problem.reference`` on the interior
nodes of a tensor mesh (``self.solver_calls`` counts them), standardises the joint vector
:math:`v = (z, w, u(x_1..x_M))` per coordinate and trains a flowdiff residual MLP (:class:`flowdiff.nn.MLP` inside
:class:`flowdiff.nn.Preconditioned`, data prediction, linear path, EDM weighting) on it.

Inverse and forward problems are posterior sampling with :func:`flowdiff.inverse.sample_posterior`:

* sensors: :math:`y_j = u(x_j) + \sigma n_j`. ``u`` between nodes is :math:`B(x,w) + D(x)\tilde u(x)` with
  :math:`\tilde u = (u - B)/D` interpolated multilinearly between the interior nodes (constant beyond the outermost
  ones), so the readings are an affine function of :math:`v`; the known ``w`` is one more row, weighted so that its
  effective noise is ``w_noise`` (in standardised units). This is a :class:`flowdiff.inverse.Matrix` operator, so
  every linear sampler applies; the default ``method="smc"`` is the library's SMC sampler (asymptotically exact).
* forward (``predict``): the same with ``z`` and ``w`` observed (inpainting), ``u`` sampled.
* **PDE-residual guidance** (DiffusionPDE, Huang, Yang, Wang & Park, NeurIPS 2024): ``method="dps"`` with
  ``pde_weight > 0`` runs fd.inverse's DPS (Chung et al. 2023) on a time-dependent nonlinear operator whose single
  output is DiffusionPDE's guidance loss :math:`\zeta_{obs}\|y - A\hat v\| + \zeta_{pde}\|R(\hat v)\|` (unsquared
  norms, ``y = 0``), so DPS's step :math:`-\zeta\nabla_{x_t}\|0 - loss\|` is DiffusionPDE's update. The residual term
  is on only in the last ``pde_fraction`` (20 %) of the steps, where the observation weight drops to 0.1× (their
  scheme). :math:`R` is the problem's **own** autograd residual of a tensor-Chebyshev least-squares fit of
  :math:`\tilde u` on the mesh, evaluated at the interior nodes (DiffusionPDE uses finite differences on its grid).
  Differences from DiffusionPDE: a DDIM(η = 1) chain of fd.inverse's DPS instead of EDM Heun, and an MLP on a
  vector instead of a U-Net on an image.

One unknown field (``u`` of shape (B, N)); problems with several fields (the cavity) are refused.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import Tensor

from .. import inverse, paths
from .. import nn as fnn
from ..fields import Field
from ..losses import GaussianPathLoss
from .problem import Problem, check_known_inputs

__all__ = ["DiffusionPrior"]


def _interp_weights_1d(nodes: Tensor, x: Tensor) -> Tensor:
    """Piecewise-linear interpolation weights (P, n) of values on sorted ``nodes`` (n,) at ``x`` (P,), clamped."""
    n = nodes.numel()
    xc = x.clamp(float(nodes[0]), float(nodes[-1]))
    idx = torch.searchsorted(nodes, xc).clamp(1, n - 1)
    x0, x1 = nodes[idx - 1], nodes[idx]
    t = ((xc - x0) / (x1 - x0)).clamp(0, 1)
    wts = torch.zeros(x.numel(), n, dtype=x.dtype)
    rows = torch.arange(x.numel())
    wts[rows, idx - 1] += 1 - t
    wts[rows, idx] += t
    return wts


def _chebyshev(xn: Tensor, degree: int) -> Tensor:
    """T_0..T_{degree-1} of xn (…,) in [-1, 1] -> (…, degree), differentiable."""
    out = [torch.ones_like(xn), xn]
    for _ in range(2, degree):
        out.append(2 * xn * out[-1] - out[-2])
    return torch.stack(out[:degree], dim=-1)


class DiffusionPrior:
    """flowdiff diffusion prior over (z, w, u on a mesh) trained on ``pairs`` reference-solver solutions.

    Arguments:
        problem: a :class:`~flowdiff.pde.Problem` with one unknown field and a ``reference`` solver.
        pairs: number of training pairs = reference solver calls (one per parameter draw).
        nodes: mesh nodes per axis, boundary included (the model sees the ``nodes - 2`` interior ones per axis).
        hidden, depth: the residual MLP.
        steps, batch, lr: Adam steps (cosine-decayed learning rate), batch size.
        degree: Chebyshev modes per axis of the fit used by the residual guidance (default 16 in 1-D, 8 otherwise; at most ``nodes - 2``).

    ``fit(seed)`` returns ``self``; ``posterior(x_obs, y_obs, w, noise, n)`` gives samples of z (n, B, dz) as
    :meth:`flowdiff.pde.RGNP.posterior`; ``predict(z, w, x)`` the sample mean and std of u at ``x``.
    """

    def __init__(self, problem: Problem, *, pairs: int = 2000, nodes: int = 65, hidden: int = 256, depth: int = 4,
                 steps: int = 4000, batch: int = 256, lr: float = 1e-3, degree: Optional[int] = None) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a flowdiff.pde.Problem, got {type(problem).__name__}")
        if problem.n_fields() != 1:
            raise ValueError(f"the diffusion prior supports one unknown field; this problem has {problem.n_fields()}")
        if problem.reference is None:
            raise ValueError("the diffusion prior is trained on solver pairs: the problem needs a reference solver "
                             "(Problem(..., reference=...))")
        for label, value, low in (("pairs", pairs, 2), ("nodes", nodes, 4), ("hidden", hidden, 1), ("depth", depth, 1),
                                  ("steps", steps, 0), ("batch", batch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.problem = problem
        self.config = dict(pairs=pairs, nodes=nodes, hidden=hidden, depth=depth, steps=steps, batch=batch, lr=lr,
                           degree=degree)
        p = problem
        axes = [torch.linspace(float(a), float(b), nodes, dtype=torch.float64)[1:-1] for a, b in p.domain]
        self.axes = axes
        mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, p.dim)
        self.mesh = mesh.float()  # (M, d)
        self.m = mesh.shape[0]
        self.dz, self.dw = p.dz, p.dw
        self.dim = self.dz + self.dw + self.m
        self.degree = min({1: 16}.get(problem.dim, 8), nodes - 2) if degree is None else int(degree)
        self.fitted = False
        self.solver_calls = 0
        self.history: dict = {}

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def fit(self, seed: int = 0, *, data: Optional[tuple[Tensor, Tensor, Tensor]] = None,
            verbose: bool = False) -> "DiffusionPrior":
        """Solve ``pairs`` prior draws with the reference solver (or take ``data = (z, w, u_mesh)``), then train."""
        cfg, p = self.config, self.problem
        gen = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        cpu0 = time.process_time()
        if data is None:
            z, w = p.sample_params(cfg["pairs"], gen)
            x = self.mesh.unsqueeze(0).expand(z.shape[0], -1, -1).contiguous()
            u = p.reference(z, w, x).float()
            self.solver_calls = int(z.shape[0])
        else:
            z, w, u = (t.float() for t in data)
            if u.shape[1] != self.m:
                raise ValueError(f"data u must hold the {self.m} interior mesh values, got shape {tuple(u.shape)}")
        if not torch.isfinite(u).all():
            raise ValueError("the reference solver returned non-finite values")
        solve_cpu = time.process_time() - cpu0
        v = torch.cat([z.float(), w.float(), u], dim=1)
        self.mean = v.mean(0)
        self.std = v.std(0).clamp_min(1e-6)
        data_std = (v - self.mean) / self.std
        self.path = paths.Linear()
        net = fnn.MLP(self.dim, hidden=cfg["hidden"], depth=cfg["depth"])
        self.model = fnn.Preconditioned(net, self.path, "data", sigma_data=1.0)
        loss_fn = GaussianPathLoss(self.path, "data", weighting="edm", time_sampler="logit-normal",
                                             sigma_data=1.0)
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg["steps"]), eta_min=cfg["lr"] * 0.02)
        losses = []
        t0 = time.process_time()
        n = data_std.shape[0]
        for step in range(cfg["steps"]):
            idx = torch.randint(0, n, (min(cfg["batch"], n),), generator=gen)
            out = loss_fn(self.model, data_std[idx], generator=gen)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"the diffusion loss became non-finite at step {step}")
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            losses.append(float(out.loss.detach()))
            if verbose and (step % 500 == 0 or step == cfg["steps"] - 1):
                print(f"diffusion step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}", flush=True)
        self.model.eval()
        self.field = Field(self.model, self.path, "data")
        self.history = {"loss": losses, "solve_cpu_seconds": solve_cpu, "train_cpu_seconds": time.process_time() - t0,
                        "solver_calls": self.solver_calls}
        self.fitted = True
        return self

    # ------------------------------------------------------------------------------------------
    # the affine map from the joint vector to point values
    # ------------------------------------------------------------------------------------------
    def _point_rows(self, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """u(x) = rows @ v_std + offset for one case: x (P, d), w (dw,) -> rows (P, dim), offset (P,)."""
        p = self.problem
        x = x.double()
        wts = None
        for k, axis in enumerate(self.axes):
            wk = _interp_weights_1d(axis, x[:, k])
            wts = wk if wts is None else (wts[:, :, None] * wk[:, None, :]).reshape(x.shape[0], -1)
        xb, wb = x.float().unsqueeze(0), w.float().reshape(1, -1)
        mb = self.mesh.unsqueeze(0)
        fac_x, lift_x = p.factor(xb)[0].double(), p.lift(xb, wb)[0].double()
        fac_m, lift_m = p.factor(mb)[0].double(), p.lift(mb, wb)[0].double()
        # u(x) = B(x) + D(x) * sum_k W_k (u_k - B_k) / D_k, u_k = mean_k + std_k * v_k
        coef = fac_x[:, None] * wts / fac_m[None, :]
        su, mu = self.std[self.dz + self.dw:].double(), self.mean[self.dz + self.dw:].double()
        rows = torch.zeros(x.shape[0], self.dim, dtype=torch.float64)
        rows[:, self.dz + self.dw:] = coef * su[None, :]
        offset = lift_x + coef @ (mu - lift_m)
        return rows, offset

    def _u_mesh(self, v_std: Tensor) -> Tensor:
        return v_std[:, self.dz + self.dw:] * self.std[self.dz + self.dw:] + self.mean[self.dz + self.dw:]

    def _operator(self, x: Optional[Tensor], y: Optional[Tensor], w: Tensor, noise: float, w_noise: float,
                  z: Optional[Tensor] = None, z_noise: float = 0.0):
        """The Matrix operator and measurement of one case (sensors and/or z, plus the known w)."""
        rows, meas = [], []
        if x is not None:
            r, off = self._point_rows(x, w)
            rows.append(r)
            meas.append(y.double() - off)
        if z is not None:  # forward problem: z observed with effective noise z_noise (standardised units)
            scale = noise / z_noise
            r = torch.zeros(self.dz, self.dim, dtype=torch.float64)
            r[:, :self.dz] = torch.eye(self.dz, dtype=torch.float64) * scale
            rows.append(r)
            meas.append(scale * ((z.double() - self.mean[:self.dz].double()) / self.std[:self.dz].double()))
        if self.dw:
            scale = noise / w_noise
            r = torch.zeros(self.dw, self.dim, dtype=torch.float64)
            r[:, self.dz:self.dz + self.dw] = torch.eye(self.dw, dtype=torch.float64) * scale
            rows.append(r)
            sl = slice(self.dz, self.dz + self.dw)
            meas.append(scale * ((w.double() - self.mean[sl].double()) / self.std[sl].double()))
        H = torch.cat(rows).float()
        return inverse.Matrix(H), torch.cat(meas).float()

    # ------------------------------------------------------------------------------------------
    # PDE residual of a joint vector (for the guidance)
    # ------------------------------------------------------------------------------------------
    def _residual_setup(self, w: Tensor) -> None:
        p = self.problem
        lo, hi = p.lo.double(), p.hi.double()
        xn = 2 * (self.mesh.double() - lo) / (hi - lo) - 1
        basis = None
        for k in range(p.dim):
            bk = _chebyshev(xn[:, k], self.degree)
            basis = bk if basis is None else (basis[:, :, None] * bk[:, None, :]).reshape(xn.shape[0], -1)
        self._fit_map = torch.linalg.pinv(basis).float()  # coefficients = fit_map @ u~_mesh
        mb = self.mesh.unsqueeze(0)
        wb = w.float().reshape(1, -1)
        self._fac_m, self._lift_m = p.factor(mb)[0], p.lift(mb, wb)[0]

    def residual(self, v_std: Tensor, w: Tensor) -> Tensor:
        """The problem's residual (S, M) at the interior nodes of the Chebyshev fit of each sample's u~ (S, dim)."""
        p = self.problem
        self._residual_setup(w)
        return self._residual(v_std, w)

    def _residual(self, v_std: Tensor, w: Tensor) -> Tensor:
        p = self.problem
        s = v_std.shape[0]
        z = v_std[:, :self.dz] * self.std[:self.dz] + self.mean[:self.dz]
        u_mesh = self._u_mesh(v_std)
        coef = ((u_mesh - self._lift_m) / self._fac_m) @ self._fit_map.T  # (S, K)
        x = self.mesh.unsqueeze(0).expand(s, -1, -1).clone().requires_grad_(True)
        lo, hi = p.lo.float(), p.hi.float()
        xn = 2 * (x - lo) / (hi - lo) - 1
        basis = None
        for k in range(p.dim):
            bk = _chebyshev(xn[..., k], self.degree)
            basis = bk if basis is None else (basis[..., :, None] * bk[..., None, :]).reshape(s, self.m, -1)
        ut = (basis * coef[:, None, :]).sum(-1)
        wb = w.float().reshape(1, -1).expand(s, -1)
        u = p.compose(ut, x, wb)
        return p.residual(u, x, z, wb).reshape(s, -1)

    # ------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------
    def _sample(self, operator, y, *, n, method, nfe, generator, noise, w, pde_weight, pde_fraction, zeta):
        if method == "dps" and pde_weight > 0:
            self._residual_setup(w)
            steps = nfe
            first_pde = int(math.floor((1 - pde_fraction) * steps))
            state = {"call": 0}
            H = operator.H
            yy = y

            def loss_fn(v):
                i = state["call"]
                state["call"] += 1
                late = i >= first_pde
                obs = torch.sqrt(((yy[None] - v @ H.T) ** 2).sum(-1).clamp_min(1e-30))
                out = (0.1 if late else 1.0) * obs
                if late:
                    r = self._residual(v, w)
                    out = out + pde_weight * torch.sqrt((r**2).sum(-1).clamp_min(1e-30))
                return out[:, None]

            op = inverse.Nonlinear(loss_fn, (self.dim,), (1,))
            res = inverse.sample_posterior(self.field, op, torch.zeros(1), sigma_y=noise, method="dps",
                                              num_samples=n, nfe=nfe, generator=generator, zeta=zeta)
        elif method == "dps":
            res = inverse.sample_posterior(self.field, operator, y, sigma_y=noise, method="dps", num_samples=n,
                                              nfe=nfe, generator=generator, zeta=zeta)
        else:
            res = inverse.sample_posterior(self.field, operator, y, sigma_y=noise, method=method, num_samples=n,
                                              nfe=nfe, generator=generator)
        return res

    def posterior(self, x_obs: Tensor, y_obs: Tensor, w: Tensor, noise, n: int = 256, *,
                  generator: Optional[torch.Generator] = None, method: str = "smc", nfe: int = 100,
                  pde_weight: float = 0.0, pde_fraction: float = 0.2, zeta: float = 0.3,
                  w_noise: float = 0.01, return_u: bool = False):
        """Posterior samples of z (n, B, dz) given sensor readings ``y_obs`` (B, M) at ``x_obs`` (B, M, d).

        ``method``: any linear method of :func:`flowdiff.inverse.available` (default ``"smc"``) or ``"dps"``;
        ``pde_weight > 0`` (DPS only) switches DiffusionPDE's residual guidance on in the last ``pde_fraction`` of
        the ``nfe`` steps. ``return_u=True`` also returns the u samples on the mesh (n, B, M).
        ``self.last_posterior`` holds the evaluations spent per sample (``nfe``) and the method.
        """
        self._require_fit()
        p = self.problem
        if not isinstance(x_obs, Tensor) or not isinstance(y_obs, Tensor):
            raise TypeError("x_obs and y_obs must be tensors")
        if x_obs.ndim == 2 and p.dim == 1:
            x_obs = x_obs.unsqueeze(-1)
        if x_obs.ndim != 3 or x_obs.shape[-1] != p.dim:
            raise ValueError(f"x_obs must have shape (B, M, d={p.dim}), got {tuple(x_obs.shape)}")
        b, m = x_obs.shape[:2]
        p.check_points(x_obs, "sensor locations x_obs")
        if tuple(y_obs.shape) != (b, m):
            raise ValueError(f"y_obs must have shape ({b}, {m}) to match x_obs {tuple(x_obs.shape)}, got {tuple(y_obs.shape)}")
        if not torch.isfinite(y_obs).all():
            raise ValueError("y_obs must be finite")
        w = self._as_w(w, b)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"noise must be a finite float > 0, got {noise!r}")
        if pde_weight < 0 or not (0 < pde_fraction <= 1):
            raise ValueError(f"pde_weight must be >= 0 and pde_fraction in (0, 1], got {pde_weight}, {pde_fraction}")
        if pde_weight > 0 and method != "dps":
            raise ValueError(f"PDE-residual guidance (pde_weight > 0) runs with method='dps', got method={method!r}")
        gen = generator or torch.Generator().manual_seed(0)
        zs, us, spent = [], [], []
        for i in range(b):
            op, y = self._operator(x_obs[i], y_obs[i], w[i], float(noise), w_noise)
            res = self._sample(op, y, n=n, method=method, nfe=nfe, generator=gen, noise=float(noise), w=w[i],
                               pde_weight=pde_weight, pde_fraction=pde_fraction, zeta=zeta)
            v = res.x
            zs.append(v[:, :self.dz] * self.std[:self.dz] + self.mean[:self.dz])
            us.append(self._u_mesh(v))
            spent.append(res.nfe)
        self.last_posterior = {"nfe_per_sample": sum(spent) / len(spent), "method": method, "pde_weight": pde_weight}
        z_out = torch.stack(zs, dim=1)
        return (z_out, torch.stack(us, dim=1)) if return_u else z_out

    def sample_u(self, z: Tensor, w: Tensor, n: int = 64, *, generator: Optional[torch.Generator] = None,
                 method: str = "smc", nfe: int = 100, z_noise: float = 0.01, w_noise: float = 0.01) -> Tensor:
        """Samples (n, B, M) of u on the mesh given (z, w): the forward problem as posterior sampling."""
        self._require_fit()
        p = self.problem
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.dz:
            raise ValueError(f"z must have shape (B, {self.dz}), got {tuple(getattr(z, 'shape', ()))}")
        w = self._as_w(w, z.shape[0])
        gen = generator or torch.Generator().manual_seed(0)
        out = []
        for i in range(z.shape[0]):
            op, y = self._operator(None, None, w[i], 1.0, w_noise, z=z[i], z_noise=z_noise)
            res = self._sample(op, y, n=n, method=method, nfe=nfe, generator=gen, noise=1.0, w=w[i], pde_weight=0.0,
                               pde_fraction=0.2, zeta=0.3)
            out.append(self._u_mesh(res.x))
        return torch.stack(out, dim=1)

    def at_points(self, u_mesh: Tensor, w: Tensor, x: Tensor) -> Tensor:
        """Values (…, B, P) at points ``x`` (B, P, d) of mesh fields ``u_mesh`` (…, B, M) (the same interpolation
        as the sensors)."""
        outs = []
        for i in range(x.shape[0]):
            rows, off = self._point_rows(x[i], w[i])
            su, mu = self.std[self.dz + self.dw:].double(), self.mean[self.dz + self.dw:].double()
            vu = (u_mesh[..., i, :].double() - mu) / su
            outs.append((vu @ rows[:, self.dz + self.dw:].T + off).float())
        return torch.stack(outs, dim=-2)

    def predict(self, z: Tensor, w: Tensor, x: Tensor, n: int = 64, *, generator: Optional[torch.Generator] = None,
                method: str = "smc", nfe: int = 100) -> tuple[Tensor, Tensor]:
        """Sample mean and std (B, N) of u at points ``x`` (B, N, d) given (z, w), from ``n`` posterior samples."""
        if x.ndim == 2 and self.problem.dim == 1:
            x = x.unsqueeze(-1)
        self.problem.check_points(x, "x")
        w = self._as_w(w, z.shape[0])
        u = self.sample_u(z, w, n, generator=generator, method=method, nfe=nfe)
        vals = self.at_points(u, w, x)
        return vals.mean(0), vals.std(0)

    # ------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        self._require_fit()
        torch.save({"config": self.config, "mean": self.mean, "std": self.std, "model": self.model.state_dict(),
                    "history": self.history, "solver_calls": self.solver_calls}, path)

    @classmethod
    def load(cls, path, problem: Problem) -> "DiffusionPrior":
        """Rebuild a saved prior for ``problem`` (the one it was fitted on)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        out = cls(problem, **state["config"])
        out.mean, out.std = state["mean"], state["std"]
        out.path = paths.Linear()
        out.model = fnn.Preconditioned(fnn.MLP(out.dim, hidden=out.config["hidden"], depth=out.config["depth"]),
                                         out.path, "data", sigma_data=1.0)
        out.model.load_state_dict(state["model"])
        out.model.eval()
        out.field = Field(out.model, out.path, "data")
        out.history, out.solver_calls, out.fitted = state["history"], state["solver_calls"], True
        return out

    def _require_fit(self) -> None:
        if not self.fitted:
            raise ValueError("the diffusion prior is not fitted yet: call fit() first")

    def _as_w(self, w, b: int) -> Tensor:
        return check_known_inputs(w, b, self.dw).float()
