"""A plain torchrun-style DDP script: only torch.distributed and the env contract.

It checkpoints after every epoch (rank 0, atomically) and resumes from the checkpoint on
restart, as the PyTorch DDP tutorial does. Data are a pure function of (epoch, rank), so any
run that completes all epochs at the same world size ends with the same parameters.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"]) and rank == int(os.environ["RANK"])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = 0
    if os.path.exists(args.ckpt):
        state = torch.load(args.ckpt, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"] + 1
        print(f"rank {rank}: resumed from epoch {state['epoch']}", flush=True)
    # DDP re-buckets gradients after its first iteration (not with find_unused_parameters), so
    # a resumed run would sum some gradients in another order than an uninterrupted one (1 ulp).
    ddp = DDP(model, find_unused_parameters=True)

    for epoch in range(start, args.epochs):
        gen = torch.Generator().manual_seed(1000 * epoch + rank)
        x = torch.randn(32, 8, generator=gen)
        y = torch.randn(32, 4, generator=gen)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            tmp = args.ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch}, tmp)
            os.replace(tmp, args.ckpt)
        dist.barrier()
        print(f"rank {rank}: epoch {epoch} loss {loss.item():.5f}", flush=True)
        time.sleep(args.sleep)

    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
