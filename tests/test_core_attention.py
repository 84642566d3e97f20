"""Core attention on one process (the drop-in outside a ``Job``): documents cut into the
plan's pieces, each computed alone; the outputs equal one causal call per document bit for
bit (CPU) and the input gradients agree within 1e-6 relative (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elastictrain.attention import AttentionPolicy, core_attention
from elastictrain.attention.plan import Document, plan_attention
from elastictrain.attention.rounds import AttentionRounds
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
def test_pieces_give_one_calls_output_and_gradients(lengths):
    torch.manual_seed(0)
    policy = AttentionPolicy(min_task=256)
    pieces = plan_attention([Document(n, 0) for n in lengths], [0], policy=policy).tasks
    assert len(pieces) > len(lengths)  # something was cut
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    tokens, heads, dim = bounds[-1], 2, 16
    inputs = [torch.randn(tokens, heads, dim, dtype=torch.float32, requires_grad=True)
              for _ in range(3)]
    grad = torch.randn(tokens, heads, dim)
    with AttentionRounds(policy, torch.device("cpu")).round(None, None):
        mine = core_attention(*inputs, bounds)
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


def test_the_same_inputs_give_the_same_bits_and_bad_input_is_refused():
    q = torch.randn(1200, 2, 8)
    a = core_attention(q, q, q, [0, 1100, 1200])
    assert torch.equal(a, core_attention(q.clone(), q.clone(), q.clone(), torch.tensor([0, 1100,
                                                                                      1200])))
    with pytest.raises(ConfigError, match="cu_seqlens"):
        core_attention(q, q, q, [0, 10, 1100])
    with pytest.raises(ConfigError, match="cu_seqlens"):
        core_attention(q, q, q, [1, 1200])
    with pytest.raises(ConfigError, match="one shape"):
        core_attention(q, q[:10], q, [0, 1200])
    with pytest.raises(ConfigError, match="pieces"):
        AttentionPolicy(pieces=0)
    with pytest.raises(ConfigError, match="row costs"):
        AttentionPolicy(query_cost=-1)


def test_packed_sequences_share_a_call_by_length_class_and_equal_each_task_alone():
    """Runs mode's kernel input: sequences packed end to end (a tail's queries with its
    whole prefix), one call per run of sequences of one length class."""
    from elastictrain.attention.core import Sequences, attend_packed, task_attention

    torch.manual_seed(1)
    spans = [(0, 3000), (2000, 2600), (0, 40), (1500, 2600), (0, 7), (0, 5)]
    sequences = Sequences([e - s for s, e in spans], [s for s, _ in spans])
    # 3000 and 2600 keys share a class (2048..4095), 40 is alone, 7 and 5 share one
    assert sequences.calls == [(0, 2), (2, 3), (3, 4), (4, 6)]
    docs = [torch.randn(3000, 2, 8) for _ in spans]
    q = torch.cat([d[s:e] for d, (s, e) in zip(docs, spans, strict=True)])
    kv = torch.cat([d[:e] for d, (_, e) in zip(docs, spans, strict=True)])
    out = attend_packed(q, kv, kv, sequences)
    alone = torch.cat([task_attention(d[s:e], d[:e], d[:e], s)
                       for d, (s, e) in zip(docs, spans, strict=True)])  # fmt: skip
    assert torch.equal(out, alone)
    with pytest.raises(ConfigError, match="packed sequences"):
        attend_packed(q[1:], kv, kv, sequences)
    with pytest.raises(ConfigError, match="sequences need"):
        Sequences([0], [3])
