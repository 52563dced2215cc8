"""Tests of flowdiff.train: exact resume after SIGKILL, data parallelism, atomic checkpoints,
non-finite stop, EMA and learning-rate schedule against hand computations, validation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import flowdiff as fd
from flowdiff.data import Dataset
from flowdiff.losses import GaussianPathLoss, LossOutput
from flowdiff.nn import MLP
from flowdiff.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_weights,
    lr_factor,
)
from flowdiff.train import checkpoint as checkpoint_module

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_train_worker.py"
STEPS = 12


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 64, labelled: bool = False) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=generator)
    if not labelled:
        return Dataset(x=x)
    return Dataset(x=x, y=(x[:, 0] > 0).long(), num_classes=2)


def _model(**kwargs: Any) -> MLP:
    torch.manual_seed(0)
    return MLP(dim=2, hidden=8, depth=1, **kwargs)


def _loss() -> GaussianPathLoss:
    return GaussianPathLoss(fd.paths.Linear(), prediction="velocity")


def _config(tmp_path: Path, **changes: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "steps": 6, "batch_size": 16, "lr": 1e-2, "grad_clip": 1.0, "ema_decay": 0.9, "checkpoint_every": 2,
        "log_every": 1, "output_dir": str(tmp_path / "run"), "device": "cpu",
    }
    settings.update(changes)
    return TrainConfig(**settings)


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# subprocess runs: reference, SIGKILL + resume, two-process data parallel (started together)
# ----------------------------------------------------------------------------------------------


def _worker(out: Path, result: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    command = [*launcher] if launcher else [sys.executable]
    command += [str(WORKER), "--out", str(out), "--result", str(result), "--steps", str(STEPS), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _finish(process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]


def _latest_step(run: Path) -> int:
    try:
        name = (run / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return 0
    return int(name.split("_")[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start the reference run (1 process, 2 accumulation micro-batches), the 2-process run and
    the run to be killed at once; kill the latter with SIGKILL after its first checkpoint, resume it."""
    base = tmp_path_factory.mktemp("subprocess_runs")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    reference = _worker(base / "reference", base / "reference", "--accum", "2")
    parallel = _worker(base / "parallel", base / "parallel", "--accum", "1", launcher=torchrun)
    victim = _worker(base / "killed", base / "killed", "--accum", "2", "--sleep", "0.25")

    deadline = time.monotonic() + 120
    while _latest_step(base / "killed") < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    killed_at = _latest_step(base / "killed")
    resumed = _worker(base / "killed", base / "resumed", "--accum", "2", "--resume")
    for process in (reference, parallel, resumed):
        _finish(process)
    return {"base": base, "victim_returncode": victim.returncode, "killed_at": killed_at}


def test_sigkill_then_resume_matches_uninterrupted_run(runs: dict[str, Any]) -> None:
    base: Path = runs["base"]
    assert runs["victim_returncode"] == -signal.SIGKILL
    # Killed mid-run: after a checkpoint, before the end.
    assert 3 <= runs["killed_at"] < STEPS
    reference = torch.load(base / "reference.rank0.pt")
    resumed = torch.load(base / "resumed.rank0.pt")
    assert resumed["start_step"] == runs["killed_at"] and resumed["step"] == STEPS
    # Same computations in the same order: equal to float rounding (bitwise in practice).
    assert _max_difference(resumed["model"], reference["model"]) <= 1e-6
    assert _max_difference(resumed["ema"], reference["ema"]) <= 1e-6
    # The resumed log has each step once, with the reference run's losses.
    records, expected = _records(base / "killed"), _records(base / "reference")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, want in zip(records, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-9)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)


def test_two_processes_equal_one_process_with_the_same_global_batch(runs: dict[str, Any]) -> None:
    base: Path = runs["base"]
    rank0 = torch.load(base / "parallel.rank0.pt")
    rank1 = torch.load(base / "parallel.rank1.pt")
    reference = torch.load(base / "reference.rank0.pt")
    assert rank0["world_size"] == rank1["world_size"] == 2 and reference["world_size"] == 1
    assert _max_difference(rank0["model"], rank1["model"]) == 0.0
    # Shard j draws its noise from generator j wherever it runs, so W=2 × A=1 ≡ W=1 × A=2.
    assert _max_difference(rank0["model"], reference["model"]) <= 1e-6
    assert _max_difference(rank0["ema"], reference["ema"]) <= 1e-6
    # Only rank 0 logs and checkpoints: one record per step, one set of checkpoints.
    records = _records(base / "parallel")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [step for step, _ in list_checkpoints(base / "parallel")] == [9, 12]
    assert load_checkpoint(base / "parallel")[2]["world_size"] == 2


