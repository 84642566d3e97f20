"""Core-attention tasks on one GPU: the kernel's rate on the planned task shapes against whole
documents, and each rank's task set of a planned 8-rank step timed in turn against its
naive packing.

    python benchmarks/attention_gpu.py [--tokens 131072] [--ranks 8] [--seeds 2]

bf16, 16 heads x 128, SDPA (flash) with a bottom-right causal mask for a query range over its
prefix, ``is_causal`` for a whole document. Work is counted in (query, key) pairs; the rate
is pairs per second over every task of the step. Each rank's set runs alone (the GPU one
rank would have), median of 5 after 2 warm-ups, with CUDA events.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128 * 1024, help="tokens per rank")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from elastictrain.attention.mixes import packed_mix
    from elastictrain.attention.plan import plan_attention, task_cost

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    longest = max(args.tokens, 1)
    q = torch.randn(1, args.heads, longest, args.dim, device=device, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)

    def run(spans) -> None:
        for start, end in spans:
            if start == 0:
                F.scaled_dot_product_attention(q[:, :, :end], k[:, :, :end], v[:, :, :end],
                                               is_causal=True)  # fmt: skip
            else:
                F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                               attn_mask=causal_lower_right(end - start, end))

    def timed(spans) -> float:
        for _ in range(2):
            run(spans)
        times = []
        for _ in range(args.repeats):
            begin = torch.cuda.Event(enable_timing=True)
            finish = torch.cuda.Event(enable_timing=True)
            begin.record()
            run(spans)
            finish.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(finish) / 1000)
        return statistics.median(times)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {args.heads} heads "
          f"x {args.dim}, {args.ranks} ranks x {args.tokens} tokens\n")
    print("| mix | whole documents, pairs/s | planned tasks, pairs/s | tasks vs whole | "
          "naive max/mean (GPU) | planned max/mean (GPU) | modelled planned |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    ok = True
    for seed in range(args.seeds):
        documents = packed_mix(args.ranks, args.tokens, seed)
        plan = plan_attention(documents, range(args.ranks))
        whole = [(0, d.length) for d in documents]
        tasks = [(t.start, t.end) for t in plan.tasks]
        pairs = sum(task_cost(0, d.length) for d in documents)
        whole_s, tasks_s = timed(whole), timed(tasks)
        naive = [timed([(0, d.length) for d in documents if d.owner == r])
                 for r in range(args.ranks)]  # fmt: skip
        planned = [timed([(t.start, t.end) for t in plan.by_runner[r]])
                   for r in range(args.ranks)]  # fmt: skip
        ratio = whole_s / tasks_s
        naive_mm = max(naive) / statistics.mean(naive)
        planned_mm = max(planned) / statistics.mean(planned)
        ok = ok and ratio >= 0.9 and planned_mm <= 1.05
        print(f"| {seed} | {pairs / whole_s:.3e} | {pairs / tasks_s:.3e} | {ratio:.3f} | "
              f"{naive_mm:.2f} | {planned_mm:.3f} | {plan.imbalance:.3f} |")
    print("\ngoals: tasks vs whole >= 0.90; planned max/mean measured <= 1.05")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
