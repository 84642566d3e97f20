"""The agent's in-memory snapshot store: shared-memory records that outlive workers.

A *record* is one rank's bytes for one step (its slice of the replicated state plus its own
per-rank state), in a segment the agent created. Workers write into the segment directly
(:mod:`elastictrain.snapshot.shm`) between ``begin`` and ``end``. Which steps are kept is the
pure :func:`plan_retention`; the store only applies it. Thread-safe (gRPC threads call it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from elastictrain.constants import MAX_PENDING_SNAPSHOTS
from elastictrain.errors import ElasticTrainError
from elastictrain.snapshot.shm import ShmSegment

logger = logging.getLogger(__name__)


class SnapshotError(ElasticTrainError):
    """A snapshot request the store cannot honour."""


@dataclass
class Record:
    """``written``: the worker ended it; ``complete``: written and its CRC32C is known (the
    agent computes it after the worker is done, so the worker's hot path is the copy alone).
    Only complete records are read, listed, spread or committed."""

    step: int
    rank: int
    segment: ShmSegment
    nbytes: int
    meta: bytes = b""
    checksum: int = 0
    complete: bool = False
    written: bool = False


_SEGMENT_GRAIN = 1 << 20


def segment_size_for(nbytes: int) -> int:
    """A record of ``nbytes`` gets a segment with 1/64 headroom, rounded up to 1 MiB."""
    padded = nbytes + nbytes // 64 + 4096
    return -(-padded // _SEGMENT_GRAIN) * _SEGMENT_GRAIN


@dataclass(frozen=True)
class RetentionPlan:
    free: frozenset[int]
    reason: str


def plan_retention(steps: Iterable[int], committed: int | None, max_pending: int) -> RetentionPlan:
    """Which steps to free: everything older than the committed step, and the oldest
    uncommitted steps beyond ``max_pending`` (they can no longer all be written in time)."""
    present = sorted(set(steps))
    older = {s for s in present if committed is not None and s < committed}
    pending = [s for s in present if committed is None or s > committed]
    dropped = set(pending[:-max_pending]) if max_pending and len(pending) > max_pending else set()
    reason = []
    if older:
        reason.append(f"older than committed step {committed}: {sorted(older)}")
    if dropped:
        reason.append(f"more than {max_pending} uncommitted steps: dropped {sorted(dropped)}")
    return RetentionPlan(frozenset(older | dropped), "; ".join(reason) or "nothing to free")


@dataclass
class SnapshotStore:
    """Records of this node's ranks, keyed by (step, rank)."""

    prefix: str
    max_pending: int = MAX_PENDING_SNAPSHOTS
    max_bytes: int = 0  # 0: unbounded; else new segments beyond this are refused
    records: dict[tuple[int, int], Record] = field(default_factory=dict)
    committed: int | None = None
    pinned: dict[int, int] = field(default_factory=dict)  # step -> pins (being written to disk)
    _free: list[ShmSegment] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, rank: int, step: int, nbytes: int, rebuilding: bool = False) -> Record:
        """A writable record for (step, rank), reusing a freed segment when one is big enough.

        Only steps after the committed one can be written, except when ``rebuilding`` a
        record of the committed step from other nodes' chunks.
        """
        if nbytes < 0 or step < 0 or rank < 0:
            raise SnapshotError(f"invalid snapshot request: rank {rank} step {step} {nbytes} B")
        with self._lock:
            committed = self.committed
            if committed is not None and (
                step < committed or (step == committed and not rebuilding)
            ):
                raise SnapshotError(f"step {step} is not after the committed step {committed}")
            record = self.records.get((step, rank))
            if record is not None and record.segment.size >= nbytes:
                record.complete = record.written = False
                record.nbytes = nbytes
                return record
            segment = self._take_segment(nbytes)
            record = Record(step=step, rank=rank, segment=segment, nbytes=nbytes)
            self.records[(step, rank)] = record
            self._apply_retention_locked()
            return record

    def _take_segment(self, nbytes: int) -> ShmSegment:
        for i, segment in enumerate(self._free):
            if segment.size >= nbytes:
                return self._free.pop(i)
        # (The headroom lets the next steps' records, whose per-rank part varies by a few
        # bytes, reuse this segment instead of faulting in a fresh one.)
        nbytes = segment_size_for(nbytes)
        held = sum(r.segment.size for r in self.records.values())
        if self.max_bytes and held + nbytes > self.max_bytes:
            # pooled segments too small to reuse are given back first
            while self._free and held + sum(s.size for s in self._free) + nbytes > self.max_bytes:
                self._free.pop(0).close()
            if held + nbytes > self.max_bytes:
                raise SnapshotError(
                    f"snapshot memory limit: {held + nbytes} bytes would exceed {self.max_bytes}"
                )
        return ShmSegment.create(self.prefix, nbytes)

    def end(self, rank: int, step: int, meta: bytes, checksum: int | None = None) -> Record:
        """The worker is done writing; with ``checksum`` the record is complete at once, else
        it waits for :meth:`set_checksum`."""
        with self._lock:
            record = self.records.get((step, rank))
            if record is None:
                raise SnapshotError(
                    f"no snapshot of rank {rank} step {step} was begun (or it was dropped)"
                )
            record.meta, record.written = meta, True
            if checksum is not None:
                record.checksum, record.complete = checksum, True
            return record

    def unchecked(self, step: int) -> list[Record]:
        """Written records of ``step`` whose checksum is still to compute."""
        with self._lock:
            return [r for (s, _), r in self.records.items()
                    if s == step and r.written and not r.complete]  # fmt: skip

    def written_steps(self, ranks: Iterable[int]) -> list[int]:
        """Steps for which every one of ``ranks`` has ended its record (checksummed or not)."""
        return self._steps_where(ranks, lambda r: r.written)

    def set_checksum(self, record: Record, checksum: int) -> None:
        """Complete a written record, unless it was rewritten or dropped meanwhile."""
        with self._lock:
            if self.records.get((record.step, record.rank)) is record and record.written:
                record.checksum, record.complete = checksum, True

    def complete_steps(self, ranks: Iterable[int]) -> list[int]:
        """Steps for which every one of ``ranks`` has a complete record."""
        return self._steps_where(ranks, lambda r: r.complete)

    def _steps_where(self, ranks: Iterable[int], holds) -> list[int]:
        wanted = set(ranks)
        with self._lock:
            by_step: dict[int, set[int]] = {}
            for (step, rank), record in self.records.items():
                if holds(record):
                    by_step.setdefault(step, set()).add(rank)
        return sorted(s for s, have in by_step.items() if wanted <= have)

    def get(self, rank: int, step: int) -> Record | None:
        with self._lock:
            record = self.records.get((step, rank))
            return record if record is not None and record.complete else None

    def adopt(self, rank: int, step: int, data: memoryview, meta: bytes, checksum: int) -> Record:
        """Hold a record rebuilt from other nodes' chunks (complete at once)."""
        record = self.begin(rank, step, len(data), rebuilding=True)
        if len(data):
            record.segment.view(0, len(data))[:] = data
        return self.end(rank, step, meta, checksum)

    def drop_uncommitted(self) -> list[int]:
        """Free every step after the committed one (a new round must not mix with them)."""
        with self._lock:
            stale = sorted(
                {s for s, _ in self.records if self.committed is None or s > self.committed}
            )
            for key in [k for k in self.records if k[0] in stale]:
                self._free.append(self.records.pop(key).segment)
            return stale

    def drop_after(self, step: int) -> list[int]:
        """Free every step after ``step`` (never the committed one); returns them."""
        with self._lock:
            floor = step if self.committed is None else max(step, self.committed)
            stale = sorted({s for s, _ in self.records if s > floor})
            for key in [k for k in self.records if k[0] in stale]:
                self._free.append(self.records.pop(key).segment)
            return stale

    def segment_names(self) -> list[str]:
        """Every segment this store holds, records' first (newest step first), then pooled."""
        with self._lock:
            held = sorted(self.records.values(), key=lambda r: -r.step)
            return [r.segment.name for r in held] + [s.name for s in self._free]

    def list(self) -> list[Record]:
        with self._lock:
            return sorted(self.records.values(), key=lambda r: (r.step, r.rank))

    def mark_committed(self, step: int) -> None:
        with self._lock:
            if self.committed is None or step > self.committed:
                self.committed = step
                self._apply_retention_locked()

    def pin(self, step: int) -> None:
        """Keep ``step``'s segments (not freed, not reused) until :meth:`unpin`."""
        with self._lock:
            self.pinned[step] = self.pinned.get(step, 0) + 1

    def unpin(self, step: int) -> None:
        with self._lock:
            left = self.pinned.get(step, 0) - 1
            if left > 0:
                self.pinned[step] = left
            else:
                self.pinned.pop(step, None)
                self._apply_retention_locked()

    def _apply_retention_locked(self) -> None:
        plan = plan_retention({s for s, _ in self.records}, self.committed, self.max_pending)
        free = plan.free - set(self.pinned)
        if not free:
            return
        for key in [k for k in self.records if k[0] in free]:
            self._free.append(self.records.pop(key).segment)
        while len(self._free) > 2 * self.max_pending + 2:
            self._free.pop(0).close()
        logger.debug("freed snapshot steps: %s", plan.reason)

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(r.segment.size for r in self.records.values()) + sum(
                s.size for s in self._free
            )

    def close(self) -> None:
        with self._lock:
            for record in self.records.values():
                record.segment.close()
            for segment in self._free:
                segment.close()
            self.records.clear()
            self._free.clear()


