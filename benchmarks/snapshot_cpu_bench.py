"""Cost of one in-memory snapshot on CPU, beside torch.save and a plain copy (the floor).

Run as the worker of a one-node job, so the snapshot goes into a real agent's shared memory:

    etrain launch --nproc-per-node 1 benchmarks/snapshot_cpu_bench.py --params-m 50

Each row runs training steps (forward, backward, AdamW step) with one extra per step: nothing,
a `copy_` of every tensor into preallocated buffers (the floor for a copy that is not
overlapped), `Snapshotter.snapshot()` (replicated state, world 1: the whole state) or
`torch.save` of the same state. Prints step time and the stall inside the extra. Sizes: fp32
model + AdamW moments (3 x params x 4 bytes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn

from elastictrain.snapshot.worker import Snapshotter


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-m", type=float, default=50, help="model size, millions")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256, help="rows per training step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width = 1024
    layers = max(1, int(args.params_m * 1e6 / (width * width * 2)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(2 * layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    params = sum(p.numel() for p in model.parameters())
    state_bytes = 3 * params * 4
    snap = Snapshotter(model=model, optimizer=opt)
    assert snap.enabled, "run me under `etrain launch`"

    step = [0]

    def snapshot() -> None:
        step[0] += 1
        assert snap.snapshot(step[0])

    tensors = [p.detach() for p in model.parameters()] + [
        t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
    ]
    buffers = [torch.empty_like(t) for t in tensors]

    def plain_copy() -> None:
        for dst, src in zip(buffers, tensors, strict=True):
            dst.copy_(src)

    path = os.path.join(tempfile.mkdtemp(prefix="etrain-bench-"), "state.pt")

    def save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    x = torch.randn(args.batch, width)

    def train_step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    def run(extra) -> tuple[float, float]:
        """Median step time and median time inside ``extra`` (the stall), over repeats."""
        steps, stalls = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            train_step()
            mid = time.perf_counter()
            if extra is not None:
                extra()
            done = time.perf_counter()
            steps.append(done - started)
            stalls.append(done - mid)
        return statistics.median(steps), statistics.median(stalls)

    rows = [
        ("no snapshot", run(None)),
        ("plain copy into preallocated buffers (floor)", run(plain_copy)),
        ("Snapshotter.snapshot, every step", run(snapshot)),
        ("torch.save to a local file, every step", run(save)),
    ]
    base = rows[0][1][0]
    print(f"\n{params / 1e6:.1f} M params, state {state_bytes / 1e9:.2f} GB (fp32 + AdamW), "
          f"1 rank, 1 thread, batch {args.batch}, median of {args.repeats} steps")  # fmt: skip
    print("| per step | step time (s) | vs no snapshot | stall (s) | stall GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, (step_time, stall) in rows:
        rate = f"{state_bytes / stall / 1e9:.2f}" if stall > 1e-4 else "-"
        print(f"| {name} | {step_time:.3f} | {step_time / base:.2f}x | {stall:.3f} | {rate} |")
    snap.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
