r"""Steering methods: Feynman–Kac SMC, best-of-N, beam search, Rollover Budget Forcing, gradient guidance.

Notation: ``β`` the temperature, :math:`\hat x_j = \hat x(x_{t_j})` the Tweedie estimate at the
``j``-th evaluation time, :math:`r_j = r(\hat x_j)/\beta`. Budgets are in model evaluations per
returned sample (``nfe``); the reward itself is not counted (it is evaluated on estimates the
methods already have).

``smc`` — Feynman–Kac steering (Singhal, Horvitz, Teehan, Ren, Yu, Cho & Ranganath 2025, "A
General Framework for Inference-time Scaling and Steering of Diffusion Models"). ``K`` particles
per returned sample move by the ancestral kernel (DDIM-η, η = 1) of the field — or a
gradient-guided version of it — and carry log-weights updated by a potential :math:`\log G_j`:

* ``diff``: :math:`r_j - r_{j'}` (:math:`j'` the previous potential step) — the twisted SMC
  whose intermediate targets are :math:`p_{t_j}(x)\,e^{r_j}`;
* ``max``: :math:`\max_{i \le j} r_i`; ``add``: :math:`\sum_{i \le j} r_i`; ``rt``: :math:`r_j`
  (sums and maxima over the potential steps of a particle's own ancestry).

Intermediate reward (``twist``): ``"tweedie"`` is :math:`r(\hat x_j)/\beta`, FK steering's choice;
``"gauss"`` (default) is :math:`\log\frac1L\sum_l e^{r(\hat x_j + s_j\odot z_l)/\beta}`, the value of
:math:`\log E[e^{r(x_1)/\beta} \mid x_t]` when the data are Gaussian (posterior
:math:`N(\hat x, s_j^2)`, :math:`s_j^2 = V\sigma_j^2/(\alpha_j^2V + \sigma_j^2)`, ``V`` the per-coordinate
data variance read off the spread of the first estimates, ``L = 16`` draws ``z_l`` shared by all
particles and steps). The Tweedie value is overconfident at high noise — :math:`\hat x` is near the
data mean for every particle, yet a sharp reward separates them by tens of nats — and its weights
collapse (measured: ESS 1e-4 of the population at the first step on the ``midpoint`` problem of
``benchmarks/steer_gmm.py``). The intermediate reward is further *tempered*: at each potential step
it is multiplied by the largest :math:`\gamma_j \le 1` that keeps the conditional ESS of the step
above ``tempering`` (0.8; Jasra et al. 2011, Zhou et al. 2016), so the population follows the twist
only as fast as its weights allow.

A particle keeps the sum :math:`A` of the potentials applied along its ancestry; the final
correction multiplies its weight by :math:`e^{r(x)/\beta - A}`, so the product of all the
potentials a lineage sees is :math:`e^{r(x)/\beta}` and the weighted population targets the
tilted law :math:`p\,e^{r/\beta}/Z` *exactly* for any potential, twist and tempering (as the
particle count grows; :math:`p` the law of the base sampler, the field's own up to
discretisation); these only decide the variance. The population is resampled (systematic, in the
order of the leading principal direction of :math:`\hat x`, so each mode keeps its share to within
one copy) when its ESS falls below ``ess_threshold · K``; ``num_samples`` samples are drawn from
the final weighted population by the same ordered systematic scheme. The budget rule: ``S``
evaluation times, ``K = nfe // S`` particles per sample, ``S ≈ 2√nfe`` clipped to [8, 40]
(the mode weights are decided at high noise and need particles more than steps).
Gradient-guided proposals (``guidance > 0``): the kernel mean is shifted by
:math:`\text{guidance}\cdot\gamma_j v\nabla_{x_t} r(\hat x(x_t))/\beta` and the weight multiplied by
the ratio of the plain to the shifted Gaussian kernel (Wu et al. 2023's TDS proposal), still exact.
Limits (measured): when the reward peaks where the prior has no mass (between two modes), the
twist stays poor and the mode weights are right only to ~0.05-0.1 TV at 1000 evaluations.

``bon`` — best-of-N: ``N = nfe // S`` independent probability-flow ODE trajectories
(DPM-Solver++(2M), ``S`` = 20 evaluations, 10 below a budget of 200) per returned sample, the one
of highest reward kept.

``beam`` — beam search over SDE paths (the greedy family of SVDD, Li et al. 2024, and search over
paths, Ma et al. 2025): ``B`` beams, each step every beam draws ``C`` ancestral children whose
:math:`r(\hat x)` is scored, the ``B`` best children of a sample's beams survive.

``rbf`` — Rollover Budget Forcing (Kim, Yoon, Hwang & Sung 2025, "Inference-Time Scaling for Flow
Models via Stochastic Generation and Rollover Budget Forcing"): ``init`` initial noises, the best
by :math:`r(\hat x)` kept; the remaining budget is split into equal per-step quotas; at each step
children are drawn one at a time by the SDE step (1 evaluation each); the first child whose
:math:`r(\hat x)` beats the best so far is taken at once and the unused quota rolls over to
the next step; if the quota runs out, the best child is taken. "Current best" is the best reward found so far by
the run (as ``best_rewards`` in the paper's code: it never decreases). The last step spends all that is
left and keeps its best child (our choice: the rest would be wasted).

``dps`` — gradient guidance: one ancestral trajectory per sample whose step mean is shifted by
:math:`\text{scale}\cdot v\,\nabla_{x_t} r(\hat x(x_t))/\beta` (``v`` the step variance; the
first-order correction of the kernel toward :math:`p_t e^{r(\hat x)/\beta}`, as in DPS, Chung et
al. 2023, and the TDS proposal, Wu et al. 2023). Not exact; one vector-Jacobian product per
evaluation. ``smc`` takes the same proposal with ``guidance=scale`` and corrects it by the
importance ratio of the two Gaussians, staying exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..fields import Field
from ..particles import effective_sample_size, normalize_log_weights, principal_order, resample, systematic_resample
from .api import Reward, register
from .kernels import MIN_STEPS, Schedule, randn

__all__ = ["plan", "smc", "best_of_n", "beam", "rbf", "dps"]

POTENTIALS = ("diff", "max", "add", "rt")
TWISTS = ("gauss", "tweedie")


# ----------------------------------------------------------------------------------------------
# Budget and option checks
# ----------------------------------------------------------------------------------------------

def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _too_small(nfe: int, need: int, what: str) -> ValueError:
    return ValueError(f"nfe={nfe} is too small for one trajectory: {what} needs at least {need} model evaluations "
                      f"per returned sample (MIN_STEPS={MIN_STEPS})")


def plan(nfe: int, particles: int | None = None, steps: int | None = None) -> tuple[int, int]:
    """Evaluation times ``S`` and particles per returned sample ``K`` of ``smc`` with ``S*K <= nfe``.

    Default ``S = clip(round(2*sqrt(nfe)), 8, 40)`` (at most ``nfe``), ``K = nfe // S``; given one of
    ``particles``/``steps``, the other fills the budget. ``ValueError`` if ``nfe < MIN_STEPS`` or
    the given values do not fit.
    """
    if nfe < MIN_STEPS:
        raise _too_small(nfe, MIN_STEPS, "an SMC trajectory")
    if steps is not None:
        steps = _positive_int("steps", steps, MIN_STEPS)
    if particles is not None:
        particles = _positive_int("particles", particles)
    if particles is not None and steps is not None:
        if steps * particles > nfe:
            raise ValueError(f"steps*particles = {steps}*{particles} = {steps * particles} exceeds the budget nfe={nfe}")
        return steps, particles
    if steps is not None:
        if steps > nfe:
            raise _too_small(nfe, steps, f"a trajectory of steps={steps}")
        return steps, nfe // steps
    if particles is not None:
        s = nfe // particles
        if s < MIN_STEPS:
            raise _too_small(nfe, MIN_STEPS * particles, f"{particles} particles of {MIN_STEPS} steps")
        return min(s, max(MIN_STEPS, 200)), particles
    s = int(min(nfe, max(8, min(40, round(2 * math.sqrt(nfe))))))
    return s, nfe // s


def _check_unknown(name: str, options: dict) -> None:
    if options:
        raise TypeError(f"method {name!r} got unknown option(s): {', '.join(sorted(options))}")


def _denoise(field: Field, x: Tensor, t: float | Tensor, max_batch: int) -> Tensor:
    if x.shape[0] <= max_batch:
        out = field.denoise(x, t)
    else:
        ts = t.split(max_batch) if isinstance(t, Tensor) else [t] * math.ceil(x.shape[0] / max_batch)
        out = torch.cat([field.denoise(xc, tc) for xc, tc in zip(x.split(max_batch), ts)])
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"the field returned {int((~torch.isfinite(out)).sum())} non-finite values")
    return out


def _denoise_with_grad(field: Field, reward: Reward, x: Tensor, t: float, beta: float,
                       max_batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x̂(x)``, ``r(x̂)`` and ``∇_x r(x̂(x))/β`` (one network VJP per row)."""
    hats, rewards, grads = [], [], []
    for xc in x.split(max_batch):
        xg = xc.detach().requires_grad_(True)
        with torch.enable_grad():
            xh = field.denoise(xg, t)
            r = reward._check(reward._eval(xh), xc.shape[0])
            if not r.requires_grad:
                raise TypeError("gradient guidance needs a differentiable reward (its output carries no gradient)")
            (g,) = torch.autograd.grad(r.sum(), xg)
        reward.calls += 1
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"the reward gradient through the field has {int((~torch.isfinite(g)).sum())} "
                                     "non-finite entries")
        hats.append(xh.detach())
        rewards.append(r.detach().to(torch.float64))
        grads.append(g.detach() / beta)
    return torch.cat(hats), torch.cat(rewards), torch.cat(grads)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# Feynman–Kac SMC
