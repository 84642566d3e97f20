"""Core attention by tasks: softmax(QK^T)V of packed documents, computed a query range at a
time (each over its whole causal key/value prefix), the way a plan cuts it.

``q``, ``k``, ``v`` are packed ``[tokens, heads, head_dim]`` (the varlen layout), with
``cu_seqlens`` the documents' boundaries (``[0, l0, l0 + l1, ...]``). On one process every
task runs here; dispatching tasks to other ranks builds on :func:`task_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from elastictrain.attention.plan import Task
from elastictrain.errors import ConfigError


def task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                   scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of queries ``q`` (positions ``start ..`` of their document,
    ``[q_len, heads, dim]``) over keys and values ``[0, start + q_len)`` of it."""
    q_len, kv_len = q.shape[0], k.shape[0]
    if kv_len != start + q_len:
        raise ConfigError(f"a task of queries [{start}, {start + q_len}) needs {start + q_len} "
                          f"keys, got {kv_len}")  # fmt: skip
    # query i (position start + i) sees keys 0 .. start + i: bottom-right aligned causality
    rows = torch.arange(start, start + q_len, device=q.device).unsqueeze(1)
    mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= rows
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)  # fmt: skip
    return out.transpose(0, 1)


def document_tasks(cu_seqlens: Sequence[int], tasks: Sequence[Task] | None = None
                   ) -> list[tuple[int, int, int]]:  # fmt: skip
    """(document offset, start, end) of each task (default: one task per document)."""
    bounds = [int(b) for b in cu_seqlens]
    if len(bounds) < 2 or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds,
                                                                      strict=False)):
        raise ConfigError("cu_seqlens must start at 0 and never go down")
    if tasks is None:
        return [(a, 0, b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    found = []
    for task in tasks:
        if not 0 <= task.doc < len(bounds) - 1:
            raise ConfigError(f"task of document {task.doc}: there are {len(bounds) - 1}")
        length = bounds[task.doc + 1] - bounds[task.doc]
        if not 0 <= task.start < task.end <= length:
            raise ConfigError(f"task [{task.start}, {task.end}) of a {length}-token document")
        found.append((bounds[task.doc], task.start, task.end))
    return found


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cu_seqlens: Sequence[int], tasks: Sequence[Task] | None = None,
                   scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of packed documents, task by task, here. ``tasks`` (a plan's, all of them)
    must cover every query once; default: one task per document."""
    out = torch.empty_like(q)
    pieces = []
    for offset, start, end in document_tasks(cu_seqlens, tasks):
        pieces.append((offset + start, offset + end,
                       task_attention(q[offset + start: offset + end], k[offset: offset + end],
                                      v[offset: offset + end], start, scale)))  # fmt: skip
    covered = sum(b - a for a, b, _ in pieces)
    if covered != q.shape[0]:
        raise ConfigError(f"the tasks cover {covered} of {q.shape[0]} queries")
    pieces.sort(key=lambda p: p[0])
    return torch.cat([p[2] for p in pieces]) if pieces else out