@dataclass(frozen=True)
class ChunkInfo:
    """One erasure-coded chunk (or full copy) of an owner node's payload for one step."""

    owner: str
    step: int
    index: int
    k: int
    m: int
    redundancy: str  # "erasure" or "replication"
    payload_bytes: int
    chunk_bytes: int
    checksums: tuple[int, ...]


@dataclass
class ChunkStore:
    """Chunks this agent holds for owner nodes (itself included), keyed (owner, step, index)."""

    max_pending: int = MAX_PENDING_SNAPSHOTS
    max_bytes: int = 0  # bytes of chunks held and being received at once (0: unbounded)
    chunks: dict[tuple[str, int, int], tuple[ChunkInfo, bytearray]] = field(default_factory=dict)
    committed: int | None = None
    _reserved: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, nbytes: int) -> None:
        """Room for a chunk of ``nbytes`` about to be received (before it is allocated);
        :class:`SnapshotError` when held and reserved chunks would pass ``max_bytes``.
        Pair with :meth:`unreserve`."""
        with self._lock:
            held = sum(len(data) for _, data in self.chunks.values())
            if self.max_bytes and held + self._reserved + nbytes > self.max_bytes:
                raise SnapshotError(f"a chunk of {nbytes} bytes would pass the {self.max_bytes}"
                                    f"-byte budget ({held} held, {self._reserved} arriving)")
            self._reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)

    def put(self, info: ChunkInfo, data: bytearray) -> None:
        if len(data) != info.chunk_bytes:
            raise SnapshotError(
                f"chunk {info.index} of {info.owner} step {info.step}: {len(data)} bytes, "
                f"expected {info.chunk_bytes}"
            )
        with self._lock:
            if self.committed is not None and info.step < self.committed:
                return  # already superseded
            self.chunks[(info.owner, info.step, info.index)] = (info, data)
            self._apply_retention_locked()

    def get(self, owner: str, step: int, index: int) -> tuple[ChunkInfo, bytearray] | None:
        with self._lock:
            return self.chunks.get((owner, step, index))

    def list(self) -> list[ChunkInfo]:
        with self._lock:
            return sorted((info for info, _ in self.chunks.values()),
                          key=lambda i: (i.step, i.owner, i.index))  # fmt: skip

    def corrupt(self, own_node: str) -> list[ChunkInfo]:
        """Flip a byte in the middle of every chunk of one owner's newest step held here
        (another owner's before ``own_node``'s): a fault made on purpose, which a rebuild must
        detect. The chunks flipped."""
        with self._lock:
            if not self.chunks:
                return []
            owner, step = max({(o, s) for o, s, _ in self.chunks},
                              key=lambda os_: (os_[1], os_[0] != own_node))  # fmt: skip
            flipped = []
            for (o, s, _), (info, data) in sorted(self.chunks.items()):
                if (o, s) == (owner, step) and len(data):
                    data[len(data) // 2] ^= 0xFF
                    flipped.append(info)
            return flipped

    def mark_committed(self, step: int) -> None:
        with self._lock:
            if self.committed is None or step > self.committed:
                self.committed = step
                self._apply_retention_locked()

    def _apply_retention_locked(self) -> None:
        steps = {step for _, step, _ in self.chunks}
        plan = plan_retention(steps, self.committed, self.max_pending)
        for key in [k for k in self.chunks if k[1] in plan.free]:
            del self.chunks[key]

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(len(data) for _, data in self.chunks.values())

    def drop_after(self, step: int) -> None:
        with self._lock:
            for key in [k for k in self.chunks if k[1] > step and k[1] != self.committed]:
                del self.chunks[key]

    def drop_uncommitted(self) -> None:
        with self._lock:
            for key in [k for k in self.chunks if self.committed is None or k[1] > self.committed]:
                del self.chunks[key]

    def clear(self) -> None:
        with self._lock:
            self.chunks.clear()
