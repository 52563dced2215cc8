"""fd.rl (issue 15 item 3): Flow-GRPO, DanceGRPO and G²RPO checked against the exact tilted target.

The policy is a flow on a 2-D Gaussian mixture: the exact velocity of the mixture plus a small MLP whose last
layer starts at zero (so the pretrained model is exact and cheap; fine-tuning trains the MLP). The KL-regularised
optimum p(x) exp(r(x)/β)/Z is flowdiff.testing.tilted_mixture.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flowdiff as fd
from flowdiff.rl import (
    ClassifierReward, GaussianFeatureReward, GRPOConfig, GRPOLoss, RolloutSource, ThresholdReward, check_reward,
    finetune, gaussian_log_prob, group_advantages, reward_from_spec, sde_kernel,
)
from flowdiff.testing import GaussianMixture, mode_frequencies, mode_weight_tv, tilted_mixture

PATH = fd.paths.Linear()
PRIOR = GaussianMixture([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], scales=[[0.5, 0.5]] * 3, weights=[0.5, 0.3, 0.2],
                        path=PATH)
A, B, SCALE = [[1.0, 0.0]], [3.0], 1.0


class Residual(nn.Module):
    """Exact mixture velocity + an MLP correction that starts at zero."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.oracle = PRIOR.model("velocity")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = fd.nn.build_network("mlp", (2,), hidden=32, depth=2)
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x, t):
        return self.oracle(x.double(), t.double()).to(x) + self.net(x, t)


def sample(model, n=3000, seed=5):
    field = fd.Field(model, PATH, "velocity")
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return fd.sample(field, x, solver="heun", nfe=30).x


def run(tmp_path, name, steps, **config):
    model = Residual()
    train = {"steps": steps, "lr": 1e-2, "ema_decay": None, "checkpoint_every": None, "log_every": 100,
             "output_dir": str(tmp_path / name), "seed": 0}
    train.update(config.pop("train", {}))
    cfg = {"group_size": 8, "groups": 8, "num_steps": 8, "updates_per_rollout": 2, **config}
    result = finetune(model, PATH, "velocity", GaussianFeatureReward(A, B, SCALE), cfg, train, data_shape=(2,))
    return model, result


# ----- pieces -------------------------------------------------------------------------------------------------


def test_sde_kernel_is_the_euler_maruyama_step_of_the_marginal_preserving_sde():
    field = fd.Field(PRIOR.model("velocity"), PATH, "velocity")
    x = torch.randn(16, 2, dtype=torch.float64)
    t, tn = torch.full((16,), 0.3, dtype=torch.float64), torch.full((16,), 0.35, dtype=torch.float64)
    g = torch.full((16,), 0.8, dtype=torch.float64)
    mean, std = sde_kernel(field, x, t, tn, g)
    want = x + 0.05 * (PRIOR.velocity(x, t) + 0.32 * PRIOR.score(x, t))
    assert torch.allclose(mean, want, atol=1e-12) and torch.allclose(std, torch.full_like(std, 0.8 * math.sqrt(0.05)))
    ode_mean, ode_std = sde_kernel(field, x, t, tn, torch.zeros_like(g))
    assert torch.allclose(ode_mean, x + 0.05 * PRIOR.velocity(x, t), atol=1e-12) and (ode_std == 0).all()
    y = torch.randn(16, 2, dtype=torch.float64)
    ref = torch.distributions.Normal(mean, std[:, None]).log_prob(y).sum(1)
    assert torch.allclose(gaussian_log_prob(y, mean, std), ref, atol=1e-12)


