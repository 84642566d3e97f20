"""A small character-level transformer on the ``Job`` API: it recovers in place.

The model and data are those of ``train_ddp.py`` (with dropout on); the ``Job`` owns the data
plan, the gradient reduction and the snapshots. Run it under ``etrain launch`` (any number of
nodes and workers: the results do not depend on them), or alone as one process.

    etrain launch --nnodes 2 --nproc-per-node 2 --hot-spares 1 \\
        --fault kill:rank=3:step=30 examples/train_job.py --steps 80
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
from train_ddp import VOCAB, TinyLM, corpus

from elastictrain.train import Job


class Windows:
    """A map-style dataset: sample ``i`` is the ``i``-th window of the token stream."""

    def __init__(self, context: int = 32, length: int = 20_000) -> None:
        self.tokens = corpus(length)
        self.context = context

    def __len__(self) -> int:
        return len(self.tokens) - self.context - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i : i + self.context + 1]


def next_token_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--reduction", choices=["deterministic", "fast"], default="deterministic")
    p.add_argument("--step-sleep", type=float, default=0.0, help="slow the steps (demos)")
    p.add_argument("--out", default=None, help="rank 0 saves the final parameters here")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLM(dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    job = Job(model, opt, Windows(), next_token_loss, global_batch=args.global_batch,
              micro_batch=args.micro_batch, steps=args.steps, scheduler=sched,
              reduction=args.reduction)  # fmt: skip
    role = "a hot spare" if job.rank < 0 else f"rank {job.rank}"
    print(f"pid {os.getpid()} starts as {role}", flush=True)
    for step in job:
        if job.rank == 0:
            print(f"step {step} loss {job.loss:.4f} world {job.world}", flush=True)
        time.sleep(args.step_sleep)
    print(f"pid {os.getpid()} done as rank {job.rank} of {job.world}", flush=True)
    if job.rank == 0 and args.out:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out)
    job.close()


if __name__ == "__main__":
    main()
