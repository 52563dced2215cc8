r"""Posterior sampling over PDE parameters: importance-resampled starts and adaptive random-walk Metropolis,
vectorised over cases and chains.

The target is :math:`\log p(z) + \log p(y\mid z)` for every case ``b``. Chains start from prior draws
resampled by their likelihood weights (a one-step sequential Monte Carlo start, which lands in every mode), and
move by Gaussian random-walk Metropolis whose covariance is the weighted covariance of those draws, with the scale
adapted toward the acceptance rate 0.234 during burn-in (Roberts, Gelman & Gilks, 1997, *Weak convergence and
optimal scaling of random walk Metropolis algorithms*; Haario, Saksman & Tamminen, 2001, *An adaptive Metropolis
algorithm*). Used by :meth:`RGNP.posterior` (surrogate likelihood) and :func:`gold_posterior` (the reference solver
as the forward map).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["sample_posterior", "gold_posterior", "PriorModel"]


class PriorModel:
    """The prior of ``z``: the user's log-density, a uniform box, or a Gaussian kernel density of prior draws.

    ``draws`` (P, dz) come from ``sample_params``; when no density is known, the draws decide: a box prior when
    every coordinate looks uniform on its range (Kolmogorov distance < 0.03), else a diagonal-bandwidth Gaussian
    kernel density estimate (Scott's rule) of 2,048 of them.
    """

    def __init__(self, problem, draws: Tensor) -> None:
        self.problem = problem
        self.kind = "user"
        self.box = None
        if problem.log_prior_fn is None and problem.support is None:
            d = draws.double()
            lo, hi = d.min(0).values, d.max(0).values
            n = d.shape[0]
            span = (hi - lo).clamp_min(1e-12)
            ks = []
            for j in range(d.shape[1]):
                s = torch.sort((d[:, j] - lo[j]) / span[j]).values
                grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
                ks.append(float((s - grid).abs().max()))
            if max(ks) < 0.03:
                self.kind = "box"
                pad = span / n
                self.box = (lo - pad, hi + pad)
            else:
                self.kind = "kde"
                self.centres = d[:2048]
                m, dz = self.centres.shape
                self.bandwidth = self.centres.std(0) * m ** (-1.0 / (dz + 4))
        elif problem.log_prior_fn is None:
            self.kind = "box"
            self.box = (torch.tensor([a for a, _ in problem.support], dtype=torch.float64),
                        torch.tensor([b for _, b in problem.support], dtype=torch.float64))

    def __call__(self, z: Tensor) -> Tensor:
        """log p(z) up to a constant, shape z.shape[:-1]; -inf outside a box prior."""
        if self.kind == "user":
            flat = z.reshape(-1, z.shape[-1])
            return self.problem.log_prior_fn(flat).reshape(z.shape[:-1]).to(z)
        if self.kind == "box":
            lo, hi = self.box[0].to(z), self.box[1].to(z)
            inside = ((z >= lo) & (z <= hi)).all(-1)
            return torch.where(inside, torch.zeros_like(z[..., 0]), torch.full_like(z[..., 0], -math.inf))
        c = self.centres.to(z)
        h = self.bandwidth.to(z)
        flat = z.reshape(-1, z.shape[-1])
        out = []
        for chunk in flat.split(512):
            q = (((chunk[:, None, :] - c[None]) / h) ** 2).sum(-1)
            out.append(torch.logsumexp(-0.5 * q, dim=-1))
        return torch.cat(out).reshape(z.shape[:-1])


def sample_posterior(log_likelihood: Callable[[Tensor], Tensor], prior: PriorModel, prior_draws: Tensor, n: int, *,
                     chains: int = 32, burn_in: int = 500, thin: int = 10, generator: Optional[torch.Generator] = None,
                     cases: int) -> tuple[Tensor, dict]:
    """Samples (n, B, dz) of :math:`p(z\\mid y_b) \\propto p(z)\\,L_b(z)` for B cases.

    Arguments:
        log_likelihood: ``(B, C, dz) -> (B, C)``, the log-likelihood of every case at C parameter values.
        prior: the prior log-density (:class:`PriorModel`).
        prior_draws: (P, dz) draws of the prior (the starting population).
        n: samples per case; ``chains`` chains run in parallel, each keeps ``ceil(n / chains)`` states ``thin``
            steps apart after ``burn_in`` steps.

    Returns:
        ``(samples (n, B, dz), info)`` with the acceptance rate and the number of likelihood evaluations.
    """
    b = cases
    p, dz = prior_draws.shape
    dtype = prior_draws.dtype
    # importance weights of the prior draws, case by case
    log_w = torch.cat([log_likelihood(chunk.expand(b, -1, -1)) for chunk in prior_draws[None].split(256, dim=1)], dim=1)
    log_w = torch.nan_to_num(log_w, nan=-math.inf)
    weights = torch.softmax(log_w, dim=1)  # (B, P)
    mean = weights @ prior_draws
    centred = prior_draws[None] - mean[:, None]
    cov = torch.einsum("bp,bpi,bpj->bij", weights, centred, centred)
    cov = cov + 1e-10 * torch.eye(dz, dtype=dtype) + 1e-6 * torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    chol = torch.linalg.cholesky(cov)
    idx = torch.multinomial(weights, chains, replacement=True, generator=generator)  # (B, C)
    state = prior_draws[idx]  # (B, C, dz)
    current = prior(state) + log_likelihood(state)
    scale = torch.full((b, 1), 2.38 / math.sqrt(dz), dtype=dtype)
    keep = math.ceil(n / chains)
    total = burn_in + keep * thin
    kept, accepted, evaluations = [], 0.0, p + chains
    window: list[Tensor] = []
    for step in range(total):
        noise = torch.randn(b, chains, dz, generator=generator, dtype=dtype)
        proposal = state + scale[..., None] * torch.einsum("bij,bcj->bci", chol, noise)
        lp = prior(proposal)
        ok = torch.isfinite(lp)
        # proposals outside the prior's support are never passed to the forward map (a solver may fail there)
        ll = log_likelihood(torch.where(ok[..., None], proposal, state))
        ll = torch.where(ok, ll, torch.full_like(ll, -math.inf))
        target = torch.nan_to_num(lp + ll, nan=-math.inf)
        evaluations += chains
        u = torch.rand(b, chains, generator=generator, dtype=dtype)
        accept = torch.log(u) < target - current
        state = torch.where(accept[..., None], proposal, state)
        current = torch.where(accept, target, current)
        rate = accept.to(dtype).mean(1, keepdim=True)
        if step < burn_in:
            scale = scale * torch.exp((rate - 0.234) / math.sqrt(1 + step / 10))
            # adaptive Metropolis (Haario et al. 2001): every 50 steps the proposal covariance becomes that of the
            # chains' recent states (all chains pooled), so directions the importance start missed open up
            window.append(state.clone())
            if len(window) == 50:
                pooled = torch.cat(window, dim=1)  # (B, 50 C, dz)
                centred = pooled - pooled.mean(1, keepdim=True)
                emp = centred.transpose(1, 2) @ centred / (pooled.shape[1] - 1)
                emp = emp + 1e-10 * torch.eye(dz, dtype=dtype) + 1e-6 * torch.diag_embed(torch.diagonal(emp, dim1=1, dim2=2))
                new_chol, info = torch.linalg.cholesky_ex(emp)
                chol = torch.where((info == 0)[:, None, None], new_chol, chol)
                window = []
        else:
            accepted += float(rate.mean())
            if (step - burn_in + 1) % thin == 0:
                kept.append(state.clone())
    samples = torch.stack(kept, dim=0)  # (keep, B, C, dz)
    samples = samples.permute(0, 2, 1, 3).reshape(-1, b, dz)[:n]
    info = {"acceptance": accepted / max(1, total - burn_in), "evaluations": evaluations,
            "ess_start": float((1 / (weights**2).sum(1)).mean())}
    return samples, info


def gold_posterior(problem, x_obs: Tensor, y_obs: Tensor, w: Tensor, noise: float, n: int = 256, *,
                   generator: Optional[torch.Generator] = None, solver: Optional[Callable] = None, chains: int = 16,
                   burn_in: int = 1000, thin: int = 10, prior_draws: int = 4096) -> tuple[Tensor, dict]:
    """The gold posterior of ``z`` from sensor readings, with the reference solver as the forward map.

    Arguments:
        problem: a :class:`~flowdiff.pde.Problem` with a ``reference`` solver (or pass ``solver(z, w, x) -> u``).
        x_obs (B, M, d), y_obs (B, M), w (B, dw): the cases; ``noise``: the sensor noise standard deviation.

    Returns:
        ``(samples (n, B, dz), info)``; ``info["solver_calls"]`` counts forward solves.
    """
    solver = solver or problem.reference
    if solver is None:
        raise ValueError(f"problem {problem.name!r} has no reference solver; pass solver=")
    b = x_obs.shape[0]
    zs, _ = problem.sample_params(prior_draws, generator)
    zs = zs.double()
    prior = PriorModel(problem, zs)
    y = y_obs.double()

    def log_likelihood(z: Tensor) -> Tensor:
        c = z.shape[1]
        u = solver(z.reshape(b * c, -1), w.double().repeat_interleave(c, 0), x_obs.double().repeat_interleave(c, 0))
        u = torch.as_tensor(u, dtype=torch.float64).reshape(b, c, -1)
        return -0.5 * (((u - y[:, None]) / noise) ** 2).sum(-1)

    samples, info = sample_posterior(log_likelihood, prior, zs, n, chains=chains, burn_in=burn_in, thin=thin,
                                     generator=generator, cases=b)
    info["solver_calls"] = info["evaluations"] * b
    return samples, info
