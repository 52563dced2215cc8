"""`flowdiff finetune`: end to end on a tiny 2-D run (fine-tune, resume, sample the result) and its errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from flowdiff.cli import app
from flowdiff.pipeline import load_field

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["--quiet", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "pre"
    res = _run("train", "--data", "eight_gaussians", "--steps", 40, "--batch", 64, "--output", out,
               "--checkpoint-every", 40)
    assert res.exit_code == 0, res.output
    return out


def test_finetune_end_to_end_and_resume(pretrained, tmp_path):
    out = tmp_path / "ft"
    common = ["-c", pretrained, "--reward", "gaussian:A=1,0;b=2;scale=1", "--beta", 0.5, "--groups", 2,
              "--group-size", 4, "--num-steps", 4, "--lr", 1e-3, "--checkpoint-every", 2, "-o", out]
    res = _run("finetune", *common, "--steps", 2, "--method", "dance-grpo")
    assert res.exit_code == 0, res.output
    assert "reward (rollout mean)" in res.output
    res = _run("finetune", *common, "--steps", 4, "--method", "dance-grpo", "--resume")
    assert res.exit_code == 0, res.output
    field, config = load_field(out)
    assert config["step"] == 4 and config["extra"]["rl"]["method"] == "dance-grpo"
    assert config["extra"]["prediction"] == "velocity"
    res = _run("sample", "-c", out, "--nfe", 8, "--count", 50, "-o", tmp_path / "samples")
    assert res.exit_code == 0, res.output
    x = torch.load(tmp_path / "samples" / "samples.pt", weights_only=False)["x"]
    assert x.shape == (50, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("args,message", [
    (["--beta", 0], "beta must be a finite number > 0"),
    (["--beta", -1], "beta must be a finite number > 0"),
    (["--group-size", 1], "group_size must be an integer >= 2"),
    (["--method", "ppo"], "unknown method 'ppo'"),
    (["--reward", "aesthetic:"], "unknown reward 'aesthetic'"),
    (["--reward", "gaussian:b=1"], "misses 'A'"),
    (["--class", 3], "unconditional"),
])
def test_finetune_errors(pretrained, tmp_path, args, message):
    base = {"--reward": "gaussian:A=1,0;b=2", "--beta": 1.0}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    flat = [v for kv in base.items() for v in kv]
    res = _run("finetune", "-c", pretrained, "-o", tmp_path / "bad", "--steps", 1, *flat)
    assert res.exit_code == 2, res.output
    assert message in res.output
