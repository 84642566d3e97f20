"""Core-attention tasks on one GPU: the kernel's rate on the planned shapes against whole
documents, each rank's set of a planned 8-rank step timed in turn against its naive packing,
and the drop-in ``core_attention`` against one varlen call over the whole documents, forward
and backward.

    python benchmarks/attention_gpu.py [--tokens 131072] [--ranks 8] [--seeds 2]

bf16, 16 heads x 128, torch's varlen attention (flash), causal. Whole documents: one call over
the packed set (the ideal). Planned, two ways: *runs* (a GPU's default: each run of a
document's consecutive pieces on one runner is one kernel call) and *pieces* (exact, under
torch's deterministic algorithms: every piece a call of its own); the runs or pieces that
start their document share one call. A task is a query range over its whole prefix,
causality aligned bottom-right (checked against the whole document's rows). Work is counted
in (query, key) pairs; the rate is pairs per second over every task of the step. Each rank's
set runs alone (the GPU one rank would have), median of 5 after 2 warm-ups, CUDA events.
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

    from elastictrain.attention.core import Piece, attend_pieces
    from elastictrain.attention.mixes import packed_mix
    from elastictrain.attention.plan import plan_attention, task_cost

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.varlen import varlen_attn

    device = torch.device("cuda")
    base = [torch.randn(args.tokens, args.heads, args.dim, device=device, dtype=torch.bfloat16)
            for _ in range(3)]  # fmt: skip

    def packed(spans):
        """q rows [s, e) and k/v rows [0, e) of each span, packed, with their boundaries."""
        rows_q = torch.cat([torch.arange(s, e) for s, e in spans]).to(device)
        rows_k = torch.cat([torch.arange(0, e) for _, e in spans]).to(device)
        lens_q = torch.tensor([0] + [e - s for s, e in spans]).cumsum(0).to(device, torch.int32)
        lens_k = torch.tensor([0] + [e for _, e in spans]).cumsum(0).to(device, torch.int32)
        return (base[0][rows_q], base[1][rows_k], base[2][rows_k], lens_q, lens_k,
                max(e - s for s, e in spans), max(e for _, e in spans))  # fmt: skip

    def run(batch) -> None:
        q, k, v, cu_q, cu_k, max_q, max_k = batch
        varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))  # causal

    def as_pieces(spans, shared: bool):
        """What the dispatch runs (``attend_pieces``): exact, each piece alone, those that
        start a document in one call (the prefixes are views, not copies); not exact, every
        run in one call."""
        pieces = [Piece(base[0][s:e], base[1][:e], base[2][:e], s) for s, e in spans]
        return lambda: attend_pieces(pieces, shared=shared)

    def timed(spans, pieces: bool = False, shared: bool = False) -> float:
        """Seconds of one call over ``spans`` packed (the ideal), or of the pieces' calls."""
        if not spans:
            return 0.0
        if pieces:
            call = as_pieces(spans, shared)
        else:
            batch = packed(spans)
            call = lambda: run(batch)  # noqa: E731
        for _ in range(2):
            call()
        times = []
        for _ in range(args.repeats):
            begin = torch.cuda.Event(enable_timing=True)
            finish = torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            finish.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(finish) / 1000)
        return statistics.median(times)

    # a query range over its prefix is causal aligned bottom-right: the same rows as the
    # whole document's call
    whole = varlen_attn(*packed([(0, 4096)])[:5], 4096, 4096, window_size=(-1, 0))
    tail = varlen_attn(*packed([(3000, 4096)])[:5], 1096, 4096, window_size=(-1, 0))
    error = float((tail.float() - whole[3000:].float()).abs().max())
    print(f"a tail [3000, 4096) against the whole document's rows: max |diff| {error:.2e}")
    if error > 1e-2:
        print("the kernel does not align causality bottom-right", file=sys.stderr)
        return 1

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {args.heads} heads "
          f"x {args.dim}, {args.ranks} ranks x {args.tokens} tokens\n")
    print("| mix | calls | whole documents, pairs/s | planned, pairs/s | planned vs whole | "
          "naive max/mean (GPU) | planned max/mean (GPU) | modelled planned |")
    print("|--:|--|--:|--:|--:|--:|--:|--:|")
    ok = True
    for seed in range(args.seeds):
        documents = packed_mix(args.ranks, args.tokens, seed)
        plan = plan_attention(documents, range(args.ranks))
        whole = [(0, d.length) for d in documents]
        pairs = sum(task_cost(0, d.length) for d in documents)
        whole_s = timed(whole)
        naive = [timed([(0, d.length) for d in documents if d.owner == r])
                 for r in range(args.ranks)]  # fmt: skip
        naive_mm = max(naive) / statistics.mean(naive)
        # runs (a GPU's default: each run of pieces one call) and pieces alone (exact)
        for calls, spans_of in (("runs", _runs), ("pieces", _pieces)):
            every = spans_of(plan.tasks)
            shared = calls == "runs"
            tasks_s = timed(every, pieces=True, shared=shared)
            planned = [timed(spans_of(plan.by_runner[r]), pieces=True, shared=shared)
                       for r in range(args.ranks)]  # fmt: skip
            ratio = whole_s / tasks_s
            planned_mm = max(planned) / statistics.mean(planned)
            if calls == "runs":
                ok = ok and ratio >= 0.9 and planned_mm <= 1.05
            print(f"| {seed} | {calls} | {pairs / whole_s:.3e} | {pairs / tasks_s:.3e} | "
                  f"{ratio:.3f} | {naive_mm:.2f} | {planned_mm:.3f} | {plan.imbalance:.3f} |")
    print("\ngoals (runs, the default on a GPU): planned vs whole >= 0.90; planned max/mean "
          "measured <= 1.05")
    ok = dropin(args, torch, varlen_attn) and ok
    same_bits(torch)
    return 0 if ok else 1


