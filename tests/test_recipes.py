"""Training recipes: power-function EMA and its post-hoc reconstruction (Karras et al. 2024, EDM2); the configs in configs/."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdiff.train.ema import (
    EMASnapshot,
    PowerEMA,
    gamma_to_sigma_rel,
    load_snapshots,
    posthoc_coefficients,
    reconstruct_ema,
    save_snapshot,
    sigma_rel_to_gamma,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))


def trajectory(k: int) -> torch.Tensor:
    """A smooth, noisy weight trajectory θ_k (three coordinates)."""
    g = torch.Generator().manual_seed(k)
    base = torch.tensor([math.sin(k / 300), math.log1p(k) , (k / 1000) ** 2], dtype=torch.float64)
    return base + 0.05 * torch.randn(3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2])
def test_sigma_rel_and_gamma_are_inverse(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-10)
    # Definition: the relative std of the profile p(τ) ∝ τ^γ on [0, 1], by numerical quadrature.
    tau = np.linspace(0, 1, 200_001)
    p = tau**gamma
    p /= np.trapezoid(p, tau)
    mean = np.trapezoid(tau * p, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
    assert std == pytest.approx(sigma_rel, rel=2e-3)


def test_power_ema_weights_are_the_integrated_power_profile():
    # Each θ_k enters the step-t average with weight (k^{γ+1} − (k−1)^{γ+1}) / t^{γ+1}: the
    # continuous profile integrated over (k − 1, k] (EDM2 eq. 2 with θ piecewise constant).
    model = Scalar()
    ema = PowerEMA(model, sigma_rels=(0.05, 0.15))
    steps = 400
    thetas = []
    for k in range(1, steps + 1):
        model.theta.data.copy_(trajectory(k))
        thetas.append(trajectory(k))
        ema.update(model, k)
    thetas = torch.stack(thetas)
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    for index, sigma_rel in enumerate((0.05, 0.15)):
        gamma = sigma_rel_to_gamma(sigma_rel)
        weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / steps ** (gamma + 1)
        torch.testing.assert_close(ema.average(index)["theta"], weights @ thetas, rtol=1e-10, atol=1e-10)


def test_posthoc_coefficients_pick_an_existing_profile():
    steps = [1000, 2000, 3000, 4000] * 2
    rels = [0.05] * 4 + [0.10] * 4
    x = posthoc_coefficients(steps, rels, 0.10, 4000)
    assert x.sum() == pytest.approx(1.0)
    expected = np.zeros(8)
    expected[7] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("target", [0.07, 0.085, 0.13])
def test_posthoc_reconstruction_matches_a_directly_tracked_ema(target, tmp_path):
    # Snapshots of σ_rel = 0.05 and 0.10 every 250 steps rebuild an average of another width
    # that was tracked directly in the same run (EDM2 §3.2): the error must be a small fraction
    # of how much the averages differ from each other.
    model = Scalar()
    tracked = PowerEMA(model, sigma_rels=(0.05, 0.10, target))
    snapshots: list[EMASnapshot] = []
    for k in range(1, 4001):
        model.theta.data.copy_(trajectory(k))
        tracked.update(model, k)
        if k % 250 == 0:
            for snap in tracked.snapshots()[:2]:
                snapshots.append(snap)
                save_snapshot(snap, tmp_path)
    direct = tracked.average(2)["theta"]
    spread = (tracked.average(0)["theta"] - tracked.average(1)["theta"]).abs().max()
    rebuilt = reconstruct_ema(snapshots, target)["theta"]
    assert (rebuilt - direct).abs().max() < 0.05 * max(float(spread), 1e-3)
    # The same from the files on disk.
    loaded = load_snapshots(tmp_path)
    assert len(loaded) == len(snapshots)
    torch.testing.assert_close(reconstruct_ema(loaded, target)["theta"], rebuilt)


def test_power_ema_errors():
    with pytest.raises(ValueError, match="sigma_rel"):
        PowerEMA(Scalar(), sigma_rels=(0.5,))
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.0)
    with pytest.raises(ValueError, match="at least one snapshot"):
        reconstruct_ema([], 0.1)
    with pytest.raises(ValueError, match="no EMA snapshots"):
        load_snapshots("/nonexistent-folder-for-test")


def test_averaged_model_with_power_ema_fn_matches_power_ema():
    # The Trainer's AveragedModel counts the initial weights as the first point: its average after
    # k updates is PowerEMA's after step k + 1 with θ_1 = the initial weights.
    from torch.optim.swa_utils import AveragedModel

    from flowdiff.train.ema import power_ema_multi_avg_fn

    model = Scalar()
    model.theta.data.copy_(trajectory(1))
    averaged = AveragedModel(model, multi_avg_fn=power_ema_multi_avg_fn(0.1), use_buffers=True)
    averaged.update_parameters(model)
    reference = PowerEMA(model, sigma_rels=(0.1,))
    reference.update(model, 1)
    for k in range(2, 300):
        model.theta.data.copy_(trajectory(k))
        averaged.update_parameters(model)
        reference.update(model, k)
    torch.testing.assert_close(averaged.module.theta.data, reference.average(0)["theta"], rtol=1e-12, atol=1e-12)


def test_trainer_power_ema_and_config_errors(tmp_path):
    from flowdiff.data import load_dataset
    from flowdiff.losses import GaussianPathLoss
    from flowdiff.nn import MLP
    from flowdiff.paths import Linear
    from flowdiff.train import TrainConfig, Trainer

    data = load_dataset("moons", split="train", n=256)
    config = TrainConfig(steps=20, batch_size=32, ema_sigma_rel=0.1, checkpoint_every=None, output_dir=str(tmp_path),
                         log_every=10, device="cpu")
    trainer = Trainer(MLP(2, hidden=16, depth=1), GaussianPathLoss(Linear()), data, config, progress=False)
    trainer.fit()
    ema = dict(trainer.ema_model.named_parameters())
    live = dict(trainer.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in ema.values())
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    with pytest.raises(ValueError, match="ema_sigma_rel"):
        TrainConfig(ema_sigma_rel=0.5)
    with pytest.raises(ValueError, match="ema_sigma_rel"):
        TrainConfig(ema_sigma_rel=0.1, ema_decay=None)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"ema_sigma": 0.1})


# ----------------------------------------------------------------------------------------------
# configs/: every file parses, names only keys `flowdiff train --config` knows, and trains
# ----------------------------------------------------------------------------------------------

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def _train_option_names() -> set[str]:
    import inspect

    from flowdiff.cli import train

    return {name for name in inspect.signature(train).parameters if name != "config"} | {"network_kwargs"}


def test_configs_folder_is_not_empty():
    assert {c.name for c in CONFIGS} >= {"digits.yaml", "digits_cond.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_config_parses_and_names_only_known_keys(config):
    import inspect

    import yaml

    from flowdiff import nn as fdnn

    loaded = yaml.safe_load(config.read_text())
    assert isinstance(loaded, dict) and loaded
    unknown = set(loaded) - _train_option_names()
    assert not unknown, f"{config.name}: unknown keys {sorted(unknown)}"
    network = {"mlp": fdnn.MLP, "unet": fdnn.UNet}[loaded.get("network", "mlp")]
    assert set(loaded.get("network_kwargs") or {}) <= set(inspect.signature(network).parameters)


def test_digits_cond_config_trains_the_measured_conditional_recipe():
    # configs/digits.yaml is the measured class-conditional UNet recipe (docs/training.md); the
    # config named for guidance must not drift from it.
    import yaml

    by_name = {c.name: yaml.safe_load(c.read_text()) for c in CONFIGS}
    assert by_name["digits_cond.yaml"] == by_name["digits.yaml"]
    assert by_name["digits_cond.yaml"]["label_dropout"] > 0 and by_name["digits_cond.yaml"]["network"] == "unet"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_config_trains_through_the_cli(config, tmp_path, monkeypatch):
    # As a user types it, shortened to 2 steps (options on the command line win over the file;
    # `train` reads which ones were given from sys.argv, so the test sets it as a shell would).
    from typer.testing import CliRunner

    from flowdiff.cli import app

    args = ["train", "--config", str(config), "--steps", "2", "--checkpoint-every", "2", "--batch", "16",
            "-o", str(tmp_path / "run")]
    monkeypatch.setattr("sys.argv", ["flowdiff", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output, result.output


def test_a_config_key_that_does_not_exist_is_one_clear_error(tmp_path):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS[0].read_text()) + "learning_rate: 0.1\n")
    result = CliRunner().invoke(app, ["train", "--config", str(bad), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "learning_rate" in errors[0] and "valid:" in errors[0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# The demo's floor: what a perfect generator scores
# ----------------------------------------------------------------------------------------------


def test_toy_floor_is_drawn_fresh_and_is_what_iid_data_scores(monkeypatch):
    # A perfect generator (fresh checkerboard points) must score ratio 1 on average against the
    # floor; the floor's real sets are fresh i.i.d. draws (Dataset.sample), not subsets of the
    # one training pool, whose shared deviation does not average out (benchmarks/demo_recipes.py).
    from flowdiff.data.dataset import Dataset
    from flowdiff.data.toy import checkerboard
    from flowdiff.pipeline import evaluate_samples

    calls = []
    original = Dataset.sample
    monkeypatch.setattr(Dataset, "sample", lambda self, n, generator=None: calls.append(n) or original(self, n, generator))
    ratios = []
    for k in range(24):
        x = checkerboard(300, torch.Generator().manual_seed(500 + k), dtype=torch.float32)
        result = evaluate_samples(x, "checkerboard", seed=0, num_projections=64)
        ratios.append(result["sliced_w2"] / result["sliced_w2_floor"])
    assert result["floor_draws"] == 16 and calls[:16] == [300] * 16
    assert 0.85 < float(np.mean(ratios)) < 1.15, ratios
    # A generator whose board is 30 % too small scores clearly above the floor.
    shrunk = 0.7 * checkerboard(300, torch.Generator().manual_seed(7), dtype=torch.float32)
    result = evaluate_samples(shrunk, "checkerboard", seed=0, num_projections=64)
    assert result["sliced_w2"] / result["sliced_w2_floor"] > 1.5
    # Finite data keeps random training subsets (8 by default).
    calls.clear()
    digits = evaluate_samples(torch.zeros(20, 1, 8, 8), "digits", seed=0, num_projections=16)
    assert digits["floor_draws"] == 8 and not calls
