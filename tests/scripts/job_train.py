"""A small job on the ``Job`` API: an MLP with dropout, AdamW and a step schedule.

Run by the tests as worker processes (``run(rank, world, ...)``) or under ``etrain launch``
(``python job_train.py --out final.pt``). Its results must not depend on the world size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

from elastictrain.train import Job
from elastictrain.train.stragglers import StragglerPolicy


class Samples:
    """A map-style dataset of fixed random regression samples (the same in every process)."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def build(seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(0.2), nn.Linear(hidden, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def mean_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def sum_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y, reduction="sum"), y.numel()


def train(args) -> Job:
    model, opt, sched = build(hidden=args.hidden)
    policy = (None if args.fail_after < 0 else
              StragglerPolicy(threshold=args.threshold, fail_after=args.fail_after))  # fmt: skip
    job = Job(
        model, opt, Samples(args.samples), sum_loss if args.loss == "sum" else mean_loss,
        global_batch=args.global_batch, micro_batch=args.micro_batch, steps=args.steps,
        scheduler=sched, logical_workers=args.logical_workers, reduction=args.reduction,
        stragglers=policy,
    )  # fmt: skip
    losses: dict[int, float] = {}  # by step: a step redone after a recovery counts once
    step_times: list[float] = []  # when each step ended, in this process
    print(f"pid {os.getpid()} starts as rank {job.rank}", flush=True)  # -1: a hot spare
    record = {"node": os.environ.get("ETRAIN_NODE_ID", ""), "pid": os.getpid(),
              "start_rank": job.rank}  # fmt: skip
    _record(args, record)
    for step in job:
        losses[step] = job.loss
        if args.step_times:
            step_times.append(time.time())
        if job.rank == 0:
            print(f"step {step} loss {job.loss:.6f} world {job.world}", flush=True)
        time.sleep(args.step_sleep)
    print(f"pid {os.getpid()} done as rank {job.rank} of {job.world}", flush=True)
    _record(args, record | {"done_rank": job.rank, "world": job.world,
                            "step_times": step_times})  # fmt: skip
    if job.rank == 0 and args.out:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"params": state, "losses": [losses[s] for s in sorted(losses)]}, args.out)
    job.close()
    return job


def _record(args, record: dict) -> None:
    """This process's part, as a file in ``--workers-dir`` (the tests' end state)."""
    if args.workers_dir:
        os.makedirs(args.workers_dir, exist_ok=True)
        path = os.path.join(args.workers_dir, f"{record['node']}-{record['pid']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--logical-workers", type=int, default=4)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--fail-after", type=int, default=50,
                   help="steps a far too slow rank may last (-1: no straggler re-plans)")
    p.add_argument("--threshold", type=float, default=0.2, help="share error that re-plans")
    p.add_argument("--reduction", default="deterministic")
    p.add_argument("--loss", default="mean")
    p.add_argument("--out", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--workers-dir", default=None, help="record each process's ranks here")
    p.add_argument("--step-times", action="store_true",
                   help="record when each step ended (with --workers-dir)")
    return p


def run(rank: int, world: int, store_path: str, argv: list[str], script: str = "job_train"
        ) -> None:  # fmt: skip
    """One worker of a test's world (a fresh process), on gloo through a file store, running
    ``script``'s ``train(parser().parse_args(argv))`` (a module of tests/scripts)."""
    import importlib

    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    module = importlib.import_module(script)
    module.train(module.parser().parse_args(argv))
    dist.destroy_process_group()


if __name__ == "__main__":
    train(parser().parse_args(sys.argv[1:]))
