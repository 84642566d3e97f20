"""Runs mode of the dispatch: each run of a document's consecutive pieces is one sequence, and
every run a rank computes goes into its kernel calls together, one per length class (a GPU
wants long calls; on a GPU flash attention's backward is not deterministic anyway).

The work per layer does not grow with the number of runs: the rows of a rank's runs are
index tensors made once per plan (:class:`Packing`), so a forward is three gathers of the
runs' inputs, one all-to-all out, the kernel calls for the rank's own runs and for the runs
it computes for others (their inputs arrive owner by owner and are gathered into the
kernel's order, by length class), one all-to-all back, and one scatter of the outputs. The
backward mirrors it; the owner adds the key/value partials of a document's runs into its
rows (``index_add_``): within rounding of exact mode in any plan.

Exchange layout, per pair of ranks: the owner sends the queries of its runs for that runner
(in plan order), then their key prefixes, then their value prefixes; the runner returns the
outputs; in the backward, the outputs' gradients go out, and the query gradients, then the
key and value partials, come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from elastictrain.attention.core import Sequences, attend_packed, length_class
from elastictrain.attention.layout import Layout, Run
from elastictrain.attention.transport import AllToAll, Exchange, cut, direct
from elastictrain.train.collectives import Collectives


def _ranges(firsts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """Rows ``[firsts[i], firsts[i] + lengths[i])`` for each ``i``, concatenated."""
    if not lengths:
        return torch.empty(0, dtype=torch.int64, device=device)
    n = torch.tensor(lengths, dtype=torch.int64)
    begin = torch.tensor(firsts, dtype=torch.int64)
    shift = torch.repeat_interleave(begin - (n.cumsum(0) - n), n)  # each range to its first row
    return (torch.arange(int(n.sum()), dtype=torch.int64) + shift).to(device)


def _at(lengths: list[int]) -> list[int]:
    """Where each of consecutive blocks of ``lengths`` rows begins."""
    found, at = [], 0
    for n in lengths:
        found.append(at)
        at += n
    return found


def _by_class(runs: Sequence[Run]) -> list[int]:
    """The runs' order for the kernel: longest length class first, else as given."""
    return sorted(range(len(runs)), key=lambda i: -length_class(runs[i].end))


