"""The agent's side of snapshots: hold records, spread erasure-coded copies, commit, recover.

When every local rank has ended step ``s``, the agent checksums their records (CRC32C on
several threads: the workers only copy), encodes them as one node payload without assembling
it (k data + m parity chunks, or full copies when there are too few nodes;
:func:`plan_placement` decides from the round's membership alone, :func:`encode_payload` codes
from the segments) and sends each holder its chunk. Only when every
holder has acknowledged does it write ``snap/done/<s>/<node>``; whoever then sees all
participants there raises ``ctl/snapshot`` to ``s`` (a compare-and-set that only moves
forward). So a committed step survives the loss of any m nodes. Every agent watches
``ctl/snapshot`` and frees what the retention plan says. This work runs on one background
thread, so a worker's ``EndSnapshot`` returns at once; when it falls behind the workers it
goes straight to the newest step they have ended (the ones skipped are freed unannounced).

Recovery (:meth:`SnapshotCoordinator.recover`) rebuilds the payloads of committed owners that
are gone from any k intact chunks held by live agents (a chunk with a bad checksum counts as
lost) and adopts their records, which this agent then serves like its own.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elastictrain import constants
from elastictrain.constants import snapshot_threads
from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.errors import (
    AgentUnavailableError,
    ConfigError,
    CoordinationUnavailableError,
    SnapshotFormatError,
)
from elastictrain.rpc.agent_client import AgentClient
from elastictrain.snapshot.checksum import crc32c_parallel, crc32c_pieces
from elastictrain.snapshot.disk import DiskTierWriter
from elastictrain.snapshot.disk import Snapshot as DiskSnapshot
from elastictrain.snapshot.disk_records import to_disk_records
from elastictrain.snapshot.erasure import (
    MAX_TOTAL_CHUNKS,
    ErasureCodec,
    ErasureScheme,
    allocate_chunks,
    chunk_checksum,
    chunk_size,
    decode_snapshot,
)
from elastictrain.snapshot.memory_store import (
    ChunkInfo,
    ChunkStore,
    Record,
    SnapshotError,
    SnapshotStore,
)
from elastictrain.snapshot.payload import (
    ZEROS,
    PayloadEntry,
    Piece,
    chunk_pieces,
    column_cuts,
    payload_layout,
    payload_prefix,
    unpack_payload,
)
from elastictrain.snapshot.placement import Redundancy, choose_scheme, plan_placement
from elastictrain.snapshot.record_meta import METADATA_RANK, decode_record_meta

logger = logging.getLogger(__name__)


def encode_payload(
    entries: list[PayloadEntry],
    records: list[memoryview],
    codec: ErasureCodec,
    parity: np.ndarray,
    zeros: np.ndarray,
    checksum: Callable[[list], int],
) -> tuple[list[list[np.ndarray]], tuple[int, ...]]:
    """A node's step as k data + m parity chunks, without assembling the payload.

    The data chunks are views of where the bytes lie (the header prefix, the records in their
    shared-memory segments, ``zeros`` for padding); parity is coded from them, piece by piece,
    into ``parity`` (``(m, chunk length)``, reused across steps). Returns each data chunk's
    views and every chunk's checksum (``checksum`` of a list of buffers). The agent's
    per-step hot path: no copy of the records, no allocation of their size."""
    prefix_bytes, placed, _total = payload_prefix(entries)
    length = parity.shape[1]
    layout = chunk_pieces(len(prefix_bytes), placed, codec.k, length)
    sources = [np.frombuffer(prefix_bytes, dtype=np.uint8)]
    sources += [np.frombuffer(r, dtype=np.uint8) if len(r) else zeros[:0] for r in records]

    def source_of(piece: Piece) -> np.ndarray:
        if piece.source == ZEROS:
            return zeros[: piece.length]
        return sources[piece.source][piece.offset : piece.offset + piece.length]

    data = [[source_of(p) for p in pieces] for pieces in layout]
    columns = []
    cursor = [0] * codec.k
    for column, nbytes in column_cuts(layout, length):
        addresses = []
        for chunk, pieces in enumerate(layout):
            while pieces[cursor[chunk]].column + pieces[cursor[chunk]].length <= column:
                cursor[chunk] += 1
            piece, view = pieces[cursor[chunk]], data[chunk][cursor[chunk]]
            base = view.__array_interface__["data"][0]
            addresses.append(base + (0 if piece.source == ZEROS else column - piece.column))
        columns.append((column, nbytes, addresses))
    codec.encode_columns(columns, parity)
    return data, tuple(checksum(d) for d in data) + tuple(checksum([row]) for row in parity)


def committable(done_nodes: Collection[str], participants: Collection[str]) -> bool:
    """Pure commit rule: every participant has announced the step."""
    return bool(participants) and set(participants) <= set(done_nodes)


CHUNK_SLACK_BYTES = 1 << 16  # a chunk may exceed payload / k by its alignment


def record_request_problem(rank: int, step: int, nbytes: int, *, worker_rank: int | None,
                           newest: int | None, max_bytes: int) -> str:  # fmt: skip
    """Why a local worker may not begin the record of (rank, step), or "" (pure). A worker
    writes its own rank's record (the one holding rank 0 also DCP's metadata), a step at most
    ``RECORD_STEP_WINDOW`` past the newest this node knows of, within the memory budget."""
    if worker_rank is None:
        return "the worker holds no rank now"
    if rank != worker_rank and not (rank == METADATA_RANK and worker_rank == 0):
        return f"rank {worker_rank} may not write the record of rank {rank}"
    if step < 0 or nbytes < 0:
        return f"step {step}, {nbytes} bytes"
    if newest is not None and step > newest + constants.RECORD_STEP_WINDOW:
        return (f"step {step} is more than {constants.RECORD_STEP_WINDOW} steps past the "
                f"newest one here ({newest})")
    if max_bytes and nbytes > max_bytes:
        return f"a record of {nbytes} bytes is over the {max_bytes}-byte budget"
    return ""


def default_chunk_budget() -> int:
    """Bytes of chunks an agent holds without --snapshot-memory-limit: a share of the
    machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return int(total * constants.DEFAULT_CHUNK_MEMORY_FRACTION)