# ----------------------------------------------------------------------------------------------

def _temper(log_w: Tensor, r: Tensor, prev: Tensor | None, potential: str, target: float) -> float:
    """The largest ``γ`` in [0, 1] whose potential step keeps the conditional ESS >= ``target``.

    Conditional ESS (Zhou, Johansen & Aston 2016, "Toward automatic model comparison: an adaptive
    sequential Monte Carlo approach") of incremental log-weights ``u``: ``(Σ W e^u)² / Σ W e^{2u}``
    with ``W`` the current normalised weights — adaptive tempering (Jasra, Stephens, Doucet &
    Tsagaris 2011) of the intermediate reward. Only for ``diff`` does the increment depend on γ
    through the previous step (``prev``); for the other potentials it is ``γ r`` itself. When no
    γ reaches the target, the γ of the highest conditional ESS.
    """
    W = normalize_log_weights(log_w.reshape(-1)) if log_w.numel() else None
    grid = torch.linspace(0.0, 1.0, 41, dtype=torch.float64, device=r.device)
    base = prev if prev is not None else torch.zeros_like(r)
    u = grid[:, None] * r[None] - base[None]                     # (41, N)
    u = u - u.amax(1, keepdim=True)
    e = torch.exp(u)
    num = (W[None] * e).sum(1) ** 2
    den = (W[None] * e * e).sum(1)
    cess = num / den
    ok = torch.nonzero(cess >= target).reshape(-1)
    if ok.numel():
        return float(grid[ok[-1]])
    return float(grid[torch.argmax(cess)])