@dataclass
class Packing:
    """A rank's runs as index tensors and packed sequences, on one device. The kernel takes
    sequences by length class (:class:`~elastictrain.attention.core.Sequences`); the
    exchanges carry them owner by owner; the indices map one order to the other."""

    device: torch.device
    local_q: torch.Tensor  # rows of this rank's own runs in its tensors, in kernel order
    local_kv: torch.Tensor
    local: Sequences
    sent_q: torch.Tensor  # rows of the runs sent out, runner by runner in rank order
    sent_kv: torch.Tensor
    sent_rows: dict[int, tuple[int, int]]  # runner -> (query rows, prefix rows) sent to it
    remote: Sequences  # the runs computed here for others, in kernel order
    remote_rows: dict[int, tuple[int, int]]  # owner -> (query rows, prefix rows) from it
    remote_q: torch.Tensor  # kernel-order rows of the received inputs (owner blocks)
    remote_k: torch.Tensor
    remote_v: torch.Tensor
    remote_out: torch.Tensor  # owner-order output rows: their kernel-order rows
    remote_grad: torch.Tensor  # kernel-order query rows: their rows in the received grads
    remote_back: torch.Tensor  # owner blocks [dq; dk; dv]: rows of the kernel's [dq; dk; dv]

    @classmethod
    def of(cls, layout: Layout, device: torch.device) -> Packing:
        """The layout's packing on ``device`` (made once, then kept by the layout)."""
        if layout.packing is not None and layout.packing.device == device:
            return layout.packing

        def totals(runs_of: dict[int, list[Run]]) -> dict[int, tuple[int, int]]:
            return {r: (sum(run.queries for run in runs), sum(run.end for run in runs))
                    for r, runs in runs_of.items()}  # fmt: skip

        def rows(runs: Sequence[Run]) -> tuple[torch.Tensor, torch.Tensor]:
            bases = [layout.offsets[run.doc] for run in runs]
            return (_ranges([b + run.start for b, run in zip(bases, runs, strict=True)],
                            [run.queries for run in runs], device),
                    _ranges(bases, [run.end for run in runs], device))  # fmt: skip

        local = [layout.local[i] for i in _by_class(layout.local)]
        local_q, local_kv = rows(local)
        sent_q, sent_kv = rows([run for r in sorted(layout.sent) for run in layout.sent[r]])
        remote_rows = totals(layout.run_for)
        # runs from others, owner by owner: where each one's rows are in the received blocks
        runs: list[Run] = []
        q_at: list[int] = []  # its queries in the received inputs
        k_at: list[int] = []  # its key prefix (its value prefix: m rows further)
        v_gap: list[int] = []
        base = 0
        for owner in sorted(layout.run_for):
            mine = layout.run_for[owner]
            n, m = remote_rows[owner]
            q_at += [base + at for at in _at([run.queries for run in mine])]
            k_at += [base + n + at for at in _at([run.end for run in mine])]
            v_gap += [m] * len(mine)
            runs += mine
            base += n + 2 * m
        order = _by_class(runs)
        queries, ends = [run.queries for run in runs], [run.end for run in runs]
        kernel_q = [0] * len(runs)  # each run's first row in the kernel's packed queries
        kernel_k = [0] * len(runs)
        for at_q, at_k, i in zip(_at([queries[i] for i in order]), _at([ends[i] for i in order]),
                                 order, strict=True):  # fmt: skip
            kernel_q[i], kernel_k[i] = at_q, at_k
        grad_at = _at(queries)  # its queries' gradients in the received grads
        total_q, total_k = sum(queries), sum(ends)
        back, first = [], 0
        for owner in sorted(layout.run_for):
            stop = first + len(layout.run_for[owner])
            span = range(first, stop)
            back += [_ranges([kernel_q[i] for i in span], queries[first:stop], device),
                     _ranges([total_q + kernel_k[i] for i in span], ends[first:stop], device),
                     _ranges([total_q + total_k + kernel_k[i] for i in span], ends[first:stop],
                             device)]  # fmt: skip
            first = stop
        layout.packing = cls(
            device, local_q, local_kv, _sequences(local), sent_q, sent_kv,
            totals(layout.sent), _sequences([runs[i] for i in order]), remote_rows,
            _ranges([q_at[i] for i in order], [queries[i] for i in order], device),
            _ranges([k_at[i] for i in order], [ends[i] for i in order], device),
            _ranges([k_at[i] + v_gap[i] for i in order], [ends[i] for i in order], device),
            _ranges(kernel_q, queries, device),
            _ranges([grad_at[i] for i in order], [queries[i] for i in order], device),
            torch.cat(back) if back else torch.empty(0, dtype=torch.int64, device=device),
        )  # fmt: skip
        return layout.packing


def _sequences(runs: Sequence[Run]) -> Sequences:
    return Sequences([run.queries for run in runs], [run.start for run in runs])


@dataclass
class PackedSaved:
    """What a runs-mode forward keeps for its backward: the rank's own inputs, and per kernel
    call (its own runs, the others') the packed leaves and the outputs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    local: tuple[list[torch.Tensor], torch.Tensor] | None
    remote: tuple[list[torch.Tensor], torch.Tensor] | None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: Sequences,
            scale: float | None) -> tuple[torch.Tensor, tuple[list[torch.Tensor], torch.Tensor]]:
    """One kernel call with its graph kept: the outputs, and (leaves, outputs) for the
    backward."""
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with torch.enable_grad():
        out = attend_packed(*leaves, sequences, scale)
    return out.detach(), (leaves, out)


def _unpack(blocks: dict[int, torch.Tensor], rows: dict[int, tuple[int, int]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Blocks from each rank (rank order), each [queries; key rows; value rows]: the three
    parts, each concatenated over the ranks."""
    parts: list[list[torch.Tensor]] = [[], [], []]
    for r in sorted(blocks):
        n, m = rows[r]
        for part, piece in zip(parts, cut(blocks[r], [n, m, m]), strict=True):
            part.append(piece)
    return tuple(torch.cat(p) if len(p) != 1 else p[0] for p in parts)  # type: ignore[return-value]


