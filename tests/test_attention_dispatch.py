"""Core-attention tasks dispatched over a real gloo group of 4 ranks: each rank's outputs
equal one causal call per document of its own, bit for bit (CPU), and the input gradients
agree with one process's within 1e-6 relative, for a document longer than a rank's share,
many tiny ones and a single one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elastictrain.attention.core import core_attention
from elastictrain.attention.plan import AttentionPolicy, Document, plan_attention

pytestmark = [pytest.mark.contract, pytest.mark.timeout(180)]

RANKS, HEADS, DIM = 4, 2, 8
MIXES = {"long": [2600, 30, 5, 400, 1, 90], "tiny": [40] * 24 + [700], "single": [1800]}


def _layout(lengths):
    """Whole documents packed in order over the ranks (a long one stays on one rank)."""
    share = -(-sum(lengths) // RANKS)
    owners, owner, room = [], 0, share
    for length in lengths:
        owners.append(min(owner, RANKS - 1))
        room -= length
        while room <= 0 and owner < RANKS - 1:
            owner, room = owner + 1, room + share
    return [Document(n, o) for n, o in zip(lengths, owners, strict=True)]


def _inputs(lengths):
    g = torch.Generator().manual_seed(7)
    total = sum(lengths)
    return [torch.randn(total, HEADS, DIM, generator=g) for _ in range(4)]  # q, k, v, grad


def _worker(rank: int, mix: str, store_path: str, out_dir: str) -> None:
    from elastictrain.attention.dispatch import dispatched_attention
    from elastictrain.train.collectives import Collectives

    dist.init_process_group("gloo", store=dist.FileStore(store_path, RANKS), rank=rank,
                            world_size=RANKS)  # fmt: skip
    lengths = MIXES[mix]
    documents = _layout(lengths)
    plan = plan_attention(documents, range(RANKS), policy=AttentionPolicy(min_task=64))
    q, k, v, grad = _inputs(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    mine = [i for i, d in enumerate(documents) if d.owner == rank]
    rows = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in mine]) \
        if mine else torch.zeros(0, dtype=torch.long)
    offsets, at = {}, 0
    for i in mine:
        offsets[i] = at
        at += lengths[i]
    local = [x[rows].clone().requires_grad_(True) for x in (q, k, v)]
    coll = Collectives(dist.group.WORLD, rank, RANKS)
    out = dispatched_attention(*local, offsets, plan, coll)
    out.backward(grad[rows])
    torch.save({"rows": rows, "out": out.detach(), "grads": [x.grad for x in local],
                "moved": sum(1 for t in plan.tasks if t.runner != t.owner)},
               os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_dispatched_tasks_equal_one_call_per_document(tmp_path, mix):
    mp.spawn(_worker, args=(mix, str(tmp_path / "store"), str(tmp_path)), nprocs=RANKS,
             join=True)  # fmt: skip
    lengths = MIXES[mix]
    q, k, v, grad = (x.clone() for x in _inputs(lengths))
    inputs = [x.requires_grad_(True) for x in (q, k, v)]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    reference = core_attention(*inputs, bounds)
    reference.backward(grad)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(RANKS)]
    if mix != "single":
        assert results[0]["moved"] > 0  # work went to other ranks
    for result in results:
        rows = result["rows"]
        assert torch.equal(result["out"], reference.detach()[rows])
        for got, ref in zip(result["grads"], (x.grad[rows] for x in inputs), strict=True):
            if ref.numel():
                assert float((got - ref).norm() / ref.norm()) < 1e-6