def _prior_variance(flat_hat: Tensor, alpha: float, sigma: float) -> Tensor:
    r"""Per-coordinate data variance ``V`` from the spread of ``x̂`` at one time.

    For Gaussian data :math:`\mathrm{Var}[\hat x] = \alpha^2V^2/(\alpha^2V + \sigma^2)`, solved for ``V``.
    """
    spread = flat_hat.var(0).clamp_min(1e-12) if flat_hat.shape[0] > 1 else torch.ones_like(flat_hat[0])
    return 0.5 * (spread + torch.sqrt(spread**2 + 4 * spread * sigma**2 / alpha**2))


def _gauss_twist(reward: Reward, xhat: Tensor, prior_var: Tensor, alpha: float, sigma: float, base: Tensor,
                 beta: float, max_batch: int) -> Tensor:
    r""":math:`\log \frac1L\sum_l e^{r(\hat x + s\odot z_l)/\beta}`, :math:`s^2 = V\sigma^2/(\alpha^2V + \sigma^2)`, shape ``(N,)``.

    The expectation of :math:`e^{r(x_1)/\beta}` under the Gaussian-data posterior
    :math:`x_1 \mid x_t \sim N(\hat x, \mathrm{diag}(s^2))` by ``L`` common draws ``z_l`` (``base``,
    ``(L, D)``, the same at every step: the twist is then a smooth function of :math:`x_t` and its
    ratios between steps carry no fresh Monte Carlo noise).
    """
    samples = base.shape[0]
    post_std = torch.sqrt(prior_var * sigma**2 / (alpha**2 * prior_var + sigma**2)).to(xhat.dtype)
    z = base * post_std
    flat = _flat(xhat)
    rows_per = max(1, max_batch // samples)
    out = []
    for chunk in flat.split(rows_per):
        pts = (chunk[:, None, :] + z[None]).reshape(-1, *xhat.shape[1:])
        out.append(reward(pts).reshape(chunk.shape[0], samples))
    vals = torch.cat(out) / beta
    return torch.logsumexp(vals, dim=1) - math.log(samples)


@register("fk", kind="sampler", description="alias of 'smc' (Feynman-Kac steering)")
@register("smc", kind="sampler", description="Feynman-Kac steering (Singhal et al. 2025): SMC with potentials "
          "diff/max/add/rt, ESS-triggered systematic resampling and the exact final correction")
def smc(field: Field, reward: Reward, *, shape: tuple[int, ...], num_samples: int, nfe: int, temperature: float,
        generator: torch.Generator | None, dtype: torch.dtype, device: torch.device,
        particles: int | None = None, steps: int | None = None, potential: str = "diff",
        ess_threshold: float = 0.5, resampling: str = "systematic", interval: int = 1, eta: float = 1.0,
        order: int = 2, guidance: float = 0.0, groups: int = 1, sort: bool = True, twist: str = "gauss",
        twist_samples: int = 16, tempering: float | None = 0.8, max_batch: int = 65536,
        **options: Any) -> tuple[Tensor, dict, float]:
    """Feynman–Kac steering toward :math:`p\\,e^{r/\\beta}` (see the module docstring).

    Options:
        particles, steps: ``K`` and ``S`` (default: :func:`plan`).
        potential: ``diff`` (default), ``max``, ``add`` or ``rt``.
        ess_threshold: resample when ESS < ``ess_threshold * K`` (default 0.5; 1 resamples every
            potential step, 0 never before the end).
        resampling: ``systematic`` (default) or ``multinomial``.
        interval: apply potentials (and consider resampling) every ``interval`` evaluation
            steps (default 1; the last step always).
        eta: the kernel's noise level (default 1, ancestral; must be > 0).
        order: 2 (default, DPM-Solver++(2M) data term) or 1.
        guidance: scale of the gradient-guided proposal (default 0: the plain kernel; > 0 needs
            a differentiable reward, one VJP per evaluation; importance-corrected, stays exact).
        groups: independent populations (default 1: one population of ``K * num_samples``).
        sort: order the particles along their principal direction before systematic resampling.
        twist: ``"gauss"`` (default) or ``"tweedie"``: the intermediate reward, see the module docstring.
        twist_samples: ``L``, reward evaluations per particle and step of the ``gauss`` twist (16).
        tempering: target conditional ESS of each potential step (default 0.8): the intermediate
            reward is raised to the largest power ``γ_j ≤ 1`` that keeps it (``None``: always 1).
        max_batch: most rows per network (and reward) call.
    """
    _check_unknown("smc", options)
    if twist not in TWISTS:
        raise ValueError(f"twist must be one of {', '.join(TWISTS)}, got {twist!r}")
    twist_samples = _positive_int("twist_samples", twist_samples)
    if tempering is not None:
        tempering = _number("tempering", tempering, 0.0, 1.0)
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {', '.join(POTENTIALS)}, got {potential!r}")
    ess_threshold = _number("ess_threshold", ess_threshold, 0.0, 1.0)
    eta = _number("eta", eta, 0.0, 10.0)
    if eta <= 0:
        raise ValueError("eta must be > 0 for smc: resampling needs a stochastic kernel (eta=0 is the ODE)")
    guidance = _number("guidance", guidance, 0.0)
    interval = _positive_int("interval", interval)
    groups = _positive_int("groups", groups)
    max_batch = _positive_int("max_batch", max_batch)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if num_samples % groups:
        raise ValueError(f"groups={groups} must divide num_samples={num_samples}")
    S, K = plan(nfe, particles, steps)
    beta = temperature
    sched = Schedule.build(field.path, S, eta)
    per_group = num_samples // groups
    G, Kg = groups, K * per_group
    N = G * Kg
    x = randn((N, *shape), generator, dtype, device) * float(sched.sigma[0])
    log_w = torch.zeros(G, Kg, dtype=torch.float64, device=device)
    applied = torch.zeros(N, dtype=torch.float64, device=device)     # Σ log G along each ancestry
    stat = torch.zeros(N, dtype=torch.float64, device=device)        # last r (diff), running max or sum
    first = True
    gammas: list[float] = []
    guide_scale = guidance
    prior_var: Tensor | None = None
    prev_hat: Tensor | None = None
    ess_trace: list[float] = []
    resampled, vjp = 0, 0
    r = torch.zeros(N, dtype=torch.float64, device=device)
    xhat = x
    for j in range(S):
        t = sched.t(j)
        last = j == S - 1
        if guidance > 0 and not last:
            xhat, r_raw, grad = _denoise_with_grad(field, reward, x, t, beta, max_batch)
            vjp += N
        else:
            xhat = _denoise(field, x, t, max_batch)
            r_raw, grad = reward(xhat), None
        r = r_raw / beta
        if last or j % interval == 0:
            if twist == "gauss" and not last:
                flat_hat = _flat(xhat).to(torch.float64)
                if prior_var is None:
                    prior_var = _prior_variance(flat_hat, float(sched.alpha[j]), float(sched.sigma[j]))
                    base = randn((twist_samples, flat_hat.shape[1]), generator, dtype, device)
                r = _gauss_twist(reward, xhat, prior_var, float(sched.alpha[j]), float(sched.sigma[j]), base,
                                 beta, max_batch)
            if tempering is not None and not last:
                gamma = _temper(log_w, r, stat if potential == "diff" and not first else None, potential, tempering)
                r = gamma * r
                gammas.append(gamma)
                guide_scale = guidance * gamma  # the proposal follows the tempered twist
            if potential == "diff":
                log_g = r - stat if not first else r
                stat = r
            elif potential == "max":
                stat = r if first else torch.maximum(stat, r)
                log_g = stat
            elif potential == "add":
                stat = r if first else stat + r
                log_g = stat
            else:
                log_g = r
            first = False
            log_w = log_w + log_g.reshape(G, Kg)
            applied = applied + log_g
            if last:
                break
            ess = effective_sample_size(log_w)
            ess_trace.append(float(ess.mean()) / Kg)
            need = ess < ess_threshold * Kg
            if bool(need.any()):
                keep = torch.arange(N, device=device).reshape(G, Kg)
                rows = torch.nonzero(need).reshape(-1)
                order_idx = principal_order(_flat(xhat).reshape(G, Kg, -1)[rows]) if sort and resampling == "systematic" else None
                idx = resample(log_w[rows], Kg, resampling, generator, order=order_idx)
                keep[rows] = rows[:, None] * Kg + idx
                keep = keep.reshape(-1)
                x, xhat, applied, stat = x[keep], xhat[keep], applied[keep], stat[keep]
                grad = grad[keep] if grad is not None else None
                prev_hat = prev_hat[keep] if prev_hat is not None else None
                log_w = log_w.clone()
                log_w[need] = 0.0
                resampled += 1
        data = sched.data_term(j, xhat, prev_hat, order)
        mean = sched.mean(j, x, data)
        std = sched.std(j)
        z = randn(tuple(x.shape), generator, dtype, device)
        if grad is not None:
            shift = (guide_scale * std * std) * grad
            x = mean + shift + std * z
            # importance ratio p/q of the plain kernel N(mean, v) to the guided one N(mean + shift, v)
            dev_p = _flat(x - mean).to(torch.float64)
            dev_q = dev_p - _flat(shift).to(torch.float64)
            log_w = log_w + ((dev_q.pow(2).sum(-1) - dev_p.pow(2).sum(-1)) / (2 * std * std)).reshape(G, Kg)
        else:
            x = mean + std * z
        prev_hat = xhat
    # Final correction: the lineage's potentials are replaced by exp(r(x)/β).
    log_w = log_w + (r - applied).reshape(G, Kg)
    final_ess = float(effective_sample_size(log_w).mean()) / Kg
    order_idx = principal_order(_flat(xhat).reshape(G, Kg, -1)) if sort else None
    idx = systematic_resample(log_w, per_group, generator, order_idx)
    pick = (torch.arange(G, device=device)[:, None] * Kg + idx).reshape(-1)
    info = {"steps": S, "particles": K, "population": Kg, "groups": G, "potential": potential,
            "resampling_steps": resampled, "ess": ess_trace, "final_ess": final_ess, "tempering": gammas,
            "final_reward": r[pick] * beta}
    return xhat[pick], info, float(vjp)


# ----------------------------------------------------------------------------------------------
# Searches
# ----------------------------------------------------------------------------------------------

def _trajectories(field: Field, x: Tensor, sched: Schedule, generator: torch.Generator | None, order: int,
                  max_batch: int) -> Tensor:
    """Run all rows of ``x`` (at ``times[0]``) through the grid; returns the last estimates."""
    prev = None
    for j in range(len(sched)):
        xhat = _denoise(field, x, sched.t(j), max_batch)
        if j == len(sched) - 1:
            return xhat
        mean = sched.mean(j, x, sched.data_term(j, xhat, prev, order))
        std = sched.std(j)
        x = mean + std * randn(tuple(x.shape), generator, x.dtype, x.device) if std > 0 else mean
        prev = xhat
    return x


@register("bon", description="best-of-N: N = nfe // steps independent ODE trajectories per sample, the best kept")
def best_of_n(field: Field, reward: Reward, *, shape: tuple[int, ...], num_samples: int, nfe: int,
              temperature: float, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device,
              steps: int | None = None, candidates: int | None = None, eta: float = 0.0, order: int = 2,
              grid: str = "log_snr", max_batch: int = 65536, **options: Any) -> tuple[Tensor, dict]:
    """Best-of-N (see the module docstring).

    Options: ``steps`` per trajectory (default 20, 10 below 200 evaluations), ``candidates`` ``N`` (default
    ``nfe // steps``), ``eta`` (default 0: ODE), ``order`` (2), ``max_batch``.
    """
    _check_unknown("bon", options)
    S = steps if steps is not None else min(20 if nfe >= 200 else 10, nfe)
    S = _positive_int("steps", S, MIN_STEPS) if S >= MIN_STEPS or steps is not None else S
    if S < MIN_STEPS or S > nfe:
        raise _too_small(nfe, max(S, MIN_STEPS), f"a trajectory of {max(S, MIN_STEPS)} steps")
    N = _positive_int("candidates", candidates) if candidates is not None else nfe // S
    if N * S > nfe:
        raise ValueError(f"candidates*steps = {N}*{S} exceeds the budget nfe={nfe}")
    eta = _number("eta", eta, 0.0, 10.0)
    sched = Schedule.build(field.path, S, eta, grid)
    x = randn((num_samples * N, *shape), generator, dtype, device) * float(sched.sigma[0])
    out = _trajectories(field, x, sched, generator, order, max_batch)
    r = reward(out).reshape(num_samples, N)
    best = r.argmax(1)
    pick = torch.arange(num_samples, device=best.device) * N + best
    info = {"steps": S, "candidates": N, "final_reward": r.max(1).values,
            "mean_candidate_reward": float(r.mean())}
    return out[pick.to(out.device)], info


@register("beam", description="beam search over ancestral SDE paths: B beams x C children per step, best B kept")
def beam(field: Field, reward: Reward, *, shape: tuple[int, ...], num_samples: int, nfe: int, temperature: float,
         generator: torch.Generator | None, dtype: torch.dtype, device: torch.device, steps: int = 10,
         beams: int | None = None, children: int | None = None, eta: float = 1.0, max_batch: int = 65536,
         **options: Any) -> tuple[Tensor, dict]:
    """Beam search (see the module docstring).

    Options: ``steps`` evaluation times (default 10, fewer if the budget is small), ``beams`` ``B``
    and ``children`` ``C`` with ``steps * B * C <= nfe`` (default ``B = 2`` when ``nfe//steps >= 4``,
    ``C`` fills the budget), ``eta`` (1), ``max_batch``.
    """
    _check_unknown("beam", options)
    S = min(_positive_int("steps", steps, MIN_STEPS), nfe)
    if S < MIN_STEPS:
        raise _too_small(nfe, MIN_STEPS, "a beam trajectory")
    width = nfe // S
    B = _positive_int("beams", beams) if beams is not None else (2 if width >= 4 else 1)
    C = _positive_int("children", children) if children is not None else max(1, width // B)
    if S * B * C > nfe:
        raise ValueError(f"steps*beams*children = {S}*{B}*{C} exceeds the budget nfe={nfe}")
    eta = _number("eta", eta, 0.0, 10.0)
    sched = Schedule.build(field.path, S, eta)
    M = num_samples
    x = randn((M * B * C, *shape), generator, dtype, device) * float(sched.sigma[0])
    for j in range(S):
        xhat = _denoise(field, x, sched.t(j), max_batch)
        r = reward(xhat).reshape(M, B * C)
        top = r.topk(B, dim=1).indices                          # (M, B)
        rows = (torch.arange(M, device=top.device)[:, None] * (B * C) + top).reshape(-1).to(x.device)
        if j == S - 1:
            best = r.argmax(1)
            pick = (torch.arange(M, device=best.device) * (B * C) + best).to(x.device)
            return xhat[pick], {"steps": S, "beams": B, "children": C, "final_reward": r.max(1).values}
        xb, hb = x[rows], xhat[rows]                             # (M*B, ...)
        mean = sched.mean(j, xb, hb)
        std = sched.std(j)
        mean = mean.repeat_interleave(C, dim=0)
        x = mean + std * randn(tuple(mean.shape), generator, dtype, device)
    raise AssertionError("unreachable")  # pragma: no cover


@register("rbf", description="Rollover Budget Forcing (Kim et al. 2025): per-step quotas, a child accepted as "
          "soon as it improves the reward, unused budget rolled over")
def rbf(field: Field, reward: Reward, *, shape: tuple[int, ...], num_samples: int, nfe: int, temperature: float,
        generator: torch.Generator | None, dtype: torch.dtype, device: torch.device, steps: int = 10,
        chains: int | None = None, init: int | None = None, eta: float = 1.0, grid: str = "vp",
        max_batch: int = 65536, **options: Any) -> tuple[Tensor, dict]:
    """Rollover Budget Forcing (see the module docstring).

    Each returned sample is the best of ``chains`` independent RBF chains sharing its budget (the
    paper's batch of 2 chains per prompt, whose best is kept).

    Options: ``steps`` SDE steps after the initial evaluation (default 10, as in the paper; fewer
    if the budget is small), ``chains`` per returned sample (default ``clip(nfe // 100, 2, 16)``:
    the paper's 2 at 500 evaluations, more with more budget — measured in ``benchmarks/steer_gmm.py``),
    ``init`` initial noises per chain (default ``clip(nfe_chain // 20, 1, 25)``, the paper's 25 at
    500 evaluations), ``eta`` (1: ancestral children), ``grid`` (``"vp"``: the paper's VP time
    grid, see :func:`~flowdiff.steer.kernels.evaluation_grid`), ``max_batch``.
    Budget per chain ``nfe // chains >= init + steps`` (every step draws at least one child).

    Info: ``children`` (mean children per step), ``accepted_early`` (fraction of steps ended by an
    improving child), ``rollover`` (mean quota carried into a step).
    """
    _check_unknown("rbf", options)
    steps = _positive_int("steps", steps, MIN_STEPS - 1)
    if nfe < MIN_STEPS:
        raise _too_small(nfe, MIN_STEPS, "an RBF trajectory")
    n_chains = _positive_int("chains", chains) if chains is not None else max(1, min(16, max(2, nfe // 100), nfe // MIN_STEPS))
    per_chain = nfe // n_chains
    n_init = _positive_int("init", init) if init is not None else max(1, min(25, per_chain // 20))
    S = min(steps, per_chain - n_init)
    if S < MIN_STEPS - 1:
        raise _too_small(nfe, n_chains * (n_init + MIN_STEPS - 1),
                         f"{n_chains} chain(s) of init={n_init} noises and {MIN_STEPS - 1} steps")
    eta = _number("eta", eta, 0.0, 10.0)
    sched = Schedule.build(field.path, S + 1, eta, grid)
    M = num_samples * n_chains
    # initial noises: keep the best by r(x̂) per chain
    x0 = randn((M * n_init, *shape), generator, dtype, device) * float(sched.sigma[0])
    h0 = _denoise(field, x0, sched.t(0), max_batch)
    r0 = reward(h0).reshape(M, n_init)
    b0 = r0.argmax(1)
    pick = (torch.arange(M, device=b0.device) * n_init + b0).to(device)
    x, xhat, score = x0[pick], h0[pick], r0.max(1).values.cpu().clone()
    budget = per_chain - n_init
    quota = budget // S
    step = torch.zeros(M, dtype=torch.long)                   # current step (0..S-1) of each chain
    used = torch.zeros(M, dtype=torch.long)                   # children drawn so far (all steps)
    at_step = torch.zeros(M, dtype=torch.long)                # children drawn at the current step
    best_x, best_h = x.clone(), xhat.clone()                  # best child of the current step
    best_r = torch.full((M,), -math.inf, dtype=torch.float64)
    final_r = torch.full((M,), -math.inf, dtype=torch.float64)
    early, rollover_sum = 0, 0.0
    shape_b = (-1,) + (1,) * len(shape)
    c_x, c_hat = sched.c_x.to(device, dtype), sched.c_hat.to(device, dtype)
    sd_all, times = sched.var.to(device, dtype).sqrt(), sched.times.to(device, dtype)
    while True:
        active = torch.nonzero(step < S).reshape(-1)
        if active.numel() == 0:
            break
        j = step[active]
        idx_dev, j_dev = active.to(device), j.to(device)
        noise = randn((active.numel(), *shape), generator, dtype, device)
        child = c_x[j_dev].reshape(shape_b) * x[idx_dev] + c_hat[j_dev].reshape(shape_b) * xhat[idx_dev] \
            + sd_all[j_dev].reshape(shape_b) * noise
        h_child = _denoise(field, child, times[j_dev + 1], max_batch)
        r_child = reward(h_child).cpu()
        used[active] += 1
        at_step[active] += 1
        better = r_child > best_r[active]
        best_r[active] = torch.where(better, r_child, best_r[active])
        bd = better.to(device).reshape(shape_b)
        best_x[idx_dev] = torch.where(bd, child, best_x[idx_dev])
        best_h[idx_dev] = torch.where(bd, h_child, best_h[idx_dev])
        last = j == S - 1
        allowance = torch.where(last, torch.full_like(j, budget), (j + 1) * quota)
        improved = (r_child > score[active]) & ~last
        move = improved | (used[active] >= allowance)
        if bool(move.any()):
            mv = active[move]
            mv_dev = mv.to(device)
            early += int(improved[move].sum())
            before = used[mv] - at_step[mv]                    # children drawn before this step
            rollover_sum += float((step[mv] * quota - before).clamp_min(0).sum())
            x[mv_dev], xhat[mv_dev] = best_x[mv_dev], best_h[mv_dev]
            final_r[mv] = best_r[mv]
            score[mv] = torch.maximum(score[mv], best_r[mv])  # the best reward found so far (monotone)
            step[mv] += 1
            at_step[mv] = 0
            best_r[mv] = -math.inf
    # each returned sample: the best of its chains' final estimates
    per = final_r.reshape(num_samples, n_chains)
    best_chain = per.argmax(1)
    pick = (torch.arange(num_samples) * n_chains + best_chain).to(device)
    info = {"steps": S, "chains": n_chains, "init": n_init, "quota": quota,
            "children": float(used.sum()) / (M * S), "accepted_early": early / (M * max(S - 1, 1)),
            "rollover": rollover_sum / (M * S), "final_reward": per.max(1).values.to(device)}
    return xhat[pick], info


# ----------------------------------------------------------------------------------------------
# Gradient guidance
# ----------------------------------------------------------------------------------------------

@register("dps", needs_gradient=True, kind="guidance", description="gradient guidance: ancestral steps shifted by "
          "scale * v * grad r(x̂(x_t))/beta (one VJP per evaluation; not exact)")
def dps(field: Field, reward: Reward, *, shape: tuple[int, ...], num_samples: int, nfe: int, temperature: float,
        generator: torch.Generator | None, dtype: torch.dtype, device: torch.device, steps: int | None = None,
        scale: float = 1.0, eta: float = 1.0, order: int = 2, max_batch: int = 65536,
        **options: Any) -> tuple[Tensor, dict, float]:
    """Gradient guidance (see the module docstring). Options: ``steps`` (default ``nfe``, at most 1000),
    ``scale`` (1), ``eta`` (1), ``order`` (2), ``max_batch``."""
    _check_unknown("dps", options)
    S = steps if steps is not None else min(nfe, 1000)
    if S < MIN_STEPS or S > nfe:
        raise _too_small(nfe, max(S, MIN_STEPS), f"a trajectory of {max(S, MIN_STEPS)} steps")
    scale = _number("scale", scale, 0.0)
    eta = _number("eta", eta, 0.0, 10.0)
    sched = Schedule.build(field.path, S, eta)
    x = randn((num_samples, *shape), generator, dtype, device) * float(sched.sigma[0])
    guide_var = Schedule.build(field.path, S, 1.0).var  # with eta = 0 the guidance step is the ancestral variance
    prev = None
    vjp = 0
    for j in range(S):
        t = sched.t(j)
        if j == S - 1:
            xhat = _denoise(field, x, t, max_batch)
            return xhat, {"steps": S, "scale": scale}, float(vjp)
        xhat, _, grad = _denoise_with_grad(field, reward, x, t, temperature, max_batch)
        vjp += num_samples
        mean = sched.mean(j, x, sched.data_term(j, xhat, prev, order))
        v = float(sched.var[j])
        step_var = v if v > 0 else float(guide_var[j])
        x = mean + (scale * step_var) * grad + math.sqrt(v) * randn(tuple(x.shape), generator, dtype, device)
        prev = xhat
    raise AssertionError("unreachable")  # pragma: no cover
