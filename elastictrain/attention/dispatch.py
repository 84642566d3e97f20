"""Core-attention tasks run where the plan puts them, with the same arithmetic wherever that is.

A plan cuts each document into pieces (tasks) that do not depend on the world
(:mod:`elastictrain.attention.plan`). Each piece is always computed alone: its queries over its
whole causal key/value prefix, one kernel call. Its key/value gradients are partial (rows
``[0, end)`` of the document) and are summed over the document's pieces in one fixed binary
tree (:mod:`elastictrain.train.tree`, leaves = the pieces): a runner that holds a run of
consecutive pieces sums them into the run's cover of aligned subtrees, and the owner merges
every cover into the root. Which rank ran which piece, and how the pieces were grouped into
runs, change no bit of the result.

Transport: the pieces of a document that one runner computes for one owner travel as a *run*
(maximal, consecutive pieces): the queries of the run and the key/value prefix of its last
piece go out once, in one all-to-all with every other run; the outputs come back in another.
The backward sends the outputs' gradients the same way, and each runner returns the run's
query gradients and the cover's key/value partials. A rank computes its own runs while the
first exchange of each direction is under way.

This is exact mode (the default on CPU and under torch's deterministic algorithms). Runs mode
(:mod:`elastictrain.attention.packed`, a GPU's default otherwise) computes each run as one
sequence of one kernel call per rank; :func:`attention_forward` and
:func:`attention_backward` take the mode the layout says.

Every rank calls :func:`dispatched_attention` with its own packed ``q``, ``k``, ``v``
(``[tokens, heads, head_dim]``), the offset of each document it owns in them, and the same
plan (world ranks = the group's ranks). A rank that owns nothing this round takes part with
empty tensors (:func:`attention_forward` and :func:`attention_backward`, called directly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from elastictrain.attention.core import (
    Graph,
    Piece,
    attend_pieces,
    exact_by_default,
    grad_pieces,
)
from elastictrain.attention.layout import Layout, Run
from elastictrain.attention.packed import PackedSaved, packed_backward, packed_forward
from elastictrain.attention.plan import AttentionPlan
from elastictrain.attention.transport import AllToAll, Exchange, cut, direct
from elastictrain.errors import ConfigError
from elastictrain.train.collectives import Collectives
from elastictrain.train.tree import BlockSum, Node, merge

Partials = list[tuple[Node, tuple[torch.Tensor, torch.Tensor]]]


def _add_prefix(left: tuple[torch.Tensor, torch.Tensor],
                right: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value partials of earlier pieces (a shorter prefix) plus later ones: the tree's
    one addition."""
    for a, b in zip(left, right, strict=True):
        b[: a.shape[0]].add_(a)
    return right


def _pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run: Run, layout: Layout
            ) -> list[Piece]:  # fmt: skip
    """The kernel inputs of a run's pieces: ``q`` its queries, ``k``/``v`` its prefix."""
    pieces = layout.pieces[run.doc]
    return [Piece(q[t.start - run.start: t.end - run.start], k[: t.end], v[: t.end], t.start)
            for t in pieces[run.first: run.stop]]  # fmt: skip


def _forward_runs(work: list[tuple[Run, list[Piece]]], scale: float | None
                  ) -> tuple[list[torch.Tensor], Graph | None]:  # fmt: skip
    """Each run's outputs (its queries' rows), every piece computed alone (some in a shared
    kernel call: the same bits), and the graph its backward takes (None: no pieces)."""
    every = [p for _, pieces in work for p in pieces]
    if not every:
        return [], None
    outs, graph = attend_pieces(every, scale, keep=True)
    found, at = [], 0
    for _, pieces in work:
        mine = outs[at: at + len(pieces)]
        at += len(pieces)
        found.append(torch.cat(mine) if len(mine) > 1 else mine[0])
    return found, graph


def _backward_runs(work: list[tuple[Run, list[Piece], torch.Tensor]], graph: Graph | None,
                   leaves: list[int]) -> list[tuple[torch.Tensor, Partials]]:
    """Each run's query gradients and its cover's key/value partials (``leaves``: the
    number of pieces of each run's document); the partials are summed as they come."""
    if graph is None:
        return []
    grads = [g[p.start - pieces[0].start: p.start - pieces[0].start + p.q.shape[0]]
             for _, pieces, g in work for p in pieces]  # fmt: skip
    found = grad_pieces(graph, grads)
    results = []
    for (run, pieces, _), count in zip(work, leaves, strict=True):
        block: BlockSum = BlockSum(run.first, run.stop, count, _add_prefix)
        dq = []
        for _ in pieces:
            gq, gk, gv = next(found)
            dq.append(gq)
            block.push((gk, gv))
        results.append((torch.cat(dq) if len(dq) > 1 else dq[0], block.partials()))
    return results


