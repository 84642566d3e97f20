"""A DDP script that snapshots every step into the agent's memory and restores from it.

Its data come from the global torch RNG (seeded once per rank), so a run that resumes without
restoring the RNG state would see other data: bit-identical results prove the whole state
(model, optimizer, scheduler, RNG, step, data position) came back.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from elastictrain.snapshot.worker import Snapshotter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--pause-file", default=None, help="hold before each step while it exists")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    torch.manual_seed(100 + rank)  # the data stream of this rank

    snap = Snapshotter(model=model, optimizer=opt, scheduler=sched)
    restored = snap.restore()
    start = 0
    if restored is not None:
        start = restored.step + 1
        assert restored.data_position == {"next": start}, restored.data_position
        print(f"rank {rank}: restored step {restored.step} from {restored.source}", flush=True)
    ddp = DDP(model, find_unused_parameters=True)
    for step in range(start, args.steps):
        while args.pause_file and os.path.exists(args.pause_file):
            time.sleep(0.05)
        x = torch.randn(16, 8)
        y = torch.randn(16, 4)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        snap.snapshot(step, data_position={"next": step + 1})
        print(f"rank {rank}: step {step} loss {loss.item():.6f}", flush=True)
        time.sleep(args.sleep)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out)
    dist.barrier()
    snap.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
