r"""Group-relative policy optimisation of a flow: Flow-GRPO, DanceGRPO and G²RPO on any flowdiff model.

**Policy.** The deterministic sampler of a field is made stochastic by the marginal-preserving SDE
(:mod:`flowdiff.paths.conversions`) :math:`dx = [u + \tfrac{g^2}{2}s]dt + g\,dW`; its Euler–Maruyama step on a
grid :math:`t_0 < \dots < t_T` (flowdiff time: ``t_0 = t_min`` noise, ``t_T = t_max`` data) is the Gaussian
policy

.. math::

    \pi_\theta(x_{k+1} \mid x_k) = N\big(\mu_\theta(x_k, t_k),\ g_k^2 h_k I\big),\qquad
    \mu_\theta = x_k + h_k\big[u_\theta + \tfrac{g_k^2}{2}s_\theta\big](x_k, t_k),\quad h_k = t_{k+1} - t_k,

whose log-density (summed over dimensions, in the model's dtype) is the per-step log-probability. The
reward :math:`r` is read on the data prediction at ``t_max``.

**Objective.** Groups of :math:`G` rollouts give advantages :math:`A_i = (R_i - \bar R)/\mathrm{std}(R)`
(clipped to ``±adv_clip``; ``normalize_std=False`` keeps :math:`R_i - \bar R`). With the importance ratio
:math:`\rho = \pi_\theta/\pi_{\theta_{old}}` of a trained step, PPO-clip (Schulman et al. 2017) minimises

.. math::

    L = E\big[\max(-A\rho,\ -A\,\mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon))\big]
        + \beta\,E\Big[\frac{\lVert\mu_\theta - \mu_{ref}\rVert^2}{2 g_k^2 h_k}\Big],

the second term the closed-form KL between the policy's and the frozen reference's Gaussian steps
(``kl="loss"``, as Flow-GRPO; it keeps the step variance :math:`g^2h` where Flow-GRPO's code drops :math:`h`).
``kl="reward"`` instead subtracts :math:`\beta\sum_k\log(\pi_\theta/\pi_{ref})(x_{k+1}|x_k)` from the reward
before the advantages: the policy gradient of :math:`E[r] - \beta\,\mathrm{KL}(P_\theta\|P_{ref})` over paths,
whose optimum, for a memoryless SDE (:class:`~flowdiff.paths.ReverseDiffusion`) and ``normalize_std=False``,
has the terminal law :math:`p(x)e^{r(x)/\beta}/Z` exactly (Uehara et al. 2024; Domingo-Enrich et al. 2024,
"Adjoint Matching"). GRPO's std normalisation rescales the reward per group, so its fixed point is a tilt at
another temperature; the benchmark measures how close each recipe gets.

**Methods.**

* ``"flow-grpo"`` — Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL":
  :math:`g = 0.7\sqrt{(1-t)/t}` (:class:`~flowdiff.paths.FlowGRPO`), independent initial noises, the
  trajectory's advantage broadcast to every step, KL in the loss.
* ``"dance-grpo"`` — Xue et al. 2025, "DanceGRPO: Unleashing GRPO on Visual Generation": constant
  :math:`g = 0.3`, a group shares its initial noise, a random 60 % of the steps is trained.
* ``"g2rpo"`` — Zhou et al. 2025, "G²RPO: Granular GRPO for Precise Reward in Flow Models": the group
  shares the initial noise and follows the ODE to step ``k``; :math:`G` branches take **one** SDE step there
  (Flow-GRPO's kernel) and finish by the ODE, so reward differences are caused by step ``k`` alone
  (step-specific advantages, "singular stochastic sampling"). Each branch is finished on grids of stride
  :math:`\lambda \in \Lambda` (``granularities``, default {1, 2, 3}) and the group-normalised advantages of
  the granularities are summed (multi-granularity advantage integration). Branch steps: the first half.

**Training loop.** :func:`finetune` runs everything through :class:`flowdiff.train.Trainer` (AdamW, gradient
clipping, EMA, atomic checkpoints, exact resume): the Trainer's "data" is a :class:`RolloutSource` that draws
a rollout every ``updates_per_rollout`` updates and hands out minibatches of transition indices; its
``state_dict`` holds the rollout buffer and its random state, so a run resumed from any checkpoint redoes
exactly the updates of an uninterrupted one. The old log-probabilities are recomputed right after a rollout
by the very code (and minibatch shapes) the loss uses, so the importance ratio is exactly 1.0 at the first
update of each rollout (DanceGRPO's debugging rule, XueZeyue/DanceGRPO#45).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field as dataclass_field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import expand_like
from ..fields import Field
from ..paths import GaussianPath
from ..paths.conversions import DiffusionCoefficient, diffusion_coefficient
from ..train import TrainConfig, Trainer, TrainSummary
from ..train.rng import stream_seed
from .rewards import Reward, check_reward

__all__ = ["METHODS", "GRPOConfig", "RolloutSource", "GRPOLoss", "FinetuneResult", "finetune", "group_advantages",
           "sde_kernel", "gaussian_log_prob"]

#: The recipes :func:`finetune` implements.
METHODS = ("flow-grpo", "dance-grpo", "g2rpo")
#: Stream index of the rollout generator (flowdiff.train.rng reserves 0-2).
ROLLOUT_STREAM = 15


@dataclass
class GRPOConfig:
    """Settings of a GRPO-family fine-tuning run (module docstring).

    Attributes:
        method: ``"g2rpo"`` (default: at equal rollouts it reached the exact tilted target where
            Flow-GRPO and DanceGRPO stalled, benchmarks/results/rl_gmm.md), ``"flow-grpo"`` or
            ``"dance-grpo"``.
        beta: KL weight β > 0 (the temperature of the tilted target :math:`p\\,e^{r/\\beta}`).
        group_size: rollouts per group G ≥ 2 (advantages are normalised within a group).
        groups: groups per rollout.
        num_steps: sampling steps T of a rollout.
        diffusion: the SDE's g(t) (a :class:`~flowdiff.paths.DiffusionCoefficient`, a name or a config dict);
            ``None``: Flow-GRPO's ``a = 0.7`` (flow-grpo, g2rpo) or DanceGRPO's ``η = 0.3``.
        clip_range: PPO's ε.
        adv_clip: advantages are clipped to ``[-adv_clip, adv_clip]``.
        normalize_std: divide the group-centred rewards by their std (GRPO); ``False``: only centre them.
        kl: ``"loss"`` (closed-form Gaussian KL term in the loss) or ``"reward"`` (path log-ratio in the reward).
        timestep_fraction: fraction of a trajectory's SDE steps trained (``None``: 1.0, DanceGRPO 0.6).
        share_initial_noise: a group starts from one noise (``None``: no for flow-grpo, yes otherwise).
        granularities: G²RPO's ODE strides Λ.
        branch_steps: G²RPO's number of branch steps, the first ones of the schedule (``None``: T // 2).
        updates_per_rollout: optimizer updates (minibatches) per rollout.
        seed: seed of the rollout noise.
    """

    method: str = "g2rpo"
    beta: float = 0.04
    group_size: int = 8
    groups: int = 16
    num_steps: int = 10
    diffusion: Any = None
    clip_range: float = 0.2
    adv_clip: float = 5.0
    normalize_std: bool = True
    kl: str = "loss"
    timestep_fraction: float | None = None
    share_initial_noise: bool | None = None
    granularities: tuple[int, ...] = (1, 2, 3)
    branch_steps: int | None = None
    updates_per_rollout: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad setting and what is allowed."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) \
                or self.beta <= 0:
            raise ValueError(f"beta must be a finite number > 0 (the KL weight, temperature of p*exp(r/beta)), "
                             f"got beta={self.beta!r}")
        for name, low in (("group_size", 2), ("groups", 1), ("num_steps", 1), ("updates_per_rollout", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                hint = " (advantages are normalised within a group)" if name == "group_size" else ""
                raise ValueError(f"{name} must be an integer >= {low}{hint}, got {name}={value!r}")
        if self.method == "g2rpo" and self.num_steps < 2:
            raise ValueError(f"g2rpo needs num_steps >= 2 (a branch step and an ODE completion), got {self.num_steps}")
        for name in ("clip_range", "adv_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {name}={value!r}")
        if self.kl not in ("loss", "reward"):
            raise ValueError(f"kl must be 'loss' or 'reward', got kl={self.kl!r}")
        if self.timestep_fraction is not None and not (0 < self.timestep_fraction <= 1):
            raise ValueError(f"timestep_fraction must lie in (0, 1], got {self.timestep_fraction!r}")
        self.granularities = tuple(self.granularities)
        if not self.granularities or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                         for g in self.granularities):
            raise ValueError(f"granularities must be integers >= 1, got {self.granularities!r}")
        if self.branch_steps is not None and not (1 <= self.branch_steps <= self.num_steps - 1):
            raise ValueError(f"branch_steps must lie in [1, num_steps - 1 = {self.num_steps - 1}], got {self.branch_steps!r}")
        self.coefficient()  # a bad diffusion spec fails here

    # ----- resolved defaults ---------------------------------------------------------------
    def coefficient(self) -> DiffusionCoefficient:
        if self.diffusion is None:
            return diffusion_coefficient("dance-grpo" if self.method == "dance-grpo" else "flow-grpo")
        return diffusion_coefficient(self.diffusion)

    def fraction(self) -> float:
        if self.timestep_fraction is not None:
            return float(self.timestep_fraction)
        return 0.6 if self.method == "dance-grpo" else 1.0

    def shared_noise(self) -> bool:
        if self.share_initial_noise is not None:
            return bool(self.share_initial_noise)
        return self.method != "flow-grpo"

    def branches(self) -> int:
        return self.branch_steps if self.branch_steps is not None else max(1, self.num_steps // 2)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["diffusion"] = self.coefficient().config()
        out["granularities"] = list(self.granularities)
        return out


def sde_kernel(field: Field, x: Tensor, t: Tensor, t_next: Tensor, g: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
    r"""Mean and std of the Euler–Maruyama step of :math:`dx = [u + \tfrac{g^2}{2}s]dt + g\,dW` from ``t`` to
    ``t_next`` (tensors ``(B,)``), one model call: :math:`\mu = x + h(u + \tfrac{g^2}{2}s)`, std :math:`g\sqrt h`
    (shape ``(B,)``). Where ``g = 0`` it is the Euler step of the ODE and the score is not used."""
    out = field.predict(x, t, **cond)
    u = field.convert(out, x, t, field.prediction, "velocity")
    h = t_next - t
    if bool((g == 0).all()):
        return x + expand_like(h, x) * u, torch.zeros_like(g)
    s = field.convert(out, x, t, field.prediction, "score")
    s = torch.where(expand_like(g, x) > 0, s, torch.zeros_like(s))  # ODE rows must not see an inf*0
    mean = x + expand_like(h, x) * (u + expand_like(0.5 * g * g, x) * s)
    return mean, g * torch.sqrt(h)


def gaussian_log_prob(value: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    r""":math:`\log N(\text{value}; \mu, \text{std}^2 I)` summed over the non-batch dimensions, ``(B,)``."""
    d = value[0].numel()
    z = (value - mean).reshape(value.shape[0], -1) / std[:, None]
    return -0.5 * (z * z).sum(1) - d * torch.log(std) - 0.5 * d * math.log(2 * math.pi)


def group_advantages(rewards: Tensor, normalize_std: bool = True, clip: float = 5.0, eps: float = 1e-8) -> Tensor:
    r"""GRPO's advantages of rewards ``(groups, G)``: :math:`(R - \bar R_{group})/(\mathrm{std}_{group} + \epsilon)`
    (population std; only centred when ``normalize_std=False``), clipped to ``[-clip, clip]``."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (groups, G) with G >= 2, got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(1, keepdim=True)
    if normalize_std:
        centred = centred / (rewards.std(1, unbiased=False, keepdim=True) + eps)
    return centred.clamp(-clip, clip)


