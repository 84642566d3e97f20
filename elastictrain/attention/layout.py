"""One rank's part of a plan: its runs (consecutive pieces of a document on one runner),
which it computes for itself, which it sends and to whom, which it computes for others, and
their rows in its packed tensors. Built once per plan; every layer of a micro-batch uses the
same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from elastictrain.attention.plan import AttentionPlan, Task
from elastictrain.errors import ConfigError
from elastictrain.train.tree import Node
from elastictrain.train.tree import cover as tree_cover

if TYPE_CHECKING:
    from elastictrain.attention.packed import Packing


class Run(NamedTuple):
    """Consecutive pieces ``[first, stop)`` of a document, computed by one runner."""

    doc: int
    first: int
    stop: int
    start: int  # the run's first query
    end: int  # one past its last query: keys and values are [0, end)
    owner: int
    runner: int

    @property
    def queries(self) -> int:
        return self.end - self.start


class Layout:
    """One rank's part of a plan. ``exact``: every piece alone and the tree
    (:mod:`elastictrain.attention.dispatch`); else each run is one sequence of one kernel
    call per rank (:mod:`elastictrain.attention.packed`)."""

    def __init__(self, plan: AttentionPlan, rank: int, offsets: Mapping[int, int],
                 exact: bool = True) -> None:  # fmt: skip
        self.rank = rank
        self.exact = exact
        self.ranks = plan.ranks
        self.offsets = dict(offsets)
        self.pieces: dict[int, list[Task]] = {}  # doc -> its pieces, for docs this rank touches
        self.local: list[Run] = []  # owned here, run here
        self.sent: dict[int, list[Run]] = {r: [] for r in plan.ranks if r != rank}
        self.run_for: dict[int, list[Run]] = {r: [] for r in plan.ranks if r != rank}
        self.packing: Packing | None = None  # runs mode's index tensors, made on first use
        runs: list[Run] = []
        pieces: list[Task] = []
        for task in plan.tasks:  # by (doc, piece)
            if pieces and task.doc != pieces[-1].doc:
                runs.extend(self._runs(pieces))
                pieces = []
            pieces.append(task)
        if pieces:
            runs.extend(self._runs(pieces))
        for run in runs:
            if run.owner == rank and run.runner == rank:
                self.local.append(run)
            elif run.owner == rank:
                self.sent[run.runner].append(run)
            elif run.runner == rank:
                self.run_for[run.owner].append(run)
        for doc in {run.doc for run in runs if run.owner == rank}:
            if doc not in self.offsets:
                raise ConfigError(f"rank {rank} owns document {doc} but has no offset for it")

    def _runs(self, pieces: list[Task]) -> list[Run]:
        """The runs of one document's pieces (in order), keeping the pieces if this rank
        owns or runs any of them."""
        if any(t.piece != i for i, t in enumerate(pieces)):
            raise ConfigError(f"document {pieces[0].doc}'s tasks are not its pieces in order")
        found, first = [], 0
        for i in range(1, len(pieces) + 1):
            if i == len(pieces) or pieces[i].runner != pieces[first].runner:
                head = pieces[first]
                found.append(Run(head.doc, first, i, head.start, pieces[i - 1].end, head.owner,
                                 head.runner))  # fmt: skip
                first = i
        if pieces[0].owner == self.rank or any(r.runner == self.rank for r in found):
            self.pieces[pieces[0].doc] = pieces
        return found

    def rows(self, run: Run) -> tuple[slice, slice]:
        """The run's query rows and key/value prefix rows in the owner's tensors."""
        base = self.offsets[run.doc]
        return slice(base + run.start, base + run.end), slice(base, base + run.end)

    def cover(self, run: Run) -> list[tuple[Node, int]]:
        """The nodes of the run's cover (its aligned subtrees of the document's pieces), each
        with the rows of its key/value partial (the prefix of its last piece)."""
        pieces = self.pieces[run.doc]
        return [(node, pieces[node.span(len(pieces))[1] - 1].end)
                for node in tree_cover(run.first, run.stop, len(pieces))]  # fmt: skip