def same_bits(torch) -> None:
    """Is a piece's result the same alone as in a shared call (what the plan-independence of
    the results rests on, on a GPU)? Forward, and the backward's dQ, dK, dV, with and without
    torch's deterministic algorithms."""
    from elastictrain.attention.core import Piece, attend_pieces, grad_pieces

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    heads, dim = 16, 128

    def rand(n):
        return torch.randn(n, heads, dim, device=device, dtype=torch.bfloat16, generator=g)

    docs = [rand(n) for n in (3000, 700, 64, 5000)]
    pieces = [Piece(d, d, d, 0) for d in docs]  # whole documents: one shared call
    long = rand(9000)
    pieces += [Piece(long[6000:], long, long, 6000)]  # a tail: a call of its own
    grads = [rand(p.q.shape[0]) for p in pieces]
    together, _ = attend_pieces(pieces)
    alone = [attend_pieces([p])[0][0] for p in pieces]
    print("\na piece alone vs in a shared call: forward "
          f"{all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))}")
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        shared = list(grad_pieces(attend_pieces(pieces, keep=True)[1], grads))
        single = [next(grad_pieces(attend_pieces([p], keep=True)[1], [gr]))
                  for p, gr in zip(pieces, grads, strict=True)]  # fmt: skip
        same = [all(torch.equal(a[i], b[i]) for a, b in zip(shared, single, strict=True))
                for i in range(3)]  # fmt: skip
        again = list(grad_pieces(attend_pieces(pieces, keep=True)[1], grads))
        repeat = [all(torch.equal(a[i], b[i]) for a, b in zip(shared, again, strict=True))
                  for i in range(3)]  # fmt: skip
        print(f"deterministic algorithms {deterministic}: dQ, dK, dV the same alone {same}; "
              f"the same when run again {repeat}")
    torch.use_deterministic_algorithms(False)


def _pieces(tasks) -> list[tuple[int, int]]:
    return [(t.start, t.end) for t in tasks]