def packed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                   coll: Collectives | None, scale: float | None = None,
                   around: Exchange = direct) -> tuple[torch.Tensor, PackedSaved]:  # fmt: skip
    """This rank's outputs (its own documents' rows) and what the backward needs."""
    heads, dim = q.shape[1], q.shape[2]
    width, shape = heads * dim, (-1, heads, dim)
    pack = Packing.of(layout, q.device)
    spread = coll is not None and coll.size > 1
    local = remote = None
    with torch.no_grad():
        if spread:
            assert coll is not None
            sizes = [pack.sent_rows[r] for r in sorted(pack.sent_rows)]
            qs = cut(q.index_select(0, pack.sent_q), [n for n, _ in sizes])
            ks = cut(k.index_select(0, pack.sent_kv), [m for _, m in sizes])
            vs = cut(v.index_select(0, pack.sent_kv), [m for _, m in sizes])
            outgoing = {r: [qs[i], ks[i], vs[i]] for i, r in enumerate(sorted(pack.sent_rows))}
            incoming = {r: n + 2 * m for r, (n, m) in pack.remote_rows.items()}
            sending = AllToAll.of(coll, outgoing, incoming, width, q)
        out = torch.empty_like(q)
        if len(pack.local):  # this rank's own runs while the others' inputs travel
            found, local = _attend(q.index_select(0, pack.local_q),
                                   k.index_select(0, pack.local_kv),
                                   v.index_select(0, pack.local_kv), pack.local,
                                   scale)  # fmt: skip
            out.index_copy_(0, pack.local_q, found)
        if spread:
            assert coll is not None
            sending.wait(around)
            received = sending.received.view(-1, width)
            found = q.new_empty(0, heads, dim)
            if len(pack.remote):
                found, remote = _attend(*(received.index_select(0, rows).view(shape)
                                          for rows in (pack.remote_q, pack.remote_k,
                                                       pack.remote_v)),
                                        pack.remote, scale)  # fmt: skip
            returning = AllToAll(coll, found.index_select(0, pack.remote_out),
                                 {r: n for r, (n, _) in pack.remote_rows.items()},
                                 {r: n for r, (n, _) in pack.sent_rows.items()}, width)  # fmt: skip
            returning.wait(around)
            out.index_copy_(0, pack.sent_q, returning.received.view(shape))
    return out, PackedSaved(q, k, v, local, remote)


def packed_backward(grad_out: torch.Tensor, saved: PackedSaved, layout: Layout,
                    coll: Collectives | None, around: Exchange = direct
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dQ, dK, dV of this rank's own rows; a document's key/value partials added in."""
    q, k, v = saved.q, saved.k, saved.v
    heads, dim = q.shape[1], q.shape[2]
    width, shape = heads * dim, (-1, heads, dim)
    pack = Packing.of(layout, q.device)
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    spread = coll is not None and coll.size > 1
    if spread:
        assert coll is not None
        grads = cut(grad_out.index_select(0, pack.sent_q),
                    [n for _, (n, _) in sorted(pack.sent_rows.items())])  # fmt: skip
        outgoing = {r: [grads[i]] for i, r in enumerate(sorted(pack.sent_rows))}
        incoming = {r: n for r, (n, _) in pack.remote_rows.items()}
        sending = AllToAll.of(coll, outgoing, incoming, width, q)
    if saved.local is not None:  # this rank's own runs while the others' gradients travel
        leaves, out = saved.local
        gq, gk, gv = torch.autograd.grad(out, leaves, grad_out.index_select(0, pack.local_q))
        dq.index_copy_(0, pack.local_q, gq)
        dk.index_add_(0, pack.local_kv, gk)
        dv.index_add_(0, pack.local_kv, gv)
    if spread:
        assert coll is not None
        sending.wait(around)
        send = q.new_empty(0, width)
        if saved.remote is not None:
            leaves, out = saved.remote
            grads = sending.received.view(-1, width).index_select(0, pack.remote_grad)
            found = torch.autograd.grad(out, leaves, grads.view(shape))
            send = torch.cat([x.reshape(-1, width) for x in found]).index_select(
                0, pack.remote_back)  # fmt: skip
        returned = AllToAll(coll, send,
                            {r: n + 2 * m for r, (n, m) in pack.remote_rows.items()},
                            {r: n + 2 * m for r, (n, m) in pack.sent_rows.items()},
                            width).wait(around)  # fmt: skip
        sq, sk, sv = _unpack(returned, pack.sent_rows)
        dq.index_copy_(0, pack.sent_q, sq.view(shape))
        dk.index_add_(0, pack.sent_kv, sk.view(shape))
        dv.index_add_(0, pack.sent_kv, sv.view(shape))
    saved.local = saved.remote = None
    return dq, dk, dv
