"""Core-attention tasks run where the plan puts them: queries and key/value prefixes sent to
the runners in one all-to-all, outputs back in another; the backward sends the outputs'
gradients the same way, and each owner sums the dK/dV partials of its documents in the
plan's task order (fixed: the result does not depend on who ran what or when it arrived).

Every rank calls :func:`dispatched_attention` with its own packed ``q``, ``k``, ``v``
(``[tokens, heads, head_dim]``), the offset of each document it owns in them, and the same
plan (world ranks = the group's ranks). A runner keeps what it received for the backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from elastictrain.attention.core import task_attention
from elastictrain.attention.plan import AttentionPlan, Task
from elastictrain.errors import ConfigError
from elastictrain.train.collectives import Collectives


class _Layout:
    """One rank's part of a plan: the tasks it runs for itself, sends out, and runs for
    others, each in the plan's order."""

    def __init__(self, plan: AttentionPlan, rank: int, offsets: Mapping[int, int]) -> None:
        self.rank = rank
        self.ranks = plan.ranks
        self.offsets = dict(offsets)
        self.tasks = plan.tasks
        self.local = [t for t in plan.tasks if t.owner == rank and t.runner == rank]
        others = [r for r in plan.ranks if r != rank]
        self.sent = {r: [t for t in plan.tasks if t.owner == rank and t.runner == r]
                     for r in others}  # fmt: skip
        self.run_for = {r: [t for t in plan.tasks if t.owner == r and t.runner == rank]
                        for r in others}  # fmt: skip
        for task in plan.tasks:
            if task.owner == rank and task.doc not in self.offsets:
                raise ConfigError(f"rank {rank} owns document {task.doc} but has no offset for it")

    def rows(self, task: Task) -> tuple[slice, slice]:
        """The task's query rows and key/value prefix rows in the owner's tensors."""
        base = self.offsets[task.doc]
        return slice(base + task.start, base + task.end), slice(base, base + task.end)


def _exchange(coll: Collectives, outgoing: dict[int, list[torch.Tensor]],
              incoming_rows: dict[int, int], width: int, like: torch.Tensor
              ) -> dict[int, torch.Tensor]:  # fmt: skip
    """Send each other rank its pieces (rows of ``width`` values), receive
    ``incoming_rows`` rows from each; other rank -> what it sent (``[rows, width]``)."""
    ranks = range(coll.size)
    send = [torch.cat([p.reshape(-1, width) for p in outgoing.get(r, [])])
            if outgoing.get(r) else like.new_empty(0, width) for r in ranks]  # fmt: skip
    out_splits = [incoming_rows.get(r, 0) * width for r in ranks]
    in_splits = [s.numel() for s in send]
    received = like.new_empty(sum(out_splits))
    coll.all_to_all(received, torch.cat([s.reshape(-1) for s in send]), out_splits, in_splits)
    pieces, at = {}, 0
    for r in ranks:
        if r != coll.rank:
            pieces[r] = received[at: at + out_splits[r]].view(-1, width)
        at += out_splits[r]
    return pieces


def _split(block: torch.Tensor, tasks: list[Task], sizes) -> list[list[torch.Tensor]]:
    """Cut ``block`` (rows) into each task's pieces of ``sizes(task)`` rows."""
    parts, at = [], 0
    for task in tasks:
        mine = []
        for n in sizes(task):
            mine.append(block[at: at + n])
            at += n
        parts.append(mine)
    return parts