# ----------------------------------------------------------------------------------------------
# in-process: resume with dropout (global RNG), EMA, schedule, non-finite, atomicity
# ----------------------------------------------------------------------------------------------


def test_resume_in_process_restores_every_random_stream(tmp_path: Path) -> None:
    # Dropout draws from torch's global RNG, label dropout and the loss from the trainer's
    # generators, the batches from the sampler's: all must continue exactly after a resume.
    def run(folder: str, steps: int, resume: bool = False) -> Trainer:
        config = _config(tmp_path, steps=steps, output_dir=str(tmp_path / folder), label_dropout=0.3,
                         lr_schedule="constant", warmup_steps=2, checkpoint_every=4)
        trainer = Trainer(_model(num_classes=2, dropout=0.2), _loss(), _data(labelled=True), config,
                          resume=resume, progress=False)
        trainer.fit()
        return trainer

    torch.manual_seed(123)
    uninterrupted = run("full", 8)
    torch.manual_seed(123)
    run("split", 4)
    torch.manual_seed(999)  # the resumed process starts from another global RNG state
    resumed = run("split", 8, resume=True)
    assert _max_difference(_params(resumed.model), _params(uninterrupted.model)) == 0.0
    assert _max_difference(_params(resumed.ema_model), _params(uninterrupted.ema_model)) == 0.0


def test_sigterm_stops_after_the_update_with_a_checkpoint_and_resume_is_exact(tmp_path: Path) -> None:
    def trainer(folder: str, resume: bool = False) -> Trainer:
        config = _config(tmp_path, steps=8, checkpoint_every=None, lr_schedule="cosine", output_dir=str(tmp_path / folder))
        return Trainer(_model(), _loss(), _data(), config, resume=resume, progress=False)

    full = trainer("full")
    full.fit()
    stopped = trainer("stopped")
    stopped.callbacks.append(lambda t, record: os.kill(os.getpid(), signal.SIGTERM) if record["step"] == 3 else None)
    handler_before = signal.getsignal(signal.SIGTERM)
    summary = stopped.fit()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # restored after fit()
    assert summary.interrupted and summary.step == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "stopped")] == [3]
    resumed = trainer("stopped", resume=True)
    assert resumed.fit().step == 8
    assert _max_difference(_params(resumed.model), _params(full.model)) == 0.0
    assert _max_difference(_params(resumed.ema_model), _params(full.ema_model)) == 0.0


def test_ema_equals_hand_computed_average(tmp_path: Path) -> None:
    decay, start, steps = 0.8, 2, 6
    history: list[dict[str, Tensor]] = []
    model = _model()
    initial = _params(model)
    config = _config(tmp_path, steps=steps, ema_decay=decay, ema_start=start)
    trainer = Trainer(model, _loss(), _data(), config, progress=False,
                      callbacks=[lambda t, record: history.append(_params(t.model))])
    trainer.fit()
    assert len(history) == steps
    # θ̄_0 = θ_0; θ̄_k = θ_k for k <= ema_start; θ̄_k = d θ̄_{k-1} + (1 - d) θ_k after.
    expected = {k: v.double() for k, v in initial.items()}
    for k, weights in enumerate(history, start=1):
        expected = {
            name: weights[name].double() if k <= start else decay * expected[name] + (1 - decay) * weights[name].double()
            for name in expected
        }
    assert _max_difference(_params(trainer.ema_model), expected) < 1e-6
    # The checkpoint stores both: the last weights and their average.
    model_state, ema_state, config_dict = load_checkpoint(config.output_dir)
    assert config_dict["step"] == steps
    assert _max_difference(model_state, history[-1]) == 0.0
    assert _max_difference(ema_state, expected) < 1e-6
    # The EMA differs from the weights (else the test above could not fail).
    assert _max_difference(ema_state, model_state) > 1e-4


