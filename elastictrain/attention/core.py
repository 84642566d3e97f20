"""The kernel of core-attention tasks: causal attention of a query range over its whole
key/value prefix, computed the same way wherever the plan puts it.

``q``, ``k``, ``v`` are packed ``[tokens, heads, head_dim]`` (the varlen layout). On CPU each
piece (or sequence) is one ``scaled_dot_product_attention`` call with its bottom-right causal
mask. On a GPU, torch's varlen flash attention.

Two ways in. :func:`attend_pieces` (exact mode) computes pieces with the same bits whatever
else is computed: the pieces that start their document (whole short documents, mostly) go
together in one call, each as its own sequence, and every other piece is a call of its own.
Measured on an H100: a piece's forward, dK and dV are the same bits alone or in a shared call,
its dQ is not (and flash attention's backward is not deterministic unless torch's
deterministic algorithms are on); so under deterministic algorithms every piece is a call of
its own, and the results are the same bits in any world on a GPU too. :func:`attend_packed`
(runs mode) takes sequences already packed end to end and makes one call of them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from elastictrain.errors import ConfigError


class Piece(NamedTuple):
    """One task's inputs: queries at positions ``start ..`` of their document, and the keys
    and values ``[0, start + len(q))`` of it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    start: int


def task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                   scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of queries ``q`` (positions ``start ..`` of their document,
    ``[q_len, heads, dim]``) over keys and values ``[0, start + q_len)`` of it."""
    return attend_pieces([Piece(q, k, v, start)], scale)[0][0]


def _check(piece: Piece) -> None:
    q_len, kv_len = piece.q.shape[0], piece.k.shape[0]
    if kv_len != piece.start + q_len or piece.v.shape[0] != kv_len:
        raise ConfigError(f"a task of queries [{piece.start}, {piece.start + q_len}) needs "
                          f"{piece.start + q_len} keys and values, got {kv_len}")  # fmt: skip


def exact_by_default(device: torch.device) -> bool:
    """Whether attention is computed exactly (every piece alone, the same bits in any plan)
    unless told: on CPU, and on a GPU under torch's deterministic algorithms. Otherwise
    flash attention's backward is not deterministic anyway, and a run of pieces is one
    kernel call (a GPU wants long calls): the results are then within rounding of each
    other in any plan."""
    return device.type != "cuda" or torch.are_deterministic_algorithms_enabled()


def _masked(piece: Piece, scale: float | None) -> torch.Tensor:
    q, k, v, start = piece
    q_len, kv_len = q.shape[0], k.shape[0]
    # query i (position start + i) sees keys 0 .. start + i: bottom-right aligned causality
    rows = torch.arange(start, start + q_len, device=q.device).unsqueeze(1)
    mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= rows
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)  # fmt: skip
    return out.transpose(0, 1)


def _varlen(pieces: Sequence[Piece], scale: float | None) -> torch.Tensor:
    """One varlen flash-attention call, each piece its own sequence, causal bottom-right."""
    from torch.nn.attention.varlen import varlen_attn

    device = pieces[0].q.device
    q_lens = [p.q.shape[0] for p in pieces]
    k_lens = [p.k.shape[0] for p in pieces]
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0, *k_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cat = (lambda xs: torch.cat(xs)) if len(pieces) > 1 else (lambda xs: xs[0])
    return varlen_attn(cat([p.q for p in pieces]), cat([p.k for p in pieces]),
                       cat([p.v for p in pieces]), cu_q.to(device), cu_k.to(device),
                       max(q_lens), max(k_lens), scale=scale,
                       window_size=(-1, 0))  # fmt: skip


def _flash(pieces: Sequence[Piece]) -> bool:
    return _flash_tensor(pieces[0].q)


def _flash_tensor(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _groups(pieces: Sequence[Piece]) -> list[list[int]]:
    """Which pieces share a kernel call: on a GPU the ones at their document's start, in one
    call; every other piece alone. Under torch's deterministic algorithms every piece alone:
    flash attention's dQ for a sequence depends on the other sequences of its call."""
    if not pieces or not _flash(pieces):
        return [[i] for i in range(len(pieces))]
    if torch.are_deterministic_algorithms_enabled():
        return [[i] for i in range(len(pieces))]
    first = [i for i, p in enumerate(pieces) if p.start == 0]
    return ([first] if first else []) + [[i] for i, p in enumerate(pieces) if p.start != 0]


def _call(pieces: list[Piece], scale: float | None) -> list[torch.Tensor]:
    """One kernel call for ``pieces`` (one of ``_groups``): each piece's outputs."""
    if not _flash(pieces):
        assert len(pieces) == 1
        return [_masked(pieces[0], scale)]
    out = _varlen(pieces, scale)
    return list(out.split([p.q.shape[0] for p in pieces])) if len(pieces) > 1 else [out]


@dataclass
class Graph:
    """Pieces computed with their autograd graphs kept: the backward needs no second
    forward. Per kernel call (group of pieces): its leaf inputs and its outputs."""

    groups: list[list[int]]
    inputs: list[list[torch.Tensor]]
    outs: list[list[torch.Tensor]]


