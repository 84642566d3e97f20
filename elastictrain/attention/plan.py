"""Core-attention tasks: where each query range of each document is attended (pure).

A document of ``length`` tokens lives on its ``owner`` rank. A task attends queries
``[start, end)`` of one document over its keys and values ``[0, end)`` (causal): cutting a
document by queries leaves every query row's computation unchanged. Work is counted in
(query, key) pairs. :func:`plan_attention` balances that work over the ranks in proportion to
their speeds, moving the tails of the longest documents first (their queries see the longest
prefixes: the most work per byte sent), never cutting a task shorter than ``min_task``
tokens unless its document is that short.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from elastictrain.errors import ConfigError

DEFAULT_MIN_TASK = 512


def task_cost(start: int, end: int) -> int:
    """(query, key) pairs of causal queries ``[start, end)`` over keys ``[0, end)``."""
    q = end - start
    return q * end - q * (q - 1) // 2


@dataclass(frozen=True)
class Document:
    length: int
    owner: int  # the rank whose batch holds its tokens

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ConfigError(f"a document of {self.length} tokens")
        if self.owner < 0:
            raise ConfigError(f"a document owned by rank {self.owner}")


@dataclass(frozen=True)
class Task:
    doc: int  # index into the planned documents
    start: int  # first query
    end: int  # one past the last query; keys and values are [0, end)
    owner: int
    runner: int  # the rank that computes it

    @property
    def cost(self) -> int:
        return task_cost(self.start, self.end)


@dataclass(frozen=True)
class AttentionPolicy:
    min_task: int = DEFAULT_MIN_TASK  # tokens: shorter query shards lose kernel efficiency
    tolerance: float = 0.01  # stop once max/mean of modelled time is within this

    def __post_init__(self) -> None:
        if self.min_task < 1:
            raise ConfigError(f"min_task {self.min_task}: must be >= 1")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"tolerance {self.tolerance}: must be in [0, 1)")


@dataclass(frozen=True)
class AttentionPlan:
    tasks: tuple[Task, ...]
    ranks: tuple[int, ...]
    loads: tuple[int, ...]  # (query, key) pairs each rank computes, in ``ranks`` order
    naive_imbalance: float  # max/mean of modelled time with every document on its owner
    imbalance: float  # the same, planned
    moved_tokens: int = 0  # rows sent: queries and outputs, keys and values of the prefixes
    reason: str = ""
    by_runner: dict[int, tuple[Task, ...]] = field(default_factory=dict, compare=False)


def _imbalance(loads: Sequence[float], speeds: Sequence[float]) -> float:
    times = [load / speed for load, speed in zip(loads, speeds, strict=True)]
    mean = sum(times) / len(times)
    return max(times) / mean if mean > 0 else 1.0


def _tail_for(work: float, end: int, floor_start: int) -> int:
    """The start s >= floor_start of the tail [s, end) whose cost is closest to ``work``
    without passing it (at least one query)."""
    # cost(s) = q * end - q (q - 1) / 2 with q = end - s; solve q^2 - (2 end + 1) q + 2 w = 0
    b = 2 * end + 1
    disc = b * b - 8 * work
    q = (b - math.sqrt(disc)) / 2 if disc > 0 else end
    q = max(1, min(int(q), end - floor_start))
    return end - q


def _shed(kept: list[tuple[int, int, int]], work: float, limit: float, floor: int,
          owner: int, runner: int) -> Task | None:  # fmt: skip
    """Take from ``kept`` (a heap of (-end, doc, start) ranges still on their owner) the tail
    that moves about ``work`` pairs, from the range with the longest prefix that allows it;
    less than ``limit`` pairs (the owner's excess plus the runner's room: the larger of the
    two loads goes down). None: no range can."""
    skipped = []
    found = None
    while kept and found is None:
        negative_end, doc, start = heapq.heappop(kept)
        end = -negative_end
        if task_cost(start, end) < limit and (end - start <= floor
                                               or task_cost(start, end) <= work):
            found = Task(doc, start, end, owner, runner)  # the whole range
            continue
        if end - start <= floor:  # indivisible and too big
            skipped.append((negative_end, doc, start))
            continue
        cut = min(_tail_for(work, end, start), end - floor)  # a tail of at least the floor
        if 0 < cut - start < floor:  # what would stay is too short: it goes too, or none
            cut = start
        if task_cost(cut, end) >= limit:
            skipped.append((negative_end, doc, start))
            continue
        found = Task(doc, cut, end, owner, runner)
        if cut > start:
            heapq.heappush(kept, (-cut, doc, start))
    for item in skipped:
        heapq.heappush(kept, item)
    return found


def plan_attention(documents: Sequence[Document], ranks: Sequence[int],
                   speeds: Sequence[float] | None = None,
                   policy: AttentionPolicy | None = None) -> AttentionPlan:  # fmt: skip
    """Tasks for ``documents`` over ``ranks`` (the current world, in order), each rank's work
    in proportion to ``speeds`` (default: equal). Every document's owner must be in
    ``ranks``."""
    policy = policy or AttentionPolicy()
    ranks = tuple(ranks)
    if not ranks or len(set(ranks)) != len(ranks):
        raise ConfigError(f"ranks {ranks}: one or more, each once")
    speeds = tuple(float(s) for s in speeds) if speeds is not None else (1.0,) * len(ranks)
    if len(speeds) != len(ranks) or not all(s > 0 and math.isfinite(s) for s in speeds):
        raise ConfigError("one finite speed > 0 per rank")
    index = {r: i for i, r in enumerate(ranks)}
    for d in documents:
        if d.owner not in index:
            raise ConfigError(f"a document's owner {d.owner} is not in the world {ranks}")
    loads = [0] * len(ranks)
    for d in documents:
        loads[index[d.owner]] += task_cost(0, d.length)
    naive = _imbalance(loads, speeds)
    total = sum(loads)
    targets = [total * s / sum(speeds) for s in speeds]
    # what is still on its owner: per rank, a heap of (-end, doc, start) query ranges
    kept: list[list[tuple[int, int, int]]] = [[] for _ in ranks]
    for i, d in enumerate(documents):
        heapq.heappush(kept[index[d.owner]], (-d.length, i, 0))
    moved: list[Task] = []
    stuck: set[int] = set()  # ranks that cannot shed at this granularity
    for _ in range(8 * (len(documents) + len(ranks)) + 16):
        if _imbalance(loads, speeds) <= 1 + policy.tolerance:
            break
        gap = [load - target for load, target in zip(loads, targets, strict=True)]
        candidates = [i for i in range(len(ranks)) if i not in stuck and kept[i] and gap[i] > 0]
        if not candidates:
            break
        over = max(candidates, key=lambda i: gap[i] / speeds[i])
        under = min(range(len(ranks)), key=lambda i: gap[i] / speeds[i])
        work = min(gap[over], -gap[under])
        if work <= 0:
            break
        task = _shed(kept[over], work, gap[over] - gap[under], policy.min_task, ranks[over],
                     ranks[under])  # fmt: skip
        if task is None:
            stuck.add(over)
            continue
        moved.append(task)
        loads[over] -= task.cost
        loads[under] += task.cost
    tasks = [Task(doc, start, -negative_end, ranks[r], ranks[r])
             for r, heap in enumerate(kept) for negative_end, doc, start in heap] + moved
    tasks.sort(key=lambda t: (t.doc, t.start))
    by_runner: dict[int, list[Task]] = {r: [] for r in ranks}
    for task in tasks:
        by_runner[task.runner].append(task)
    moved_tokens = sum((t.end - t.start) * 2 + t.end * 2 for t in moved)  # q, out; k, v
    after = _imbalance(loads, speeds)
    return AttentionPlan(
        tasks=tuple(tasks), ranks=ranks, loads=tuple(loads), naive_imbalance=naive,
        imbalance=after, moved_tokens=moved_tokens,
        reason=f"{len(moved)} task(s) moved: max/mean {naive:.2f} -> {after:.2f}",
        by_runner={r: tuple(ts) for r, ts in by_runner.items()},
    )  # fmt: skip
