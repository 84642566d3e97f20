"""The training job of the recovery benchmarks, in two forms with the same model and data.

- ``--api job``: the ``Job`` API under ``etrain launch`` (in-place recovery; the fault is
  planned with ``--fault``).
- ``--api ddp``: a plain torchrun script: DDP, a disk checkpoint every ``--ckpt-every`` steps,
  resume from it; on the first attempt, rank ``--kill-rank`` SIGKILLs itself at the start of
  step ``--kill-step`` after writing the time. On gloo each attempt meets under a store prefix
  of its own (torch 2.13's torchrun would hand the new attempt the dead one's addresses).

Both write ``<out>/times-<pid>.txt`` lines ``<event> <wall time> <step>`` (``start``,
``built``, ``loaded``, ``step``), which the benchmark reads.

    python benchmarks/recovery_train.py --api ddp --out DIR ...
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn


class Samples:
    def __init__(self, n: int, dim: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def build(args):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.dim, args.dim), nn.GELU(), nn.Dropout(0.1)]
    model = nn.Sequential(*layers, nn.Linear(args.dim, args.dim))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


class Times:
    def __init__(self, out: Path) -> None:
        self.path = out / f"times-{os.getpid()}.txt"
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives with the process

    def mark(self, event: str, step: int = -1) -> None:
        self.file.write(f"{event} {time.time():.6f} {step}\n")


def run_job(args, times: Times) -> None:
    from elastictrain.train import Job

    model, opt = build(args)
    times.mark("built")
    job = Job(model, opt, Samples(args.samples, args.dim), loss_fn,
              global_batch=args.global_batch, micro_batch=args.micro_batch, steps=args.steps,
              reduction=args.reduction)  # fmt: skip
    for step in job:
        times.mark("step", step)
    job.close()


def run_ddp(args, times: Times) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, use_libuv=True)  # fmt: skip
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}/", store),
                            rank=rank, world_size=world)  # fmt: skip
    model, opt = build(args)
    times.mark("built")
    ckpt = Path(args.out) / "ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        times.mark("loaded", start)
    ddp = DDP(model)
    data = Samples(args.samples, args.dim)
    per_rank = args.global_batch // world
    for step in range(start, args.steps):
        if attempt == 0 and rank == args.kill_rank and step == args.kill_step:
            times.mark("kill", step)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(step * 1000 + rank)
        index = torch.randint(0, len(data), (per_rank,))
        x, y = data.x[index], data.y[index]
        loss = loss_fn(ddp, (x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.mark("step", step)
        if (step + 1) % args.ckpt_every == 0 and rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                       tmp)  # fmt: skip
            os.replace(tmp, ckpt)
        dist.barrier() if (step + 1) % args.ckpt_every == 0 else None
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--api", choices=["job", "ddp"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--reduction", default="deterministic")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--kill-rank", type=int, default=3)
    p.add_argument("--kill-step", type=int, default=17)
    args = p.parse_args()
    times = Times(Path(args.out))
    times.mark("start")
    torch.set_num_threads(1)
    (run_job if args.api == "job" else run_ddp)(args, times)


if __name__ == "__main__":
    main()
