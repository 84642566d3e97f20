"""A small long-context-style job: a transformer over packed documents whose attention goes
through ``core_attention``, on the ``Job`` API with core-attention rounds.

Each sample is one packed sequence of 192 tokens holding documents of long-tailed lengths
(its own ``cu_seqlens``): some samples are one long document, others many short ones, so the
ranks' attention work differs and the rounds move it. Run by the tests as worker processes
(``job_train.run(..., "attention_train")``) or under ``etrain launch``. Its results must not
depend on the world size, bit for bit with the deterministic reduction.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
from job_train import _record

from elastictrain.attention import AttentionPolicy, core_attention
from elastictrain.train import Job

VOCAB, WIDTH, HEADS = 32, 16, 2


class PackedDocuments:
    """Sample ``i``: ``context`` token ids and the boundaries of the documents packed in
    them (the same in every process)."""

    def __init__(self, n: int = 64, context: int = 192) -> None:
        self.samples = []
        for i in range(n):
            g = torch.Generator().manual_seed(1000 + i)
            bounds = [0]
            while bounds[-1] < context:
                if i % 4 == 0:  # one long document
                    length = context
                else:
                    length = int(8 * (1 - torch.rand((), generator=g)) ** -1.5)
                bounds.append(min(context, bounds[-1] + max(length, 1)))
            tokens = torch.randint(0, VOCAB, (context,), generator=g)
            self.samples.append((tokens, torch.tensor(bounds)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


def collate(samples):
    """Micro-batches pack their samples end to end: one sequence, one ``cu_seqlens``."""
    tokens = torch.cat([t for t, _ in samples])
    bounds, at = [0], 0
    for t, b in samples:
        bounds.extend(int(x) + at for x in b[1:])
        at += len(t)
    return tokens, torch.tensor(bounds)


class Block(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)  # a key bias has no gradient
        self.out = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * WIDTH, WIDTH))  # fmt: skip
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).view(-1, 3, HEADS, WIDTH // HEADS).unbind(1)
        x = x + self.out(core_attention(q, k, v, bounds).reshape(x.shape))
        return x + self.mlp(x)


class TinyPackedLM(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block(dropout) for _ in range(2))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, bounds)
        return self.head(x)


def token_loss(model, batch):
    """Next-token loss summed over each document's tokens (the count divides it)."""
    tokens, bounds = batch
    logits = model(tokens, bounds)
    starts = torch.zeros(len(tokens), dtype=torch.bool)
    starts[bounds[1:-1]] = True
    keep = ~starts[1:]  # no target across a document's end
    loss = nn.functional.cross_entropy(logits[:-1][keep], tokens[1:][keep], reduction="sum")
    return loss, int(keep.sum())


def train(args) -> Job:
    torch.manual_seed(0)
    model = TinyPackedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    job = Job(model, opt, PackedDocuments(), token_loss, global_batch=args.global_batch,
              micro_batch=args.micro_batch, steps=args.steps, scheduler=sched,
              reduction=args.reduction, collate_fn=collate,
              # documents of tens of tokens: balance their pairs (the row costs model a
              # GPU kernel's, and would outweigh them)
              attention=AttentionPolicy(min_task=16, query_cost=0, key_cost=0),
              capacities=[float(c) for c in args.capacities.split(",")] if args.capacities
              else None)  # fmt: skip
    losses: dict[int, float] = {}
    plans: dict[int, dict] = {}
    record = {"node": os.environ.get("ETRAIN_NODE_ID", ""), "pid": os.getpid(),
              "start_rank": job.rank}  # fmt: skip
    _record(args, record)
    for step in job:
        losses[step] = job.loss
        plans[step] = job.attention
        if job.rank == 0:
            print(f"step {step} loss {job.loss:.6f} world {job.world} attention "
                  f"{job.attention['naive']:.2f} -> {job.attention['planned']:.2f}",
                  flush=True)  # fmt: skip
        time.sleep(args.step_sleep)
    _record(args, record | {"done_rank": job.rank, "world": job.world})
    if job.rank == 0 and args.out:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"params": state, "losses": [losses[s] for s in sorted(losses)],
                    "plans": [plans[s] for s in sorted(plans)]}, args.out)  # fmt: skip
    job.close()
    return job


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--reduction", default="deterministic")
    p.add_argument("--capacities", default="", help="each rank's initial capacity, a,b,...")
    p.add_argument("--out", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--workers-dir", default=None, help="record each process's ranks here")
    return p


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(parser().parse_args(sys.argv[1:]))