class _Dispatched(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: _Layout, coll: Collectives, scale):  # noqa: ANN001
        heads, dim = q.shape[1], q.shape[2]
        width = heads * dim
        shape = (-1, heads, dim)
        with torch.no_grad():
            outgoing = {r: [x for t in layout.sent[r] for x in
                            (q[layout.rows(t)[0]], k[layout.rows(t)[1]], v[layout.rows(t)[1]])]
                        for r in layout.ranks if r != layout.rank}  # fmt: skip
            rows = {r: sum(t.end - t.start + 2 * t.end for t in layout.run_for[r])
                    for r in layout.ranks if r != layout.rank}  # fmt: skip
            got = _exchange(coll, outgoing, rows, width, q)
            inputs = {r: _split(got[r], layout.run_for[r],
                                lambda t: (t.end - t.start, t.end, t.end))
                      for r in got}  # fmt: skip
            results = {r: [task_attention(qi.view(shape), ki.view(shape), vi.view(shape),
                                          t.start, scale)
                           for t, (qi, ki, vi) in zip(layout.run_for[r], inputs[r], strict=True)]
                       for r in inputs}  # fmt: skip
            back_rows = {r: sum(t.end - t.start for t in layout.sent[r])
                         for r in layout.ranks if r != layout.rank}  # fmt: skip
            returned = _exchange(coll, results, back_rows, width, q)
            out = torch.empty_like(q)
            for task in layout.local:
                query, prefix = layout.rows(task)
                out[query] = task_attention(q[query], k[prefix], v[prefix], task.start, scale)
            for r, block in returned.items():
                for task, (piece,) in zip(layout.sent[r], _split(block, layout.sent[r],
                                                                 lambda t: (t.end - t.start,)),
                                          strict=True):  # fmt: skip
                    out[layout.rows(task)[0]] = piece.view(shape)
        ctx.save_for_backward(q, k, v)
        ctx.layout, ctx.coll, ctx.scale, ctx.inputs = layout, coll, scale, inputs
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q, k, v = ctx.saved_tensors
        layout, coll, scale = ctx.layout, ctx.coll, ctx.scale
        heads, dim = q.shape[1], q.shape[2]
        width, shape = heads * dim, (-1, heads, dim)
        grad_out = grad_out.contiguous()

        def grads(qt, kt, vt, gt, start):
            qt, kt, vt = (x.detach().view(shape).requires_grad_(True) for x in (qt, kt, vt))
            with torch.enable_grad():
                out = task_attention(qt, kt, vt, start, scale)
            return torch.autograd.grad(out, (qt, kt, vt), gt.view(shape))

        outgoing = {r: [grad_out[layout.rows(t)[0]] for t in layout.sent[r]]
                    for r in layout.ranks if r != layout.rank}  # fmt: skip
        rows = {r: sum(t.end - t.start for t in layout.run_for[r])
                for r in layout.ranks if r != layout.rank}  # fmt: skip
        got = _exchange(coll, outgoing, rows, width, q)
        results = {}
        for r, block in got.items():
            pieces = _split(block, layout.run_for[r], lambda t: (t.end - t.start,))
            results[r] = [g for t, (gt,), (qi, ki, vi) in
                          zip(layout.run_for[r], pieces, ctx.inputs[r], strict=True)
                          for g in grads(qi, ki, vi, gt, t.start)]  # fmt: skip
        back = {r: sum(t.end - t.start + 2 * t.end for t in layout.sent[r])
                for r in layout.ranks if r != layout.rank}  # fmt: skip
        returned = _exchange(coll, results, back, width, q)
        partial: dict[Task, tuple[torch.Tensor, ...]] = {}
        for task in layout.local:
            query, prefix = layout.rows(task)
            partial[task] = grads(q[query], k[prefix], v[prefix], grad_out[query], task.start)
        for r, block in returned.items():
            for task, pieces in zip(layout.sent[r], _split(
                    block, layout.sent[r], lambda t: (t.end - t.start, t.end, t.end)),
                    strict=True):  # fmt: skip
                partial[task] = tuple(p.view(shape) for p in pieces)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for task in layout.tasks:  # the plan's order, whoever ran it
            if task not in partial:
                continue
            query, prefix = layout.rows(task)
            gq, gk, gv = partial[task]
            dq[query] += gq
            dk[prefix] += gk
            dv[prefix] += gv
        return dq, dk, dv, None, None, None


def dispatched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         offsets: Mapping[int, int], plan: AttentionPlan, coll: Collectives,
                         scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """This rank's attention outputs (rows of its own documents), the tasks run where
    ``plan`` says. ``offsets``: document index -> its first row in ``q``/``k``/``v``."""
    if tuple(plan.ranks) != tuple(range(coll.size)):
        raise ConfigError(f"a plan over ranks {plan.ranks} in a group of {coll.size}")
    layout = _Layout(plan, coll.rank, offsets)
    return _Dispatched.apply(q, k, v, layout, coll, scale)