@dataclass(frozen=True)
class RoundView:
    """What the coordinator needs of the current round."""

    members: tuple[str, ...] = ()  # node ids in group-rank order
    endpoints: dict[str, str] = field(default_factory=dict)  # node id -> gRPC endpoint
    local_ranks: frozenset[int] = frozenset()


class SnapshotCoordinator:
    """Bridges the local stores, the peers' agents and the job's commit state in etcd."""

    def __init__(
        self,
        client: EtcdClient,
        keys: JobKeys,
        node_id: str,
        store: SnapshotStore,
        round_view: Callable[[], RoundView],
        scheme: ErasureScheme | None = None,
        agent_endpoints: Callable[[], list[str]] = list,
        disk_dir: str | None = None,
        disk_every: int = 0,
        checksum_threads: int | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._node_id = node_id
        self._corrupting_until = 0.0  # chaos: chunks received until then are corrupted
        self.store = store
        self.chunks = ChunkStore(max_pending=store.max_pending,
                                 max_bytes=store.max_bytes or default_chunk_budget())
        self._round_view = round_view
        self._scheme = scheme
        self._agent_endpoints = agent_endpoints
        self.committed_nodes: tuple[str, ...] = ()
        self._announced: set[int] = set()
        self._recover_lock = threading.Lock()
        # Done marks go to etcd under this lock, only for steps of the current round; a new
        # round or a truncation withdraws them under it (see :meth:`new_round`).
        self._mark_lock = threading.Lock()
        self._round = 0  # counts new rounds
        self._dropped_after = -1  # a truncation dropped the steps after this one
        self._truncated_epoch = 0
        self.disk_root = str(Path(disk_dir) / node_id) if disk_dir else None
        self.disk_error = ""  # the last disk-tier write's failure ("": none)
        try:
            self._disk = DiskTierWriter(self.disk_root) if self.disk_root else None
        except OSError as exc:
            raise ConfigError(f"--snapshot-dir: {self.disk_root}: {exc.strerror}") from exc
        self._disk_every = disk_every
        self._commits_since_disk = 0
        self.checksum_threads = checksum_threads or snapshot_threads()
        self._encode_buffer: np.ndarray | None = None  # parity rows, reused
        self._zero_buffer: np.ndarray | None = None
        self._codecs: dict[tuple[int, int], ErasureCodec] = {}
        self._checksum_pool = (
            ThreadPoolExecutor(self.checksum_threads - 1, thread_name_prefix="snapshot-crc")
            if self.checksum_threads > 1
            else None
        )
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="snapshot-commit", daemon=True)
        self._thread.start()

    # -- called from gRPC threads ---------------------------------------------------------------

    def begin(self, rank: int, step: int, nbytes: int) -> Record:
        return self.store.begin(rank, step, nbytes)

    def end(self, rank: int, step: int, meta: bytes) -> bool:
        """A worker finished its record: kept once its description reads as one (versioned,
        every field checked) of this rank and step; anything else is refused."""
        try:
            described = decode_record_meta(meta)
        except SnapshotFormatError as exc:
            raise SnapshotError(f"rank {rank} step {step}: {exc}") from exc
        if (described.rank, described.step) != (rank, step):
            raise SnapshotError(f"rank {rank} step {step}: the record describes rank "
                                f"{described.rank} step {described.step}")  # fmt: skip
        self.store.end(rank, step, meta)
        self._queue.put(step)
        committed = self.store.committed
        return committed is not None and committed >= step

    def newest_step(self) -> int | None:
        """The newest step this node knows of: committed, or begun by a local worker."""
        steps = [r.step for r in self.store.list()]
        if self.store.committed is not None:
            steps.append(self.store.committed)
        return max(steps, default=None)

    def record_budget(self) -> int:
        """The largest record a worker may ask for (the memory limit, else the chunk budget)."""
        return self.store.max_bytes or self.chunks.max_bytes

    def chunk_problem(self, info: ChunkInfo) -> str:
        """Why a peer's chunk is not taken (checked before its bytes are received), or ""."""
        members = self._round_view().members
        if info.owner not in members:
            return f"node {info.owner!r} is not a member of the current world"
        if info.k < 1 or info.m < 0 or info.k + info.m > MAX_TOTAL_CHUNKS:
            return f"a code of k={info.k}, m={info.m} is not one this agent holds"
        if not 0 <= info.index < info.k + info.m or len(info.checksums) != info.k + info.m:
            return f"chunk {info.index} of a {info.k}+{info.m} code with {len(info.checksums)} " \
                   "checksums"  # fmt: skip
        if info.redundancy not in ("erasure", "replication") or info.step < 0:
            return f"redundancy {info.redundancy!r} at step {info.step}"
        if not 0 <= info.chunk_bytes <= info.payload_bytes + CHUNK_SLACK_BYTES:
            return f"a chunk of {info.chunk_bytes} bytes for a {info.payload_bytes}-byte payload"
        return ""

    def put_chunk(self, info: ChunkInfo, data: bytearray) -> None:
        if info.owner != self._node_id and time.monotonic() < self._corrupting_until and data:
            data[len(data) // 2] ^= 0xFF  # a chaos corrupt-chunk window: held as received
        self.chunks.put(info, data)

    def corrupt_chunks(self, seconds: float = 0.0) -> list[ChunkInfo]:
        """Flip a byte of each held chunk of another node's newest step (see
        :meth:`ChunkStore.corrupt`), and of every chunk received from other nodes for
        ``seconds`` more. The chunks flipped now."""
        self._corrupting_until = time.monotonic() + seconds
        return self.chunks.corrupt(self._node_id)

    # -- called from the agent --------------------------------------------------------------------

    def on_committed(self, value: bytes) -> None:
        """``ctl/snapshot`` moved to ``value``; an older or repeated value changes nothing."""
        decoded = json.loads(value)
        step = int(decoded["step"])
        if self.store.committed is not None and step <= self.store.committed:
            return
        self.committed_nodes = tuple(decoded.get("nodes", ()))
        self.store.mark_committed(step)
        self.chunks.mark_committed(step)
        self._announced = {s for s in self._announced if s > step}
        self._commits_since_disk += 1
        if (
            self._disk is not None
            and self._disk_every
            and self._commits_since_disk >= self._disk_every
        ):
            self.save_to_disk(step)

    def save_to_disk(self, step: int | None = None):
        """Write this node's records of ``step`` (default: the committed one) to the disk tier
        in the background; returns the write's future, or None if there is nothing to write."""
        if self._disk is None:
            return None
        step = self.store.committed if step is None else step
        records = (
            [r for r in self.store.list() if r.step == step and r.complete]
            if step is not None
            else []
        )
        if not records:
            return None
        self._commits_since_disk = 0
        self.store.pin(step)
        pieces = [
            piece
            for r in records
            for piece in to_disk_records(r.rank, r.segment.tensor()[: r.nbytes], r.meta, r.checksum)
        ]
        future = self._disk.submit(
            DiskSnapshot(step=step, job_id=self._keys.job_id, records=pieces)
        )
        future.add_done_callback(lambda _f: self.store.unpin(step))
        future.add_done_callback(self._disk_written)
        return future

    def _disk_written(self, future) -> None:
        """A disk-tier write ended: a failure is logged and kept (status shows it, and a job
        whose last write failed does not exit 0); a later success clears it."""
        exc = future.exception()
        if exc is None:
            self.disk_error = ""
            return
        self.disk_error = f"{type(exc).__name__}: {exc}"
        logger.error("writing a snapshot to the disk tier failed: %s", self.disk_error)

    def truncate(self, after_step: int, epoch: int) -> list[int]:
        """A world re-formed in place at ``after_step``: steps after it belong to a discarded
        future (some ranks of the old world may have written them) and must not mix with the
        new world's. Done once per epoch, whichever local worker asks first."""
        with self._recover_lock, self._mark_lock:
            if epoch <= self._truncated_epoch:
                return []
            self._truncated_epoch = epoch
            self._client.put(self._keys.snapshot_fence, self._node_id)
            self._dropped_after = after_step
            dropped = self.store.drop_after(after_step)
            self.chunks.drop_after(after_step)
            self._announced = {s for s in self._announced if s <= after_step}
            for step in dropped:
                self._client.delete(self._keys.snapshot_done(step, self._node_id))
        if dropped:
            logger.info("world epoch %d resumes after step %d: dropped steps %s", epoch,
                        after_step, dropped)  # fmt: skip
        return dropped

    def new_round(self) -> None:
        """Steps after the committed one belong to the old round: drop them, and make sure no
        commit can still count on them.

        1. The fence (``snap/fence``) moves. A commit counts only done marks newer than the
           fence and fails if the fence moves before it lands (:meth:`commit`): from here on
           no step this node drops can be committed, whoever still tries (a peer whose mark
           was held up in an outage), until this node has marked it again in the new round.
        2. The committed step is read: a node that was cut off may have missed the commit of
           a step it holds records of; those are kept, the others restore from them.
        3. The steps after it are dropped.

        When etcd cannot be reached, nothing is dropped: a record kept is overwritten once its
        step is redone, a record dropped may be one that a commit already counts on."""
        with self._mark_lock:
            self._round += 1
            self._announced.clear()
            try:
                self._client.put(self._keys.snapshot_fence, self._node_id)
                current = self._client.get(self._keys.snapshot_committed)
            except CoordinationUnavailableError as exc:
                logger.warning("the committed snapshot step is unknown (%s): the steps after "
                               "the last one seen committed are kept", exc)  # fmt: skip
                return
            if current is not None:
                self.on_committed(current.value)
            self.store.drop_uncommitted()
            self.chunks.drop_uncommitted()

    # -- background -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            steps = {self._queue.get()}
            while not self._queue.empty():  # a backlog: only its newest ended step matters
                steps.add(self._queue.get_nowait())
            if None in steps:
                return
            view = self._round_view()
            ready = set(self.store.written_steps(view.local_ranks)) - self._announced
            candidates = sorted(steps & ready)
            if not candidates:
                continue
            step = candidates[-1]
            try:
                self._checksum(step)
                self._distribute_and_announce(step)
            except (CoordinationUnavailableError, AgentUnavailableError) as exc:
                logger.warning("snapshot step %d not committed here: %s", step, exc)
            except Exception:
                logger.exception("snapshot step %d not committed here", step)

    def _checksum(self, step: int) -> None:
        """CRC32C of the step's ended records (its segments are pinned meanwhile)."""
        self.store.pin(step)
        try:
            for record in self.store.unchecked(step):
                view = record.segment.view(0, record.nbytes)
                checksum = crc32c_parallel(view, self._checksum_pool, self.checksum_threads)
                view.release()
                self.store.set_checksum(record, checksum)
        finally:
            self.store.unpin(step)

    def _distribute_and_announce(self, step: int) -> None:
        round_ = self._round
        self._dropped_after = -1  # a later truncation sets it again
        view = self._round_view()
        if step in self._announced or not view.local_ranks:
            return
        if step not in self.store.complete_steps(view.local_ranks):
            return
        # every record of the step (a sharded job's DCP metadata has a record of its own)
        records = [r for r in self.store.list() if r.step == step and r.complete]
        if not view.local_ranks <= {r.rank for r in records}:
            return  # dropped meanwhile
        self._distribute(step, view, records)
        with self._mark_lock:
            if self._round != round_ or step > self._dropped_after >= 0:
                return  # a new round began, or the step was dropped, meanwhile
            self._client.put(self._keys.snapshot_done(step, self._node_id), b"1")
            self._announced.add(step)
        self.commit(step, view.members)

    def _distribute(self, step: int, view: RoundView, records: list[Record]) -> None:
        """Send each peer holder its chunk. The owner's own chunk (index 0) is not stored: while
        the owner lives its records serve, and when it dies its chunk dies with it.

        The payload is never assembled: data chunks are coded and sent from the records'
        segments where they lie, parity goes into rows kept across steps
        (:func:`encode_payload`)."""
        scheme = self._scheme or choose_scheme(len(view.members))
        decision = plan_placement(view.members, scheme)
        holders = decision.holders_of(self._node_id)
        if len(holders) < 2:
            return  # no peer: the records stay local only
        entries = [PayloadEntry(r.rank, r.nbytes, r.meta, r.checksum) for r in records]
        total = payload_layout(entries)[2]
        views = [r.segment.view(0, r.nbytes) for r in records]
        k, m = (scheme.k, scheme.m) if decision.redundancy is Redundancy.ERASURE else (1, 0)
        length = chunk_size(total, k)
        parity = self._encode_rows(m, length)
        data, checksums = encode_payload(entries, views, self._codec(k, m), parity,
                                         self._zeros(length), self._crc_pieces)  # fmt: skip
        chunks: list = data + [memoryview(row) for row in parity]
        if decision.redundancy is not Redundancy.ERASURE:  # full copies (or only the local)
            chunks, checksums = chunks * len(holders), checksums * len(holders)
            m = len(holders) - 1
        for index, holder in enumerate(holders):
            info = ChunkInfo(
                owner=self._node_id, step=step, index=index, k=k, m=m,
                redundancy=decision.redundancy.value, payload_bytes=total,
                chunk_bytes=length, checksums=tuple(checksums),
            )  # fmt: skip
            if holder == self._node_id:
                continue
            with AgentClient(view.endpoints[holder], timeout=30.0) as peer:
                peer.put_chunk(info, chunks[index])

    def _encode_rows(self, count: int, length: int) -> np.ndarray:
        """``count`` rows of ``length`` bytes over the reused parity buffer (grown by 1/64
        headroom when too small; rows start on 64-byte boundaries as ``length`` is aligned)."""
        needed = count * length
        if self._encode_buffer is None or self._encode_buffer.nbytes < needed:
            self._encode_buffer = allocate_chunks(needed + needed // 64, ErasureScheme(1, 0))[0]
        return self._encode_buffer[:needed].reshape(count, length)

    def _zeros(self, length: int) -> np.ndarray:
        """At least ``length`` zero bytes (read-only by convention), kept across steps."""
        if self._zero_buffer is None or self._zero_buffer.nbytes < length:
            self._zero_buffer = np.zeros(length + length // 64, dtype=np.uint8)
        return self._zero_buffer

    def _codec(self, k: int, m: int) -> ErasureCodec:
        codec = self._codecs.get((k, m))
        if codec is None:
            codec = self._codecs[(k, m)] = ErasureCodec(k, m, threads=self.checksum_threads)
        return codec

    def _crc_pieces(self, pieces: list) -> int:
        return crc32c_pieces(pieces, self._checksum_pool, self.checksum_threads)

    def commit(self, step: int, nodes: Collection[str]) -> bool:
        """Move ``ctl/snapshot`` to ``step`` if each of ``nodes`` has marked it done since the
        fence last moved (:meth:`new_round`), in a transaction that fails if the fence moves
        meanwhile: two compares, whatever the number of nodes. False if a mark is missing,
        the fence moved, or a newer step is committed already."""
        key = self._keys.snapshot_committed
        value = json.dumps({"step": step, "nodes": list(nodes)})
        fence = self._client.get(self._keys.snapshot_fence)
        fenced_at = fence.mod_revision if fence is not None else 0
        kvs, _ = self._client.get_prefix(self._keys.snapshot_done(step))
        marked = {kv.key.rsplit("/", 1)[-1] for kv in kvs if kv.mod_revision > fenced_at}
        if not committable(marked, nodes):
            return False
        guard = {self._keys.snapshot_fence: fenced_at}
        while True:
            current = self._client.get(key)
            if current is not None and int(json.loads(current.value)["step"]) >= step:
                return False
            expected = current.mod_revision if current else 0
            written, now = self._client.compare_and_swap(key, value, expected, unchanged=guard)
            if written:
                logger.debug("snapshot step %d committed", step)
                self._client.delete_range(
                    self._keys.snapshot_done_prefix, self._keys.snapshot_done(step)
                )
                return True
            if (now.mod_revision if now else 0) == expected:
                logger.info("snapshot step %d not committed: a node began a new round", step)
                return False

    # -- recovery -------------------------------------------------------------------------------

    def recover(self, step: int) -> tuple[list[str], list[int]]:
        """Rebuild and adopt the records of step ``step`` whose owners hold them no more.

        Returns (owners rebuilt, ranks adopted). Raises NotEnoughChunksError when an owner's
        payload cannot be rebuilt.
        """
        with self._recover_lock:
            indexes = []
            for endpoint in self._agent_endpoints():
                try:
                    with AgentClient(endpoint, timeout=10.0) as peer:
                        indexes.append((endpoint, peer.snapshot_index()))
                except AgentUnavailableError:
                    continue
            held_ranks = {r.rank for _, index in indexes for r in index.records if r.step == step}
            live = {index.node_id for _, index in indexes}
            rebuilt: list[str] = []
            ranks: list[int] = []
            for owner in self.committed_nodes:
                if owner in live:
                    continue
                sources = [(endpoint, c) for endpoint, index in indexes for c in index.chunks
                           if c.owner == owner and c.step == step]  # fmt: skip
                if not sources:
                    logger.warning(
                        "no chunk of node %s step %d is held by a live agent", owner, step
                    )
                    continue
                payload = self._rebuild_payload(owner, step, sources)
                for entry, data in unpack_payload(payload):
                    if entry.rank in held_ranks:
                        continue
                    self.store.adopt(entry.rank, step, data, entry.meta, entry.checksum)
                    ranks.append(entry.rank)
                rebuilt.append(owner)
                logger.info("rebuilt node %s's snapshot of step %d (ranks %s) from %d chunk(s)",
                            owner, step, ranks, len(sources))  # fmt: skip
            return rebuilt, ranks

    def _rebuild_payload(self, owner: str, step: int, sources) -> np.ndarray:
        header = sources[0][1]
        chunks: dict[int, np.ndarray] = {}
        for endpoint, info in sources:
            if info.index in chunks:
                continue
            data = bytearray(info.chunk_bytes)
            try:
                with AgentClient(endpoint, timeout=30.0) as peer:
                    peer.get_chunk(owner, step, info.index, data)
            except AgentUnavailableError as exc:
                logger.warning(
                    "chunk %d of %s from %s unreadable: %s", info.index, owner, endpoint, exc
                )
                continue
            chunks[info.index] = np.frombuffer(data, dtype=np.uint8)
        if header.redundancy != Redundancy.ERASURE.value:
            for index, chunk in chunks.items():
                if chunk_checksum(chunk) == header.checksums[index]:
                    return chunk[: header.payload_bytes]
            raise CoordinationUnavailableError(f"no intact copy of node {owner}'s step {step}")
        with ErasureCodec(header.k, header.m) as codec:
            return decode_snapshot(codec, chunks, list(header.checksums), header.payload_bytes)

    def memory_bytes(self) -> int:
        return self.store.memory_bytes() + self.chunks.memory_bytes()

    def close(self, save: bool = False) -> None:
        """Stop; with ``save``, first write the committed step to the disk tier and wait."""
        self._queue.put(None)
        self._thread.join(timeout=5)
        if self._checksum_pool is not None:
            self._checksum_pool.shutdown(wait=False)
        for codec in self._codecs.values():
            codec.close()
        self._encode_buffer = None
        if self._disk is not None:
            if save:
                future = self.save_to_disk()
                if future is None and self.disk_error:  # no part of the final state is here
                    logger.info("this node holds no record of the final step: the disk tier's "
                                "earlier failure is superseded (%s)", self.disk_error)
                    self.disk_error = ""
                if future is not None:
                    try:
                        written = future.result(timeout=600)
                        logger.info("snapshot step %d written to %s", written.step, written.path)
                    except Exception as exc:  # kept in disk_error by _disk_written
                        logger.error("writing the final snapshot failed: %s", exc)
                        self.disk_error = self.disk_error or f"{type(exc).__name__}: {exc}"
            self._disk.close()
        self.store.close()
        self.chunks.clear()
