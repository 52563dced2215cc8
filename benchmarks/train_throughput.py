"""Training throughput: flowdiff's Trainer against a plain hand-written PyTorch loop (issue 3, item 5).

Both train the same network (``MLP(dim=2, ...)`` initialised from the same seed; a small one,
where per-step overhead shows most, and the default-sized one) on the same data (``moons``,
8 000 training points), with the same batch, the same AdamW (``foreach=True``, as the Trainer
builds it) and the same loss object (``GaussianPathLoss(Linear(), prediction="velocity")``: flow
matching), the batches drawn by the same seeded ``BatchSampler``. Two comparisons:

* ``matched`` — the features a real diffusion training loop has: linear warm-up (``LambdaLR``),
  gradient clipping at 1.0, an EMA of the weights (decay 0.999, ``torch._foreach_lerp_`` in the
  hand loop), and the loss read back each step for logging. The Trainer does the same plus its
  own bookkeeping: non-finite checks, a JSONL record every 50 steps, and one checkpoint at the end.
* ``bare`` — AdamW alone (hand loop: ``zero_grad; backward; step``) against the Trainer with
  ``grad_clip=None, ema_decay=None, warmup_steps=0``.

Timing: a Trainer run is ``fit()`` for ``steps`` updates (set-up inside ``fit()`` and logging
included) minus the time writing its final checkpoint, which is reported apart (a real run pays it
once per ``checkpoint_every`` updates); the ``Trainer`` constructor, like the hand loop's optimizer
construction, is outside. Each round runs the Trainer and the hand loop back to back (ABBA order,
after one warm-up run each); the ratio is the median over rounds of Trainer steps/s over hand-loop
steps/s, which cancels the machine-load drifts between rounds. A second, finer measurement
alternates single updates (``Trainer._train_step`` — everything fit() does per update except the
every-50-steps log line — and one hand-loop update) and compares median milliseconds per update:
on a shared machine whose load changes by the second, it is the trustworthy one. Goal: ratio >= 0.95.

Run: ``.venv/bin/python benchmarks/train_throughput.py`` (a few minutes on 2 cores) or
``--quick``. Writes ``benchmarks/results/train_throughput.{md,json}`` and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metadata_line, run_metadata, write_results  # noqa: E402

import flowdiff as fd
from flowdiff.data import BatchSampler, Dataset, load_dataset
from flowdiff.losses import GaussianPathLoss
from flowdiff.nn import MLP
from flowdiff.train import TrainConfig, Trainer, lr_factor

SIZES = {
    # name: (hidden, depth, batch, updates per timed run, updates of the lockstep comparison)
    "small": (64, 2, 256, 150, 400),
    "default": (256, 4, 512, 20, 150),
}
LR = 1e-3
WARMUP = 100
EMA_DECAY = 0.999
GRAD_CLIP = 1.0


def make_model(size: str) -> MLP:
    hidden, depth = SIZES[size][:2]
    torch.manual_seed(0)
    return MLP(dim=2, hidden=hidden, depth=depth)


class HandLoop:
    """A plain PyTorch training loop, one update per :meth:`step`."""

    def __init__(self, data: Any, loss: GaussianPathLoss, steps: int, matched: bool, size: str) -> None:
        self.loss, self.matched = loss, matched
        self.model = make_model(size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, foreach=True)  # as the Trainer builds it
        self.sampler = BatchSampler(data, SIZES[size][2], generator=torch.Generator().manual_seed(1))
        self.generator = torch.Generator().manual_seed(2)
        warmup = min(WARMUP, steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda done: lr_factor(done + 1, warmup, steps)
        )
        self.ema = [p.detach().clone() for p in self.params]

    def step(self) -> None:
        x, _ = next(self.sampler)
        out = self.loss(self.model, x, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.matched:
            torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        if self.matched:
            self.scheduler.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - EMA_DECAY)
            out.loss.item()  # what a loop that logs its loss does


def hand_loop(data: Any, loss: GaussianPathLoss, steps: int, matched: bool, size: str) -> float:
    """Wall time of ``steps`` updates of the hand-written loop."""
    loop = HandLoop(data, loss, steps, matched, size)
    start = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return time.perf_counter() - start


def make_trainer(data: Any, loss: GaussianPathLoss, steps: int, matched: bool, size: str, folder: Path) -> Trainer:
    config = TrainConfig(
        steps=steps,
        batch_size=SIZES[size][2],
        lr=LR,
        warmup_steps=min(WARMUP, steps) if matched else 0,
        grad_clip=GRAD_CLIP if matched else None,
        ema_decay=EMA_DECAY if matched else None,
        checkpoint_every=None,
        log_every=50,
        seed=1,
        output_dir=str(folder),
        device="cpu",
    )
    return Trainer(make_model(size), loss, data, config, overwrite=True, progress=False)


def trainer_run(
    data: Any, loss: GaussianPathLoss, steps: int, matched: bool, size: str, folder: Path
) -> tuple[float, float]:
    """The same training through :class:`flowdiff.train.Trainer`.

    Returns:
        ``(wall time of fit(), seconds of it spent writing the final checkpoint)``.
    """
    trainer = make_trainer(data, loss, steps, matched, size, folder)
    start = time.perf_counter()
    summary = trainer.fit()
    return time.perf_counter() - start, summary.checkpoint_time


def lockstep(
    data: Any, loss: GaussianPathLoss, updates: int, matched: bool, size: str, folder: Path
) -> dict[str, float]:
    """Alternate one Trainer update and one hand-loop update, timing each; medians over ``updates``.

    Load changes on a shared machine act on both members of each adjacent pair alike, so this
    isolates the per-update cost of the Trainer's own work (``Trainer._train_step``: batch,
    shards, loss, backward, norm, finiteness check, AdamW, schedule, EMA).
    """
    trainer = make_trainer(data, loss, updates + 20, matched, size, folder)
    hand = HandLoop(data, loss, updates + 20, matched, size)
    trainer_times, hand_times = [], []
    for update in range(updates + 20):
        first_trainer = update % 2 == 0  # alternate who goes first
        for which in ("trainer", "hand") if first_trainer else ("hand", "trainer"):
            start = time.perf_counter()
            if which == "trainer":
                trainer._train_step()
                trainer.step += 1
                elapsed = time.perf_counter() - start
                if update >= 20:
                    trainer_times.append(elapsed)
            else:
                hand.step()
                elapsed = time.perf_counter() - start
                if update >= 20:
                    hand_times.append(elapsed)
    trainer_ms, hand_ms = 1e3 * statistics.median(trainer_times), 1e3 * statistics.median(hand_times)
    return {"trainer_ms": trainer_ms, "hand_loop_ms": hand_ms, "ratio": hand_ms / trainer_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="ABBA rounds per comparison (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer updates")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    torch.set_num_threads(args.threads)

    # Unlabelled points (the network is unconditional).
    data = Dataset(x=load_dataset("moons", split="train", seed=0).x, name="moons")
    loss = GaussianPathLoss(fd.paths.Linear(), prediction="velocity")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "run"
        for size in args.sizes:
            steps = SIZES[size][3] // (2 if args.quick else 1)
            for variant in ("matched", "bare"):
                matched = variant == "matched"
                # Warm-up round (allocator, lazy imports) not recorded.
                trainer_run(data, loss, 10, matched, size, folder)
                hand_loop(data, loss, 10, matched, size)
                trainer_rates, hand_rates, checkpoint_ms = [], [], []
                for round_ in range(args.repeats):
                    order = ("trainer", "hand") if round_ % 2 == 0 else ("hand", "trainer")
                    for which in order:
                        if which == "trainer":
                            wall, saving = trainer_run(data, loss, steps, matched, size, folder)
                            trainer_rates.append(steps / (wall - saving))
                            checkpoint_ms.append(1e3 * saving)
                        else:
                            hand_rates.append(steps / hand_loop(data, loss, steps, matched, size))
                # Adjacent runs see the same machine load: their ratio is the robust statistic.
                pair_ratios = sorted(t / h for t, h in zip(trainer_rates, hand_rates))
                results[f"{size}/{variant}"] = {
                    "size": size,
                    "variant": variant,
                    "model": f"MLP(dim=2, hidden={SIZES[size][0]}, depth={SIZES[size][1]})",
                    "parameters": sum(p.numel() for p in make_model(size).parameters()),
                    "batch_size": SIZES[size][2],
                    "steps_per_run": steps,
                    "trainer_steps_per_s": trainer_rates,
                    "hand_loop_steps_per_s": hand_rates,
                    "trainer_median": statistics.median(trainer_rates),
                    "hand_loop_median": statistics.median(hand_rates),
                    "ratio": statistics.median(pair_ratios),
                    "ratio_of_medians": statistics.median(trainer_rates) / statistics.median(hand_rates),
                    "pair_ratio_quartiles": statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) > 1 else pair_ratios,
                    "final_checkpoint_ms_median": statistics.median(checkpoint_ms),
                }
                r = results[f"{size}/{variant}"]
                r["lockstep"] = lockstep(data, loss, SIZES[size][4] // (4 if args.quick else 1), matched, size, folder)
                print(
                    f"{size}/{variant}: fit() ratio {r['ratio']:.3f} (ratio of medians {r['ratio_of_medians']:.3f}), "
                    f"per-update lockstep ratio {r['lockstep']['ratio']:.3f}",
                    flush=True,
                )

    environment = run_metadata()  # the load average is read at the end of the run
    setup = {
        "data": "moons train split (8000 points)",
        "loss": "GaussianPathLoss(Linear(), prediction='velocity')",
        "optimizer": "AdamW(lr=1e-3, foreach=True) on both sides",
        "rounds": args.repeats,
    }
    payload = {"setup": setup, "environment": environment, "results": results, "goal_ratio": 0.95}

    lines = [
        "# Trainer throughput vs a hand-written PyTorch loop",
        "",
        (
            f"Generated by `benchmarks/train_throughput.py`: {setup['data']}, {setup['loss']}, "
            f"{setup['optimizer']}; {args.repeats} interleaved (ABBA) rounds after a warm-up. Run on "
            f"{metadata_line(environment)} The load average is read at the end of the run."
        ),
        "",
        (
            "| network | batch | comparison | Trainer steps/s | hand loop steps/s | **ratio** (median of rounds) "
            "| quartiles of the round ratios | ratio of medians | final checkpoint (ms) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        quartiles = r["pair_ratio_quartiles"]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['variant']} | {r['trainer_median']:.1f} | "
            f"{r['hand_loop_median']:.1f} | **{r['ratio']:.3f}** | {quartiles[0]:.3f}–{quartiles[-1]:.3f} | "
            f"{r['ratio_of_medians']:.3f} | {r['final_checkpoint_ms_median']:.0f} |"
        )
    lines += [
        "",
        "Per update, lockstep (one Trainer update, one hand-loop update, alternating; median milliseconds):",
        "",
        "| network | batch | comparison | Trainer ms/update | hand loop ms/update | **ratio** (hand / Trainer) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.values():
        lock = r["lockstep"]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['variant']} | {lock['trainer_ms']:.2f} | "
            f"{lock['hand_loop_ms']:.2f} | **{lock['ratio']:.3f}** |"
        )
    lines += [
        "",
        (
            "`matched`: both with warm-up, clipping at 1.0, EMA 0.999 and the loss read each step; the Trainer "
            "also checks finiteness (loss and gradient norm, every step) and writes metrics.jsonl every 50 steps. "
            "`bare`: AdamW only on both sides (the Trainer still computes the gradient norm for its finiteness "
            "check). Trainer steps/s = updates / (fit() wall time − time writing the final checkpoint); that "
            "checkpoint (safetensors + JSON + optimizer state, each fsync-ed, atomic renames) is listed apart: "
            "in a real run it is paid once every `checkpoint_every` updates. Each round runs the Trainer and the "
            "hand loop back to back (ABBA order); the ratio is the median over rounds of their steps/s ratio, "
            "robust to the machine load that drifts between rounds. The lockstep table times single updates "
            "(`Trainer._train_step`, i.e. without fit()'s logging) alternating with the hand loop's, which "
            "cancels load changes best. Goal: ratio >= 0.95."
        ),
        "",
    ]
    write_results("train_throughput", lines, payload, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