def test_group_advantages_are_normalised_within_groups():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 14.0]], dtype=torch.float64)
    a = group_advantages(r)
    assert torch.allclose(a.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a.std(1, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(group_advantages(r, normalize_std=False), r - r.mean(1, keepdim=True))
    assert float(group_advantages(torch.tensor([[0.0] * 99 + [1.0]]), clip=5.0).max()) == 5.0


def test_rewards():
    tilt = tilted_mixture(PRIOR, torch.tensor(A), torch.tensor(B), scale=SCALE, temperature=1.0)
    x = torch.randn(32, 2, dtype=torch.float64)
    assert torch.allclose(GaussianFeatureReward(A, B, SCALE)(x), tilt.reward(x), atol=1e-12)
    assert ThresholdReward([1.0, 0.0], 0.5)(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist() == [1.0, 0.0]
    assert ThresholdReward(threshold=0.0)(torch.tensor([[1.0, -1.0, 2.0]])).tolist() == [2.0]
    assert isinstance(reward_from_spec("gaussian:A=1,0;b=3;scale=0.5"), GaussianFeatureReward)
    assert isinstance(reward_from_spec("threshold:A=1,0;c=0.5"), ThresholdReward)
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    r = ClassifierReward(lambda z: logits, label=1, clamp=None)(torch.zeros(2, 2))
    assert torch.allclose(r, torch.log_softmax(logits, -1)[:, 1])
    with pytest.raises(ValueError, match="unknown reward"):
        reward_from_spec("aesthetic:")
    with pytest.raises(ValueError, match="scale must be"):
        GaussianFeatureReward(A, B, 0.0)


@pytest.mark.parametrize("method", ["flow-grpo", "dance-grpo", "g2rpo"])
def test_ratio_is_exactly_one_before_the_first_update(method):
    model = Residual()
    cfg = GRPOConfig(method=method, group_size=4, groups=3, num_steps=6, updates_per_rollout=2)
    source = RolloutSource(model, Residual(), PATH, "velocity", GaussianFeatureReward(A, B), cfg, data_shape=(2,))
    loss = GRPOLoss(source)
    idx = next(source)
    value = loss(model, idx.float())
    assert loss.last["ratio_min"] == 1.0 and loss.last["ratio_max"] == 1.0
    assert loss.last["kl"] == 0.0  # policy = reference before training
    assert torch.isfinite(value)
    n = source.transitions_per_rollout()
    expected = {"flow-grpo": 3 * 4 * 6, "dance-grpo": 3 * 4 * round(0.6 * 6), "g2rpo": 3 * 3 * 4}[method]
    assert n == expected and idx.shape == (n // 2, 1)
    # advantages of a group sum to zero (per trajectory or per branch step)
    assert abs(float(source.buffer.advantage.sum())) < 1e-3


# ----- fine-tuning toward the tilted target --------------------------------------------------------------------


def test_g2rpo_moves_the_flow_to_the_tilted_target(tmp_path):
    beta = 1.0
    tilt = tilted_mixture(PRIOR, torch.tensor(A), torch.tensor(B), scale=SCALE, temperature=beta)
    before = mode_weight_tv(sample(Residual()), tilt)
    model, result = run(tmp_path, "g2rpo", 16, method="g2rpo", beta=beta, num_steps=6, groups=6, granularities=(1, 2),
                        updates_per_rollout=1, train={"lr": 2e-2})
    after = mode_weight_tv(sample(model), tilt)
    assert before > 0.6
    assert after < 0.5 * before, (before, after, mode_frequencies(sample(model), tilt))
    assert result.history[-1]["reward"] > result.history[0]["reward"]


def test_larger_beta_keeps_the_kl_to_the_reference_smaller(tmp_path):
    kls = {}
    for beta in (0.1, 30.0):
        _, result = run(tmp_path, f"beta{beta}", 24, method="flow-grpo", beta=beta)
        kls[beta] = sum(h["kl"] for h in result.history[-4:]) / 4
    assert kls[30.0] < 0.5 * kls[0.1], kls


def test_exact_resume_through_the_trainer(tmp_path):
    common = {"method": "dance-grpo", "groups": 2, "group_size": 4, "num_steps": 5, "updates_per_rollout": 3}
    straight, _ = run(tmp_path, "straight", 5, **common, train={"ema_decay": 0.9, "checkpoint_every": 1})
    # stop after update 2 (in the middle of a rollout's 3 updates), then resume to 5 in a fresh process state
    run(tmp_path, "parts", 2, **common, train={"ema_decay": 0.9, "checkpoint_every": 1})
    resumed = Residual()
    finetune(resumed, PATH, "velocity", GaussianFeatureReward(A, B, SCALE),
             {"group_size": 4, **common}, {"steps": 5, "lr": 1e-2, "ema_decay": 0.9, "checkpoint_every": 1,
                                           "log_every": 100, "output_dir": str(tmp_path / "parts"), "seed": 0},
             resume=True, data_shape=(2,))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    a = fd.train.load_checkpoint(tmp_path / "straight")[1]
    b = fd.train.load_checkpoint(tmp_path / "parts")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA weights too


# ----- errors -----------------------------------------------------------------------------------------------


def test_bad_input_gives_one_clear_error(tmp_path):
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(4,\)"):
        check_reward(lambda z: z, x)
    with pytest.raises(ValueError, match="non-finite"):
        check_reward(lambda z: torch.full((4,), float("nan")), x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_reward(lambda z: [0.0] * 4, x)
    for beta in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            GRPOConfig(beta=beta)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="g2rpo needs num_steps >= 2"):
        GRPOConfig(method="g2rpo", num_steps=1)
    with pytest.raises(ValueError, match="unknown method"):
        GRPOConfig(method="ppo")
    with pytest.raises(ValueError, match="no stochastic step"):
        RolloutSource(Residual(), Residual(), PATH, "velocity", GaussianFeatureReward(A, B),
                      GRPOConfig(method="flow-grpo", diffusion=fd.paths.Window(1.0, 0.9999, 1.0).config()),
                      data_shape=(2,))
    with pytest.raises(ValueError, match="no stochastic branch"):  # g2rpo: zero g on its branch steps
        RolloutSource(Residual(), Residual(), PATH, "velocity", GaussianFeatureReward(A, B),
                      GRPOConfig(method="g2rpo", diffusion=fd.paths.Window(1.0, 0.9999, 1.0).config()),
                      data_shape=(2,))
    # a reward of the wrong shape or NaN stops fine-tuning at the first rollout with the same message
    for bad, match in ((lambda z: z.sum(), r"shape \(B,\)"), (lambda z: z[:, 0] / 0 * 0, "non-finite")):
        with pytest.raises(ValueError, match=match):
            finetune(Residual(), PATH, "velocity", bad, {"groups": 1, "group_size": 2, "num_steps": 2},
                     {"steps": 1, "output_dir": str(tmp_path / "bad"), "checkpoint_every": None}, data_shape=(2,),
                     overwrite=True)
