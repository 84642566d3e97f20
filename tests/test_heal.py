"""A member's state sent to the others over a real gloo group: they leave with the same
model, optimizer and scheduler, bit for bit, and the next step agrees."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elastictrain.train.collectives import Collectives
from elastictrain.train.heal import share_state

pytestmark = [pytest.mark.contract, pytest.mark.timeout(120)]


def _build(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 2))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _step(model, opt, sched, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sched.step()


def _worker(rank: int, world: int, store_path: str, out: str) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    model, opt, sched = _build(seed=0 if rank == 0 else 100 + rank)
    steps = {0: 5, 1: 2, 2: 0}[rank]  # the source is ahead; rank 2 never stepped
    for s in range(steps):
        _step(model, opt, sched, s)
    coll = Collectives(dist.group.WORLD, rank, world)
    share_state(coll, 0, model, opt, sched, torch.device("cpu"))
    _step(model, opt, sched, 99)  # the next step, the same everywhere
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, os.path.join(out, f"{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


def test_every_member_leaves_with_the_sources_state(tmp_path):
    mp.spawn(_worker, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3, join=True)
    states = [torch.load(tmp_path / f"{r}.pt") for r in range(3)]
    for other in states[1:]:
        for key, value in states[0]["model"].items():
            assert torch.equal(value, other["model"][key]), key
        for index, entry in states[0]["opt"]["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, other["opt"]["state"][index][key]), (index, key)
        assert other["opt"]["param_groups"][0]["lr"] == states[0]["opt"]["param_groups"][0]["lr"]
        assert other["sched"]["last_epoch"] == states[0]["sched"]["last_epoch"] == 6
