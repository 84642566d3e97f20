"""The training job of the GPU recovery benchmark: the ~1B GPT of ``snapshot_gpu_bench.py``
(AdamW, bf16 autocast, batch 4 x 2048 tokens), in three forms on the same data:

- ``--api plain``: a plain loop (forward, backward, optimizer step), no library;
- ``--api job``: the ``Job`` API (under ``etrain launch``: in-place recovery and snapshots
  every ``--snapshot-every`` steps; alone: one process, no snapshots);
- ``--api ddp``: a torchrun script: DDP, ``torch.save`` of model and optimizer every
  ``--ckpt-every`` steps, resume from it; on the first attempt rank ``--kill-rank``
  SIGKILLs itself at the start of step ``--kill-step``.

Each writes ``<out>/times-<pid>.txt`` (``start``, ``built``, ``loaded``, ``kill``, ``step``
lines with wall times), read by ``recovery_gpu_bench.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_train import Times  # noqa: E402
from snapshot_gpu_bench import GPT  # noqa: E402


class Tokens:
    """A map-style dataset of token sequences, each drawn from its own seed."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(i))
        return torch.randint(self.vocab, (self.seq + 1,), generator=g)


def build(args, device: torch.device):
    torch.manual_seed(0)
    model = GPT(args.layers, args.width, args.heads, args.vocab, args.seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, opt


def loss_fn(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def plain_step(model, opt, data: Tokens, step: int, batch: int, device: torch.device) -> None:
    """One step of the plain loop: batch ``step`` of the data in order, waited for."""
    index = [(step * batch + j) % len(data) for j in range(batch)]
    tokens = torch.stack([data[i] for i in index]).to(device, non_blocking=True)
    loss = loss_fn(model, tokens)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()


def run_plain(args, times: Times, device: torch.device) -> None:
    model, opt = build(args, device)
    times.mark("built")
    data = Tokens(args.samples, args.seq, args.vocab)
    for step in range(args.steps):
        plain_step(model, opt, data, step, args.batch, device)
        times.mark("step", step)


def run_job(args, times: Times, device: torch.device) -> None:
    from elastictrain.train import Job

    model, opt = build(args, device)
    times.mark("built")
    job = Job(model, opt, Tokens(args.samples, args.seq, args.vocab), loss_fn,
              global_batch=args.batch, micro_batch=args.batch, steps=args.steps,
              reduction=args.reduction, snapshot_every=args.snapshot_every,
              device=device, **({"stragglers": None} if args.no_stragglers else {}))  # fmt: skip
    for step in job:
        times.mark("step", step)
    if job.recoveries:
        print("recoveries:", job.recoveries, flush=True)
    job.close()


def run_ddp(args, times: Times, device: torch.device) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ["RANK"])
    dist.init_process_group("nccl", device_id=device)
    model, opt = build(args, device)
    times.mark("built")
    ckpt = Path(args.out) / "ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        del state
        torch.cuda.synchronize()
        times.mark("loaded", start)
    ddp = DDP(model, device_ids=[device.index])
    data = Tokens(args.samples, args.seq, args.vocab)
    for step in range(start, args.steps):
        if attempt == 0 and rank == args.kill_rank and step == args.kill_step:
            times.mark("kill", step)
            os.kill(os.getpid(), signal.SIGKILL)
        plain_step(ddp, opt, data, step, args.batch, device)
        times.mark("step", step)
        if (step + 1) % args.ckpt_every == 0:
            if rank == 0:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "step": step + 1}, tmp)  # fmt: skip
                os.replace(tmp, ckpt)
            dist.barrier()
    dist.destroy_process_group()


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The ~1B GPT's shape and batch (the GPU benchmarks share them)."""
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--api", choices=["plain", "job", "ddp"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    add_model_args(p)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--reduction", default="deterministic")
    p.add_argument("--no-stragglers", action="store_true", help="Job: nothing timed")
    p.add_argument("--snapshot-every", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--kill-step", type=int, default=17)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    times = Times(Path(args.out))
    times.mark("start")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    {"plain": run_plain, "job": run_job, "ddp": run_ddp}[args.api](args, times, device)


if __name__ == "__main__":
    main()
