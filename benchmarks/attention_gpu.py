"""Core-attention tasks on one GPU: the kernel's rate on the planned shapes against whole
documents, each rank's set of a planned 8-rank step timed in turn against its naive packing,
and the drop-in ``core_attention`` against one varlen call over the whole documents, forward
and backward.

    python benchmarks/attention_gpu.py [--tokens 131072] [--ranks 8] [--seeds 2] [--dump f.json]

With ``--dump``, each rank's set is also timed forward and backward (runs mode), beside a few
made-up sets, and every set's shape and times go to the file (what the plan's cost model is
checked against).

bf16, 16 heads x 128, torch's varlen attention (flash), causal. Whole documents: one call over
the packed set (the ideal). Planned, two ways: *runs* (a GPU's default: each run of a
document's consecutive pieces on one runner is one sequence, and all of a rank's runs are one
kernel call, their inputs gathered first) and *pieces* (exact, under torch's deterministic
algorithms: every piece a call of its own, except that the pieces that start their document
share one call). A task is a query range over its whole prefix,
causality aligned bottom-right (checked against the whole document's rows). Work is counted
in (query, key) pairs; the rate is the step's pairs over the sum of the ranks' times (whole
documents: each rank's own, as naive packing runs them). Each rank's
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
    p.add_argument("--dump", help="write each timed set's shape and times (JSON) here")
    p.add_argument("--dump-only", action="store_true", help="only the --dump part")
    p.add_argument("--step", action="store_true",
                   help="time forward and backward (runs only), and stop after the table")
    p.add_argument("--query-cost", type=int, help="the plan's cost of a query row (pairs)")
    p.add_argument("--key-cost", type=int, help="the plan's cost of a key/value row (pairs)")
    args = p.parse_args()

    import torch

    from elastictrain.attention.core import (
        Piece,
        attend_pieces,
    )
    from elastictrain.attention.mixes import packed_mix
    from elastictrain.attention.plan import plan_attention, task_cost

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.varlen import varlen_attn

    if args.dump_only:
        cost_rows(args, torch)
        return 0
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
        inputs = [x.requires_grad_(args.step) for x in (q, k, v)]
        out = varlen_attn(*inputs, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))  # causal
        if args.step:
            torch.autograd.grad(out, inputs, torch.ones_like(out))

    def as_pieces(spans):
        """What exact mode runs (``attend_pieces``): each piece alone, those that start a
        document in one call (the prefixes are views, not copies)."""
        pieces = [Piece(base[0][s:e], base[1][:e], base[2][:e], s) for s, e in spans]
        return lambda: attend_pieces(pieces)

    def as_runs(spans):
        """What runs mode runs (``attend_packed``): the runs' queries and prefixes gathered
        (an owner's own runs; a runner's arrive packed), one call per length class."""
        return _runs_call(torch, base, spans, args.step)

    def timed(spans, mode: str = "whole") -> float:
        """Seconds of one call over ``spans`` packed (the ideal), or of the planned calls."""
        if not spans:
            return 0.0
        if mode != "whole":
            call = as_runs(spans) if mode == "runs" else as_pieces(spans)
        else:
            batch = packed(spans)
            call = lambda: run(batch)  # noqa: E731
        return _median_s(torch, call, args.repeats)

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
        plan = plan_attention(documents, range(args.ranks), policy=_policy(args))
        pairs = sum(task_cost(0, d.length) for d in documents)
        # each rank's whole documents (the naive packing), the better of two ways: one
        # call, or by length class; the step's whole documents take their sum
        naive = [min(timed(mine), timed(mine, "runs"))
                 for mine in ([(0, d.length) for d in documents if d.owner == r]
                              for r in range(args.ranks))]  # fmt: skip
        whole_s = sum(naive)
        naive_mm = max(naive) / statistics.mean(naive)
        # runs (a GPU's default: each run of pieces one call) and pieces alone (exact)
        for calls, spans_of in (("runs", _runs), ("pieces", _pieces))[: 1 if args.step else 2]:
            planned = [timed(spans_of(plan.by_runner[r]), calls) for r in range(args.ranks)]
            tasks_s = sum(planned)
            ratio = whole_s / tasks_s
            planned_mm = max(planned) / statistics.mean(planned)
            if calls == "runs":
                ok = ok and ratio >= 0.9 and planned_mm <= 1.05
            print(f"| {seed} | {calls} | {pairs / whole_s:.3e} | {pairs / tasks_s:.3e} | "
                  f"{ratio:.3f} | {naive_mm:.2f} | {planned_mm:.3f} | {plan.imbalance:.3f} |")
    print("\ngoals (runs, the default on a GPU): planned vs whole >= 0.90; planned max/mean "
          f"measured <= 1.05 ({'forward and backward' if args.step else 'forward'})")
    if args.step:
        return 0 if ok else 1
    ok = dropin(args, torch, varlen_attn) and ok
    same_bits(torch)
    if args.dump:
        cost_rows(args, torch)
    return 0 if ok else 1


def cost_rows(args, torch) -> None:
    """Each rank's set (planned runs, and naive) and a few made-up sets, forward and
    forward+backward as runs mode computes them (inputs gathered, one call), with their
    shapes: what a cost model of the kernel is fitted to. Written to ``--dump`` as JSON."""
    import json

    from elastictrain.attention.mixes import packed_mix
    from elastictrain.attention.plan import plan_attention

    device = torch.device("cuda")
    longest = max(args.tokens, 131072)
    base = [torch.randn(longest, args.heads, args.dim, device=device, dtype=torch.bfloat16)
            for _ in range(3)]  # fmt: skip

    def timed(spans, backward: bool) -> float:
        return _median_s(torch, _runs_call(torch, base, spans, backward), args.repeats) * 1e3

    sets: list[tuple[str, list[tuple[int, int]]]] = [
        ("tiny x2048", [(0, 64)] * 2048),
        ("512 x256", [(0, 512)] * 256),
        ("4K x32", [(0, 4096)] * 32),
        ("one 128K", [(0, 131072)]),
        ("tails 1K of 128K x16", [(131072 - 1024, 131072)] * 16),
        ("tails 1K of 32K x64", [(32768 - 1024, 32768)] * 64),
        ("one tail 4K of 128K", [(131072 - 4096, 131072)]),
    ]
    for seed in range(args.seeds):
        documents = packed_mix(args.ranks, args.tokens, seed)
        plan = plan_attention(documents, range(args.ranks), policy=_policy(args))
        for r in range(args.ranks):
            sets.append((f"{seed}/{r} planned", _runs(plan.by_runner[r])))
            sets.append((f"{seed}/{r} naive",
                         [(0, d.length) for d in documents if d.owner == r]))  # fmt: skip
    rows = []
    for name, spans in sets:
        rows.append({"set": name, "spans": spans, "forward_ms": timed(spans, False),
                     "step_ms": timed(spans, True)})  # fmt: skip
        print(f"{name}: {len(spans)} sequences, forward {rows[-1]['forward_ms']:.2f} ms, "
              f"forward+backward {rows[-1]['step_ms']:.2f} ms", flush=True)
        with open(args.dump, "w") as out:  # each row as it comes: a cut-off run keeps them
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "heads": args.heads, "dim": args.dim, "tokens": args.tokens,
                       "rows": rows}, out)  # fmt: skip
    print("\neach rank's set of a planned step, forward+backward as runs mode computes it:\n")
    print("| mix | naive max/mean fwd | planned fwd | naive fwd+bwd | planned fwd+bwd | "
          "modelled planned |")
    print("|--:|--:|--:|--:|--:|--:|")
    for seed in range(args.seeds):
        plan = plan_attention(packed_mix(args.ranks, args.tokens, seed), range(args.ranks),
                              policy=_policy(args))
        cells = []
        for key in ("forward_ms", "step_ms"):
            for kind in ("naive", "planned"):
                times = [row[key] for row in rows if row["set"].startswith(f"{seed}/")
                         and row["set"].endswith(kind)]  # fmt: skip
                cells.append(max(times) / statistics.mean(times))
        print(f"| {seed} | " + " | ".join(f"{c:.3f}" for c in cells)
              + f" | {plan.imbalance:.3f} |")  # fmt: skip


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


def _median_s(torch, call, repeats: int) -> float:
    """Seconds of ``call`` on the GPU: the median of ``repeats`` after 2 warm-ups."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        begin = torch.cuda.Event(enable_timing=True)
        finish = torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        finish.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(finish) / 1000)
    return statistics.median(times)


