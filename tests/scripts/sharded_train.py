"""FSDP2 (DTensor-sharded) training with per-step snapshots through DCP into agent memory.

Rank 0 prints a hash of the full (gathered) model and optimizer state after every snapshot and
after a restore, so a test can check that the state restored into another world size is the
one that was snapshotted.
"""

import argparse
import hashlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from elastictrain.snapshot.worker import Snapshotter


def full_state_hash(model, opt) -> str:
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    digest = hashlib.sha256()
    for key in sorted(model_sd):
        digest.update(model_sd[key].contiguous().numpy().tobytes())
    for key in sorted(optim_sd["state"]):
        for name in sorted(optim_sd["state"][key]):
            value = optim_sd["state"][key][name]
            if torch.is_tensor(value):
                digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = Snapshotter(model=model, optimizer=opt, sharded=True)
    restored = snap.restore()
    start = 0
    if restored is not None:
        start = restored.step + 1
        digest = full_state_hash(model, opt)
        if rank == 0:
            print(f"restored step {restored.step} world {world} hash {digest}", flush=True)
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        loss = model(torch.randn(8, 8, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snap.snapshot(step)
        digest = full_state_hash(model, opt)
        if rank == 0:
            print(f"snapshot step {step} world {world} hash {digest}", flush=True)
        time.sleep(args.sleep)
    snap.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
