"""A training script for the kill/resume and data-parallel tests of ``tests/test_train.py``.

It is an ordinary user script — nothing in it knows about processes — so running it under
``torchrun --nproc_per_node 2`` tests data-parallel training "with no change to user code".
At the end each process writes its final weights to ``<result>.rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import time

import torch

import flowdiff as fd
from flowdiff.data import load_dataset
from flowdiff.losses import GaussianPathLoss
from flowdiff.nn import MLP
from flowdiff.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step (to be killed)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    # One thread: the same kernels, hence the same rounding, in every process of every run.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_dataset("moons", n=256, seed=0)  # labelled, 2 classes
    model = MLP(dim=2, hidden=32, depth=2, num_classes=2, dropout=args.dropout)
    loss = GaussianPathLoss(fd.paths.Linear(), prediction="velocity")
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=3e-3,
        warmup_steps=4,
        lr_schedule="cosine",
        grad_clip=0.5,
        grad_accum_steps=args.accum,
        ema_decay=0.9,
        ema_start=2,
        label_dropout=0.25,
        checkpoint_every=args.checkpoint_every,
        keep_last=2,
        log_every=1,
        seed=7,
        output_dir=args.out,
        device="cpu",
    )
    callbacks = [lambda trainer, record: time.sleep(args.sleep)] if args.sleep > 0 else []
    trainer = Trainer(model, loss, data, config, resume=args.resume, progress=False, callbacks=callbacks)
    summary = trainer.fit()
    torch.save(
        {
            "model": trainer.model.state_dict(),
            "ema": trainer.ema_model.state_dict(),
            "step": summary.step,
            "start_step": summary.start_step,
            "world_size": summary.world_size,
        },
        f"{args.result}.rank{trainer.dist.rank}.pt",
    )


if __name__ == "__main__":
    main()
