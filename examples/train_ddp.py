"""A small character-level transformer trained with DDP: a plain torchrun script.

It only uses torch.distributed and the torchrun environment (RANK, WORLD_SIZE, ...), saves a
checkpoint every ``--ckpt-every`` steps from rank 0 and resumes from it after a restart. Run it
with `torchrun` or `etrain launch` alike.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

VOCAB = 32


def corpus(length: int, seed: int = 0) -> torch.Tensor:
    """A deterministic token stream with learnable structure (a random order-2 Markov chain)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, VOCAB, (VOCAB, VOCAB, 3), generator=gen)
    picks = torch.randint(0, 3, (length,), generator=gen)
    out = torch.zeros(length, dtype=torch.long)
    for i in range(2, length):
        out[i] = table[out[i - 2], out[i - 1], picks[i]]
    return out


class TinyLM(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, context: int = 32,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=dropout, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--ckpt", default="checkpoint.pt")
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = corpus(20_000)
    model = TinyLM(context=args.context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = 0
    if os.path.exists(args.ckpt):
        state = torch.load(args.ckpt, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"] + 1
        if rank == 0:
            print(f"resumed from checkpoint at step {state['step']}", flush=True)
    ddp = DDP(model, find_unused_parameters=True)

    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(step * 1000 + rank)
        offsets = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([data[o : o + args.context] for o in offsets])
        y = torch.stack([data[o + 1 : o + args.context + 1] for o in offsets])
        loss = nn.functional.cross_entropy(ddp(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step + 1) % args.ckpt_every == 0:
            tmp = args.ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, args.ckpt)
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f} world {world}", flush=True)
        time.sleep(args.step_sleep)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
