"""Core-attention tasks: where each query range of each document is attended (pure).

A document of ``length`` tokens lives on its ``owner`` rank. A task attends queries
``[start, end)`` of one document over its keys and values ``[0, end)`` (causal): cutting a
document by queries leaves every query row's computation unchanged. Work is counted in
(query, key) pairs.

A plan is two decisions, made apart:

- **Cuts** (:func:`cut_document`) depend on a document's length and on its owner's batch
  alone (the number of tokens the owner holds), never on the world or the speeds: a
  micro-batch is cut the same way whichever ranks exist. Each task is then computed by the
  same kernel call on the same inputs wherever it runs, and its owner sums the key/value
  gradients of a document's tasks in their fixed order, so attention's outputs and gradients
  are bit-identical in any world (where the kernel is deterministic). A document is cut into
  pieces of equal work, as many as its share of a ``pieces``-way cut of a document as long as
  its owner's batch, none shorter than ``min_task`` tokens unless the document is.
- **Placement** (:func:`plan_attention`) puts those tasks on the ranks, in proportion to their
  speeds. A rank's modelled work is its (query, key) pairs plus a cost per row: each query
  row of a task, each key/value row of its document's prefix that the rank holds
  (:func:`work`; a run of tails moved to another rank brings its whole prefix there).
  Measured on an H100 (``benchmarks/attention_gpu.py --dump``), a step's attention time
  follows this within 5 %, where the pairs alone are 15 % off for ranks of many short
  documents. Placement: every task starts on its owner (the naive packing); while a rank is over its
  target, it gives the task that best fills the gap to the rank furthest under its target,
  preferring tails of long documents (their queries see the longest prefixes: the most work
  per byte sent). A move is made only if it lowers the larger of the two loads.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from elastictrain.errors import ConfigError

DEFAULT_MIN_TASK = 1024  # a piece runs alone: shorter ones leave a GPU idle
DEFAULT_PIECES = 256
# what a row costs beyond its pairs, in pairs: fitted to forward+backward times of varlen
# flash attention on an H100 (bf16, 16 heads x 128): 86 ms per 1e9 pairs, 29.5 ms per 1e6
# query rows, 15 ms per 1e6 key/value rows
DEFAULT_QUERY_COST = 320
DEFAULT_KEY_COST = 160


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


class Task(NamedTuple):
    doc: int  # index into the planned documents
    start: int  # first query
    end: int  # one past the last query; keys and values are [0, end)
    owner: int
    runner: int  # the rank that computes it
    piece: int = 0  # its place among its document's tasks (0, 1, ...: by start)

    @property
    def cost(self) -> int:
        return task_cost(self.start, self.end)


@dataclass(frozen=True)
class AttentionPolicy:
    min_task: int = DEFAULT_MIN_TASK  # tokens: shorter query shards lose kernel efficiency
    pieces: int = DEFAULT_PIECES  # tasks of a document as long as its owner's whole batch
    tolerance: float = 0.01  # stop once max/mean of modelled time is within this
    query_cost: int = DEFAULT_QUERY_COST  # pairs a query row costs beyond its own pairs
    key_cost: int = DEFAULT_KEY_COST  # and a key/value row of a prefix a rank holds
    # every piece alone and its partials in the fixed tree (the same bits in any world), or
    # a run of pieces as one kernel call (faster on a GPU, within rounding); None: exact on
    # CPU and under torch's deterministic algorithms (``core.exact_by_default``)
    exact: bool | None = None

    def __post_init__(self) -> None:
        if self.min_task < 1:
            raise ConfigError(f"min_task {self.min_task}: must be >= 1")
        if self.pieces < 1:
            raise ConfigError(f"pieces {self.pieces}: must be >= 1")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"tolerance {self.tolerance}: must be in [0, 1)")
        if self.query_cost < 0 or self.key_cost < 0:
            raise ConfigError(f"row costs {self.query_cost}, {self.key_cost}: must be >= 0")


def work(start: int, end: int, policy: AttentionPolicy) -> int:
    """Modelled work of queries ``[start, end)`` of a run that holds its prefix up to
    ``start`` already (the owner's, or the next piece of a run): its pairs, and each of its
    query rows with the key/value row at its position. A run that starts at ``start`` on a
    rank that does not hold the prefix adds ``key_cost * start``."""
    return task_cost(start, end) + (policy.query_cost + policy.key_cost) * (end - start)

@dataclass(frozen=True)
class AttentionPlan:
    tasks: tuple[Task, ...]  # by (document, start): the order every merge follows
    ranks: tuple[int, ...]
    loads: tuple[int, ...]  # modelled work each rank does (:func:`work`), in ``ranks`` order
    naive_imbalance: float  # max/mean of modelled time with every document on its owner
    imbalance: float  # the same, planned
    moved_tokens: int = 0  # rows sent: queries and outputs, keys and values of the prefixes
    pairs: tuple[int, ...] = ()  # (query, key) pairs each rank computes
    reason: str = ""
    by_runner: dict[int, tuple[Task, ...]] = field(default_factory=dict, compare=False)


def cut_document(length: int, batch_tokens: int, policy: AttentionPolicy) -> list[tuple[int, int]]:
    """The query ranges ``[start, end)`` a document of ``length`` tokens is cut into, when its
    owner holds ``batch_tokens`` tokens: pieces of about equal work, each at most
    ``task_cost(0, batch_tokens) / policy.pieces`` pairs where the floor allows."""
    if length < 2 * policy.min_task:
        return [(0, length)]
    quantum = task_cost(0, max(batch_tokens, length)) / policy.pieces
    # the last piece is the shortest, about L / 2n tokens: keep it at the floor or above
    count = min(math.ceil(task_cost(0, length) / quantum), length // (2 * policy.min_task))
    if count <= 1:
        return [(0, length)]
    # the prefix [0, x) holds about x^2 / 2 pairs: equal work ends at L * sqrt(j / n)
    ends = [length]
    for j in range(count - 1, 0, -1):
        cut = round(length * math.sqrt(j / count))
        if ends[-1] - cut >= policy.min_task and cut >= policy.min_task:
            ends.append(cut)
    ends.append(0)
    ends.reverse()
    return list(zip(ends, ends[1:], strict=False))


def _imbalance(loads: Sequence[float], speeds: Sequence[float]) -> float:
    times = [load / speed for load, speed in zip(loads, speeds, strict=True)]
    mean = sum(times) / len(times)
    return max(times) / mean if mean > 0 else 1.0


def _shed(kept: list[tuple[int, int, int, int]], pieces: list[list[tuple[int, int]]],
          suffix: list[list[int]], work: float, limit: float,
          extra: Callable[[int, int, int], int]) -> tuple[int, int, int] | None:
    """From ``kept`` (a heap of (-end, doc, first, stop): a document's pieces ``[first,
    stop)`` still on their owner), take the tail of pieces that moves about ``work`` and
    less than ``limit`` (the larger of the two loads goes down; the receiver also pays
    ``extra(doc, cut, stop)`` for the prefix), from the range with the longest prefix that
    allows it. Returns (doc, first, stop) of the pieces taken, or None."""
    skipped = []
    found = None
    while kept and found is None:
        item = heapq.heappop(kept)
        _, doc, first, stop = item
        costs = suffix[doc]  # costs[i]: the work of pieces [i, end of the document)
        beyond = costs[stop] if stop < len(costs) else 0
        # the most pieces [cut, stop) whose work is <= work; at least the last one
        cut = stop - 1
        while cut > first and costs[cut - 1] - beyond <= work:
            cut -= 1
        if costs[cut] - beyond + extra(doc, cut, stop) >= limit:
            skipped.append(item)
            continue
        found = (doc, cut, stop)
        if cut > first:
            heapq.heappush(kept, (-pieces[doc][cut - 1][1], doc, first, cut))
    for item in skipped:
        heapq.heappush(kept, item)
    return found


def plan_attention(documents: Sequence[Document], ranks: Sequence[int],
                   speeds: Sequence[float] | None = None,
                   policy: AttentionPolicy | None = None) -> AttentionPlan:  # fmt: skip
    """Tasks for ``documents`` over ``ranks`` (the current world, in order), each rank's work
    in proportion to ``speeds`` (default: equal). Every document's owner must be in
    ``ranks``. The cuts do not depend on ``ranks`` or ``speeds`` (see the module)."""
    policy = policy or AttentionPolicy()
    ranks = tuple(ranks)
    if not ranks or len(set(ranks)) != len(ranks):
        raise ConfigError(f"ranks {ranks}: one or more, each once")
    speeds = tuple(float(s) for s in speeds) if speeds is not None else (1.0,) * len(ranks)
    if len(speeds) != len(ranks) or not all(s > 0 and math.isfinite(s) for s in speeds):
        raise ConfigError("one finite speed > 0 per rank")
    index = {r: i for i, r in enumerate(ranks)}
    batch_tokens = dict.fromkeys(ranks, 0)
    for d in documents:
        if d.owner not in index:
            raise ConfigError(f"a document's owner {d.owner} is not in the world {ranks}")
        batch_tokens[d.owner] += d.length
    pieces = [cut_document(d.length, batch_tokens[d.owner], policy) for d in documents]
    suffix = []  # per document: the work of its pieces from each one to its end
    for spans in pieces:
        if len(spans) == 1:
            suffix.append([work(0, spans[0][1], policy)])
            continue
        costs = [work(start, end, policy) for start, end in spans]
        for i in range(len(costs) - 2, -1, -1):
            costs[i] += costs[i + 1]
        suffix.append(costs)
    loads = [0] * len(ranks)
    kept: list[list[tuple[int, int, int, int]]] = [[] for _ in ranks]
    for doc, d in enumerate(documents):
        loads[index[d.owner]] += suffix[doc][0]
        heapq.heappush(kept[index[d.owner]], (-d.length, doc, 0, len(pieces[doc])))
    naive = _imbalance(loads, speeds)
    total_speed = sum(speeds)
    targets = [sum(loads) * s / total_speed for s in speeds]
    runner = [[index[d.owner]] * len(spans) for d, spans in zip(documents, pieces, strict=True)]
    moves = 0
    stuck: set[int] = set()  # ranks with nothing that fits any more
    under = 0

    def extra(doc: int, cut: int, stop: int) -> int:
        """The prefix a run of pieces [cut, stop) brings to ``under``; none if it joins the
        run of that document already there (the prefix is held)."""
        if stop < len(runner[doc]) and runner[doc][stop] == under:
            return policy.key_cost * (pieces[doc][cut][0] - pieces[doc][stop][0])
        return policy.key_cost * pieces[doc][cut][0]

    for _ in range(8 * (len(documents) + len(ranks)) + 16):
        if _imbalance(loads, speeds) <= 1 + policy.tolerance:
            break
        gap = [load - target for load, target in zip(loads, targets, strict=True)]
        candidates = [i for i in range(len(ranks)) if i not in stuck and kept[i] and gap[i] > 0]
        if not candidates:
            break
        over = max(candidates, key=lambda i: gap[i] / speeds[i])
        under = min(range(len(ranks)), key=lambda i: gap[i] / speeds[i])
        want = min(gap[over], -gap[under])
        if want <= 0:
            break
        taken = _shed(kept[over], pieces, suffix, want, gap[over] - gap[under], extra)
        if taken is None:
            stuck.add(over)
            continue
        doc, first, stop = taken
        cost = suffix[doc][first] - (suffix[doc][stop] if stop < len(suffix[doc]) else 0)
        added = cost + extra(doc, first, stop)
        runner[doc][first:stop] = [under] * (stop - first)
        loads[over] -= cost
        loads[under] += added
        moves += 1
    tasks = tuple(Task(doc, start, end, documents[doc].owner, ranks[runner[doc][i]], i)
                  for doc, spans in enumerate(pieces)
                  for i, (start, end) in enumerate(spans))  # fmt: skip
    by_runner: dict[int, list[Task]] = {r: [] for r in ranks}
    sent: dict[tuple[int, int], int] = {}  # (document, runner) -> the longest prefix sent
    queries = 0
    pairs = dict.fromkeys(ranks, 0)
    for task in tasks:
        by_runner[task.runner].append(task)
        pairs[task.runner] += task.cost
        if task.runner != task.owner:
            key = (task.doc, task.runner)
            sent[key] = max(sent.get(key, 0), task.end)
            queries += task.end - task.start
    moved_tokens = 2 * queries + 2 * sum(sent.values())  # q, out; k, v once per runner
    after = _imbalance(loads, speeds)
    return AttentionPlan(
        tasks=tasks, ranks=ranks, loads=tuple(loads), naive_imbalance=naive,
        imbalance=after, moved_tokens=moved_tokens, pairs=tuple(pairs[r] for r in ranks),
        reason=f"{moves} move(s) of {len(tasks)} task(s): max/mean {naive:.2f} -> {after:.2f}",
        by_runner={r: tuple(ts) for r, ts in by_runner.items()},
    )  # fmt: skip