@dataclass
class _Buffer:
    """The trained transitions of one rollout (tensors with a leading transition axis)."""

    x: Tensor
    step: Tensor
    x_next: Tensor
    ref_mean: Tensor
    advantage: Tensor
    old_log_prob: Tensor

    def state(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in asdict(self).items()}


class RolloutSource:
    """The Trainer's "data": rollouts of the policy, handed out as minibatches of transition indices.

    Iterating yields ``(batch, 1)`` float tensors of indices into :attr:`buffer`; every
    ``updates_per_rollout`` batches a new rollout is drawn with the current weights. ``state_dict`` /
    ``load_state_dict`` hold the buffer, the cursor, the random state and the per-rollout statistics
    (:attr:`history`: reward mean/std, the path KL to the reference, model evaluations), which makes a
    Trainer run exactly resumable.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, path: GaussianPath, prediction: str, reward: Reward,
                 config: GRPOConfig, shard_size: int | None = None, data_shape: tuple[int, ...] | None = None):
        self.policy, self.reference, self.path, self.prediction = policy, reference, path, prediction
        self.reward, self.config = reward, config
        self.g = config.coefficient()
        self.data_shape = tuple(data_shape) if data_shape is not None else _data_shape(policy)
        self.batch_size = self.transitions_per_rollout() // config.updates_per_rollout
        if self.batch_size * config.updates_per_rollout != self.transitions_per_rollout():
            raise ValueError(
                f"updates_per_rollout={config.updates_per_rollout} must divide the {self.transitions_per_rollout()} "
                f"trained transitions of a rollout")
        self.shard_size = shard_size or self.batch_size
        self.generator = torch.Generator().manual_seed(stream_seed(config.seed, ROLLOUT_STREAM))
        self.cursor = 0
        self.rollouts = 0
        self.buffer: _Buffer | None = None
        self.order: Tensor | None = None
        self.history: list[dict[str, float]] = []

    # ----- sizes -------------------------------------------------------------------------------
    def train_steps_per_trajectory(self) -> int:
        sde = len(self._sde_steps())
        if sde == 0:
            raise ValueError(f"the diffusion coefficient {self.g!r} is zero on every step of the {self.config.num_steps}-step "
                             f"grid: there is no stochastic step to train")
        return max(1, round(self.config.fraction() * sde))

    def transitions_per_rollout(self) -> int:
        c = self.config
        if c.method == "g2rpo":
            sde = set(self._sde_steps())
            zero = [k for k in range(c.branches()) if k not in sde]
            if zero:
                raise ValueError(f"g2rpo branches at the first {c.branches()} steps, but the diffusion coefficient {self.g!r} "
                                 f"is zero at steps {zero}: no stochastic branch there; choose branch_steps or a diffusion "
                                 f"that is nonzero on them")
            return c.groups * c.branches() * c.group_size
        return c.groups * c.group_size * self.train_steps_per_trajectory()

    def times(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.linspace(self.path.t_min, self.path.t_max, self.config.num_steps + 1,
                              dtype=torch.float64).to(dtype=dtype, device=device)

    def g_table(self, times: Tensor) -> Tensor:
        """g at the grid's step starts, evaluated on the float64 grid (so that which steps are stochastic does not
        depend on the model's dtype), in ``times``' dtype and device."""
        grid = self.times(torch.float64, torch.device("cpu"))[:-1]
        return self.g(grid).to(dtype=times.dtype, device=times.device)

    def _sde_steps(self) -> list[int]:
        g = self.g_table(self.times(torch.float64, torch.device("cpu")))
        return [k for k in range(self.config.num_steps) if float(g[k]) > 0]

    # ----- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> RolloutSource:
        return self

    def __next__(self) -> Tensor:
        if self.cursor == 0 or self.buffer is None:
            self.rollout()
        assert self.order is not None
        lo = self.cursor * self.batch_size
        chunk = self.order[lo: lo + self.batch_size]
        self.cursor = (self.cursor + 1) % self.config.updates_per_rollout
        return chunk.to(torch.float64)[:, None]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(), "cursor": self.cursor, "rollouts": self.rollouts,
            "buffer": self.buffer.state() if self.buffer is not None else None,
            "order": self.order.clone() if self.order is not None else None,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.cursor, self.rollouts = int(state["cursor"]), int(state["rollouts"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.order = state["order"]
        device, dtype = _device_dtype(self.policy)
        if state["buffer"] is None:
            self.buffer = None
        else:
            self.buffer = _Buffer(**{k: (v.to(device) if not v.is_floating_point() else v.to(device, dtype))
                                     for k, v in state["buffer"].items()})

    # ----- rollouts ------------------------------------------------------------------------------
    def _noise(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.randn((n, *self.data_shape), generator=self.generator, dtype=dtype).to(device)

    @torch.no_grad()
    def rollout(self) -> dict[str, float]:
        """Draw one rollout with the current weights, fill :attr:`buffer` and a new minibatch order; returns its statistics."""
        device, dtype = _device_dtype(self.policy)
        policy = Field(self.policy, self.path, self.prediction)
        reference = Field(self.reference, self.path, self.prediction)
        times = self.times(dtype, device)
        g = self.g_table(times)
        if self.config.method == "g2rpo":
            buffer, stats = self._rollout_g2rpo(policy, reference, times, g, device, dtype)
        else:
            buffer, stats = self._rollout_trajectories(policy, reference, times, g, device, dtype)
        stats["nfe"] = float(policy.nfe + reference.nfe)
        n = buffer.x.shape[0]
        self.order = torch.randperm(n, generator=self.generator)
        self.buffer = buffer
        # Old log-probabilities by the loss's own code on the loss's own minibatch shards: ρ = 1 exactly at the
        # first update, whatever the kernels do with different batch shapes.
        for c in range(self.config.updates_per_rollout):
            chunk = self.order[c * self.batch_size: (c + 1) * self.batch_size]
            for shard in chunk.split(self.shard_size):
                idx = shard.to(torch.float64).to(dtype).round().long().to(device)
                log_prob, _, _ = policy_terms(self.policy, self.path, self.prediction, buffer, idx, times, g)
                buffer.old_log_prob[idx] = log_prob
        self.rollouts += 1
        stats["rollout"] = float(self.rollouts)
        self.history.append(stats)
        return stats

    def _terminal_reward(self, policy: Field, x: Tensor, t_end: Tensor) -> Tensor:
        data = policy.denoise(x, t_end.expand(x.shape[0]))
        return check_reward(self.reward, data).to(x)

    def _rollout_trajectories(self, policy: Field, reference: Field, times: Tensor, g: Tensor,
                              device: torch.device, dtype: torch.dtype) -> tuple[_Buffer, dict[str, float]]:
        c = self.config
        n = c.groups * c.group_size
        sigma0 = float(self.path.sigma(self.path.t_min))
        if c.shared_noise():
            x = sigma0 * self._noise(c.groups, dtype, device).repeat_interleave(c.group_size, 0)
        else:
            x = sigma0 * self._noise(n, dtype, device)
        states, nexts, ref_means = [], [], []
        log_ratio = torch.zeros(n, dtype=dtype, device=device)
        kl = torch.zeros(n, dtype=dtype, device=device)
        for k in range(c.num_steps):
            t, tn = times[k].expand(n), times[k + 1].expand(n)
            gk = g[k].expand(n)
            mean, std = sde_kernel(policy, x, t, tn, gk)
            if float(g[k]) > 0:
                ref_mean, _ = sde_kernel(reference, x, t, tn, gk)
                x_next = mean + expand_like(std, x) * self._noise(n, dtype, device)
                log_ratio += gaussian_log_prob(x_next, mean, std) - gaussian_log_prob(x_next, ref_mean, std)
                kl += ((mean - ref_mean) ** 2).reshape(n, -1).sum(1) / (2 * std * std)
                ref_means.append(ref_mean)
            else:
                x_next = mean
                ref_means.append(mean)
            states.append(x)
            nexts.append(x_next)
            x = x_next
        reward = self._terminal_reward(policy, x, times[-1])
        total = reward - c.beta * log_ratio if c.kl == "reward" else reward
        advantage = group_advantages(total.view(c.groups, c.group_size), c.normalize_std, c.adv_clip).reshape(n)
        # The trained steps of each trajectory: all SDE steps, or a random fraction of them (DanceGRPO).
        sde = torch.tensor(self._sde_steps(), dtype=torch.long)
        m = self.train_steps_per_trajectory()
        if m == len(sde):
            chosen = sde.expand(n, m)
        else:
            chosen = torch.stack([sde[torch.randperm(len(sde), generator=self.generator)[:m]] for _ in range(n)])
        rows = torch.arange(n).repeat_interleave(m)
        steps = chosen.reshape(-1)
        stacked = [torch.stack(v) for v in (states, nexts, ref_means)]  # (T, n, ...)
        rows_d, steps_d = rows.to(device), steps.to(device)
        buffer = _Buffer(
            x=stacked[0][steps_d, rows_d], step=steps_d, x_next=stacked[1][steps_d, rows_d],
            ref_mean=stacked[2][steps_d, rows_d], advantage=advantage[rows_d],
            old_log_prob=torch.zeros(len(rows), dtype=dtype, device=device),
        )
        stats = {"reward": float(reward.mean()), "reward_std": float(reward.std()), "kl": float(kl.mean()),
                 "log_ratio": float(log_ratio.mean())}
        return buffer, stats

    def _rollout_g2rpo(self, policy: Field, reference: Field, times: Tensor, g: Tensor,
                       device: torch.device, dtype: torch.dtype) -> tuple[_Buffer, dict[str, float]]:
        c = self.config
        groups, G, T = c.groups, c.group_size, c.num_steps
        sigma0 = float(self.path.sigma(self.path.t_min))
        x = sigma0 * self._noise(groups, dtype, device)
        zero = torch.zeros(groups, dtype=dtype, device=device)
        ode_states = [x]
        for k in range(T - 1):  # the shared ODE prefix
            x, _ = sde_kernel(policy, x, times[k].expand(groups), times[k + 1].expand(groups), zero)
            ode_states.append(x)
        xs, steps, nexts, ref_means, advantages = [], [], [], [], []
        rewards, kls = [], []
        n = groups * G
        for k in range(c.branches()):
            xk = ode_states[k].repeat_interleave(G, 0)
            t, tn = times[k].expand(n), times[k + 1].expand(n)
            gk = g[k].expand(n)
            if float(g[k]) <= 0:
                raise ValueError(f"g2rpo: the diffusion coefficient is 0 at branch step {k} (t={float(times[k]):.4g}); "
                                 f"use a coefficient > 0 on the first {c.branches()} steps")
            mean, std = sde_kernel(policy, xk, t, tn, gk)
            ref_mean, _ = sde_kernel(reference, xk, t, tn, gk)
            x_next = mean + expand_like(std, xk) * self._noise(n, dtype, device)
            log_ratio = gaussian_log_prob(x_next, mean, std) - gaussian_log_prob(x_next, ref_mean, std)
            kls.append(((mean - ref_mean) ** 2).reshape(n, -1).sum(1) / (2 * std * std))
            mix = torch.zeros(n, dtype=dtype, device=device)
            for j, stride in enumerate(c.granularities):
                grid = list(range(k + 1, T + 1, stride))
                if grid[-1] != T:
                    grid.append(T)
                y = x_next
                for a, b in zip(grid[:-1], grid[1:]):
                    y, _ = sde_kernel(policy, y, times[a].expand(n), times[b].expand(n), torch.zeros(n, dtype=dtype,
                                                                                                     device=device))
                r = self._terminal_reward(policy, y, times[-1])
                if j == 0:
                    rewards.append(r)
                total = r - c.beta * log_ratio if c.kl == "reward" else r
                mix += group_advantages(total.view(groups, G), c.normalize_std, c.adv_clip).reshape(n)
            xs.append(xk)
            steps.append(torch.full((n,), k, dtype=torch.long, device=device))
            nexts.append(x_next)
            ref_means.append(ref_mean)
            advantages.append(mix)
        buffer = _Buffer(
            x=torch.cat(xs), step=torch.cat(steps), x_next=torch.cat(nexts), ref_mean=torch.cat(ref_means),
            advantage=torch.cat(advantages), old_log_prob=torch.zeros(n * len(xs), dtype=dtype, device=device),
        )
        reward = torch.cat(rewards)
        stats = {"reward": float(reward.mean()), "reward_std": float(reward.std()),
                 "kl": float(torch.stack(kls).mean()), "log_ratio": float("nan")}
        return buffer, stats


def policy_terms(model: nn.Module, path: GaussianPath, prediction: str, buffer: _Buffer, idx: Tensor, times: Tensor,
                 g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log π(x_next | x), μ, std)`` of the transitions ``idx`` under ``model`` (one model call)."""
    field = Field(model, path, prediction)
    k = buffer.step[idx]
    mean, std = sde_kernel(field, buffer.x[idx], times[k], times[k + 1], g[k])
    return gaussian_log_prob(buffer.x_next[idx], mean, std), mean, std


