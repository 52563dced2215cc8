r"""Random Grid Neural Processes (RGNP): physics-informed latent-variable models of parametric PDE solutions.

Vadeboncoeur, Kazlauskaite, Papandreou, Cirak, Girolami, Akyildiz, *Random Grid Neural Processes for
Parametric PDEs*, ICML 2023 (PMLR 202). Its fixed-grid predecessor (PDDLVM): Vadeboncoeur et al., *Fully
probabilistic deep models for forward and inverse problems in parametric PDEs*, JCP 491 (2023).

**Model.** For an instance :math:`(z, w)` and a grid :math:`X = (x_1..x_N) \sim \rho^N` drawn afresh for every
instance at every step, the forward model :math:`q_\alpha(\tilde u(X)\mid z,w) = N(\mu, \mathrm{diag}(\sigma^2) + CC^\top)`
(``family="diag"``: :math:`C=0`; ``"lowrank"``: rank ``k``) is a Fourier-feature MLP at each point. The ELBO
(one reparameterised sample :math:`\tilde u = \mu + \sigma\odot\epsilon + C\eta`, :math:`u = B + D\tilde u`) is

.. math:: \mathcal L = \mathbb E\Big[\sum_i \log N(0; R[u](x_i), \varepsilon_r^2)
          + \log p_\beta(z\mid \tilde u(X), w, X) - \log q_\alpha(\tilde u(X)\mid z,w)\Big],

the residual :math:`R` by autograd in x; :math:`\varepsilon_r` fixed or learned; :math:`p_\beta` is a
:class:`~flowdiff.pde.gicnet.GICNet` (the amortised inverse). Deviation from the paper's code: :math:`p_\beta` is
trained on detached samples, so it does not pull the forward model (it learns the same inverse; the forward fit
is not traded for identifiability).

**Predictive.** Closed form at any points: mean :math:`B + D\mu`, covariance :math:`D(\mathrm{diag}\,\sigma^2 + CC^\top)D`.

**Calibration (ours, not in the paper).** The ELBO's :math:`\sigma` reflects :math:`\varepsilon_r`, not the error
against the exact solution (the paper's construction covered the solver's answer at only 13–15 % of points in a
prototype). After training, ``calibration`` instances are solved by spectral collocation on the problem's own
residual (:func:`~flowdiff.pde.collocation.collocation_solve`; no user solver needed; a problem's ``reference``
solver in more than one dimension), a small network fits a heteroscedastic error scale
:math:`s(x;z,w) = |D(x)|\,e^{g(x,z,w)}` by Gaussian likelihood on three quarters of them, and one factor :math:`\kappa`
chosen on the other quarter (split conformal, Vovk et al. 2005; Lei et al. 2018) makes the central 95 % interval
cover 95 % of held-out points. ``predict``'s std is :math:`\kappa\sqrt{D^2(\sigma^2 + \|C\|^2) + s^2}`.

**Inverse.** :meth:`RGNP.invert` (amortised, GICNet, any grid), :meth:`RGNP.posterior` (random-walk Metropolis
on z with the Gaussian predictive plus sensor noise as a surrogate likelihood).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..nn.gicnet import GICNet
from .mcmc import PriorModel, sample_posterior
from .problem import Problem, check_known_inputs

__all__ = ["RGNP", "ForwardNet", "NonFiniteTrainingError"]


class NonFiniteTrainingError(RuntimeError):
    """The ELBO became NaN or infinite during ``fit``."""


class ForwardNet(nn.Module):
    """Fourier-feature MLP: (x, z, w) -> per point and field (mean, variance, low-rank factor row)."""

    def __init__(self, dim: int, fields: int, cond: int, *, rank: int = 0, width: int = 128, depth: int = 4,
                 frequencies: int = 16, max_frequency: float = 4.0, min_variance: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.fields, self.rank, self.min_variance = dim, fields, rank, float(min_variance)
        freqs = torch.logspace(math.log10(0.25), math.log10(max_frequency), frequencies) if frequencies else torch.zeros(0)
        self.register_buffer("freqs", freqs)
        features = dim * (1 + 2 * frequencies) + cond
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(features if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, fields * (2 + rank)))
        self.mlp = nn.Sequential(*layers)

    def forward(self, xn: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """xn (B, N, d) in [-1, 1]^d, cond (B, m) standardised -> mean (B,N,c), var (B,N,c), factor (B,N,c,k)|None."""
        angles = math.pi * xn[..., None] * self.freqs  # (B, N, d, F)
        feats = [xn, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2),
                 cond[:, None, :].expand(-1, xn.shape[1], -1)]
        out = self.mlp(torch.cat(feats, dim=-1))
        c, k = self.fields, self.rank
        mean = out[..., :c]
        var = self.min_variance + (1 - self.min_variance) * torch.sigmoid(out[..., c:2 * c] - 8.0)
        factor = out[..., 2 * c:].reshape(*out.shape[:2], c, k) * 0.1 if k else None
        return mean, var, factor


class ChebyshevNet(nn.Module):
    r"""Spectral forward net: an MLP of (z, w) gives the coefficients of a tensor Chebyshev basis in x.

    :math:`\mu(x) = \sum_k a_k(z,w)\,T_k(\hat x)` (and likewise the raw variance and the low-rank factor), so the
    derivatives in x that the residual takes go through the analytic basis only, never back through the MLP, and
    the MLP runs once per instance instead of once per point (ours; a DeepONet with a fixed Chebyshev trunk, Lu et
    al. 2021, *Learning nonlinear operators via DeepONet*).
    """

    def __init__(self, dim: int, fields: int, cond: int, *, rank: int = 0, width: int = 128, depth: int = 4,
                 degree: int = 24, min_variance: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.fields, self.rank, self.min_variance, self.degree = dim, fields, rank, float(min_variance), degree
        self.modes = degree**dim
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(cond if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, self.modes * fields * (2 + rank)))
        self.mlp = nn.Sequential(*layers)
        # spectral decay at initialisation: high modes start small
        with torch.no_grad():
            k = torch.arange(degree, dtype=torch.float32)
            decay = 1.0 / (1 + k) ** 2
            for _ in range(dim - 1):
                decay = (decay[:, None] * (1.0 / (1 + k) ** 2)[None]).flatten()
            self.register_buffer("decay", decay.repeat(fields * (2 + rank)))

    def basis(self, xn: Tensor) -> Tensor:
        theta = torch.arccos(xn.clamp(-1 + 1e-6, 1 - 1e-6))  # (B, N, d)
        per_axis = torch.cos(theta[..., None] * torch.arange(self.degree, dtype=xn.dtype, device=xn.device))
        out = per_axis[..., 0, :]
        for j in range(1, self.dim):
            out = (out[..., :, None] * per_axis[..., j, None, :]).flatten(-2)
        return out  # (B, N, K^d)

    def forward(self, xn: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        coef = (self.mlp(cond) * self.decay.to(cond)).reshape(cond.shape[0], self.fields * (2 + self.rank), self.modes)
        out = torch.einsum("bnm,bjm->bnj", self.basis(xn), coef)
        c, k = self.fields, self.rank
        mean = out[..., :c]
        var = self.min_variance + (1 - self.min_variance) * torch.sigmoid(out[..., c:2 * c] - 8.0)
        factor = out[..., 2 * c:].reshape(*out.shape[:2], c, k) * 0.1 if k else None
        return mean, var, factor


class RGNP:
    """Random Grid Neural Process for a :class:`~flowdiff.pde.Problem` (Vadeboncoeur et al., ICML 2023).

    Arguments:
        problem: the parametric PDE.
        family: ``"diag"``, ``"lowrank"`` (rank ``rank``) or ``"deterministic"`` (a PINN-style baseline: mean only,
            mean-squared residual, no variance; the calibration still gives it an error bar).
        points: collocation points per instance and step (fresh uniform draws; ``grid="fixed"`` gives the
            fixed-grid PDDLVM baseline, the same ``points`` evenly spaced for every instance and step).
        batch: instances per step; steps: optimiser steps (Adam, cosine-decayed learning rate from ``lr``).
        noise: the virtual-observation scale :math:`\\varepsilon_r` (a float), ``"learned"`` (initial 1, the paper's
            Burgers setting) or ``"auto"`` (1 % of the residual of the lift alone: 0.015 for the Poisson problem,
            near the paper's 0.01; the learned scale let the sample variance swamp the residual in our runs).
        inverse: train the GICNet amortised inverse alongside.
        calibration: number of instances solved to calibrate the std (0: none); ``calibration_points`` each.
        net: ``"chebyshev"`` (default: an MLP of (z, w) gives the coefficients of a tensor Chebyshev basis of
            ``degree`` modes per axis, default 32 / 16 / 8 in 1 / 2 / 3 dimensions) or ``"fourier"`` (the paper's
            Fourier-feature MLP over (x, z, w): ``frequencies`` geometric from 0.25 to ``max_frequency``).
        width, depth: the MLP.
        inverse_grid: points per axis of GICNet's latent grid (default 20 / 10 / 6 in 1 / 2 / 3 dimensions; the 3-D
            convolutions on a 10³ grid cost twice the forward model's step).
        device, dtype: where and in which precision to train.
    """

    def __init__(self, problem: Problem, *, family: str = "diag", rank: int = 2, points: int = 32, batch: int = 64,
                 steps: int = 6000, lr: float = 2e-3, noise="auto", grid: str = "random", inverse: bool = True,
                 calibration: int = 64, calibration_points: int = 64, width: int = 128, depth: int = 4,
                 frequencies: int = 16, max_frequency: float = 4.0, min_variance: float = 1e-6, margin: float = 1e-5,
                 net: str = "chebyshev", degree: Optional[int] = None, inverse_grid: Optional[int] = None,
                 device="cpu", dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a flowdiff.pde.Problem, got {type(problem).__name__}")
        if family not in ("diag", "lowrank", "deterministic"):
            raise ValueError(f"family must be 'diag', 'lowrank' or 'deterministic', got {family!r}")
        if grid not in ("random", "fixed"):
            raise ValueError(f"grid must be 'random' or 'fixed', got {grid!r}")
        for label, value, low in (("rank", rank, 1), ("points", points, 2), ("batch", batch, 1), ("steps", steps, 0),
                                  ("calibration", calibration, 0), ("calibration_points", calibration_points, 4)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if not (noise in ("learned", "auto") or (isinstance(noise, (int, float)) and noise > 0)):
            raise ValueError(f"noise must be a positive float, 'auto' or 'learned', got {noise!r}")
        if inverse_grid is not None and (not isinstance(inverse_grid, int) or isinstance(inverse_grid, bool) or inverse_grid < 2):
            raise ValueError(f"inverse_grid must be an integer >= 2 or None, got {inverse_grid!r}")
        if net not in ("fourier", "chebyshev"):
            raise ValueError(f"net must be 'fourier' or 'chebyshev', got {net!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.problem = problem
        self.config = dict(family=family, rank=rank, points=points, batch=batch, steps=steps, lr=lr, noise=noise,
                           grid=grid, inverse=inverse, calibration=calibration, calibration_points=calibration_points,
                           width=width, depth=depth, frequencies=frequencies, max_frequency=max_frequency,
                           min_variance=min_variance, margin=margin, net=net, degree=degree,
                           inverse_grid=inverse_grid)
        self.device = torch.device(device)
        self.dtype = dtype
        self.fields = problem.n_fields()
        self.net: Optional[ForwardNet] = None
        self.beta: Optional[GICNet] = None
        self.error_net: Optional[nn.Module] = None
        self.kappa = 1.0
        self.history: dict = {}
        self.fitted = False

    # ------------------------------------------------------------------------------------------
    # building blocks
    # ------------------------------------------------------------------------------------------
    def _build(self, generator: torch.Generator) -> None:
        cfg, p = self.config, self.problem
        z, w = p.sample_params(4096, generator)
        cond = torch.cat([z, w], dim=1).double()
        self.cond_mean = cond.mean(0).to(self.device, self.dtype)
        self.cond_std = cond.std(0).clamp_min(1e-8).to(self.device, self.dtype)
        self.z_mean, self.z_std = self.cond_mean[:p.dz], self.cond_std[:p.dz]
        rank = cfg["rank"] if cfg["family"] == "lowrank" else 0
        if cfg["net"] == "chebyshev":
            degree = cfg["degree"] or {1: 32, 2: 16}.get(p.dim, 8)
            self.net = ChebyshevNet(p.dim, self.fields, p.dz + p.dw, rank=rank, width=cfg["width"], depth=cfg["depth"],
                                    degree=degree, min_variance=cfg["min_variance"]).to(self.device, self.dtype)
        else:
            self.net = ForwardNet(p.dim, self.fields, p.dz + p.dw, rank=rank, width=cfg["width"], depth=cfg["depth"],
                                  frequencies=cfg["frequencies"], max_frequency=cfg["max_frequency"],
                                  min_variance=cfg["min_variance"]).to(self.device, self.dtype)
        self.log_noise = nn.Parameter(torch.zeros((), device=self.device, dtype=self.dtype))
        if cfg["inverse"]:
            grid = cfg.get("inverse_grid") or {1: 20, 2: 10}.get(p.dim, 6)
            self.beta = GICNet(p.dim, self.fields, p.dz, p.dw, channels=16, grid=grid,
                               conv_channels=16, conv_layers=4 if p.dim < 3 else 2, hidden=128,
                               max_bandwidth=2.0).to(self.device, self.dtype)

    def _lo_hi(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.problem.lo.to(like), self.problem.hi.to(like)

    def _normalise_x(self, x: Tensor) -> Tensor:
        lo, hi = self._lo_hi(x)
        return 2 * (x - lo) / (hi - lo) - 1

    def _cond(self, z: Tensor, w: Tensor) -> Tensor:
        return (torch.cat([z, w], dim=1) - self.cond_mean) / self.cond_std

    def _outputs(self, z, w, x):
        return self.net(self._normalise_x(x), self._cond(z, w))

    def _fixed_grid(self, n: int) -> Tensor:
        p = self.problem
        per_axis = max(2, round(n ** (1.0 / p.dim)))
        axes = [torch.linspace(float(a), float(b), per_axis + 2, dtype=torch.float64)[1:-1] for a, b in p.domain]
        mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, p.dim)
        return mesh.to(self.device, self.dtype)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def elbo(self, z: Tensor, w: Tensor, x: Tensor, generator: Optional[torch.Generator] = None) -> dict:
        """The per-instance ELBO terms on grids ``x`` (B, N, d) (see the module docstring); x must require grad."""
        cfg, p = self.config, self.problem
        b, n = x.shape[:2]
        mean, var, factor = self._outputs(z, w, x)
        family = cfg["family"]
        if family == "deterministic":
            ut = mean
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            ut = mean + var.sqrt() * eps
            if factor is not None:
                eta = torch.randn(b, factor.shape[-1], generator=generator, dtype=mean.dtype).to(mean.device)
                ut = ut + torch.einsum("bnck,bk->bnc", factor, eta)
        u_field = ut[..., 0] if self.fields == 1 else ut
        u = p.compose(u_field, x, w)
        r = p.residual(u, x, z, w)
        k = r.shape[-1]
        terms: dict = {"residual_ms": (r.detach() ** 2).mean(dim=(1, 2))}
        if family == "deterministic":
            terms["loss"] = (r**2).mean()
            terms["u_tilde"] = ut
            return terms
        log_noise = self.log_noise if cfg["noise"] == "learned" else torch.tensor(math.log(self.noise_value)).to(r)
        physics = -0.5 * (r**2).sum(dim=(1, 2)) * torch.exp(-2 * log_noise) - n * k * log_noise
        if factor is None:
            log_q = -0.5 * (eps**2).sum(dim=(1, 2)) - 0.5 * torch.log(var).sum(dim=(1, 2))
        else:
            v = (ut - mean).reshape(b, -1)
            d = var.reshape(b, -1)
            c = factor.reshape(b, -1, factor.shape[-1])
            log_q = _lowrank_log_density(v, d, c)
        terms.update(physics=physics, log_q=log_q, u_tilde=ut)
        terms["loss"] = -(physics - log_q).mean() / n
        return terms

    def _auto_noise(self, gen: torch.Generator) -> float:
        """``noise="auto"``: 1 % of the RMS residual of the lift alone (u~ = 0), the paper's 0.01 for the Poisson."""
        p = self.problem
        z, w = p.sample_params(64, gen)
        x = p.uniform_points(64, 32, gen, margin=0.01).requires_grad_(True)
        zero = torch.zeros(64, 32) if self.fields == 1 else torch.zeros(64, 32, self.fields)
        r = p.residual(p.compose(zero, x, w.float()), x, z.float(), w.float()).detach()
        rms = float(r.pow(2).mean().sqrt())
        return 0.01 * rms if math.isfinite(rms) and rms > 0 else 0.01

    def data_log_likelihood(self, z: Tensor, w: Tensor, x: Tensor, y: Tensor, noise: float) -> Tensor:
        r"""Closed-form log marginal likelihood (B,) of noisy sensor readings under the ELBO's Gaussian (no calibration).

        :math:`\log N(y;\, B + D\mu,\; D(\mathrm{diag}\,\sigma^2 + CC^\top)D + s^2 I)` over all points and fields of an
        instance, by the Woodbury identity and the determinant lemma in the low-rank family (:math:`O(Nk^2)`), the
        paper's data term (RGNP §3, "physics and data"). Differentiable in the network's parameters.
        """
        mean, var, factor = self._outputs(z, w, x)
        fac = self._factor(x)
        lift = self.problem.lift(x, w)
        lift = lift.unsqueeze(-1) if lift.ndim == 2 else lift
        y = y.reshape(mean.shape)
        b = mean.shape[0]
        v = (y - lift - fac * mean).reshape(b, -1)
        var = torch.zeros_like(var) if self.config["family"] == "deterministic" else var
        d = (fac**2 * var).reshape(b, -1) + float(noise) ** 2
        n = v.shape[1]
        if factor is None:
            out = -0.5 * ((v**2 / d).sum(-1) + torch.log(d).sum(-1))
        else:
            c = (fac[..., None] * factor).reshape(b, n, -1)
            out = _lowrank_log_density(v, d, c)
        return out - 0.5 * n * math.log(2 * math.pi)

    def _check_data(self, data, data_noise):
        p = self.problem
        if not (isinstance(data, (tuple, list)) and len(data) == 4):
            raise TypeError("data must be a tuple (z, w, x, y) of tensors: z (M, dz), w (M, dw), x (M, N, d), y (M, N[, c])")
        z, w, x, y = data
        for label, value in (("z", z), ("w", w), ("x", x), ("y", y)):
            if not isinstance(value, Tensor):
                raise TypeError(f"data {label} must be a tensor, got {type(value).__name__}")
            if not torch.isfinite(value).all():
                raise ValueError(f"data {label} must be finite")
        x = self._as_points(x)
        m, n = x.shape[:2]
        if tuple(z.shape) != (m, p.dz):
            raise ValueError(f"data z must have shape ({m}, {p.dz}), got {tuple(z.shape)}")
        w = self._as_w(w, m)
        if y.shape[:2] != (m, n) or y.numel() != m * n * self.fields:
            raise ValueError(f"data y must have shape ({m}, {n}) (one value per point and field), got {tuple(y.shape)}")
        p.check_points(x, "data x")
        if not (isinstance(data_noise, (int, float)) and not isinstance(data_noise, bool) and math.isfinite(data_noise)
                and data_noise > 0):
            raise ValueError(f"data_noise must be a finite number > 0 with data, got {data_noise!r}")
        return (z.to(self.device, self.dtype), w.to(self.device, self.dtype), x.to(self.device, self.dtype),
                y.to(self.device, self.dtype).reshape(m, n, self.fields))

    def fit(self, seed: int = 0, *, steps: Optional[int] = None, progress: Optional[Callable[[int, int, dict], None]] = None,
            verbose: bool = False, data: Optional[tuple] = None, data_noise: Optional[float] = None) -> "RGNP":
        """Train on the physics (fresh random grids every step), then calibrate. Returns ``self``.

        ``data=(z, w, x, y)`` with ``data_noise`` (the readings' noise std) adds the optional data term: every step,
        a minibatch of ``batch`` of these M instances contributes its closed-form log marginal likelihood
        (:meth:`data_log_likelihood`) per point, next to the physics ELBO per point.
        """
        cfg, p = self.config, self.problem
        steps = cfg["steps"] if steps is None else int(steps)
        if data is not None:
            data = self._check_data(data, data_noise)
        gen = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        self._build(gen)
        self.noise_value = self._auto_noise(gen) if cfg["noise"] == "auto" else (
            1.0 if cfg["noise"] == "learned" else float(cfg["noise"]))
        params = list(self.net.parameters())
        if cfg["noise"] == "learned" and cfg["family"] != "deterministic":
            params.append(self.log_noise)
        opt = torch.optim.Adam(params, lr=cfg["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps), eta_min=cfg["lr"] * 0.01)
        opt_beta = torch.optim.Adam(self.beta.parameters(), lr=1e-3) if self.beta is not None else None
        fixed = self._fixed_grid(cfg["points"]) if cfg["grid"] == "fixed" else None
        start, cpu0 = time.perf_counter(), time.process_time()
        losses = []
        self.history = {"grids": []}
        for step in range(steps):
            z, w = p.sample_params(cfg["batch"], gen)
            z, w = z.to(self.device, self.dtype), w.to(self.device, self.dtype)
            if fixed is None:
                x = p.uniform_points(cfg["batch"], cfg["points"], gen, margin=cfg["margin"], dtype=self.dtype,
                                     device=self.device)
            else:
                x = fixed.expand(cfg["batch"], -1, -1).clone()
            if step < 2:
                self.history["grids"].append(x.detach().clone())
            x.requires_grad_(True)
            terms = self.elbo(z, w, x, gen)
            loss = terms["loss"]
            if data is not None:
                idx = torch.randint(0, data[0].shape[0], (min(cfg["batch"], data[0].shape[0]),), generator=gen)
                ll = self.data_log_likelihood(data[0][idx], data[1][idx], data[2][idx], data[3][idx], data_noise)
                data_loss = -ll.mean() / (data[2].shape[1] * self.fields)
                loss = loss + data_loss
                self.history.setdefault("data_nll", []).append(float(data_loss.detach()))
            if not torch.isfinite(loss):
                raise NonFiniteTrainingError(f"the ELBO became non-finite at step {step} (loss {float(loss)}); "
                                             "try a smaller lr or check the residual")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if self.beta is not None:
                ut = terms["u_tilde"].detach()
                m, v = self.beta(self._normalise_x(x.detach()), ut, (w - self.cond_mean[p.dz:]) / self.cond_std[p.dz:])
                zn = (z - self.z_mean) / self.z_std
                beta_loss = 0.5 * (((zn - m) ** 2) / v + torch.log(v)).sum(-1).mean()
                opt_beta.zero_grad(set_to_none=True)
                beta_loss.backward()
                opt_beta.step()
            losses.append(float(terms["residual_ms"].mean()))
            if progress is not None:
                progress(step + 1, steps, {"residual_ms": losses[-1]})
            if verbose and (step % 500 == 0 or step == steps - 1):
                print(f"step {step} residual_ms {sum(losses[-100:]) / len(losses[-100:]):.3e} "
                      f"noise {float(self.log_noise.detach().exp()):.3e} t={time.perf_counter() - start:.0f}s", flush=True)
        self.history.update(residual_ms=losses, train_seconds=time.perf_counter() - start,
                            train_cpu_seconds=time.process_time() - cpu0)
        self.fitted = True
        if cfg["calibration"] > 0:
            self.calibrate(cfg["calibration"], generator=gen, points=cfg["calibration_points"])
        self.history["total_cpu_seconds"] = time.process_time() - cpu0
        return self

    # ------------------------------------------------------------------------------------------
    # calibration
    # ------------------------------------------------------------------------------------------
    def _solve_for_calibration(self, z: Tensor, w: Tensor) -> Callable[[Tensor], Tensor]:
        p = self.problem
        if p.dim == 1 and self.fields == 1:
            from .collocation import collocation_solve

            def initial(x):
                with torch.no_grad():
                    mean, _, _ = self._outputs(z.to(self.device, self.dtype), w.to(self.device, self.dtype),
                                               x.to(self.device, self.dtype))
                return mean[..., 0].cpu()

            try:
                sol = collocation_solve(p, z, w, initial=initial)
            except (RuntimeError, TypeError):  # a residual written for float32 only
                sol = collocation_solve(p, z, w, initial=initial, dtype=torch.float32, tol=1e-6)
            self.history["calibration_converged"] = int(sol.converged.sum())
            keep = sol.converged

            def solution(x):
                return sol(x.double()).detach()

            return solution, keep
        if p.reference is None:
            raise ValueError(f"calibration of a {p.dim}-D problem needs problem.reference; pass calibration=0")
        return (lambda x: torch.as_tensor(p.reference(z, w, x)).double()), torch.ones(z.shape[0], dtype=torch.bool)

    def calibrate(self, n: int = 64, *, generator: Optional[torch.Generator] = None, points: int = 64,
                  solution: Optional[Callable] = None, params: Optional[tuple] = None) -> dict:
        """Fit the error scale and the conformal factor on ``n`` solved instances (see the module docstring).

        ``solution(x) -> u`` and ``params=(z, w)`` may be given (e.g. solver data); otherwise the instances are
        drawn from the prior and solved here. Returns a dict of coverage before/after on the held-out quarter.
        """
        self._require_fit()
        p = self.problem
        gen = generator or torch.Generator().manual_seed(1)
        if params is None:
            z, w = p.sample_params(n, gen)
        else:
            z, w = params
        t0 = time.process_time()
        if solution is None:
            solution, keep = self._solve_for_calibration(z.double(), w.double())
        else:
            keep = torch.ones(z.shape[0], dtype=torch.bool)
        x = p.uniform_points(z.shape[0], points, gen, margin=0.01, dtype=torch.float64)
        truth = solution(x).to(self.dtype)
        if truth.ndim == 2:
            truth = truth.unsqueeze(-1)
        solve_cpu = time.process_time() - t0
        keep = keep & torch.isfinite(truth).flatten(1).all(1)
        z, w, x, truth = z[keep].to(self.dtype), w[keep].to(self.dtype), x[keep].to(self.dtype), truth[keep]
        if z.shape[0] < 8:
            raise ValueError(f"calibration needs at least 8 solved instances, got {z.shape[0]} of {n}")
        with torch.no_grad():
            mean_u, model_var = self._predictive_u(z, w, x)
        err = truth - mean_u
        fac = self._factor(x).abs()
        m = z.shape[0]
        n_fit = max(4, (3 * m) // 4)
        feats = self._error_features(z, w, x)
        self.error_net = nn.Sequential(nn.Linear(feats.shape[-1], 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(),
                                       nn.Linear(32, self.fields)).to(self.dtype)
        with torch.no_grad():
            scale0 = (err[:n_fit] / fac[:n_fit].clamp_min(1e-3)).abs().mean((0, 1)).clamp_min(1e-8)
            self.error_net[-1].bias.copy_(torch.log(scale0))
            self.error_net[-1].weight.mul_(0.1)
        opt = torch.optim.Adam(self.error_net.parameters(), lr=3e-3, weight_decay=1e-4)
        valid = (fac > 1e-6)
        for _ in range(400):
            s = fac[:n_fit] * torch.exp(self.error_net(feats[:n_fit]))
            var = model_var[:n_fit] + s**2 + 1e-20
            nll = 0.5 * (err[:n_fit] ** 2 / var + torch.log(var))
            loss = nll[valid[:n_fit]].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            held = slice(n_fit, m)
            s = fac[held] * torch.exp(self.error_net(feats[held]))
            std = (model_var[held] + s**2).sqrt()
            ratio = (err[held].abs() / std.clamp_min(1e-30))[valid[held]]
            raw_std = model_var[held].sqrt()
            before = float((err[held].abs() <= 1.96 * raw_std)[valid[held]].float().mean())
            self.kappa = float(torch.quantile(ratio.double(), 0.95) / 1.96) if ratio.numel() else 1.0
            after = float((ratio <= 1.96 * self.kappa).float().mean())
        info = {"instances": m, "coverage_95_uncalibrated": before, "coverage_95_calibrated_heldout": after,
                "kappa": self.kappa, "solve_cpu_seconds": solve_cpu,
                "mean_rel_l2": float((err.flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)).median())}
        self.history["calibration"] = info
        return info

    def _error_features(self, z, w, x):
        xn = self._normalise_x(x)
        return torch.cat([xn, self._cond(z, w)[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)

    def _factor(self, x: Tensor) -> Tensor:
        f = self.problem.factor(x)
        return f.unsqueeze(-1) if f.ndim == 2 else f.expand(*x.shape[:2], self.fields)

    # ------------------------------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------------------------------
    def _predictive_u(self, z: Tensor, w: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B,N,c) and the ELBO's own marginal variance (B,N,c) of u = B + D u~."""
        mean, var, factor = self._outputs(z, w, x)
        fac = self._factor(x)
        lift = self.problem.lift(x, w)
        lift = lift.unsqueeze(-1) if lift.ndim == 2 else lift
        if self.config["family"] == "deterministic":
            var = torch.zeros_like(var)
        if factor is not None:
            var = var + (factor**2).sum(-1)
        return lift + fac * mean, fac**2 * var

    def predict_fields(self, z: Tensor, w: Tensor, x: Tensor, calibrated: bool = True) -> tuple[Tensor, Tensor]:
        """Mean and std (B, N, c) of every field (see :meth:`predict`)."""
        self._require_fit()
        z, w, x = self._check_inputs(z, w, x)
        means, stds = [], []
        with torch.no_grad():
            for zc, wc, xc in zip(z.split(256), w.split(256), x.split(256)):
                mean, var = self._predictive_u(zc, wc, xc)
                if calibrated and self.error_net is not None:
                    s = self._factor(xc).abs() * torch.exp(self.error_net(self._error_features(zc, wc, xc)))
                    var = self.kappa**2 * (var + s**2)
                means.append(mean)
                stds.append(var.sqrt())
        return torch.cat(means), torch.cat(stds)

    def predict(self, z: Tensor, w: Tensor, x: Tensor, calibrated: bool = True) -> tuple[Tensor, Tensor]:
        """Predictive mean and marginal std of u at points ``x`` (B, N, d) for parameters z (B, dz), w (B, dw).

        Returns ``(mean, std)``, (B, N) each ((B, N, c) for several fields), in ``x``'s dtype. ``calibrated=False``
        gives the ELBO's own std (no model error).
        """
        out_dtype = x.dtype if isinstance(x, Tensor) and x.is_floating_point() else self.dtype
        mean, std = self.predict_fields(z, w, x, calibrated)
        if self.fields == 1:
            mean, std = mean[..., 0], std[..., 0]
        return mean.to(out_dtype), std.to(out_dtype)

    def sample(self, z: Tensor, w: Tensor, x: Tensor, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Joint samples (n, B, N[, c]) of u at ``x`` from the closed-form Gaussian (low-rank correlations included;
        the calibration's error term is added as independent noise)."""
        self._require_fit()
        z, w, x = self._check_inputs(z, w, x)
        with torch.no_grad():
            mean, var, factor = self._outputs(z, w, x)
            fac = self._factor(x)
            lift = self.problem.lift(x, w)
            lift = lift.unsqueeze(-1) if lift.ndim == 2 else lift
            eps = torch.randn((n,) + mean.shape, generator=generator, dtype=mean.dtype)
            ut = mean + var.sqrt() * eps if self.config["family"] != "deterministic" else mean.expand(n, *mean.shape)
            if factor is not None:
                eta = torch.randn(n, z.shape[0], factor.shape[-1], generator=generator, dtype=mean.dtype)
                ut = ut + torch.einsum("bnck,sbk->sbnc", factor, eta)
            u = lift + fac * ut
            if self.error_net is not None:
                s = fac.abs() * torch.exp(self.error_net(self._error_features(z, w, x)))
                total = self.kappa**2 * (fac**2 * var + s**2)
                extra = (total - fac**2 * var).clamp_min(0).sqrt()
                u = u + extra * torch.randn(u.shape, generator=generator, dtype=u.dtype)
        return u[..., 0] if self.fields == 1 else u

    # ------------------------------------------------------------------------------------------
    # inverse problems
    # ------------------------------------------------------------------------------------------
    def invert(self, x: Tensor, u: Tensor, w: Tensor, min_factor: float = 0.05) -> tuple[Tensor, Tensor]:
        """Amortised inverse (GICNet): the field ``u`` (B, N[, c]) seen at points ``x`` (B, N, d) -> Gaussian over z.

        Points where :math:`|D(x)| <` ``min_factor`` times its maximum are dropped (there :math:`\\tilde u = (u-B)/D`
        is ill-conditioned, the paper's pitfall with noisy data). Returns ``(mean, std)`` (B, dz).
        """
        self._require_fit()
        if self.beta is None:
            raise ValueError("this model was fitted with inverse=False; there is no amortised inverse")
        p = self.problem
        x = self._as_points(x)
        if u.ndim == 2:
            u = u.unsqueeze(-1)
        w = self._as_w(w, x.shape[0])
        if u.shape[:2] != x.shape[:2]:
            raise ValueError(f"u {tuple(u.shape)} must match x {tuple(x.shape)} in (B, N)")
        p.check_points(x, "x")
        x, u, w = x.to(self.device, self.dtype), u.to(self.device, self.dtype), w.to(self.device, self.dtype)
        fac = self._factor(x)
        lift = p.lift(x, w)
        lift = lift.unsqueeze(-1) if lift.ndim == 2 else lift
        mask = (fac.abs() >= min_factor * fac.abs().amax()).all(-1)
        ut = torch.where(mask[..., None], (u - lift) / torch.where(mask[..., None], fac, torch.ones_like(fac)),
                         torch.zeros_like(u))
        with torch.no_grad():
            m, v = self.beta(self._normalise_x(x), ut, (w - self.cond_mean[p.dz:]) / self.cond_std[p.dz:], mask)
        return m * self.z_std + self.z_mean, v.sqrt() * self.z_std

    def log_likelihood(self, z: Tensor, w: Tensor, x_obs: Tensor, y_obs: Tensor, noise) -> Tensor:
        """Surrogate log-likelihood log N(y; mean(z), diag(std^2) + noise^2) for z (B, C, dz) -> (B, C)."""
        b, c, dz = z.shape
        flat_z = z.reshape(b * c, dz).to(self.dtype)
        flat_w = w.repeat_interleave(c, 0)
        flat_x = x_obs.repeat_interleave(c, 0)
        mean, std = self.predict_fields(flat_z, flat_w, flat_x)
        mean, std = mean.reshape(b, c, *mean.shape[1:]), std.reshape(b, c, *std.shape[1:])
        y = y_obs.reshape(b, 1, *mean.shape[2:])
        nz = noise.reshape(b, 1, -1, 1) if noise.ndim == 2 else noise.reshape(b, 1, 1, 1)
        var = std**2 + nz**2
        return (-0.5 * ((y - mean) ** 2 / var + torch.log(var))).sum(dim=(2, 3)).double()

    def posterior(self, x_obs: Tensor, y_obs: Tensor, w: Tensor, noise, n: int = 256, *,
                  generator: Optional[torch.Generator] = None, chains: int = 32, burn_in: int = 500, thin: int = 10,
                  prior_draws: int = 4096) -> Tensor:
        """Posterior samples of z (n, B, dz) from sparse noisy sensors, all B cases in one call.

        Arguments:
            x_obs: sensor locations (B, M, d) (or (B, M) in 1-D), inside the domain.
            y_obs: readings (B, M) (or (B, M, c)).
            w: known inputs (B, dw).
            noise: sensor noise standard deviation, > 0 (a float, or a tensor (B,) or (B, M)).
            n: samples per case.

        The likelihood is the model's Gaussian predictive at the sensors (calibrated std, so the model error is
        counted) plus the sensor noise; the prior is the problem's (``log_prior``, ``support``, or estimated from
        ``sample_params`` draws: :class:`~flowdiff.pde.mcmc.PriorModel`). Sampling: importance-resampled prior
        draws, then adaptive random-walk Metropolis (``chains`` per case), the proposal covariance re-estimated from the pooled chains every 50 burn-in steps. ``self.last_posterior`` holds the
        acceptance rate and the number of likelihood evaluations.
        """
        self._require_fit()
        p = self.problem
        x_obs = self._as_points(x_obs)
        b, m = x_obs.shape[:2]
        p.check_points(x_obs, "sensor locations x_obs")
        if not isinstance(y_obs, Tensor):
            raise TypeError(f"y_obs must be a tensor, got {type(y_obs).__name__}")
        expected = (b, m) if self.fields == 1 else (b, m, self.fields)
        if tuple(y_obs.shape) != expected and not (self.fields == 1 and tuple(y_obs.shape) == (b, m, 1)):
            raise ValueError(f"y_obs must have shape {expected} to match x_obs {tuple(x_obs.shape)}, got {tuple(y_obs.shape)}")
        if not torch.isfinite(y_obs).all():
            raise ValueError("y_obs must be finite")
        w = self._as_w(w, b)
        noise_t = torch.as_tensor(noise, dtype=torch.float64)
        if noise_t.ndim == 0:
            noise_t = noise_t.expand(b)
        if not (noise_t.shape == (b,) or noise_t.shape == (b, m)):
            raise ValueError(f"noise must be a number, or a tensor of shape ({b},) or ({b}, {m}), got {tuple(noise_t.shape)}")
        if not (torch.isfinite(noise_t).all() and (noise_t > 0).all()):
            raise ValueError(f"noise must be finite and > 0, got min {float(noise_t.min())}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        gen = generator or torch.Generator().manual_seed(0)
        zs, _ = p.sample_params(prior_draws, gen)
        zs = zs.double()
        prior = PriorModel(p, zs)
        x_obs, w = x_obs.to(self.device, self.dtype), w.to(self.device, self.dtype)
        y = y_obs.to(self.device, self.dtype).reshape(b, m, -1)
        noise_t = noise_t.to(self.device, self.dtype)

        def log_likelihood(z: Tensor) -> Tensor:
            return self.log_likelihood(z, w, x_obs, y, noise_t)

        samples, info = sample_posterior(log_likelihood, prior, zs, n, chains=chains, burn_in=burn_in, thin=thin,
                                         generator=gen, cases=b)
        info["prior"] = prior.kind
        self.last_posterior = info
        out_dtype = y_obs.dtype if y_obs.is_floating_point() else self.dtype
        return samples.to(out_dtype)

    # ------------------------------------------------------------------------------------------
    # checks and persistence
    # ------------------------------------------------------------------------------------------
    def _require_fit(self) -> None:
        if not self.fitted:
            raise ValueError("the model is not fitted yet: call fit() first")

    def _as_points(self, x) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"points must be a tensor, got {type(x).__name__}")
        if x.ndim == 2 and self.problem.dim == 1:
            x = x.unsqueeze(-1)
        if x.ndim != 3 or x.shape[-1] != self.problem.dim:
            raise ValueError(f"points must have shape (B, N, d={self.problem.dim}), got {tuple(x.shape)}")
        return x

    def _as_w(self, w, b: int) -> Tensor:
        return check_known_inputs(w, b, self.problem.dw)

    def _check_inputs(self, z, w, x):
        x = self._as_points(x)
        b = x.shape[0]
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a tensor of shape ({b}, {self.problem.dz}), got {type(z).__name__}")
        if tuple(z.shape) != (b, self.problem.dz):
            raise ValueError(f"z must have shape ({b}, {self.problem.dz}) to match x {tuple(x.shape)}, got {tuple(z.shape)}")
        w = self._as_w(w, b)
        for label, value in (("z", z), ("w", w), ("x", x)):
            if not torch.isfinite(value).all():
                raise ValueError(f"{label} must be finite")
        return z.to(self.device, self.dtype), w.to(self.device, self.dtype), x.to(self.device, self.dtype)

    def state_dict(self) -> dict:
        self._require_fit()
        return {"config": self.config, "net": self.net.state_dict(), "beta": None if self.beta is None else self.beta.state_dict(),
                "error_net": None if self.error_net is None else self.error_net.state_dict(), "kappa": self.kappa,
                "log_noise": self.log_noise.detach(), "noise_value": getattr(self, "noise_value", 1.0), "cond_mean": self.cond_mean, "cond_std": self.cond_std,
                "problem": self.problem.name, "history": {k: v for k, v in self.history.items() if k != "grids"}}

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, problem: Problem) -> "RGNP":
        """Rebuild a saved model for ``problem`` (the same problem it was fitted on)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = cls(problem, **state["config"])
        model._build(torch.Generator().manual_seed(0))
        model.net.load_state_dict(state["net"])
        if state["beta"] is not None:
            model.beta.load_state_dict(state["beta"])
        if state["error_net"] is not None:
            feats = problem.dim + problem.dz + problem.dw
            model.error_net = nn.Sequential(nn.Linear(feats, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(),
                                            nn.Linear(32, model.fields))
            model.error_net.load_state_dict(state["error_net"])
        model.kappa = state["kappa"]
        model.cond_mean, model.cond_std = state["cond_mean"], state["cond_std"]
        model.z_mean, model.z_std = model.cond_mean[:problem.dz], model.cond_std[:problem.dz]
        with torch.no_grad():
            model.log_noise.copy_(state["log_noise"])
        model.history = state["history"]
        model.noise_value = state.get("noise_value", 1.0)
        model.fitted = True
        return model


def _lowrank_log_density(v: Tensor, d: Tensor, c: Tensor) -> Tensor:
    """log N(v; 0, diag(d) + C C^T) up to -n/2 log 2π, batched: v, d (B, n), c (B, n, k); O(n k^2 + k^3)."""
    k = c.shape[-1]
    cd = c / d[..., None]  # D^-1 C
    inner = torch.eye(k, dtype=v.dtype, device=v.device) + c.transpose(1, 2) @ cd  # I + C^T D^-1 C
    chol = torch.linalg.cholesky(inner)
    proj = (cd.transpose(1, 2) @ v[..., None])  # C^T D^-1 v
    sol = torch.cholesky_solve(proj, chol)
    quad = (v**2 / d).sum(-1) - (proj * sol).sum(dim=(1, 2))
    logdet = torch.log(d).sum(-1) + 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1)
    return -0.5 * (quad + logdet)
