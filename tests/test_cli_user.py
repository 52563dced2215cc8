"""The flowdiff command as a new user meets it (issue 11): the CLI runs in subprocesses (its real entry
point) or through :func:`flowdiff.cli.main` in-process (the same function, same exit codes), with
tiny runs so the file stays fast.

Reproducibility and resume are checked bitwise on the files; errors are checked for one line,
no traceback, the documented exit status, and nothing deleted.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLOWDIFF_PROGRESS_EVERY": "0"}
ENV.pop("FLOWDIFF_DEBUG", None)
TINY = ["--data", "moons", "--batch", "32", "--threads", "1"]


def _cli(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowdiff.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env or ENV, timeout=timeout)


def _main(*args, capsys) -> tuple[int, str, str]:
    """Run :func:`flowdiff.cli.main` in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(stop.value.code or 0), out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("network_kwargs: {hidden: 16, depth: 1}\n")
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints at steps 10, 20, 30)."""
    root = tmp_path_factory.mktemp("cli_user")
    res = _cli("train", *TINY, "--steps", 30, "--checkpoint-every", 10, "-o", root / "run")
    assert res.returncode == 0, res.stderr
    return root / "run"


# ----------------------------------------------------------------------------------------------
# 1. reproducible, 7. progress
# ----------------------------------------------------------------------------------------------


def test_same_seed_gives_bitwise_identical_weights_in_new_processes(run, tmp_path):
    again = _cli("train", *TINY, "--steps", 30, "--checkpoint-every", 10, "-o", tmp_path / "again", "--quiet")
    assert again.returncode == 0, again.stderr
    for name in ("model.safetensors", "ema.safetensors"):
        first = (run / "checkpoints" / "step_00000030" / name).read_bytes()
        assert (tmp_path / "again" / "checkpoints" / "step_00000030" / name).read_bytes() == first
    # --quiet: no progress lines; FLOWDIFF_PROGRESS_EVERY=0 without --quiet: a line per update off a terminal
    assert "train:" not in again.stderr
    other = _cli("train", *TINY, "--steps", 3, "--seed", 1, "-o", tmp_path / "seed1")
    assert other.returncode == 0, other.stderr
    assert "train: 3/3 step (100%)" in other.stderr and "step/s" in other.stderr


def test_train_run_seeds_the_weights_without_touching_torchs_generator(tmp_path):
    from flowdiff.pipeline import train_run

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    kwargs = dict(data="moons", steps=2, batch_size=16, checkpoint_every=None, progress=False,
                  network_kwargs={"hidden": 8, "depth": 1})
    a = train_run(output_dir=tmp_path / "a", **kwargs)
    torch.manual_seed(999)  # whatever the caller did to the global generator
    b = train_run(output_dir=tmp_path / "b", **kwargs)
    read = lambda s: (s.checkpoint / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b)
    torch.manual_seed(123)
    assert torch.equal(torch.random.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------
# 2. Ctrl-C, 4. corrupt checkpoint, 3. non-empty folder
# ----------------------------------------------------------------------------------------------


def test_sigint_saves_a_checkpoint_exits_130_and_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = _tiny_config(tmp_path)
    args = ["train", *TINY, "--config", cfg, "--steps", 1500, "--checkpoint-every", 10]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "flowdiff.cli", *map(str, args), "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step_00000010").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted by SIGINT" in stderr and "--resume" in stderr
    assert "trained" not in stdout  # no success message
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert 10 <= steps[-1] < 1500, steps  # the last update before the stop was checkpointed

    resumed = _cli(*args, "-o", out, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr  # same command: no changed settings
    full = _cli(*args, "-o", tmp_path / "full", "--quiet")
    assert full.returncode == 0, full.stderr
    for name in ("model.safetensors", "ema.safetensors"):  # bitwise, not just round-off
        assert (out / "checkpoints" / "step_00001500" / name).read_bytes() == \
            (tmp_path / "full" / "checkpoints" / "step_00001500" / name).read_bytes()


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step_00000030" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    res = _cli("train", *TINY, "--steps", 30, "--checkpoint-every", 10, "-o", copy, "--resume", "--quiet")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "step_00000020" in lines[0] and "step_00000030" in lines[0] and "verify" in lines[0], lines
    # steps 21-30 were redone from step 20: the same weights as the uninterrupted run
    assert (copy / "checkpoints" / "step_00000030" / "model.safetensors").read_bytes() == \
        (run / "checkpoints" / "step_00000030" / "model.safetensors").read_bytes()
    # nothing verifies: one line, exit 1
    for state in (copy / "checkpoints").glob("step_*/training_state.pt"):
        state.write_bytes(b"")
    res = _cli("train", *TINY, "--steps", 30, "-o", copy, "--resume")
    assert res.returncode == 1
    assert "verifies" in _one_error_line(res.stderr)


def test_a_folder_holding_a_run_is_never_overwritten_without_asking(run, capsys):
    before = _files(run)
    code, out, err = _main("train", *TINY, "--steps", 2, "-o", run, capsys=capsys)
    assert code == 2
    line = _one_error_line(err)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert _files(run) == before  # nothing deleted or truncated
    code, _, err = _main("train", *TINY, "--steps", 2, "-o", run, "--resume", "--overwrite", capsys=capsys)
    assert code == 2 and "exclude" in _one_error_line(err)
    assert _files(run) == before


def test_overwrite_starts_over(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    code, _, err = _main("train", *TINY, "--steps", 2, "-o", tmp_path / "r", capsys=capsys)
    assert code == 2 and "not empty" in _one_error_line(err)
    code, out, err = _main("train", *TINY, "--steps", 2, "-o", tmp_path / "r", "--overwrite", "--quiet", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert (tmp_path / "r" / "checkpoints" / "step_00000002").is_dir()


# ----------------------------------------------------------------------------------------------
# 5. one-line errors, exit 2 (usage) / 1 (data, I/O)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    x = np.random.default_rng(0).normal(size=(50, 2))
    nan, inf = x.copy(), x.copy()
    nan[3, 1], inf[4, 0] = np.nan, np.inf
    np.save(d / "nan.npy", nan)
    np.save(d / "inf.npy", inf)
    np.save(d / "empty.npy", np.zeros((0, 2)))
    np.save(d / "one.npy", np.zeros((1, 2)))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "strings.npy", np.array(["a", "b"]))
    (d / "afile").write_text("x")
    (d / "steps.yaml").write_text("steps: ten\n")
    (d / "netkey.yaml").write_text("network_kwargs: {hiden: 3}\nsteps: 2\n")
    torch.save({"x": torch.full((40, 2), float("nan"))}, d / "nan_samples.pt")
    return d


@pytest.mark.parametrize("args,code,words", [
    (["train", "--data", "{d}/nan.npy"], 1, ["nan.npy", "non-finite"]),
    (["train", "--data", "{d}/inf.npy"], 1, ["inf.npy", "non-finite"]),
    (["train", "--data", "{d}/empty.npy"], 1, ["empty.npy", "no samples"]),
    (["train", "--data", "{d}/one.npy"], 1, ["one.npy", "at least 2"]),
    (["train", "--data", "{d}/objects.npy"], 1, ["objects.npy", "array of numbers"]),
    (["train", "--data", "{d}/strings.npy"], 1, ["strings.npy", "numbers"]),
    (["train", "-o", "{d}/afile"], 2, ["afile", "is a file"]),
    (["train", "--lr", "0"], 2, ["--lr", "> 0"]),
    (["train", "--steps", "ten"], 2, ["--steps", "integer"]),
    (["train", "--network", "unet"], 2, ["unet", "(C, H, W)"]),
    (["train", "--config", "{d}/steps.yaml"], 2, ["steps", "'ten'", ">= 1"]),
    (["train", "--config", "{d}/netkey.yaml"], 2, ["hiden", "valid: hidden"]),
    (["train", "--device", "tpu"], 2, ["tpu", "cpu, cuda"]),
    (["train", "--dtype", "float8"], 2, ["float8", "float32"]),
    (["sample", "-c", "{run}", "-o", "{d}/afile"], 2, ["afile", "file"]),
    (["sample", "-c", "{run}", "--solver", "magic"], 2, ["magic", "dpm-solver++"]),
    (["sample", "-c", "{run}", "--dtype", "float16"], 2, ["float16", "bfloat16"]),
    (["sample", "-c", "{run}", "--solver-option", "bogus=1"], 2, ["bogus", "valid"]),
    (["sample", "-c", "{d}/nothing"], 1, ["not found", "nothing"]),
    (["eval", "-s", "{d}/nan_samples.pt", "--data", "moons"], 1, ["NaN"]),
    (["likelihood", "{run}", "--dtype", "bfloat16"], 2, ["bfloat16", "float64"]),
    (["ems", "-c", "{run}", "-o", "{d}/afile/ems.safetensors"], 2, ["afile", "is a file"]),
    (["nosuchcommand"], 2, ["nosuchcommand"]),
])
def test_user_errors_are_one_line_with_the_documented_status(args, code, words, bad_files, run, tmp_path, capsys):
    args = [a.format(d=bad_files, run=run) for a in args]
    if args[0] in ("train", "sample") and "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    if args[0] == "train" and "--steps" not in args:
        args += ["--steps", "2"]
    got, out, err = _main(*args, capsys=capsys)
    line = _one_error_line(err)
    assert got == code, line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists()  # nothing left behind by a refused command


def test_eval_of_two_dimensional_samples_against_digits_is_a_usage_error(run, tmp_path, capsys):
    code, _, err = _main("sample", "-c", run, "-n", 20, "--nfe", 4, "-o", tmp_path / "s", "-q", capsys=capsys)
    assert code == 0, err
    code, _, err = _main("eval", "-s", tmp_path / "s", "--data", "digits", capsys=capsys)
    assert code == 2 and "(1, 8, 8)" in _one_error_line(err)


def test_debug_shows_the_traceback_and_the_real_entry_point_agrees(bad_files, tmp_path):
    res = _cli("train", "--data", bad_files / "nan.npy", "-o", tmp_path / "o")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = _cli("train", "--data", bad_files / "nan.npy", "-o", tmp_path / "o", env={**ENV, "FLOWDIFF_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr and "DataError" in res.stderr
    assert not (tmp_path / "o").exists()  # the folder made for the run is removed again when it stays empty


def test_unwritable_output_is_an_io_error_before_any_work(run, tmp_path, capsys):
    if os.geteuid() == 0:
        target = Path("/sys/flowdiff-test-not-writable/out")  # root writes everywhere else
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "out"
    t0 = time.perf_counter()
    code, _, err = _main("sample", "-c", run, "-n", 10 ** 7, "-o", target, capsys=capsys)
    assert code == 1 and "cannot write" in _one_error_line(err)
    assert time.perf_counter() - t0 < 10  # refused before ten million samples were drawn


# ----------------------------------------------------------------------------------------------
# 6. where things go
# ----------------------------------------------------------------------------------------------


def test_eval_of_a_sample_folder_does_not_depend_on_the_current_directory(run, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    import shutil

    shutil.copytree(run, work / "run")
    res = _cli("sample", "-c", "run", "-n", 50, "--nfe", 4, "-o", "samples", cwd=work)
    assert res.returncode == 0, res.stderr
    res = _cli("eval", "-s", work / "samples", cwd=tmp_path)  # elsewhere, no --data
    assert res.returncode == 0, res.stderr
    assert json.loads((work / "samples" / "metrics.json").read_text())["dataset"] == "moons"


def test_ems_and_tune_grid_say_where_they_wrote(run, tmp_path, capsys):
    code, out, err = _main("ems", "-c", run, "--knots", 6, "--samples", 16, "--batch-size", 16, "-q", capsys=capsys)
    assert code == 0, err
    written = run / "checkpoints" / "step_00000030" / "ems.safetensors"
    assert written.is_file() and str(written) in out
    target = tmp_path / "grids" / "g.safetensors"
    code, out, err = _main("tune-grid", "-c", run, "--nfe", 4, "--count", 8, "--max-evals", 4, "--time-budget", 5,
                           "-o", target, "-q", capsys=capsys)
    assert code == 0, err
    assert target.is_file() and str(target) in out


def test_demo_writes_one_run_folder_not_checkpoints_inside_checkpoints(tmp_path, capsys):
    code, out, err = _main("demo", "--steps", 8, "--count", 40, "--nfe", 4, "-o", tmp_path / "demo", "-q", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "demo" / "checkpoints" / "step_00000008" / "model.safetensors").is_file()
    assert not (tmp_path / "demo" / "checkpoints" / "checkpoints").exists()
    for name in ("samples.pt", "samples.png", "metrics.json"):
        assert (tmp_path / "demo" / name).is_file()
    code, _, err = _main("demo", "--steps", 8, "--count", 40, "--nfe", 4, "-o", tmp_path / "demo", capsys=capsys)
    assert code == 2 and "--overwrite" in _one_error_line(err)


# ----------------------------------------------------------------------------------------------
# 8. threads, 9. devices and dtypes, dopri5 from the command line
# ----------------------------------------------------------------------------------------------


def test_default_threads_do_not_oversubscribe_and_are_restored(tmp_path):
    from flowdiff._utils import available_cores, default_threads
    from flowdiff.pipeline import train_run

    small = torch.nn.Linear(4, 4)
    assert default_threads(small) == 1
    assert 1 <= default_threads() <= min(4, available_cores())
    seen = []
    torch.set_num_threads(2)
    try:
        from flowdiff.train import Trainer

        original = Trainer._train_step

        def spy(self):
            seen.append(torch.get_num_threads())
            return original(self)

        Trainer._train_step = spy
        try:
            train_run(data="moons", steps=2, batch_size=16, output_dir=tmp_path / "t", progress=False,
                      checkpoint_every=None, network_kwargs={"hidden": 8, "depth": 1})
        finally:
            Trainer._train_step = original
        assert seen == [1, 1]  # a tiny network trains on one thread
        assert torch.get_num_threads() == 2  # and the caller's setting comes back
    finally:
        torch.set_num_threads(1)


def test_sample_dtype_device_batch_size_and_load_field(run, tmp_path, capsys):
    from flowdiff.pipeline import load_field

    field, _ = load_field(run, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in field.model.parameters())
    with pytest.raises(ValueError, match="not available|valid"):
        load_field(run, device="cuda:7" if not torch.cuda.is_available() else "tpu")
    code, _, err = _main("sample", "-c", run, "-n", 21, "--batch-size", 8, "--nfe", 4, "--dtype", "float64",
                         "-o", tmp_path / "f64", "-q", capsys=capsys)
    assert code == 0, err
    x64 = torch.load(tmp_path / "f64" / "samples.pt", weights_only=False)["x"]
    assert x64.shape == (21, 2) and x64.dtype == torch.float64
    code, _, err = _main("sample", "-c", run, "-n", 21, "--batch-size", 8, "--nfe", 4, "-o", tmp_path / "f32", "-q",
                         capsys=capsys)
    x32 = torch.load(tmp_path / "f32" / "samples.pt", weights_only=False)["x"]
    assert (x32.double() - x64).abs().max() < 1e-4  # same noise, same solve, another precision
    code, _, err = _main("sample", "-c", run, "-n", 21, "--batch-size", 8, "--nfe", 4, "--dtype", "bfloat16", "-o", tmp_path / "bf",
                         "-q", capsys=capsys)
    assert code == 0, err  # CPU autocast
    xbf = torch.load(tmp_path / "bf" / "samples.pt", weights_only=False)["x"]
    assert torch.isfinite(xbf).all() and (xbf - x32).abs().max() < 0.5
    if not torch.cuda.is_available():
        code, _, err = _main("sample", "-c", run, "--device", "cuda", "-o", tmp_path / "c", capsys=capsys)
        assert code == 2 and "'cuda'" in _one_error_line(err) and "cpu" in err


def test_dopri5_runs_from_the_command_line_with_tolerances(run, tmp_path, capsys):
    code, out, err = _main("sample", "-c", run, "-n", 30, "--solver", "dopri5", "--rtol", "1e-3", "--atol", "1e-3",
                           "-o", tmp_path / "d", "-q", capsys=capsys)
    assert code == 0, err
    blob = torch.load(tmp_path / "d" / "samples.pt", weights_only=False)
    assert torch.isfinite(blob["x"]).all() and blob["nfe"] > 0
    tight = _main("sample", "-c", run, "-n", 30, "--solver", "dopri5", "--solver-option", "rtol=1e-7",
                  "--solver-option", "atol=1e-7", "-o", tmp_path / "t", "-q", capsys=capsys)
    assert tight[0] == 0, tight[2]
    assert torch.load(tmp_path / "t" / "samples.pt", weights_only=False)["nfe"] > blob["nfe"]


# ----------------------------------------------------------------------------------------------
# 10. likelihood, --version
# ----------------------------------------------------------------------------------------------


def test_likelihood_recipe_matches_the_closed_form_gaussian():
    from flowdiff.pipeline import likelihood_of_data
    from flowdiff.testing import Gaussian

    path = fd.paths.Linear(t_min=0.0, t_max=1.0)  # the base N(0, I) at t = 0 is exact: no prior error
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    oracle = Gaussian(torch.tensor([1.0, -0.5]), cov, path=path)
    x = oracle.sample(300, torch.Generator().manual_seed(0))
    field = fd.Field(oracle.model("velocity"), path, "velocity")
    res = likelihood_of_data(field, x, batch_size=128)
    truth = -oracle.log_prob(x)
    assert abs(res["nll_nats"] - float(truth.mean())) < 1e-3
    assert res["bits_per_dim"] == pytest.approx(res["nll_nats"] / (2 * math.log(2)))
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))  # E[-log p] of the population
    lo, hi = res["nll_nats_ci"]
    assert lo < entropy < hi and hi - lo < 0.3
    assert res["divergence"] == "exact" and res["num_data"] == 300


def test_likelihood_and_version_commands(run, tmp_path, capsys):
    code, out, err = _main("likelihood", run, "-n", 40, "--nfe", 8, "-o", tmp_path / "ll.json", "-q", capsys=capsys)
    assert code == 0, err
    assert "nats/datum" in out and "bits/dim" in out and "95% CI" in out
    res = json.loads((tmp_path / "ll.json").read_text())
    assert res["num_data"] == 40 and res["nll_nats_ci"][0] < res["nll_nats"] < res["nll_nats_ci"][1]
    code, out, _ = _main("--version", capsys=capsys)
    assert code == 0 and out.startswith("flowdiff ")
