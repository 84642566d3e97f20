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

Every rank calls :func:`dispatched_attention` with its own packed ``q``, ``k``, ``v``
(``[tokens, heads, head_dim]``), the offset of each document it owns in them, and the same
plan (world ranks = the group's ranks). A rank that owns nothing this round takes part with
empty tensors (:func:`attention_forward` and :func:`attention_backward`, called directly).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from elastictrain.attention.core import (
    Graph,
    Piece,
    attend_pieces,
    exact_by_default,
    grad_pieces,
)
from elastictrain.attention.plan import AttentionPlan, Task
from elastictrain.errors import ConfigError
from elastictrain.train.collectives import Collectives
from elastictrain.train.tree import BlockSum, Node, merge
from elastictrain.train.tree import cover as tree_cover

Partials = list[tuple[Node, tuple[torch.Tensor, torch.Tensor]]]


class Run(NamedTuple):
    """Consecutive pieces ``[first, stop)`` of a document, computed by one runner."""

    doc: int
    first: int
    stop: int
    start: int  # the run's first query
    end: int  # one past its last query: keys and values are [0, end)
    owner: int
    runner: int

    @property
    def queries(self) -> int:
        return self.end - self.start


class Layout:
    """One rank's part of a plan: its runs, who runs them, and the pieces of its documents.
    Built once per plan (every layer of a micro-batch uses the same)."""

    def __init__(self, plan: AttentionPlan, rank: int, offsets: Mapping[int, int],
                 exact: bool = True) -> None:  # fmt: skip
        self.rank = rank
        self.exact = exact  # pieces alone and the tree; else a run is one kernel call
        self.ranks = plan.ranks
        self.offsets = dict(offsets)
        self.pieces: dict[int, list[Task]] = {}  # doc -> its pieces, for docs this rank touches
        self.local: list[Run] = []  # owned here, run here
        self.sent: dict[int, list[Run]] = {r: [] for r in plan.ranks if r != rank}
        self.run_for: dict[int, list[Run]] = {r: [] for r in plan.ranks if r != rank}
        runs: list[Run] = []
        pieces: list[Task] = []
        for task in plan.tasks:  # by (doc, piece)
            if pieces and task.doc != pieces[-1].doc:
                runs.extend(self._runs(pieces))
                pieces = []
            pieces.append(task)
        if pieces:
            runs.extend(self._runs(pieces))
        for run in runs:
            if run.owner == rank and run.runner == rank:
                self.local.append(run)
            elif run.owner == rank:
                self.sent[run.runner].append(run)
            elif run.runner == rank:
                self.run_for[run.owner].append(run)
        for doc in {run.doc for run in runs if run.owner == rank}:
            if doc not in self.offsets:
                raise ConfigError(f"rank {rank} owns document {doc} but has no offset for it")

    def _runs(self, pieces: list[Task]) -> list[Run]:
        """The runs of one document's pieces (in order), keeping the pieces if this rank
        owns or runs any of them."""
        if any(t.piece != i for i, t in enumerate(pieces)):
            raise ConfigError(f"document {pieces[0].doc}'s tasks are not its pieces in order")
        found, first = [], 0
        for i in range(1, len(pieces) + 1):
            if i == len(pieces) or pieces[i].runner != pieces[first].runner:
                head = pieces[first]
                found.append(Run(head.doc, first, i, head.start, pieces[i - 1].end, head.owner,
                                 head.runner))  # fmt: skip
                first = i
        if pieces[0].owner == self.rank or any(r.runner == self.rank for r in found):
            self.pieces[pieces[0].doc] = pieces
        return found

    def rows(self, run: Run) -> tuple[slice, slice]:
        """The run's query rows and key/value prefix rows in the owner's tensors."""
        base = self.offsets[run.doc]
        return slice(base + run.start, base + run.end), slice(base, base + run.end)

    def cover(self, run: Run) -> list[tuple[Node, int]]:
        """The nodes of the run's cover (its aligned subtrees of the document's pieces), each
        with the rows of its key/value partial (the prefix of its last piece). Not exact: the
        run's one partial, named by its first piece."""
        if not self.exact:
            return [(Node(0, run.first), run.end)]
        pieces = self.pieces[run.doc]
        return [(node, pieces[node.span(len(pieces))[1] - 1].end)
                for node in tree_cover(run.first, run.stop, len(pieces))]  # fmt: skip


def _add_prefix(left: tuple[torch.Tensor, torch.Tensor],
                right: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value partials of earlier pieces (a shorter prefix) plus later ones: the tree's
    one addition."""
    for a, b in zip(left, right, strict=True):
        b[: a.shape[0]].add_(a)
    return right


def _pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run: Run, layout: Layout
            ) -> list[Piece]:  # fmt: skip
    """The kernel inputs of a run's pieces: ``q`` its queries, ``k``/``v`` its prefix. Not
    exact: the whole run as one piece."""
    if not layout.exact:
        return [Piece(q, k, v, run.start)]
    pieces = layout.pieces[run.doc]
    return [Piece(q[t.start - run.start: t.end - run.start], k[: t.end], v[: t.end], t.start)
            for t in pieces[run.first: run.stop]]  # fmt: skip


def _forward_runs(work: list[tuple[Run, list[Piece]]], scale: float | None, exact: bool
                  ) -> tuple[list[torch.Tensor], Graph | None]:  # fmt: skip
    """Each run's outputs (its queries' rows), every piece computed alone (some in a shared
    kernel call: the same bits), and the graph its backward takes (None: no pieces). Not
    exact: every run of ``work`` in one kernel call."""
    every = [p for _, pieces in work for p in pieces]
    if not every:
        return [], None
    outs, graph = attend_pieces(every, scale, keep=True, shared=not exact)
    found, at = [], 0
    for _, pieces in work:
        mine = outs[at: at + len(pieces)]
        at += len(pieces)
        found.append(torch.cat(mine) if len(mine) > 1 else mine[0])
    return found, graph


def _backward_runs(work: list[tuple[Run, list[Piece], torch.Tensor]], graph: Graph | None,
                   leaves: Sequence[int], exact: bool = True
                   ) -> list[tuple[torch.Tensor, Partials]]:  # fmt: skip
    """Each run's query gradients and its cover's key/value partials (``leaves``: the
    number of pieces of each run's document); the partials are summed as they come. Not
    exact: a run is one piece, its partial the run's."""
    if graph is None:
        return []
    if not exact:
        found_runs = grad_pieces(graph, [g for _, _, g in work])
        return [(gq, [(Node(0, run.first), (gk, gv))])
                for (run, _, _), (gq, gk, gv) in zip(work, found_runs, strict=True)]
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


class _Exchange:
    """An all-to-all under way: each other rank's pieces (rows of ``width`` values) sent,
    ``incoming_rows`` rows from each to come. :meth:`wait` gives other rank -> what it sent
    (``[rows, width]``)."""

    def __init__(self, coll: Collectives, outgoing: dict[int, list[torch.Tensor]],
                 incoming_rows: dict[int, int], width: int, like: torch.Tensor) -> None:
        ranks = range(coll.size)
        send = [torch.cat([p.reshape(-1, width) for p in outgoing.get(r, [])])
                if outgoing.get(r) else like.new_empty(0, width) for r in ranks]  # fmt: skip
        self._coll, self._width = coll, width
        self._splits = [incoming_rows.get(r, 0) * width for r in ranks]
        self._received = like.new_empty(sum(self._splits))
        self._sent = torch.cat([s.reshape(-1) for s in send])  # kept alive until the wait
        self._work = coll.all_to_all_async(self._received, self._sent, self._splits,
                                           [s.numel() for s in send])  # fmt: skip

    def wait(self, around: Exchange) -> dict[int, torch.Tensor]:
        around(lambda: self._coll.wait(self._work))
        pieces, at = {}, 0
        for r, n in enumerate(self._splits):
            if r != self._coll.rank:
                pieces[r] = self._received[at: at + n].view(-1, self._width)
            at += n
        return pieces


def _cut(block: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, at = [], 0
    for n in sizes:
        out.append(block[at: at + n])
        at += n
    return out


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


T = TypeVar("T")
Exchange = Callable[[Callable[[], T]], T]  # runs a collective (a clock can leave it out)


def direct(exchange: Callable[[], T]) -> T:
    """An ``around`` that only runs the exchange."""
    return exchange()


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                      coll: Collectives | None, scale: float | None = None,
                      around: Exchange = direct) -> tuple[torch.Tensor, Saved]:  # fmt: skip
    """This rank's outputs (its own documents' rows) and what the backward needs. ``around``
    wraps each exchange (a clock that leaves waiting out, say)."""
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
            sending = _Exchange(coll, outgoing, rows, width, q)
        # this rank's own runs while the others' inputs travel
        out = torch.empty_like(q)
        local = [(run, _pieces(q[layout.rows(run)[0]], k[layout.rows(run)[1]],
                               v[layout.rows(run)[1]], run, layout))
                 for run in layout.local]  # fmt: skip
        outs, local_graph = _forward_runs(local, scale, layout.exact)
        for (run, _), piece in zip(local, outs, strict=True):
            out[layout.rows(run)[0]] = piece
        if spread:
            assert coll is not None
            got = sending.wait(around)
            for r, block in got.items():
                runs = layout.run_for[r]
                parts = _cut(block, [n for run in runs for n in (run.queries, run.end, run.end)])
                for i, run in enumerate(runs):
                    inputs = [p.view(shape) for p in parts[3 * i: 3 * i + 3]]
                    remote.append((r, run, _pieces(*inputs, run, layout)))
            outs, remote_graph = _forward_runs([(run, ps) for _, run, ps in remote], scale,
                                               layout.exact)  # fmt: skip
            results: dict[int, list[torch.Tensor]] = {r: [] for r in got}
            for (r, _, _), piece in zip(remote, outs, strict=True):
                results[r].append(piece)
            back = {r: sum(run.queries for run in runs) for r, runs in layout.sent.items()}
            returned = _Exchange(coll, results, back, width, q).wait(around)
        for r, block in returned.items():
            runs = layout.sent[r]
            for run, piece in zip(runs, _cut(block, [run.queries for run in runs]), strict=True):
                out[layout.rows(run)[0]] = piece.view(shape)
    return out, Saved(q, k, v, local, local_graph, remote, remote_graph)


def attention_backward(grad_out: torch.Tensor, saved: Saved, layout: Layout,
                       coll: Collectives | None, around: Exchange = direct
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
        sending = _Exchange(coll, outgoing, rows, width, q)
    # this rank's own runs while the others' gradients travel
    local = [(run, pieces, grad_out[layout.rows(run)[0]]) for run, pieces in saved.local]
    leaves = [len(layout.pieces[run.doc]) for run in layout.local]
    for run, (gq, cover) in zip(layout.local, _backward_runs(local, saved.local_graph, leaves,
                                                             layout.exact),
                                strict=True):  # fmt: skip
        dq[layout.rows(run)[0]] = gq
        partials.setdefault(run.doc, []).extend(cover)
    if spread:
        assert coll is not None
        got = sending.wait(around)
        grads = {r: iter(_cut(block, [run.queries for run in layout.run_for[r]]))
                 for r, block in got.items()}  # fmt: skip
        work = [(run, pieces, next(grads[r]).view(shape)) for r, run, pieces in saved.remote]
        results: dict[int, list[torch.Tensor]] = {r: [] for r in got}
        leaves = [len(layout.pieces[run.doc]) for run, _, _ in work]
        for (r, _, _), (gq, cover) in zip(saved.remote,
                                          _backward_runs(work, saved.remote_graph, leaves,
                                                         layout.exact),
                                          strict=True):  # fmt: skip
            results[r].append(gq)
            results[r].extend(x for _, pair in cover for x in pair)
        covers = {run: layout.cover(run) for runs in layout.sent.values() for run in runs}
        back = {r: sum(run.queries + 2 * sum(n for _, n in covers[run]) for run in runs)
                for r, runs in layout.sent.items()}  # fmt: skip
        returned = _Exchange(coll, results, back, width, q).wait(around)
        for r, block in returned.items():
            sizes = []
            for run in layout.sent[r]:
                sizes.append(run.queries)
                sizes.extend(n for _, rows_ in covers[run] for n in (rows_, rows_))
            parts = iter(_cut(block, sizes))
            for run in layout.sent[r]:
                dq[layout.rows(run)[0]] = next(parts).view(shape)
                partials.setdefault(run.doc, []).extend(
                    (node, (next(parts).view(shape), next(parts).view(shape)))
                    for node, _ in covers[run])  # fmt: skip
    for doc, cover in partials.items():
        pieces = layout.pieces[doc]
        if layout.exact:
            gk, gv = merge(cover, len(pieces), _add_prefix)
        else:  # the runs' partials in the plan's order
            ordered = [pair for _, pair in sorted(cover, key=lambda c: c[0].index)]
            gk, gv = functools.reduce(_add_prefix, ordered)
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