def test_learning_rate_warmup_and_cosine_values(tmp_path: Path) -> None:
    lr, warmup, steps, floor = 0.01, 4, 10, 0.1
    config = _config(tmp_path, steps=steps, lr=lr, warmup_steps=warmup, lr_schedule="cosine", min_lr_ratio=floor)
    Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    used = [r["lr"] for r in _records(Path(config.output_dir))]
    # Update k uses lr·k/W during the warm-up, then lr·(r + (1-r)(1+cos(π(k-W)/(S-W)))/2).
    for k in range(1, steps + 1):
        if k <= warmup:
            want = lr * k / warmup
        else:
            want = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))))
        assert used[k - 1] == pytest.approx(want, rel=1e-12), k
    assert used[-1] == pytest.approx(lr * floor)
    assert lr_factor(3, 0, 10, "constant") == 1.0
    assert lr_factor(2, 4, 10, "constant") == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_clipping_matches_its_formula(dtype: torch.dtype) -> None:
    from flowdiff.train.trainer import _clip_gradients

    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=generator, dtype=dtype) for shape in [(4, 3), (3,), (2, 2, 2)]]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    clipped = [g.clone() for g in grads]
    assert float(_clip_gradients(clipped, 0.5)) == pytest.approx(norm, rel=1e-6)
    for before, after in zip(grads, clipped):  # g ← g · c / (‖g‖ + 1e-6)
        torch.testing.assert_close(after, before * (0.5 / (norm + 1e-6)))
    unclipped = [g.clone() for g in grads]
    assert float(_clip_gradients(unclipped, 10 * norm)) == pytest.approx(norm, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, grads))
    assert float(_clip_gradients([g.clone() for g in grads], None)) == pytest.approx(norm, rel=1e-6)


class _PoisonedLoss:
    """The real loss, made non-finite (in value or in gradient only) from a given call on."""

    def __init__(self, bad_call: int, where: str) -> None:
        self.inner, self.calls, self.bad_call, self.where = _loss(), 0, bad_call, where

    def __call__(self, model: nn.Module, x1: Tensor, **kwargs: Any) -> LossOutput:
        self.calls += 1
        out = self.inner(model, x1, **kwargs)
        if self.calls < self.bad_call:
            return out
        if self.where == "loss":
            return LossOutput(out.loss * float("nan"), out.per_sample, out.t)
        # sqrt'(0) = inf, times 0 = nan: a finite loss value with a NaN gradient.
        anchor = next(model.parameters()).sum() * 0.0
        return LossOutput(out.loss + torch.sqrt(anchor.abs()), out.per_sample, out.t)


@pytest.mark.parametrize("where", ["loss", "grad_norm"])
def test_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, where: str) -> None:
    config = _config(tmp_path, steps=10, checkpoint_every=2)
    trainer = Trainer(_model(), _PoisonedLoss(bad_call=5, where=where), _data(), config, progress=False)
    good: dict[str, Tensor] = {}
    trainer.callbacks.append(lambda t, record: good.update(_params(t.model)))
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        trainer.fit()
    assert info.value.step == 5 and info.value.quantity == where and math.isnan(info.value.value)
    assert info.value.checkpoint is not None and info.value.checkpoint.name == "step_00000004"
    # The bad update was not applied; the last good checkpoint is intact and is step 4.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert _max_difference(_params(trainer.model), good) == 0.0
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [2, 4]
    model_state, ema_state, config_dict = load_checkpoint(config.output_dir)
    assert config_dict["step"] == 4 and _max_difference(model_state, good) == 0.0
    assert all(torch.isfinite(v).all() for v in ema_state.values())
    assert _records(Path(config.output_dir))[-1]["event"] == "non_finite"


