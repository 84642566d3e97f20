"""The kernel of one core-attention task: causal attention of a query range over its whole
key/value prefix. The pieces of a plan (:mod:`elastictrain.attention.plan`) each run through
it alone, on whichever rank the plan chose.

``q``, ``k``, ``v`` are packed ``[tokens, heads, head_dim]`` (the varlen layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