@dataclass
class Saved:
    """What a forward keeps for its backward: the rank's own inputs, the pieces it ran (its
    own, then those of each owner it ran runs for) and their graphs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    local: list[tuple[Run, list[Piece]]]
    local_graph: Graph | None
    remote: list[tuple[int, Run, list[Piece]]]  # (owner, run, its pieces)
    remote_graph: Graph | None


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                      coll: Collectives | None, scale: float | None = None,
                      around: Exchange = direct
                      ) -> tuple[torch.Tensor, Saved | PackedSaved]:  # fmt: skip
    """This rank's outputs (its own documents' rows) and what the backward needs, in the
    layout's mode. ``around`` wraps each exchange (a clock that leaves waiting out, say)."""
    if not layout.exact:
        return packed_forward(q, k, v, layout, coll, scale, around)
    return _exact_forward(q, k, v, layout, coll, scale, around)


def attention_backward(grad_out: torch.Tensor, saved: Saved | PackedSaved, layout: Layout,
                       coll: Collectives | None, around: Exchange = direct
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dQ, dK, dV of this rank's own rows, in the layout's mode."""
    if isinstance(saved, PackedSaved):
        return packed_backward(grad_out, saved, layout, coll, around)
    return _exact_backward(grad_out, saved, layout, coll, around)


def _exact_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                   coll: Collectives | None, scale: float | None, around: Exchange
                   ) -> tuple[torch.Tensor, Saved]:  # fmt: skip
    heads, dim = q.shape[1], q.shape[2]
    width, shape = heads * dim, (-1, heads, dim)
    remote: list[tuple[int, Run, list[Piece]]] = []
    remote_graph = None
    returned: dict[int, torch.Tensor] = {}
    spread = coll is not None and coll.size > 1
    with torch.no_grad():
        if spread:
            assert coll is not None
            outgoing = {r: [x for run in runs for x in
                            (q[layout.rows(run)[0]], k[layout.rows(run)[1]],
                             v[layout.rows(run)[1]])]
                        for r, runs in layout.sent.items()}  # fmt: skip
            rows = {r: sum(run.queries + 2 * run.end for run in runs)
                    for r, runs in layout.run_for.items()}  # fmt: skip
            sending = AllToAll.of(coll, outgoing, rows, width, q)
        # this rank's own runs while the others' inputs travel
        out = torch.empty_like(q)
        local = [(run, _pieces(q[layout.rows(run)[0]], k[layout.rows(run)[1]],
                               v[layout.rows(run)[1]], run, layout))
                 for run in layout.local]  # fmt: skip
        outs, local_graph = _forward_runs(local, scale)
        for (run, _), piece in zip(local, outs, strict=True):
            out[layout.rows(run)[0]] = piece
        if spread:
            assert coll is not None
            got = sending.wait(around)
            for r, block in got.items():
                runs = layout.run_for[r]
                parts = cut(block, [n for run in runs for n in (run.queries, run.end, run.end)])
                for i, run in enumerate(runs):
                    inputs = [p.view(shape) for p in parts[3 * i: 3 * i + 3]]
                    remote.append((r, run, _pieces(*inputs, run, layout)))
            outs, remote_graph = _forward_runs([(run, ps) for _, run, ps in remote], scale)
            results: dict[int, list[torch.Tensor]] = {r: [] for r in got}
            for (r, _, _), piece in zip(remote, outs, strict=True):
                results[r].append(piece)
            back = {r: sum(run.queries for run in runs) for r, runs in layout.sent.items()}
            returned = AllToAll.of(coll, results, back, width, q).wait(around)
        for r, block in returned.items():
            runs = layout.sent[r]
            for run, piece in zip(runs, cut(block, [run.queries for run in runs]), strict=True):
                out[layout.rows(run)[0]] = piece.view(shape)
    return out, Saved(q, k, v, local, local_graph, remote, remote_graph)


def _exact_backward(grad_out: torch.Tensor, saved: Saved, layout: Layout,
                    coll: Collectives | None, around: Exchange
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dQ, dK, dV of this rank's own rows; the key/value partials of each document summed in
    its pieces' fixed tree."""
    q, k, v = saved.q, saved.k, saved.v
    heads, dim = q.shape[1], q.shape[2]
    width, shape = heads * dim, (-1, heads, dim)
    grad_out = grad_out.contiguous()
    partials: dict[int, Partials] = {}  # doc -> the covers of its runs
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    spread = coll is not None and coll.size > 1
    if spread:
        assert coll is not None
        outgoing = {r: [grad_out[layout.rows(run)[0]] for run in runs]
                    for r, runs in layout.sent.items()}  # fmt: skip
        rows = {r: sum(run.queries for run in runs) for r, runs in layout.run_for.items()}
        sending = AllToAll.of(coll, outgoing, rows, width, q)
    # this rank's own runs while the others' gradients travel
    local = [(run, pieces, grad_out[layout.rows(run)[0]]) for run, pieces in saved.local]
    leaves = [len(layout.pieces[run.doc]) for run in layout.local]
    for run, (gq, cover) in zip(layout.local, _backward_runs(local, saved.local_graph, leaves),
                                strict=True):  # fmt: skip
        dq[layout.rows(run)[0]] = gq
        partials.setdefault(run.doc, []).extend(cover)
    if spread:
        assert coll is not None
        got = sending.wait(around)
        grads = {r: iter(cut(block, [run.queries for run in layout.run_for[r]]))
                 for r, block in got.items()}  # fmt: skip
        work = [(run, pieces, next(grads[r]).view(shape)) for r, run, pieces in saved.remote]
        results: dict[int, list[torch.Tensor]] = {r: [] for r in got}
        leaves = [len(layout.pieces[run.doc]) for run, _, _ in work]
        for (r, _, _), (gq, cover) in zip(saved.remote,
                                          _backward_runs(work, saved.remote_graph, leaves),
                                          strict=True):  # fmt: skip
            results[r].append(gq)
            results[r].extend(x for _, pair in cover for x in pair)
        covers = {run: layout.cover(run) for runs in layout.sent.values() for run in runs}
        back = {r: sum(run.queries + 2 * sum(n for _, n in covers[run]) for run in runs)
                for r, runs in layout.sent.items()}  # fmt: skip
        returned = AllToAll.of(coll, results, back, width, q).wait(around)
        for r, block in returned.items():
            sizes = []
            for run in layout.sent[r]:
                sizes.append(run.queries)
                sizes.extend(n for _, rows_ in covers[run] for n in (rows_, rows_))
            parts = iter(cut(block, sizes))
            for run in layout.sent[r]:
                dq[layout.rows(run)[0]] = next(parts).view(shape)
                partials.setdefault(run.doc, []).extend(
                    (node, (next(parts).view(shape), next(parts).view(shape)))
                    for node, _ in covers[run])  # fmt: skip
    for doc, cover in partials.items():
        pieces = layout.pieces[doc]
        gk, gv = merge(cover, len(pieces), _add_prefix)
        base = layout.offsets[doc]
        dk[base: base + pieces[-1].end] = gk
        dv[base: base + pieces[-1].end] = gv
    return dq, dk, dv


class DispatchedAttention(torch.autograd.Function):
    """:func:`attention_forward` and :func:`attention_backward` as one autograd node; ``note``
    (if any) is called as its backward begins (a round records the order of its calls)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: Layout, coll: Collectives | None, scale,  # noqa: ANN001
                around: Exchange, note: Callable[[], None] | None):  # fmt: skip
        out, saved = attention_forward(q, k, v, layout, coll, scale, around)
        ctx.saved, ctx.layout, ctx.coll, ctx.around = saved, layout, coll, around
        ctx.note = note
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        if ctx.note is not None:  # an empty rank replays the calls in this order
            ctx.note()
        dq, dk, dv = attention_backward(grad_out, ctx.saved, ctx.layout, ctx.coll, ctx.around)
        ctx.saved = None
        return dq, dk, dv, None, None, None, None, None


def dispatched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         offsets: Mapping[int, int], plan: AttentionPlan,
                         coll: Collectives | None, scale: float | None = None,
                         exact: bool | None = None,
                         around: Exchange = direct) -> torch.Tensor:  # fmt: skip
    """This rank's attention outputs (rows of its own documents), the tasks run where
    ``plan`` says. ``offsets``: document index -> its first row in ``q``/``k``/``v``.
    ``coll`` None: a world of one (every task here). ``exact`` (default
    :func:`exact_by_default`): every piece alone and the tree (the same bits in any plan);
    else each run is one kernel call and its owner sums the runs in order."""
    size = coll.size if coll is not None else 1
    if tuple(plan.ranks) != tuple(range(size)):
        raise ConfigError(f"a plan over ranks {plan.ranks} in a group of {size}")
    exact = exact_by_default(q.device) if exact is None else exact
    layout = Layout(plan, coll.rank if coll is not None else 0, offsets, exact)
    return DispatchedAttention.apply(q, k, v, layout, coll, scale, around, None)
