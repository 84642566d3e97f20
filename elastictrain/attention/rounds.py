"""The drop-in: :func:`core_attention`, called by a transformer block instead of
``scaled_dot_product_attention``, balanced over the ranks by a ``Job``.

A ``Job`` with ``attention=AttentionPolicy()`` runs each step's micro-batches in *rounds*:
round ``i`` is every rank's ``i``-th micro-batch, and the attention of a round's micro-batches
is planned together (:func:`~elastictrain.attention.plan.plan_attention`) over the current
world, in proportion to the ranks' speeds. At a round's first attention call every rank
all-gathers its documents' lengths (two small collectives), and every rank makes the same
plan; each later layer of the micro-batch reuses it. A rank that hosts fewer micro-batches
than others still takes part in their rounds: it has no documents, but it runs tasks for the
others, replaying the attention calls its own last micro-batch made (their shapes, in the
order the forward and backward made them) with empty inputs.

The plan's cuts do not depend on the world (see :mod:`elastictrain.attention.dispatch`), so
in exact mode (CPU, or a GPU under deterministic algorithms) attention's outputs and
gradients are bit-identical in any world, before and after a recovery, and equal to what
:func:`core_attention` computes outside a ``Job`` (every task on this process); otherwise
within rounding.

Limits: a model must make the same attention calls for every micro-batch (no
data-dependent layers), and must not recompute attention in its backward (activation
checkpointing) unless every rank does the same.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from elastictrain.attention.core import exact_by_default
from elastictrain.attention.dispatch import (
    DispatchedAttention,
    Exchange,
    Layout,
    Saved,
    attention_backward,
    attention_forward,
    direct,
)
from elastictrain.attention.plan import AttentionPlan, AttentionPolicy, Document, plan_attention
from elastictrain.errors import ConfigError
from elastictrain.train.collectives import Collectives

_active = threading.local()


@dataclass(frozen=True)
class Call:
    """One attention call of a micro-batch, as an empty rank replays it."""

    kind: str  # "forward" or "backward"
    index: int  # the forward's number in the round (a backward names its forward's)
    heads: int = 0
    dim: int = 0
    dtype: torch.dtype = torch.float32
    scale: float | None = None


def _bounds(cu_seqlens: Sequence[int] | torch.Tensor, tokens: int) -> tuple[int, ...]:
    bounds = tuple(int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor)
                                    else cu_seqlens))  # fmt: skip
    if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != tokens
            or any(b < a for a, b in zip(bounds, bounds[1:], strict=False))):
        raise ConfigError(f"cu_seqlens must go from 0 to the {tokens} packed tokens and never "
                          "down")  # fmt: skip
    return bounds


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ConfigError(f"q, k, v must be packed [tokens, heads, head_dim] of one shape, got "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip


@dataclass
class RoundStats:
    """What a step's rounds planned, for its event and ``etrain status``."""

    rounds: int = 0
    ranks: int = 1  # the world the rounds were planned over
    speeds: tuple[float, ...] = ()  # the speeds they were planned with (empty: equal)
    naive: list[float] = field(default_factory=list)  # each round's max/mean, unplanned
    planned: list[float] = field(default_factory=list)  # and planned
    moved_tokens: int = 0
    plan_s: float = 0.0

    def report(self, step: int) -> dict:
        """JSON values: the step's imbalance before and after planning (the mean over its
        rounds, and the worst round), the tokens moved, the planning time."""
        mean = (lambda xs: sum(xs) / len(xs)) if self.planned else (lambda xs: 1.0)
        return {"step": step, "rounds": self.rounds, "ranks": self.ranks,
                "speeds": [round(s, 4) for s in self.speeds],
                "naive": round(mean(self.naive), 4), "planned": round(mean(self.planned), 4),
                "worst_naive": round(max(self.naive, default=1.0), 4),
                "worst_planned": round(max(self.planned, default=1.0), 4),
                "moved_tokens": self.moved_tokens, "plan_ms": round(self.plan_s * 1e3, 3)}


