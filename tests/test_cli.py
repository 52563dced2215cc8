"""The flowdiff command: end to end on a tiny run, and every bad input it promises to catch."""

import json

import pytest
import torch
from typer.testing import CliRunner

from flowdiff.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = _run("train", "--data", "moons", "--steps", 60, "--batch", 128, "--output", out / "ckpt", "--checkpoint-every", 30)
    assert res.exit_code == 0, res.output
    return out


def test_train_sample_eval_end_to_end(trained):
    res = _run("sample", "--checkpoint", trained / "ckpt", "--solver", "dpm-solver++", "--nfe", 10, "--count", 300,
               "--output", trained / "samples")
    assert res.exit_code == 0, res.output
    blob = torch.load(trained / "samples" / "samples.pt", weights_only=False)
    assert blob["x"].shape == (300, 2) and torch.isfinite(blob["x"]).all()
    assert blob["nfe"] <= 10
    png = (trained / "samples" / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    res = _run("eval", "--samples", trained / "samples")
    assert res.exit_code == 0, res.output
    metrics = json.loads((trained / "samples" / "metrics.json").read_text())
    assert metrics["sliced_w2"] > 0 and metrics["sliced_w2_floor"] > 0
    assert "floor" in res.output


@pytest.mark.parametrize(
    "args,word",
    [
        (["train", "--data", "nosuchdata", "--steps", "1"], "checkerboard"),
        (["train", "--path", "nosuchpath", "--steps", "1"], "linear"),
        (["train", "--prediction", "eps", "--steps", "1"], "velocity"),
        (["train", "--network", "transformer", "--steps", "1"], "mlp"),
    ],
)
def test_unknown_names_exit_2_and_list_valid(args, word, tmp_path):
    res = _run(*args, "--output", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert "unknown" in res.output and word in res.output


def test_unknown_solver_exits_2(trained):
    res = _run("sample", "--checkpoint", trained / "ckpt", "--solver", "magic", "--count", 4, "--output", trained / "s2")
    assert res.exit_code == 2
    assert "dpm-solver++" in res.output


def test_missing_checkpoint_is_one_line(tmp_path):
    res = _run("sample", "--checkpoint", tmp_path / "nothing", "--output", tmp_path / "s")
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_one_line(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "ckpt", bad)
    for f in bad.rglob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    res = _run("sample", "--checkpoint", bad, "--output", tmp_path / "s")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_help_explains_every_option():
    for command in ("train", "sample", "eval", "demo"):
        res = _run(command, "--help")
        assert res.exit_code == 0
        assert "--" in res.output
    res = _run("train", "--help")
    for option in ("--data", "--path", "--prediction", "--network", "--steps", "--batch", "--output", "--config"):
        assert option in res.output


def test_yaml_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: nosuchdata\nsteps: 1\n")
    res = _run("train", "--config", cfg, "--output", tmp_path / "o")
    assert res.exit_code == 2 and "nosuchdata" in res.output
    cfg.write_text("colour: blue\n")
    res = _run("train", "--config", cfg, "--output", tmp_path / "o")
    assert res.exit_code == 2 and "colour" in res.output


def test_ems_and_tune_grid_from_a_checkpoint_then_sample_with_both(trained):
    ckpt = trained / "ckpt"
    ems_file, grid_file = trained / "ems.safetensors", trained / "grid.safetensors"
    res = _run("ems", "-c", ckpt, "-o", ems_file, "--knots", 12, "--samples", 64, "--batch-size", 64, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "model calls" in res.output and ems_file.is_file()
    res = _run("tune-grid", "-c", ckpt, "--solver", "dpm-solver-v3", "--nfe", 5, "--ems", ems_file, "-o", grid_file,
               "--count", 16, "--max-evals", 12, "--time-budget", 30)
    assert res.exit_code == 0, res.output
    assert grid_file.is_file()
    out = trained / "v3"
    res = _run("sample", "-c", ckpt, "--solver", "dpm-solver-v3", "--nfe", 5, "--ems", ems_file, "--grid", grid_file,
               "--count", 64, "--output", out)
    assert res.exit_code == 0, res.output
    blob = torch.load(out / "samples.pt", weights_only=False)
    assert blob["nfe"] == 5 and torch.isfinite(blob["x"]).all()
    # the grid was tuned for 5 NFE and one solver: anything else is refused with what it was tuned for
    res = _run("sample", "-c", ckpt, "--solver", "dpm-solver-v3", "--nfe", 6, "--ems", ems_file, "--grid", grid_file,
               "--count", 4, "--output", trained / "v3b")
    assert res.exit_code == 2 and "5" in res.output, res.output
    res = _run("sample", "-c", ckpt, "--solver", "dpm-solver-v3", "--nfe", 5, "--count", 4, "--output", trained / "v3c")
    assert res.exit_code == 2 and "--ems" in res.output