def test_crash_before_rename_leaves_previous_checkpoint_and_no_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, steps=6, checkpoint_every=2)
    real_replace = os.replace

    def crash_on_step_4(source: Any, target: Any) -> None:
        if Path(target).name == "step_00000004":
            raise OSError("simulated crash between the temporary write and the rename")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", crash_on_step_4)
    with pytest.raises(OSError, match="simulated crash"):
        Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    root = Path(config.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert load_checkpoint(config.output_dir)[2]["step"] == 2

    # What a hard kill at that moment leaves behind: temporary folder and file, never under a
    # final name. The next run ignores and removes them, resuming from step 2.
    (root / ".tmp-step_00000004-abc").mkdir()
    (root / ".tmp-step_00000004-abc" / "model.safetensors").write_bytes(b"half a file")
    (root / ".tmp-latest-xyz").write_text("step_0000")
    trainer = Trainer(_model(), _loss(), _data(), config, resume=True, progress=False)
    assert trainer.step == 2
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert trainer.fit().step == 6


def test_a_missing_or_stale_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    # A crash between a checkpoint folder's rename and the update of ``latest`` leaves ``latest``
    # absent (first checkpoint) or one checkpoint behind: the complete newest folder is used.
    config = _config(tmp_path, steps=4, checkpoint_every=2)
    Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    root = Path(config.output_dir) / "checkpoints"
    atomic_write_text(root / "latest", "step_00000002\n")
    assert load_checkpoint(config.output_dir)[2]["step"] == 4
    (root / "latest").unlink()
    assert load_checkpoint(config.output_dir)[2]["step"] == 4
    assert Trainer(_model(), _loss(), _data(), config.replace(steps=6), resume=True, progress=False).step == 4


def test_atomic_write_keeps_old_content_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "latest"
    atomic_write_text(target, "old\n")

    def failing_replace(source: Any, target_: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_keep_last_and_metrics_log(tmp_path: Path) -> None:
    config = _config(tmp_path, steps=5, checkpoint_every=1, keep_last=2, log_every=2)
    summary = Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [4, 5]
    assert summary.step == 5 and summary.start_step == 0 and math.isfinite(summary.final_loss)
    assert summary.steps_per_second > 0 and summary.checkpoint is not None and summary.checkpoint.name == "step_00000005"
    records = _records(Path(config.output_dir))
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "it_per_s", "wall"} <= set(record)
        assert record["grad_norm"] >= 0 and record["it_per_s"] > 0


def test_metrics_window_and_truncation(tmp_path: Path) -> None:
    from flowdiff.train.logs import METRICS_FILE, MetricsWindow, RunLog, truncate_metrics

    window = MetricsWindow(time.perf_counter())
    for loss, grad in ((1.0, 4.0), (3.0, 2.0)):
        window.add(loss, grad)
    record = window.record(step=2, lr=0.5)
    assert (record["step"], record["loss"], record["grad_norm"], record["lr"]) == (2, 2.0, 3.0, 0.5)
    assert window.steps == 0 and record["it_per_s"] > 0
    log = RunLog(tmp_path)
    log.open()
    for step in (2, 4, 6):
        log.write({"step": step, "loss": float(step)})
    log.close()
    with open(tmp_path / METRICS_FILE, "a", encoding="utf-8") as file:
        file.write('{"step": 8, "lo')  # a line cut by a kill
    truncate_metrics(tmp_path, 4)
    assert [r["step"] for r in _records(tmp_path)] == [2, 4]
    silent = RunLog(tmp_path / "other", enabled=False)  # another process than the main one
    silent.open()
    silent.write({"step": 1})
    silent.close()
    assert not (tmp_path / "other").exists()


def test_shard_streams_are_independent_of_the_process_layout() -> None:
    from flowdiff.train.rng import restore_shard_generators, shard_generators

    cpu = torch.device("cpu")
    four = shard_generators(seed=3, first_shard=0, count=4, device=cpu)
    second_process = shard_generators(seed=3, first_shard=2, count=2, device=cpu)  # rank 1 of 2, 2 shards each
    for g, h in zip(four[2:], second_process):
        assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=h))
    assert not torch.equal(torch.rand(5, generator=four[0]), torch.rand(5, generator=four[1]))
    # Restoring the states of all shards continues each stream exactly ...
    states = [g.get_state() for g in four]
    expected = [torch.rand(3, generator=g) for g in four[2:]]
    assert restore_shard_generators(second_process, states, first_shard=2, total_shards=4, seed=3, step=7)
    assert all(torch.equal(torch.rand(3, generator=g), e) for g, e in zip(second_process, expected))
    # ... another number of shards reseeds from (seed, step): reproducible, reported by False.
    a, b = shard_generators(3, 0, 2, cpu), shard_generators(3, 0, 2, cpu)
    assert not restore_shard_generators(a, states, 0, 2, seed=3, step=7)
    assert not restore_shard_generators(b, states[:3], 0, 2, seed=3, step=7)
    assert torch.equal(torch.rand(3, generator=a[1]), torch.rand(3, generator=b[1]))


