"""The training job of the straggler benchmark: an MLP on the ``Job`` API with 64 logical
workers, under ``etrain launch`` (the slowdown is planned with ``--fault slow:...``).

Rank 0 writes ``<out>/steps.jsonl``: one line per step with its wall time when done, every
rank's speed as that step's reduction carried it, and every rank's logical workers.

``--noise D --noise-rank R``: every rank does extra work of half its forward's compute three
times over (about half a micro-batch) in each micro-batch; rank R's extra varies from step to
step (uniform, drawn per step) so that its step's compute varies by about +-D around the same
mean as the others': a noisy but healthy rank.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
from recovery_train import Samples  # this directory: the recovery benchmarks' data

from elastictrain.train import Job
from elastictrain.train.stragglers import StragglerPolicy
from elastictrain.train.timing import cpu_clock

EXTRA = 0.5  # the noise runs' extra work, as a fraction of a micro-batch's compute


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=75)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--logical-workers", type=int, default=64)
    p.add_argument("--static", action="store_true",
                   help="measure speeds but never re-plan (the static split)")
    p.add_argument("--reduction", default="deterministic")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--noise-rank", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.dim, args.dim), nn.GELU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clock = cpu_clock()
    extra = [0.0]  # this step's extra work, as a fraction of the forward's compute x 3

    def loss_fn(m, batch):
        x, y = batch
        began = clock()
        loss = nn.functional.mse_loss(m(x), y)
        if extra[0]:
            until = clock() + 3 * extra[0] * (clock() - began)
            while clock() < until:
                pass
        return loss

    job = Job(model, opt, Samples(args.global_batch * 4, args.dim), loss_fn,
              global_batch=args.global_batch, micro_batch=args.micro_batch, steps=args.steps,
              logical_workers=args.logical_workers, reduction=args.reduction,
              stragglers=StragglerPolicy(replan=not args.static))  # fmt: skip
    draws = random.Random(1000 + job.rank)
    spread = args.noise * (1 + EXTRA) / EXTRA  # the extra's spread that gives +-noise in all

    def next_extra() -> float:
        if not args.noise:
            return 0.0
        if job.rank != args.noise_rank:
            return EXTRA
        return EXTRA * draws.uniform(1 - spread, 1 + spread)

    extra[0] = next_extra()
    lines = []
    for step in job:
        if job.rank == 0:
            lines.append({"step": step, "t": time.time(), "speeds": job.speeds,
                          "workers": [e - s for s, e in job.hosting()]})  # fmt: skip
        extra[0] = next_extra()
    if job.rank == 0:
        with open(Path(args.out) / "steps.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    job.close()


if __name__ == "__main__":
    main()
