"""Core attention by tasks on one process: cut by a plan's query ranges, the outputs equal
one causal call per document bit for bit (CPU) and the input gradients agree within 1e-6
relative (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elastictrain.attention.core import core_attention
from elastictrain.attention.plan import AttentionPolicy, Document, plan_attention
from elastictrain.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _reference(q, k, v, bounds):
    outs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        outs.append(F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
            is_causal=True).transpose(0, 1))  # fmt: skip
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[3000, 40, 7, 700, 1], [5000], [64] * 30 + [2500]])
def test_planned_tasks_give_one_calls_output_and_gradients(lengths):
    torch.manual_seed(0)
    ranks = 4
    per_rank = -(-sum(lengths) // ranks)
    documents, owner, room = [], 0, per_rank
    for length in lengths:  # whole documents packed in order; a long one stays whole
        documents.append(Document(length, min(owner, ranks - 1)))
        room -= length
        while room <= 0 and owner < ranks - 1:
            owner, room = owner + 1, room + per_rank
    plan = plan_attention(documents, range(ranks), policy=AttentionPolicy(min_task=64))
    assert len(plan.tasks) > len(lengths)  # something was cut
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    tokens, heads, dim = bounds[-1], 2, 16
    inputs = [torch.randn(tokens, heads, dim, dtype=torch.float32, requires_grad=True)
              for _ in range(3)]
    grad = torch.randn(tokens, heads, dim)
    mine = core_attention(*inputs, bounds, plan.tasks)
    mine.backward(grad)
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    ref = _reference(*inputs, bounds)
    ref.backward(grad)
    assert torch.equal(mine, ref)  # CPU SDPA: each query row's sums do not depend on the cut
    for g, r in zip(got, (t.grad for t in inputs), strict=True):
        error = float((g - r).norm() / r.norm())
        assert error < 1e-6, error


def test_tasks_that_miss_a_query_are_refused():
    q = torch.zeros(10, 1, 4)
    plan = plan_attention([Document(10, 0)], [0])
    with pytest.raises(ConfigError, match="cover 10 of 12"):
        core_attention(torch.zeros(12, 1, 4), torch.zeros(12, 1, 4), torch.zeros(12, 1, 4),
                       [0, 10, 12], plan.tasks)  # fmt: skip
    with pytest.raises(ConfigError, match="cu_seqlens"):
        core_attention(q, q, q, [1, 10])
