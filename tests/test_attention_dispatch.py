"""Core-attention tasks dispatched over a real gloo group of 4 ranks.

Each rank brings its own batch; whatever the plan (even speeds, uneven speeds) each rank's
outputs and input gradients are bit-identical to its batch computed alone on one process
(:func:`core_attention` outside a round: the same pieces, every one here), for a document
longer than a rank's share, many tiny ones and a single one. Through a ``Job``'s rounds, a
two-layer model gives the same bits, with a rank that has no batch of its own in a round
taking part by replaying its calls. Runs mode (each run of pieces one sequence, all of a
rank's in one kernel call: a GPU's default), directly and through the rounds: the same
outputs, and gradients within 1e-6 relative."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elastictrain.attention import AttentionPolicy, core_attention

pytestmark = [pytest.mark.contract, pytest.mark.timeout(180)]

RANKS, HEADS, DIM = 4, 2, 8
POLICY = AttentionPolicy(min_task=64)
RUNS = AttentionPolicy(min_task=64, exact=False)
# each rank's batch (document lengths) in a mix; a long one is longer than a rank's share
MIXES = {
    "long": [[2600, 30], [5, 400], [1, 90], [64]],
    "tiny": [[40] * 6, [40] * 6, [40] * 6, [40] * 6 + [700]],
    "single": [[1800], [1], [2], [3]],
}
SPEEDS = {"even": None, "uneven": [1.0, 0.5, 2.0, 1.0]}


def _batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return [torch.randn(total, HEADS, DIM, generator=g) for _ in range(4)], bounds  # q k v grad


def _alone(lengths, seed):
    """A rank's batch on one process: outputs and input gradients."""
    from elastictrain.attention.rounds import AttentionRounds

    (q, k, v, grad), bounds = _batch(lengths, seed)
    inputs = [x.requires_grad_(True) for x in (q, k, v)]
    with AttentionRounds(POLICY, torch.device("cpu")).round(None, None):
        out = core_attention(*inputs, bounds)
    out.backward(grad)
    return out.detach(), [x.grad for x in inputs]


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        width = HEADS * DIM
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(2))

    def forward(self, x, bounds):
        for layer in self.qkv:
            q, k, v = layer(x).view(-1, 3, HEADS, DIM).unbind(1)
            x = x + core_attention(q, k, v, bounds, scale=0.5).reshape(x.shape)
        return x.square().sum()


def _model_grads(lengths, seed):
    from elastictrain.attention.rounds import AttentionRounds

    model = _TwoLayers()
    (x, *_), bounds = _batch(lengths, seed)
    with AttentionRounds(POLICY, torch.device("cpu")).round(None, None):
        model(x.reshape(x.shape[0], -1), bounds).backward()
    return [p.grad for p in model.parameters()]


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from elastictrain.attention.dispatch import dispatched_attention
    from elastictrain.attention.plan import Document, plan_attention
    from elastictrain.attention.rounds import AttentionRounds
    from elastictrain.train.collectives import Collectives

    dist.init_process_group("gloo", store=dist.FileStore(store_path, RANKS), rank=rank,
                            world_size=RANKS)  # fmt: skip
    coll = Collectives(dist.group.WORLD, rank, RANKS)
    results = {}
    for mix, batches in MIXES.items():
        documents = [Document(n, r) for r, lengths in enumerate(batches) for n in lengths]
        mine = [i for i, d in enumerate(documents) if d.owner == rank]
        offsets = dict(zip(mine, [sum(batches[rank][:j]) for j in range(len(mine))],
                           strict=True))  # fmt: skip
        for name, speeds in SPEEDS.items():
            plan = plan_attention(documents, range(RANKS), speeds, POLICY)
            (q, k, v, grad), _ = _batch(batches[rank], rank)
            inputs = [x.requires_grad_(True) for x in (q, k, v)]
            out = dispatched_attention(*inputs, offsets, plan, coll)
            out.backward(grad)
            results[mix, name] = (out.detach(), [x.grad for x in inputs],
                                  sum(1 for t in plan.tasks if t.runner != t.owner))  # fmt: skip
        # not exact (a GPU's default): each run one kernel call, summed in the plan's order
        (q, k, v, grad), _ = _batch(batches[rank], rank)
        inputs = [x.requires_grad_(True) for x in (q, k, v)]
        out = dispatched_attention(*inputs, offsets, plan, coll, exact=False)
        out.backward(grad)
        results[mix, "runs"] = (out.detach(), [x.grad for x in inputs], 0)
    # rounds: round 0, every rank its batch; round 1, rank 3 has none and replays its calls;
    # exact, then runs
    for mode, policy in (("round", POLICY), ("runs round", RUNS)):
        rounds = AttentionRounds(policy, torch.device("cpu"))
        model = _TwoLayers()
        for index in range(2):
            model.zero_grad()
            if rank == 3 and index == 1:
                rounds.serve(coll, [1.0, 1.0, 0.5, 2.0])
                continue
            lengths = MIXES["long"][rank] if index == 0 else MIXES["tiny"][rank]
            (x, *_), bounds = _batch(lengths, rank + 10 * index)
            with rounds.round(coll, [1.0, 1.0, 0.5, 2.0]):
                model(x.reshape(x.shape[0], -1), bounds).backward()
            results[mode, index] = [p.grad.clone() for p in model.parameters()]
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """The workers run one intra-op thread each (OMP_NUM_THREADS=1): so do the references
    (a CPU kernel's sums depend on how its threads split them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dispatched_tasks_equal_each_batch_alone_bit_for_bit(tmp_path, one_thread):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=RANKS, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(RANKS)]
    for mix, batches in MIXES.items():
        moved = 0
        for rank, result in enumerate(results):
            out, grads = _alone(batches[rank], rank)
            for name in SPEEDS:
                got_out, got_grads, moved_now = result[mix, name]
                moved += moved_now
                assert torch.equal(got_out, out), (mix, name, rank)
                for got, ref in zip(got_grads, grads, strict=True):
                    assert torch.equal(got, ref), (mix, name, rank)
        assert moved > 0  # work went to other ranks
        for rank, result in enumerate(results):  # runs: the same outputs, grads within rounding
            out, grads = _alone(batches[rank], rank)
            got_out, got_grads, _ = result[mix, "runs"]
            assert torch.equal(got_out, out), (mix, rank)
            for got, ref in zip(got_grads, grads, strict=True):
                if ref.abs().sum() > 0:
                    assert float((got - ref).norm() / ref.norm()) < 1e-6, (mix, rank)
    for rank, result in enumerate(results):
        for index, mix in enumerate(("long", "tiny")):
            if rank == 3 and index == 1:
                assert ("round", index) not in result
                continue
            ref = _model_grads(MIXES[mix][rank], rank + 10 * index)
            for got, want in zip(result["round", index], ref, strict=True):
                assert torch.equal(got, want), (rank, index)
            for got, want in zip(result["runs round", index], ref, strict=True):
                assert float((got - want).norm() / want.norm()) < 1e-6, (rank, index)
