"""The kernel of core-attention tasks: causal attention of a query range over its whole
key/value prefix. The pieces of a plan (:mod:`elastictrain.attention.plan`) each run through
it alone, on whichever rank the plan chose: the same inputs give the same bits anywhere.

``q``, ``k``, ``v`` are packed ``[tokens, heads, head_dim]`` (the varlen layout). On CPU each
piece is one ``scaled_dot_product_attention`` call with its bottom-right causal mask. On a
GPU, torch's varlen flash attention: the pieces that start their document (whole short
documents, mostly) go together in one call, each as its own sequence, and every other piece
is a call of its own (its prefix would have to be copied to share a call); not exact
(``shared``), every piece a rank computes goes into one call. Measured on an
H100: a piece's forward, dK and dV are the same bits alone or in a shared call, its dQ is
not (and flash attention's backward is not deterministic unless torch's deterministic
algorithms are on); so under deterministic algorithms every piece is a call of its own, and
the results are the same bits in any world on a GPU too.
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
    return pieces[0].q.is_cuda and pieces[0].q.dtype in (torch.float16, torch.bfloat16)


def _groups(pieces: Sequence[Piece], shared: bool = False) -> list[list[int]]:
    """Which pieces share a kernel call: on a GPU the ones at their document's start, in one
    call; every other piece alone. Under torch's deterministic algorithms every piece alone:
    flash attention's dQ for a sequence depends on the other sequences of its call.
    ``shared``: all in one call (their prefixes copied together)."""
    if not pieces or not _flash(pieces):
        return [[i] for i in range(len(pieces))]
    if shared:
        return [list(range(len(pieces)))]
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


def attend_pieces(pieces: Sequence[Piece], scale: float | None = None, keep: bool = False,
                  shared: bool = False) -> tuple[list[torch.Tensor], Graph | None]:
    """Each piece's outputs (``[q_len, heads, dim]``), in order, and with ``keep`` the graph
    :func:`grad_pieces` takes. ``shared``: on a GPU, every piece in one call."""
    for piece in pieces:
        _check(piece)
    outs: list[torch.Tensor | None] = [None] * len(pieces)
    groups = _groups(pieces, shared)
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