class AttentionRound:
    """One round: this rank's micro-batch (or none) with every other rank's, on ``coll``."""

    def __init__(self, coll: Collectives | None, speeds: Sequence[float] | None,
                 policy: AttentionPolicy, around: Exchange = direct,
                 stats: RoundStats | None = None) -> None:  # fmt: skip
        self.coll = coll
        self.speeds = tuple(speeds) if speeds is not None else None
        self.policy = policy
        self.around = around
        self.stats = stats
        self.calls: list[Call] = []
        self.plan: AttentionPlan | None = None
        self.layout: Layout | None = None
        self._bounds: tuple[int, ...] | None = None

    @property
    def _rank(self) -> int:
        return self.coll.rank if self.coll is not None else 0

    @property
    def _size(self) -> int:
        return self.coll.size if self.coll is not None else 1

    def _plan(self, bounds: tuple[int, ...], device: torch.device) -> Layout:
        """Every rank's documents, gathered, and the round's plan (the same on every rank)."""
        began = time.perf_counter()
        lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        mine = [(length, start) for length, start in zip(lengths, bounds, strict=False)
                if length > 0]  # fmt: skip
        every = [[length for length, _ in mine]]
        if self._size > 1:
            assert self.coll is not None
            count = torch.tensor([len(mine)], dtype=torch.int64, device=device)
            counts = torch.empty(self._size, dtype=torch.int64, device=device)
            self.around(lambda: self.coll.all_gather(counts, count))
            most = max(int(counts.max()), 1)
            padded = torch.zeros(most, dtype=torch.int64, device=device)
            padded[: len(mine)] = torch.tensor([n for n, _ in mine], dtype=torch.int64)
            gathered = torch.empty(self._size * most, dtype=torch.int64, device=device)
            self.around(lambda: self.coll.all_gather(gathered, padded))
            rows = gathered.view(self._size, most).tolist()
            every = [rows[r][: int(counts[r])] for r in range(self._size)]
        documents, offsets = [], {}
        for rank, lengths_of in enumerate(every):
            for i, length in enumerate(lengths_of):
                if rank == self._rank:
                    offsets[len(documents)] = mine[i][1]
                documents.append(Document(int(length), rank))
        self.plan = plan_attention(documents, range(self._size), self.speeds, self.policy)
        exact = self.policy.exact
        self.layout = Layout(self.plan, self._rank, offsets,
                             exact_by_default(device) if exact is None else exact)
        self._bounds = bounds
        if self.stats is not None:
            self.stats.rounds += 1
            self.stats.ranks = self._size
            self.stats.speeds = self.speeds or ()
            self.stats.naive.append(self.plan.naive_imbalance)
            self.stats.planned.append(self.plan.imbalance)
            self.stats.moved_tokens += self.plan.moved_tokens
            self.stats.plan_s += time.perf_counter() - began
        return self.layout

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cu_seqlens: Sequence[int] | torch.Tensor, scale: float | None) -> torch.Tensor:
        _check(q, k, v)
        bounds = _bounds(cu_seqlens, q.shape[0])
        if self.layout is None:
            self._plan(bounds, q.device)
        elif bounds != self._bounds:
            raise ConfigError("every attention call of a micro-batch must pass the same "
                              "cu_seqlens")  # fmt: skip
        assert self.layout is not None
        index = sum(1 for c in self.calls if c.kind == "forward")
        self.calls.append(Call("forward", index, q.shape[1], q.shape[2], q.dtype, scale))
        return DispatchedAttention.apply(
            q.contiguous(), k.contiguous(), v.contiguous(), self.layout, self.coll, scale,
            self.around, lambda: self.calls.append(Call("backward", index)))  # fmt: skip

    def replay(self, calls: Sequence[Call], device: torch.device) -> None:
        """Take part in a round where this rank has no micro-batch: ``calls`` (its own last
        micro-batch's) with no documents of its own."""
        saved: list[tuple[Call, Saved]] = []
        for call in calls:
            if call.kind == "forward":
                empty = torch.empty(0, call.heads, call.dim, dtype=call.dtype, device=device)
                layout = self.layout or self._plan((0, 0), device)
                _, kept = attention_forward(empty, empty, empty, layout, self.coll, call.scale,
                                            self.around)  # fmt: skip
                saved.append((call, kept))
            else:
                _, kept = saved[call.index]
                assert self.layout is not None
                attention_backward(torch.empty_like(kept.q), kept, self.layout, self.coll,
                                   self.around)  # fmt: skip
        self.calls = list(calls)


class AttentionRounds:
    """A ``Job``'s rounds: the policy, the calls to replay, the step's statistics."""

    def __init__(self, policy: AttentionPolicy, device: torch.device,
                 around: Exchange = direct) -> None:  # fmt: skip
        self.policy = policy
        self.device = device
        self.around = around
        self.calls: list[Call] | None = None  # the last micro-batch's, to replay
        self.stats = RoundStats()

    def begin_step(self) -> None:
        self.stats = RoundStats()

    @contextmanager
    def round(self, coll: Collectives | None, speeds: Sequence[float] | None
              ) -> Iterator[AttentionRound]:  # fmt: skip
        """This rank's micro-batch of the next round: :func:`core_attention` calls inside
        use it."""
        current = AttentionRound(coll, speeds, self.policy, self.around, self.stats)
        previous = getattr(_active, "round", None)
        _active.round = current
        try:
            yield current
        finally:
            _active.round = previous
        if current.calls:
            self.calls = current.calls

    def serve(self, coll: Collectives | None, speeds: Sequence[float] | None) -> None:
        """A round in which this rank has no micro-batch."""
        if self.calls is None:
            raise ConfigError("a rank with no micro-batch of its own yet cannot take part in "
                              "an attention round")  # fmt: skip
        AttentionRound(coll, speeds, self.policy, self.around, self.stats).replay(
            self.calls, self.device)  # fmt: skip


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cu_seqlens: Sequence[int] | torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of packed documents (``q``, ``k``, ``v``: ``[tokens, heads,
    head_dim]``; ``cu_seqlens``: the documents' boundaries ``[0, l0, l0 + l1, ...]``), each
    document attending only to itself. Inside a ``Job``'s round, its tasks run where the
    round's plan puts them; elsewhere, all here, with the same arithmetic."""
    current: AttentionRound | None = getattr(_active, "round", None)
    if current is None:
        current = AttentionRound(None, None, AttentionPolicy())
    return current.attend(q, k, v, cu_seqlens, scale)