def _runs(tasks) -> list[tuple[int, int]]:
    """The tasks' runs: consecutive pieces of a document on one runner, as one span."""
    spans: list[tuple[int, int]] = []
    last = None
    for t in sorted(tasks, key=lambda t: (t.doc, t.start)):
        if last is not None and (t.doc, t.runner) == last and spans[-1][1] == t.start:
            spans[-1] = (spans[-1][0], t.end)
        else:
            spans.append((t.start, t.end))
        last = (t.doc, t.runner)
    return spans


def dropin(args, torch, varlen_attn) -> bool:
    """One rank's packed batch, forward and backward: ``core_attention`` against one varlen
    call over its whole documents, by default (runs: here each document is one run) and under
    torch's deterministic algorithms (exact: every piece alone, the tree's sums; the varlen
    call's backward deterministic too)."""
    from elastictrain.attention.mixes import packed_mix

    print("\n| mix | rank | documents | pieces | mode | whole docs fwd+bwd (ms) | "
          "core_attention fwd+bwd (ms) | whole vs core_attention | max out diff | "
          "dK rel. error |")
    print("|--:|--:|--:|--:|--|--:|--:|--:|--:|--:|")
    worst = 1.0
    for seed in range(args.seeds):
        documents = packed_mix(args.ranks, args.tokens, seed)
        loads: dict[int, int] = {}
        for d in documents:
            loads[d.owner] = loads.get(d.owner, 0) + d.length**2
        rank = max(loads, key=loads.get)  # the rank with the most attention work
        mine = [d for d in documents if d.owner == rank]
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            ratio = _dropin_row(args, torch, varlen_attn, mine, seed, rank)
            if deterministic:
                worst = min(worst, ratio)
        torch.use_deterministic_algorithms(False)
    print(f"\nthe price of bit-identical attention in any world (deterministic algorithms, "
          f"both sides): core_attention runs at {worst:.3f} of one call's speed at worst")
    return True


def _dropin_row(args, torch, varlen_attn, documents, seed: int, rank: int) -> float:
    import statistics

    from elastictrain.attention import core_attention
    from elastictrain.attention.plan import plan_attention

    device = torch.device("cuda")
    mode = "exact" if torch.are_deterministic_algorithms_enabled() else "runs"
    lengths = [d.length for d in documents]
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    cu = bounds.to(device, torch.int32)
    pieces = len(plan_attention(documents, [rank]).tasks)
    tokens = int(bounds[-1])
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = [torch.randn(tokens, args.heads, args.dim, device=device, dtype=torch.bfloat16,
                          generator=g).requires_grad_(True) for _ in range(3)]  # fmt: skip
    grad = torch.randn(tokens, args.heads, args.dim, device=device, dtype=torch.bfloat16,
                       generator=g)  # fmt: skip
    calls = {
        "whole": lambda: varlen_attn(*inputs, cu, cu, max(lengths), max(lengths),
                                     window_size=(-1, 0)),
        "pieces": lambda: core_attention(*inputs, bounds.tolist()),
    }  # fmt: skip

    def step(name):
        out = calls[name]()
        return out.detach(), torch.autograd.grad(out, inputs, grad)

    def timed(name):
        for _ in range(2):
            step(name)
        times = []
        for _ in range(args.repeats):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            step(name)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times)

    ref_out, ref_grads = step("whole")
    out, grads = step("pieces")
    diff = float((out.float() - ref_out.float()).abs().max())
    dk = float((grads[1].float() - ref_grads[1].float()).norm() / ref_grads[1].float().norm())
    whole_ms, mine_ms = timed("whole"), timed("pieces")
    print(f"| {seed} | {rank} | {len(lengths)} | {pieces} | {mode} | {whole_ms:.1f} | "
          f"{mine_ms:.1f} | {whole_ms / mine_ms:.3f} | {diff:.2e} | {dk:.2e} |")
    return whole_ms / mine_ms


if __name__ == "__main__":
    sys.exit(main())