def attend_pieces(pieces: Sequence[Piece], scale: float | None = None, keep: bool = False
                  ) -> tuple[list[torch.Tensor], Graph | None]:  # fmt: skip
    """Each piece's outputs (``[q_len, heads, dim]``), in order, and with ``keep`` the graph
    :func:`grad_pieces` takes."""
    for piece in pieces:
        _check(piece)
    outs: list[torch.Tensor | None] = [None] * len(pieces)
    groups = _groups(pieces)
    graph = Graph(groups, [], []) if keep else None
    for group in groups:
        chosen = [pieces[i] for i in group]
        if graph is not None:
            chosen = [Piece(*(x.detach().requires_grad_(True) for x in p[:3]), p.start)
                      for p in chosen]  # fmt: skip
            graph.inputs.append([x for p in chosen for x in p[:3]])
        with torch.enable_grad() if graph is not None else torch.no_grad():
            found = _call(chosen, scale)
        if graph is not None:
            graph.outs.append(found)
        for i, out in zip(group, found, strict=True):
            outs[i] = out.detach()
    return outs, graph  # type: ignore[return-value]


def grad_pieces(graph: Graph, grads: Sequence[torch.Tensor]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Each piece's (dQ, dK, dV) for its outputs' gradients ``grads``, in order, computed as
    they are asked for (a shared call's all at once): a caller that sums dK/dV partials as
    they come holds few of them. The graph is spent."""
    where = {i: g for g, group in enumerate(graph.groups) for i in group}
    ready: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for i in range(len(where)):
        if i not in ready:
            g = where[i]
            group = graph.groups[g]
            found = torch.autograd.grad(graph.outs[g], graph.inputs[g], [grads[j] for j in group])
            graph.outs[g], graph.inputs[g] = [], []
            for n, j in enumerate(group):
                ready[j] = tuple(found[3 * n: 3 * n + 3])  # type: ignore[assignment]
        yield ready.pop(i)


def length_class(kv_len: int) -> int:
    """The kernel-call class of a sequence of ``kv_len`` keys: lengths within a factor of two
    share one. A varlen kernel launches blocks for every sequence as if it were the call's
    longest; measured on an H100, those idle blocks cost up to 10 % of a step whose call
    mixes a 128K prefix with hundreds of short documents."""
    return kv_len.bit_length()


class Sequences:
    """Sequences packed end to end, as :func:`attend_packed` takes them: sequence ``i`` has
    ``q_lens[i]`` queries at positions ``starts[i] ..`` of its document, and the keys and
    values ``[0, starts[i] + q_lens[i])`` of it. Consecutive sequences of one
    :func:`length_class` share a kernel call (give them longest first, say, to make few
    calls). Boundary tensors are made once per device (every layer reuses them)."""

    def __init__(self, q_lens: Sequence[int], starts: Sequence[int]) -> None:
        if len(q_lens) != len(starts) or any(n < 1 for n in q_lens) or min(starts, default=0) < 0:
            raise ConfigError("sequences need one start >= 0 and >= 1 query each")
        self.q_lens = tuple(q_lens)
        self.kv_lens = tuple(s + n for s, n in zip(starts, q_lens, strict=True))
        self.starts = tuple(starts)
        self.queries = sum(self.q_lens)
        self.keys = sum(self.kv_lens)
        self.calls: list[tuple[int, int]] = []  # [first, stop) sequences of each kernel call
        for i, n in enumerate(self.kv_lens):
            if self.calls and length_class(n) == length_class(self.kv_lens[i - 1]):
                self.calls[-1] = (self.calls[-1][0], i + 1)
            else:
                self.calls.append((i, i + 1))
        self._bounds: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.q_lens)

    def bounds(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per kernel call, ``cu_seqlens`` of its queries and of its keys, on ``device``."""
        if device not in self._bounds:
            found = []
            for first, stop in self.calls:
                cu = [torch.tensor([0, *lens[first:stop]], dtype=torch.int64).cumsum(0)
                      .to(device, torch.int32) for lens in (self.q_lens, self.kv_lens)]  # fmt: skip
                found.append((cu[0], cu[1]))
            self._bounds[device] = found
        return self._bounds[device]


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: Sequences,
                  scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """The outputs of every sequence of ``sequences`` (``q``: their queries packed, ``k``
    and ``v``: their prefixes packed), packed like ``q``; differentiable. On a GPU one kernel
    call per length class (``sequences.calls``); on CPU one masked call per sequence."""
    if q.shape[0] != sequences.queries or k.shape[0] != sequences.keys or v.shape != k.shape:
        raise ConfigError(f"packed sequences of {sequences.queries} queries and "
                          f"{sequences.keys} keys, got {q.shape[0]} and {k.shape[0]}")  # fmt: skip
    if not len(sequences):
        return q.clone()
    if _flash_tensor(q):
        from torch.nn.attention.varlen import varlen_attn

        sizes_q = [sum(sequences.q_lens[a:b]) for a, b in sequences.calls]
        sizes_k = [sum(sequences.kv_lens[a:b]) for a, b in sequences.calls]
        parts = zip(q.split(sizes_q), k.split(sizes_k), v.split(sizes_k),
                    sequences.bounds(q.device), sequences.calls, strict=True)  # fmt: skip
        outs = [varlen_attn(qc, kc, vc, cu_q, cu_k, max(sequences.q_lens[a:b]),
                            max(sequences.kv_lens[a:b]), scale=scale, window_size=(-1, 0))
                for qc, kc, vc, (cu_q, cu_k), (a, b) in parts]  # fmt: skip
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    outs, at_q, at_k = [], 0, 0
    for n, m, start in zip(sequences.q_lens, sequences.kv_lens, sequences.starts, strict=True):
        outs.append(_masked(Piece(q[at_q: at_q + n], k[at_k: at_k + m], v[at_k: at_k + m],
                                  start), scale))  # fmt: skip
        at_q, at_k = at_q + n, at_k + m
    return torch.cat(outs) if len(outs) > 1 else outs[0]
