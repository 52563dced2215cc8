r"""RL fine-tuning of flows toward a reward (issue 15): Flow-GRPO, DanceGRPO and G²RPO on any flowdiff model.

* :func:`finetune` — run a recipe through :class:`flowdiff.train.Trainer` (EMA, checkpoints, exact resume);
  :class:`GRPOConfig` — its settings; :class:`RolloutSource`, :class:`GRPOLoss` — the Trainer's data and loss.
* :func:`sde_kernel`, :func:`gaussian_log_prob`, :func:`group_advantages` — the Gaussian SDE policy step,
  its log-density and GRPO's group-normalised advantages.
* Rewards (:mod:`flowdiff.rl.rewards`): :class:`GaussianFeatureReward` (log-density of a target region),
  :class:`ClassifierReward` (a classifier's class log-probability), :class:`ThresholdReward`
  (non-differentiable indicator / count), :func:`check_reward`, :func:`reward_from_spec`.

The KL-regularised optimum of a reward r at temperature β is :math:`p(x)e^{r(x)/\beta}/Z`;
``flowdiff.testing.tilted_mixture`` gives it in closed form for the toy checks (docs/rl.md).
"""

from .grpo import (
    METHODS,
    FinetuneResult,
    GRPOConfig,
    GRPOLoss,
    RolloutSource,
    finetune,
    gaussian_log_prob,
    group_advantages,
    sde_kernel,
)
from .rewards import ClassifierReward, GaussianFeatureReward, Reward, ThresholdReward, check_reward, reward_from_spec

__all__ = [
    "METHODS", "GRPOConfig", "GRPOLoss", "RolloutSource", "FinetuneResult", "finetune", "sde_kernel",
    "gaussian_log_prob", "group_advantages", "Reward", "GaussianFeatureReward", "ClassifierReward",
    "ThresholdReward", "check_reward", "reward_from_spec",
]