def _runs_call(torch, base, spans, backward: bool):
    """Runs mode on ``spans`` (query ranges over their prefixes of ``base``'s q, k, v), as a
    ``Packing`` orders them (by length class): the inputs gathered, the kernel calls, and
    with ``backward`` their gradients."""
    from elastictrain.attention.core import Sequences, attend_packed, length_class

    device = base[0].device
    spans = sorted(spans, key=lambda span: -length_class(span[1]))
    sequences = Sequences([e - s for s, e in spans], [s for s, _ in spans])
    rows_q = torch.cat([torch.arange(s, e) for s, e in spans]).to(device)
    rows_k = torch.cat([torch.arange(0, e) for _, e in spans]).to(device)
    grad = torch.randn(sequences.queries, base[0].shape[1], base[0].shape[2], device=device,
                       dtype=base[0].dtype)  # fmt: skip

    def call():
        inputs = [x.index_select(0, rows).requires_grad_(backward)
                  for x, rows in zip(base, (rows_q, rows_k, rows_k), strict=True)]
        out = attend_packed(*inputs, sequences)
        if backward:
            torch.autograd.grad(out, inputs, grad)

    return call


def _policy(args):
    """The plan's policy: the defaults, with the row costs given."""
    from elastictrain.attention.plan import AttentionPolicy

    costs = {name: value for name, value in (("query_cost", args.query_cost),
                                             ("key_cost", args.key_cost)) if value is not None}
    return AttentionPolicy(**costs)


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
