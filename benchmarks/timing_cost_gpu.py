"""What the stragglers' timing costs a GPU step, in one process: the ~1B GPT's step (batch 4
x 2048 tokens, bf16 autocast, fused AdamW) with and without ``ComputeClock`` around its
forward and backward (two CUDA events, read a step late) and the speed written into a
device tensor, in alternating blocks of steps.

    python benchmarks/timing_cost_gpu.py --blocks 6 --block-steps 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_gpu_train import Tokens, add_model_args, build, loss_fn  # noqa: E402

from elastictrain.train.timing import ComputeClock  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=6, help="blocks of each kind, alternating")
    p.add_argument("--block-steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=8)
    add_model_args(p)
    args = p.parse_args()
    device = torch.device("cuda")
    model, opt = build(args, device)
    data = Tokens(4096, args.seq, args.vocab)
    clock = ComputeClock(device)
    extras = torch.zeros(3, dtype=torch.float64, device=device)
    step = 0

    def one(timed: bool) -> float:
        nonlocal step
        began = time.perf_counter()
        index = [(step * args.batch + j) % len(data) for j in range(args.batch)]
        tokens = torch.stack([data[i] for i in index]).to(device, non_blocking=True)
        if timed:
            extras[2] = clock.speed()
            clock.start()
        loss = loss_fn(model, tokens)
        loss.backward()
        if timed:
            clock.stop(args.batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        step += 1
        return time.perf_counter() - began

    for _ in range(args.warmup):
        one(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.blocks):
        for timed in (False, True):
            times[timed] += [one(timed) for _ in range(args.block_steps)]
    plain, timed = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n~1B GPT step, one GPU, {args.blocks} x {args.block_steps} steps of each, "
          "alternating blocks, median\n")  # fmt: skip
    print("| step | s/step | vs untimed |\n|---|--:|--:|")
    print(f"| untimed | {plain:.4f} | 1.0000x |")
    print(f"| timed (ComputeClock) | {timed:.4f} | {timed / plain:.4f}x |")
    print(f"\nlast measured speed: {clock.speed():.2f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
