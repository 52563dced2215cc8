"""``flowdiff distill`` / ``flowdiff sample`` of a distilled model / ``flowdiff restore-train`` and
``flowdiff restore --method mrs`` (issue 18's CLI): end to end on tiny runs, and their bad inputs."""

import json

import pytest
import torch
from typer.testing import CliRunner

import flowdiff as fd
from flowdiff.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fewstep")
    res = _run("train", "--data", "moons", "--steps", 20, "--batch", 64, "--output", out / "run")
    assert res.exit_code == 0, res.output
    return out


def test_distill_writes_a_flow_map_that_sample_draws_with_nfe_calls(teacher):
    res = _run("distill", "-c", teacher / "run", "-o", teacher / "fm", "--steps", 5, "--batch-size", 32, "--count", 8)
    assert res.exit_code == 0, res.output
    meta = json.loads((teacher / "fm" / "flowmap.json").read_text())
    assert meta["method"] == "flow-map" and meta["two_time"] and meta["teacher_nfe"] > 0 and meta["data_shape"] == [2]
    model, _ = fd.flowmaps.load_flow_map(teacher / "fm")
    for nfe in (1, 2):
        res = _run("sample", "-c", teacher / "fm", "--nfe", nfe, "-n", 16, "-o", teacher / f"s{nfe}", "--seed", 3)
        assert res.exit_code == 0, res.output
        blob = torch.load(teacher / f"s{nfe}" / "samples.pt", weights_only=False)
        assert blob["x"].shape == (16, 2) and blob["nfe"] == nfe and blob["solver"] == "flow-map"
        # the command is the library's sampler on the saved model, from the seed's noise
        noise = model.path.prior_sample((16, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float32)
        assert torch.allclose(blob["x"], fd.flowmaps.sample(model, noise, steps=nfe).x, atol=1e-6)
    res = _run("sample", "-c", teacher / "fm", "--nfe", 2, "--solver", "heun", "-o", teacher / "bad")
    assert res.exit_code == 2 and "does not apply to a distilled flow map" in res.output


def test_distill_consistency_model_and_bad_options(teacher):
    res = _run("distill", "-c", teacher / "run", "-o", teacher / "cd", "--method", "cd", "--steps", 3, "--count", 0)
    assert res.exit_code == 0, res.output
    assert not fd.flowmaps.load_flow_map(teacher / "cd")[0].two_time
    for args, message in (
        (["--method", "progressive"], "unknown --method"),
        (["--objective", "direct", "--method", "cd"], "is for --method flow-map"),
        (["--solver", "nosuch"], "unknown solver"),
        (["--steps", 0], "steps"),
    ):
        res = _run("distill", "-c", teacher / "run", "-o", teacher / "x", *args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    assert not (teacher / "x").exists()


def test_distill_student_of_another_shape_is_refused(teacher, tmp_path):
    # a student network for 3-D data (another run's network) against the 2-D teacher
    other = tmp_path / "other"
    x3 = torch.randn(256, 3)
    torch.save(x3, tmp_path / "x3.pt")
    res = _run("train", "--data", tmp_path / "x3.pt", "--steps", 2, "--batch", 16, "--output", other)
    assert res.exit_code == 0, res.output
    res = _run("distill", "-c", teacher / "run", "--student", other, "-o", tmp_path / "o", "--steps", 1)
    assert res.exit_code == 2 and "different shape than the teacher" in res.output, res.output


@pytest.fixture(scope="module")
def restoration(tmp_path_factory):
    out = tmp_path_factory.mktemp("mrs")
    res = _run("restore-train", "--data", "digits", "--steps", 3, "--batch-size", 8, "-o", out / "model")
    assert res.exit_code == 0, res.output
    return out


def test_restore_method_mrs_end_to_end(restoration):
    res = _run("restore", "--method", "mrs", "-c", restoration / "model", "--task", "deblur", "-n", 3, "--nfe", 4,
               "-o", restoration / "out")
    assert res.exit_code == 0, res.output
    blob = torch.load(restoration / "out" / "restore.pt", weights_only=False)
    assert blob["samples"].shape == (3, 1, 1, 8, 8) and blob["nfe"] == 4 and blob["task"] == "deblur"
    metrics = json.loads((restoration / "out" / "metrics.json").read_text())
    assert metrics["method"] == "mrs" and metrics["samples"] == 1 and metrics["nfe_per_sample"] == 4
    # the same as the library's default MRS on the saved model
    model, path, meta = fd.mean_reverting.load_restoration_model(restoration / "model")
    assert meta["tasks"] == ["denoise", "deblur", "inpaint"] and meta["data_shape"] == [1, 8, 8]
    g = torch.Generator().manual_seed(0)
    mu = fd.mean_reverting.degrade(blob["truth"], "deblur", g)
    assert torch.allclose(mu, blob["mu"])
    with torch.no_grad():
        x = fd.mean_reverting.mrs_sample(model, mu, path, "noise", nfe=4, generator=g).x.clamp(-1, 1)
    assert torch.allclose(x, blob["samples"][:, 0], atol=1e-5)


def test_restore_method_mrs_bad_input(restoration, teacher):
    res = _run("restore", "--method", "mrs", "-c", teacher / "run", "-o", restoration / "x")
    assert res.exit_code == 2 and "needs a mean-reverting restoration model" in res.output
    res = _run("restore", "--method", "mrs", "-c", restoration / "model", "--task", "superres", "-o", restoration / "x")
    assert res.exit_code == 2 and "unknown task 'superres'" in res.output
    res = _run("restore-train", "--tasks", "denoise,dehaze", "-o", restoration / "x")
    assert res.exit_code == 2 and "dehaze" in res.output
    res = _run("restore-train", "--data", "moons", "-o", restoration / "x")
    assert res.exit_code == 2 and "needs images" in res.output
    assert not (restoration / "x").exists()
