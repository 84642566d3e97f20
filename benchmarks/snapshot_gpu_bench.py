"""Snapshot cost on a GPU: a ~1B-parameter GPT (AdamW, bf16 autocast), step time with a
snapshot every step against none, torch.save, DCP async_save and a synchronous pinned copy;
then the restore time from the agent's memory.

Run it as the worker of a one-node job, so snapshots go into a real agent's shared memory:

    etrain launch --nproc-per-node 1 --snapshot-memory-limit 64 \\
        benchmarks/snapshot_gpu_bench.py --layers 16 --width 2048

With ``--nproc-per-node 2`` (or more) it trains under DDP, one GPU a rank, and each rank
snapshots its own 1/world slice beside the all-reduce; rank 0 prints the table.

Rows (each after warm-up steps of its own, so segments are allocated and page-locked):

- ``lazy 1/2 slice``: ``Snapshotter(rank=0, world=2)``: the 1/2 slice that each rank of a
  2-GPU data-parallel job copies (the other half is its peer's). On one GPU this is the
  per-rank copy cost of that job without the peer's all-reduce traffic.
- ``lazy full``: world 1, the whole state every 1, 2 and 3 steps (more than PCIe moves in
  one step on most machines: the copier stages the overflow on the device when the next
  snapshot leaves time for it).
- ``sync pinned copy``: ``copy_`` into preallocated pinned buffers, then synchronize: the floor
  for a copy that does not overlap compute.
- ``torch.save`` and ``dcp.async_save``: the stall of the call, at the same frequency (a few
  steps only: each stalls for seconds).

Step times are the wall time of N steps with one synchronization of the training stream at the
end (the lazy copy overlaps the next steps, so a per-step sync would serialize it, and a
device-wide one would count the last copy's tail as training time), divided by N.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from elastictrain.snapshot.layout import flatten_state, slice_range, stream_pieces
from elastictrain.snapshot.worker import Snapshotter


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    return tensors + [t for s in opt.state.values() for t in s.values() if t.is_cuda]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first (snapshot segments are made and page-locked)")
    parser.add_argument("--save-steps", type=int, default=2, help="timed steps of save rows")
    parser.add_argument("--rows", default="full,half,sync,save,dcp,restore",
                        help="comma-separated groups of rows to run")
    parser.add_argument("--profile", action="store_true", help="profile the snapshot calls")
    parser.add_argument("--trace", default=None,
                        help="write a torch.profiler trace (.json.gz) of 1/2-slice steps here")
    args = parser.parse_args()
    groups = set(filter(None, args.rows.split(",")))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    ddp = world > 1  # one rank a GPU, DDP: each rank snapshots its own 1/world slice
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("cuda:nccl,cpu:gloo")
        groups.discard("full")  # a whole state per rank is not what a DDP job snapshots
    torch.backends.cuda.matmul.allow_tf32 = True

    def build():
        torch.manual_seed(0)
        model = GPT(args.layers, args.width, args.heads, args.vocab, args.seq).to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    model, opt = build()
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index])
    else:
        net = model
    params = sum(p.numel() for p in model.parameters())
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    events: list[tuple[torch.cuda.Event, ...]] = []
    host_step: list[float] = []

    def train_step() -> None:
        started = time.perf_counter()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        marks[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(data[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, args.vocab), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks[1].record()
        opt.step()
        marks[2].record()
        events.append(tuple(marks))
        host_step.append(time.perf_counter() - started)

    for _ in range(3):
        train_step()
    torch.cuda.synchronize()
    state_bytes = sum(t.numel() * t.element_size() for t in state_tensors(model, opt))

    probe = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    host = torch.empty(1 << 31, dtype=torch.uint8, pin_memory=True)
    link = {}
    for name, dst, src in (("device to pinned host", host, probe),
                           ("pinned host to device", probe, host)):  # fmt: skip
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            started = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        link[name] = probe.numel() / min(times[1:]) / 1e9
    del probe, host
    print("link: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in link.items()), flush=True)

    step_counter = [0]
    rows: list[dict] = []
    compute = torch.cuda.current_stream(device)

    def row(name: str, extra: Callable[[int], object] | None, nbytes: float,
            steps: int = args.steps, warmup: int = args.warmup, profile: bool = False) -> None:
        """Mean step time over ``steps`` timed steps (one sync at the end), with the medians of
        the host time inside ``extra``, the host time of a training step, and the GPU time of
        forward + backward and of the optimizer step."""
        stalls: list[float] = []
        skipped = 0
        pinned = (snap.pinned_bytes, snap.pin_seconds)
        profiler = None
        for timed, count in ((False, warmup), (True, steps)):
            if timed:
                pinned = (snap.pinned_bytes, snap.pin_seconds)
                events.clear()
                host_step.clear()
                if profile:
                    import cProfile

                    profiler = cProfile.Profile()
            compute.synchronize()  # the training stream only: snapshot copies go on beside it
            started = time.perf_counter()
            for _ in range(count):
                train_step()
                step_counter[0] += 1
                if extra is not None:
                    before = time.perf_counter()
                    if profiler is not None:
                        profiler.enable()
                    taken = extra(step_counter[0])
                    if profiler is not None:
                        profiler.disable()
                    if timed:
                        stalls.append(time.perf_counter() - before)
                        skipped += taken is False and nbytes > 0 and "lazy" in name
            compute.synchronize()
            elapsed = time.perf_counter() - started
        result = {
            "name": name, "step": elapsed / steps, "bytes": nbytes,
            "stall": statistics.median(stalls) if stalls else 0.0,
            "host": statistics.median(host_step),
            "fwd_bwd": statistics.median(e[0].elapsed_time(e[1]) for e in events) / 1e3,
            "opt": statistics.median(e[1].elapsed_time(e[2]) for e in events) / 1e3,
            "pinned": snap.pinned_bytes - pinned[0], "pin_s": snap.pin_seconds - pinned[1],
            "skipped": skipped,
            "staging": snap.staging.reason if "lazy" in name and snap.staging else "",
        }  # fmt: skip
        rows.append(result)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in result.items()), flush=True)  # fmt: skip
        if profiler is not None:
            import pstats

            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)

    snap = Snapshotter(model=model, optimizer=opt, rank=rank, world=world)
    assert snap.enabled, "run me under `etrain launch`"

    def every(slices: int, k: int) -> Callable[[int], object]:
        """Snapshot every k steps: this rank's slice of a DDP job, or on one GPU rank 0's
        1/``slices`` (``slices`` = 2: one rank's share of a 2-GPU job; 1: the whole state)."""

        def extra(step: int) -> object:
            snap.world = world if ddp else slices
            return step % k == 0 and snap.snapshot(step)

        return extra

    def pinned_copy(slices: int) -> Callable[[int], None]:
        """The slice a snapshot would copy (as in :func:`every`) into a pinned buffer
        allocated once, then a synchronization."""
        layout, _ = flatten_state({"model": model.state_dict(), "optimizer": opt.state_dict()})
        start, end = slice_range(layout.total_bytes, world if ddp else slices, rank)
        buffer = torch.empty(end - start, dtype=torch.uint8, pin_memory=True)

        def extra(_step: int) -> None:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            layout, tensors = flatten_state(state)
            pieces = list(stream_pieces(layout, tensors, start, end))
            torch._foreach_copy_([buffer[p : p + t.numel()] for p, t in pieces],
                                 [t for _, t in pieces], non_blocking=True)  # fmt: skip
            torch.cuda.synchronize()

        return extra

    row("no snapshot", None, 0)
    # full-size segments first: the 1/2 slices then reuse them (no new page-locking)
    for k in (1, 2, 3) if "full" in groups else ():
        row(f"lazy full state, every {k} step(s)", every(1, k), state_bytes / k)
    share = world if ddp else 2
    part = f"this rank's 1/{world} slice" if ddp else "1/2 slice"
    for k in (1, 2) if "half" in groups else ():
        row(f"lazy {part}, every {k} step(s)", every(2, k), state_bytes / share / k,
            profile=args.profile and k == 1)  # fmt: skip
    snap.wait()
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        extra = every(2, 2)
        for _ in range(6):  # warm
            train_step()
            step_counter[0] += 1
            extra(step_counter[0])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            for _ in range(6):
                train_step()
                step_counter[0] += 1
                extra(step_counter[0])
            torch.cuda.synchronize()
        trace.export_chrome_trace(args.trace)
    if "sync" in groups:
        row(f"sync pinned copy of the {part}, every step", pinned_copy(2), state_bytes / share)
        if not ddp:
            row("sync pinned copy of the full state, every step", pinned_copy(1), state_bytes)
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # give the pinned buffers back

    workdir = tempfile.mkdtemp(prefix="etrain-bench-", dir=os.environ.get("BENCH_DIR"))
    if "save" in groups:
        path = os.path.join(workdir, "state.pt")

        def save(_step: int) -> None:
            if rank == 0:  # the others wait for it in the next step's all-reduce
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

        row("torch.save (rank 0), every step", save, state_bytes, args.save_steps, 1)
    if "dcp" in groups:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if not dist.is_initialized():
            dist.init_process_group("cuda:nccl,cpu:gloo")
        pending = [None]

        def async_save(step: int) -> None:
            if pending[0] is not None:
                pending[0].result()
            model_sd, optim_sd = get_state_dict(model, opt)
            checkpoint = os.path.join(workdir, f"dcp-{step}")
            pending[0] = dcp.async_save({"model": model_sd, "optimizer": optim_sd},
                                        checkpoint_id=checkpoint)  # fmt: skip

        row("dcp.async_save, every step", async_save, state_bytes, args.save_steps, 1)
        if pending[0] is not None:
            pending[0].result()

    # Restore from the agent's memory: first a few full snapshots, so the newest committed
    # one is whole; in place (the same worker: its mapping of the segment is still
    # page-locked), then as a restarted worker would (new objects, a new Snapshotter that maps
    # the segment afresh).
    restores = []
    if "restore" in groups:
        row("lazy full state (or DDP slices), every 3 step(s), before the restore", every(1, 3),
            state_bytes / 3, steps=6, warmup=0)  # fmt: skip
        snap.wait()
    for target in ("in place", "fresh") if "restore" in groups else ():
        if target == "fresh":
            snap.close()
            del model, opt
            torch.cuda.empty_cache()
            model, opt = build()
            snap = Snapshotter(model=model, optimizer=opt, rank=rank, world=world)
        torch.cuda.synchronize()
        started = time.perf_counter()
        restored = snap.restore()
        torch.cuda.synchronize()
        restores.append((target, time.perf_counter() - started, restored.step))
    snap.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if rank:
        return 0

    print(f"\n{params / 1e6:.0f} M params, state {state_bytes / 1e9:.2f} GB (fp32 params + "
          f"AdamW moments), batch {args.batch} x {args.seq} tokens, bf16 autocast, "
          f"{world} x {torch.cuda.get_device_name(device)}{' (DDP)' if ddp else ''}, "
          f"torch {torch.__version__}; "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in link.items()))  # fmt: skip
    base = rows[0]["step"]
    print("| per step | step time (s) | vs no snapshot | GB copied per step | host stall (s) "
          "| host time of a step (s) | GPU fwd+bwd (s) | GPU optimizer step (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "before the restore" in r["name"]:
            continue  # only makes the newest committed snapshot a full one
        print(f"| {r['name']} | {r['step']:.4f} | {r['step'] / base:.3f}x | "
              f"{r['bytes'] / 1e9:.2f} | {r['stall']:.4f} | {r['host']:.4f} | "
              f"{r['fwd_bwd']:.4f} | {r['opt']:.4f} |")  # fmt: skip
    print("\n| restore of the full state from local agent memory | time (s) | GB/s |")
    print("|---|---:|---:|")
    for target, seconds, step in restores:
        rate = state_bytes / seconds / 1e9 if seconds > 0 else math.inf
        print(f"| {target} (step {step}) | {seconds:.3f} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
