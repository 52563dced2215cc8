"""flowdiff pde fit|infer, in-process, with a tiny number of steps."""

import numpy as np
import pytest

from flowdiff.cli import main


def _run(*args):
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", *args])
    return exc.value.code


def test_pde_fit_and_infer(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run("pde", "fit", "--problem", "poisson", "-o", str(run), "--steps", "5", "--calibration", "8",
                "--threads", "1") == 0
    assert (run / "model.pt").is_file() and (run / "forward.png").is_file() and (run / "metrics.json").is_file()
    assert _run("pde", "fit", "--problem", "poisson", "-o", str(run), "--steps", "5") == 2  # already a run there
    sensors = tmp_path / "s.csv"
    x = np.linspace(-0.8, 0.8, 6)
    np.savetxt(sensors, np.stack([x, 0.5 * np.cos(np.pi * x / 2)], 1), delimiter=",", header="x,u", comments="")
    assert _run("pde", "infer", "-c", str(run), "--sensors", str(sensors), "--noise", "0.05", "--samples", "16",
                "--w", "1.5", "--threads", "1") == 0
    samples = np.loadtxt(run / "posterior.csv", delimiter=",", skiprows=1)
    assert samples.shape == (16, 5) and np.abs(samples).max() <= 1.0 + 1e-3
    assert (run / "posterior.png").is_file()
    capsys.readouterr()
    assert _run("pde", "infer", "-c", str(run), "--sensors", str(sensors), "--noise", "0") == 2
    assert "--noise" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("3.0,1.0\n")
    assert _run("pde", "infer", "-c", str(run), "--sensors", str(bad), "--noise", "0.1", "--w", "1.5") == 2
    assert "outside the domain" in capsys.readouterr().err


def test_pde_fit_rejects_unknown_problem(tmp_path, capsys):
    assert _run("pde", "fit", "--problem", "heat", "-o", str(tmp_path / "r")) == 2
    assert "unknown problem" in capsys.readouterr().err


def test_pde_fit_fixed_grid_is_the_pddlvm_baseline(tmp_path, capsys):
    import json

    import torch

    run = tmp_path / "fixed"
    assert _run("pde", "fit", "--problem", "poisson", "-o", str(run), "--grid", "fixed", "--steps", "3",
                "--calibration", "0", "--threads", "1") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["grid"] == "fixed" and metrics["points"] == 30
    state = torch.load(run / "model.pt", weights_only=False)
    assert state["config"]["grid"] == "fixed"
    capsys.readouterr()
    assert _run("pde", "fit", "--problem", "poisson", "-o", str(tmp_path / "bad"), "--grid", "mesh") == 2
    assert "unknown grid 'mesh'" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["cavity"])  # 3-D, three fields per sensor (Burgers: tests/test_pde.py)
def test_pde_fit_and_infer_on_the_other_problems(tmp_path, problem):
    run = tmp_path / problem
    assert _run("pde", "fit", "--problem", problem, "-o", str(run), "--steps", "2", "--calibration", "0",
                "--threads", "1") == 0
    assert (run / "forward.png").is_file()
    sensors = tmp_path / "s.csv"
    pts = np.array([[0.3, 0.5, 0.7], [0.6, 0.4, 0.5], [0.5, 0.5, 0.9]])
    readings = np.zeros((3, 1 if problem == "burgers" else 3))
    coords = pts[:, :2] if problem == "burgers" else pts
    np.savetxt(sensors, np.concatenate([coords, readings], 1), delimiter=",")
    assert _run("pde", "infer", "-c", str(run), "--sensors", str(sensors), "--noise", "0.1", "--samples", "8",
                "--threads", "1") == 0
    assert np.loadtxt(run / "posterior.csv", delimiter=",", skiprows=1).shape == (8, 2)