def test_tensorboard_scalars_match_the_metrics_log(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, steps=5, checkpoint_every=None, log_every=2, tensorboard=True)
    Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    records = _records(Path(config.output_dir))
    events = EventAccumulator(str(Path(config.output_dir) / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/it_per_s"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [r["step"] for r in records] == [2, 4, 5]
    assert all(math.isclose(value, r["loss"], rel_tol=1e-6) for (_, value), r in zip(logged, records))


def test_training_reduces_the_loss(tmp_path: Path) -> None:
    # A 2-D Gaussian with mean (2, -1): the velocity loss must fall well below its start value.
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) * 0.3 + torch.tensor([2.0, -1.0])
    config = _config(tmp_path, steps=150, batch_size=128, lr=1e-2, log_every=10, checkpoint_every=None, ema_decay=None)
    torch.manual_seed(0)
    trainer = Trainer(MLP(dim=2, hidden=32, depth=2), _loss(), x, config, progress=False)
    trainer.fit()
    losses = [r["loss"] for r in _records(Path(config.output_dir))]
    assert losses[-1] < 0.6 * losses[0]


def test_labels_and_label_dropout_reach_the_loss(tmp_path: Path) -> None:
    seen: list[Tensor] = []

    def loss(model: nn.Module, x1: Tensor, *, y: Tensor | None = None, generator: Any = None) -> Tensor:
        seen.append(y.clone())
        return _loss()(model, x1, y=y, generator=generator).loss

    data = _data(labelled=True)
    Trainer(_model(num_classes=2), loss, data, _config(tmp_path, steps=2, label_dropout=1.0), progress=False).fit()
    assert all((y == 2).all() for y in seen)  # every label replaced by the null label 2
    seen.clear()
    config = _config(tmp_path, steps=2, output_dir=str(tmp_path / "b"))
    Trainer(_model(num_classes=2), loss, data, config, progress=False).fit()
    assert all(((y == 0) | (y == 1)).all() for y in seen) and len(seen) == 2


def test_a_dataloader_is_reiterated_and_an_exhausted_iterator_is_an_error(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(_data(n=40).x), batch_size=16, shuffle=False, drop_last=True)
    summary = Trainer(_model(), _loss(), loader, _config(tmp_path, steps=5), progress=False).fit()
    assert summary.step == 5  # 2 batches per pass: the loader was restarted twice
    batches = iter([torch.randn(16, 2) for _ in range(3)])
    config = _config(tmp_path, steps=5, output_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="ran out after 3 updates of the 5"):
        Trainer(_model(), _loss(), batches, config, progress=False).fit()


def test_resume_with_changed_settings_warns(tmp_path: Path) -> None:
    config = _config(tmp_path, steps=2)
    Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    with pytest.warns(UserWarning, match=r"changed settings \['lr'\]"):
        Trainer(_model(), _loss(), _data(), config.replace(lr=0.5, steps=4), resume=True, progress=False)


def test_float64_training_and_load_helpers(tmp_path: Path) -> None:
    model = _model().double()
    description = {"name": "mlp", "data_shape": [2], "kwargs": {"hidden": 8, "depth": 1}}
    config = _config(tmp_path, steps=3)
    trainer = Trainer(model, _loss(), _data(), config, progress=False, model_config=description)
    trainer.fit()
    model_state, _, config_dict = load_checkpoint(config.output_dir)
    assert all(v.dtype == torch.float64 for v in model_state.values())
    assert config_dict["model"] == description and config_dict["path"]["name"] == "Linear"
    assert TrainConfig.from_dict(config_dict["train"]) == config
    rebuilt = load_model(config.output_dir).double()
    rebuilt = load_weights(rebuilt, config.output_dir)  # float64 weights into a float64 network
    assert _max_difference(_params(rebuilt), _params(trainer.ema_model)) == 0.0
    raw = load_weights(_model().double(), config.output_dir, which="model")
    assert _max_difference(_params(raw), _params(trainer.model)) == 0.0


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_missing_and_corrupt_checkpoints_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    config = _config(tmp_path, steps=2)
    Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    folder = Path(config.output_dir) / "checkpoints" / "step_00000002"
    for name, damage in [("ema.safetensors", b"\x00garbage"), ("config.json", b"{not json")]:
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(damage)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(config.output_dir)
        message = str(info.value)
        assert str(folder / name) in message and "\n" not in message
        (folder / name).write_bytes(original)
    (folder / "training_state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="training_state.pt"):
        Trainer(_model(), _loss(), _data(), config, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(MLP(dim=2, hidden=4, depth=1), config.output_dir)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*model.safetensors"):
        load_checkpoint(folder)


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    config = _config(tmp_path, steps=2)
    Trainer(_model(), _loss(), _data(), config, progress=False).fit()
    with pytest.raises(FileExistsError, match="resume=True.*overwrite=True"):
        Trainer(_model(), _loss(), _data(), config, progress=False)
    trainer = Trainer(_model(), _loss(), _data(), config, overwrite=True, progress=False)
    assert trainer.step == 0 and list_checkpoints(config.output_dir) == []
    # resume=True on a finished run: nothing left to do.
    finished = Trainer(_model(), _loss(), _data(), _config(tmp_path, steps=2, output_dir=str(tmp_path / "x")), progress=False)
    finished.fit()
    again = Trainer(_model(), _loss(), _data(), finished.config, resume=True, progress=False)
    assert again.step == 2 and again.fit().step == 2


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"steps": 0}, "steps must be an integer >= 1, got steps=0"),
        ({"batch_size": -4}, "batch_size must be an integer >= 1, got batch_size=-4"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be a finite number in \[0, 1\), got betas\[1\]=1.0"),
        ({"warmup_steps": 20, "steps": 10}, r"warmup_steps must lie in \[0, steps=10\]"),
        ({"grad_clip": -1.0}, "grad_clip must be"),
        ({"ema_decay": 1.0}, r"ema_decay must be a finite number in \[0, 1\), got ema_decay=1.0 \(or None: no EMA\)"),
        ({"label_dropout": 1.5}, r"label_dropout must be a finite number in \[0, 1\], got label_dropout=1.5"),
        ({"mixed_precision": "fp8"}, r"mixed_precision must be one of \['no', 'bf16', 'fp16'\]"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
        ({"device": "tpu"}, "device must be"),
        ({"checkpoint_every": 0}, "checkpoint_every must be"),
        ({"batch_size": 10, "grad_accum_steps": 3}, "divisible by grad_accum_steps=3"),
    ],
)
def test_config_validation_names_the_value(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_config_round_trip_and_unknown_keys() -> None:
    config = TrainConfig(steps=7, betas=(0.5, 0.6), grad_clip=None, ema_decay=None, checkpoint_every=None)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})
    assert config.replace(lr=0.5).lr == 0.5


def test_trainer_rejects_bad_setups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixed_precision='bf16' needs a CUDA device"):
        Trainer(_model(), _loss(), _data(), _config(tmp_path, mixed_precision="bf16"), progress=False)
    with pytest.raises(ValueError, match="label_dropout=0.5 needs a conditional network"):
        Trainer(_model(), _loss(), _data(labelled=True), _config(tmp_path, label_dropout=0.5), progress=False)
    with pytest.raises(ValueError, match="label_dropout=0.5 needs labelled data"):
        Trainer(_model(num_classes=2), _loss(), _data(), _config(tmp_path, label_dropout=0.5), progress=False)
    with pytest.raises(TypeError, match="data must be"):
        Trainer(_model(), _loss(), 3.0, _config(tmp_path), progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size=100 exceeds"):
        Trainer(_model(), _loss(), _data(n=64), _config(tmp_path, batch_size=100), progress=False)
