"""`flowdiff restore` and the restoration recipe (issue 14, item 6)."""

from __future__ import annotations

import json

import pytest
import torch

from flowdiff.pipeline import RESTORE_TASKS, measure, psnr, restore_operator


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    root = tmp_path_factory.mktemp("restore")
    runner = CliRunner()
    for name, data in (("digits", "digits"), ("moons", "moons")):
        result = runner.invoke(app, ["train", "--data", data, "--network", "mlp", "--steps", "3", "--batch", "16",
                                     "--checkpoint-every", "3", "-o", str(root / name)])
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("task", RESTORE_TASKS)
def test_task_operators_fit_digits_and_measure(task):
    op = restore_operator(task, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = measure(op, x, 0.0)
    torch.testing.assert_close(y, op.forward(x))
    noisy = measure(op, x, 0.1, torch.Generator().manual_seed(0))
    assert noisy.shape == y.shape and (noisy - y).abs().max() > 0
    # The measurement's pseudo-inverse is consistent with it (A A+ y = y for y in the range).
    torch.testing.assert_close(op.forward(op.pinv(y)), y, atol=1e-9, rtol=1e-9)
    assert float(psnr(x, x).min()) > 100


def test_restore_cli_writes_grid_tensors_and_metrics(runs, tmp_path):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    runner = CliRunner()
    out = tmp_path / "r"
    result = runner.invoke(app, ["restore", "-c", str(runs / "digits"), "--task", "superres", "--method", "pgdm",
                                 "-n", "3", "--samples", "2", "--nfe", "6", "-o", str(out)])
    assert result.exit_code == 0, result.output
    blob = torch.load(out / "restore.pt", weights_only=True)
    assert blob["samples"].shape == (3, 2, 1, 8, 8) and torch.isfinite(blob["samples"]).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe_per_sample"] <= 7 and metrics["task"] == "superres"
    assert (out / "restore.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--task", "denoise"], "unknown task 'denoise'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--sigma-y", "-1"], "--sigma-y"),
    (["--nfe", "0"], "--nfe"),
])
def test_restore_cli_bad_input_one_line_each(runs, tmp_path, args, message):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    result = CliRunner().invoke(app, ["restore", "-c", str(runs / "digits"), "-o", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_restore_cli_refuses_a_vector_model(runs, tmp_path):
    from typer.testing import CliRunner

    from flowdiff.cli import app

    result = CliRunner().invoke(app, ["restore", "-c", str(runs / "moons"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "image model" in result.output