class GRPOLoss:
    """``loss(model, indices, generator=None)``: PPO-clip on the transitions of the current rollout plus β·KL.

    Called by the Trainer with the index batches of a :class:`RolloutSource`. After each call
    :attr:`last` holds the minibatch's ``ratio_min``, ``ratio_max``, ``clip_fraction``, ``policy_loss`` and ``kl``.
    ``config()`` (the checkpoint's ``loss`` entry) records the prediction, so that the fine-tuned checkpoint loads
    like the pretrained one (``flowdiff.pipeline.load_field``).
    """

    def __init__(self, source: RolloutSource):
        self.source = source
        self.path, self.prediction = source.path, source.prediction
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        src = self.source
        buffer, c = src.buffer, src.config
        if buffer is None:
            raise RuntimeError("GRPOLoss called before the RolloutSource drew a rollout")
        idx = x[:, 0].round().long().to(buffer.step.device)
        times = src.times(buffer.x.dtype, buffer.x.device)
        g = src.g_table(times)
        log_prob, mean, std = policy_terms(model, self.path, self.prediction, buffer, idx, times, g)
        ratio = torch.exp(log_prob - buffer.old_log_prob[idx])
        advantage = buffer.advantage[idx]
        clipped = ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
        policy_loss = torch.maximum(-advantage * ratio, -advantage * clipped).mean()
        kl = (((mean - buffer.ref_mean[idx]) ** 2).reshape(len(idx), -1).sum(1) / (2 * std * std)).mean()
        loss = policy_loss + c.beta * kl if c.kl == "loss" else policy_loss
        with torch.no_grad():
            self.last = {"ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
                         "clip_fraction": float(((ratio - 1).abs() > c.clip_range).double().mean()),
                         "policy_loss": float(policy_loss), "kl": float(kl)}
        return loss

    def config(self) -> dict[str, Any]:
        return {"name": "grpo", "prediction": self.prediction, **self.source.config.to_dict()}


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: the Trainer's summary, the trained network (``trainer.model``; EMA weights in
    ``trainer.ema_model``), the frozen reference, and per-rollout statistics (``history``)."""

    summary: TrainSummary
    trainer: Trainer
    reference: nn.Module
    history: list[dict[str, float]] = dataclass_field(default_factory=list)


def finetune(model: nn.Module, path: GaussianPath, prediction: str, reward: Reward,
             config: GRPOConfig | dict[str, Any] | None = None, train: TrainConfig | dict[str, Any] | None = None, *,
             reference: nn.Module | None = None, resume: bool = False, overwrite: bool = False, progress: bool = False,
             model_config: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None,
             data_shape: tuple[int, ...] | None = None, callbacks: tuple = ()) -> FinetuneResult:
    """Fine-tune ``model`` (trained on ``path`` predicting ``prediction``) toward ``reward`` with a GRPO recipe.

    Arguments:
        model: the network to train (its current weights are the pretrained policy; trained in place).
        path, prediction: what the model was trained on (any Gaussian path, any prediction type).
        reward: ``reward(x) -> (B,)`` on data predictions (:mod:`flowdiff.rl.rewards`); checked on every rollout.
        config: :class:`GRPOConfig` (or a dict of its fields).
        train: :class:`~flowdiff.train.TrainConfig` (or dict): steps (= optimizer updates), lr, EMA, checkpoints,
            output folder. Its ``batch_size`` is set to the transitions per update.
        reference: the frozen reference; default a copy of ``model`` as passed (before any resume).
        resume, overwrite, progress, model_config, extra_config, callbacks: as for :class:`~flowdiff.train.Trainer`.
        data_shape: the shape of one sample (default: ``model.data_shape`` or ``model.config()["data_shape"]``).

    Returns:
        :class:`FinetuneResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}")
    if not callable(reward):
        raise TypeError(f"reward must be a callable reward(x) -> Tensor of shape (B,), got {type(reward).__name__}")
    Field(model, path, prediction)  # validates the prediction
    if config is None:
        config = GRPOConfig()
    elif isinstance(config, dict):
        config = GRPOConfig(**config)
    elif not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, a dict or None, got {type(config).__name__}")
    train_dict = train.to_dict() if isinstance(train, TrainConfig) else dict(train or {})
    if reference is None:
        reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    model.requires_grad_(True)
    accum = int(train_dict.get("grad_accum_steps", 1))
    probe = RolloutSource(model, reference, path, prediction, reward, config, data_shape=data_shape)
    train_dict["batch_size"] = probe.batch_size
    train_config = TrainConfig.from_dict(train_dict)
    if probe.batch_size % accum:
        raise ValueError(f"grad_accum_steps={accum} must divide the {probe.batch_size} transitions of an update")
    source = RolloutSource(model, reference, path, prediction, reward, config, shard_size=probe.batch_size // accum,
                           data_shape=data_shape)
    loss = GRPOLoss(source)
    extra = {**(extra_config or {}), "path": path.config(), "prediction": prediction, "rl": config.to_dict(),
             "reward": _describe(reward)}
    trainer = Trainer(model, loss, source, train_config, resume=resume, overwrite=overwrite, progress=progress,
                      model_config=model_config, extra_config=extra, callbacks=callbacks)
    summary = trainer.fit()
    return FinetuneResult(summary=summary, trainer=trainer, reference=reference, history=list(source.history))


def _describe(reward: Any) -> Any:
    cfg = getattr(reward, "config", None)
    if callable(cfg):
        try:
            return cfg()
        except TypeError:
            pass
    return {"class": f"{type(reward).__module__}.{type(reward).__qualname__}"}


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError("the model has no floating-point parameters to fine-tune")


def _data_shape(model: nn.Module) -> tuple[int, ...]:
    shape = getattr(model, "data_shape", None)
    if shape is None and callable(getattr(model, "config", None)):
        try:
            shape = model.config().get("data_shape")  # type: ignore[union-attr]
        except (TypeError, AttributeError):
            shape = None
    if shape is None:
        raise ValueError("cannot tell the shape of one sample from the model; pass data_shape=(D,) (or (C, H, W))")
    return tuple(int(s) for s in shape)
