"""The restoring side of :class:`~elastictrain.snapshot.worker.Snapshotter`.

:class:`SnapshotReader` finds the job's newest committed step on the live agents (asking them
to rebuild lost records from erasure-coded chunks), or else the newest whole step of the disk
tier, verifies every record's checksum and loads it into the snapshotter's objects: replicated
slices straight into the model's tensors, sharded records through DCP. It reads the
snapshotter's settings, objects and mapped segments (a record this worker wrote is read in
place) and owns only what restoring alone needs: the pool that checksums what it reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from elastictrain import safe_pickle
from elastictrain.constants import snapshot_threads
from elastictrain.errors import SnapshotFormatError
from elastictrain.rpc.agent_client import AgentClient
from elastictrain.snapshot.checksum import crc32c_parallel
from elastictrain.snapshot.layout import StateLayout, tensors_by_path, unflatten_state
from elastictrain.snapshot.record_meta import (
    RecordMeta,
    ShardedRecordMeta,
    decode_record_meta,
    restore_rng,
)
from elastictrain.snapshot.shm import ShmSegment

if TYPE_CHECKING:
    from elastictrain.snapshot.worker import Snapshotter

logger = logging.getLogger(__name__)

ENV_SNAPSHOT_DIR = "ETRAIN_SNAPSHOT_DIR"


@dataclass
class Restored:
    step: int
    data_position: Any = None
    extras: Any = None
    world: int = 0
    source: str = "memory"
    sources: dict[int, str] = field(default_factory=dict)  # rank -> agent it was read from


# Record bytes as read: a view of a mapped agent segment, or a buffer streamed over gRPC.
Buffer = memoryview | bytearray


class _LazyRecords:
    """rank -> record bytes, each read on first use (DCP reads only the ranks it needs)."""

    def __init__(self, read: Callable[[int], Buffer | None]) -> None:
        self._read = read
        self._cache: dict[int, Buffer | None] = {}

    def get(self, rank: int) -> Buffer | None:
        if rank not in self._cache:
            self._cache[rank] = self._read(rank)
        return self._cache[rank]

    def clear(self) -> None:
        self._cache.clear()


class SnapshotCorruptError(RuntimeError):
    """A record's bytes do not match its checksum."""


def load_replicated(snap: Snapshotter, layout: StateLayout,
                    pieces: list[tuple[int, torch.Tensor]]) -> None:  # fmt: skip
    """Load a replicated state (its stream's pieces) into the snapshotter's objects: each
    byte copied once, straight into the model's and optimizer's own tensors."""
    into = tensors_by_path(snap._replicated_state())
    with torch.no_grad():
        state = unflatten_state(layout, pieces, into=into)
    if snap.model is not None:
        snap.model.load_state_dict(state["model"])
    if snap.optimizer is not None:
        snap.optimizer.load_state_dict(state["optimizer"])
    if snap.scheduler is not None:
        snap.scheduler.load_state_dict(state["scheduler"])


def apply_rank_state(restored: Restored, blob: bytes) -> None:
    """A rank's blob (RNG states, data position, extras) put back and noted in ``restored``."""
    rank_state = safe_pickle.loads(blob)
    if not (isinstance(rank_state, dict) and {"rng", "data", "extras"} <= rank_state.keys()):
        raise SnapshotFormatError("a rank's blob is not {rng, data, extras}")
    restore_rng(rank_state["rng"])
    restored.data_position = rank_state["data"]
    restored.extras = rank_state["extras"]


class SnapshotReader:
    """Restores ``snap``'s objects; ``client`` is its agent's (None: nothing to restore).

    The snapshotter stays the owner of the objects, the settings (rank, replicated, sharded)
    and the mapped segments; they are read through it at restore time, not copied.
    """

    def __init__(self, snap: Snapshotter, client: AgentClient | None) -> None:
        self._snap = snap
        self._client = client
        self.checksum_threads = snapshot_threads()  # verifying what a restore reads
        self._checksum_pool = (
            ThreadPoolExecutor(self.checksum_threads - 1, thread_name_prefix="snapshot-crc")
            if self.checksum_threads > 1 and self._client is not None
            else None
        )

    def complete_steps(self) -> set[int]:
        """Steps whose records, on the live agents, hold a whole state (the committed one is
        rebuilt from erasure-coded chunks first if its owner is gone)."""
        if self._client is None:
            return set()
        self._snap.wait()
        local = self._client.snapshot_index()
        by_step = self._all_records(local)
        committed = local.committed_step
        if committed >= 0 and not self._covers(by_step.get(committed, {})):
            try:
                reply = self._client.recover_snapshot(committed)
                logger.info("rank %d: %s", self._snap.rank, reply.message)
            except Exception as exc:  # reported; the other steps still count
                logger.warning("rebuilding step %d failed: %s", committed, exc)
            by_step = self._all_records(self._client.snapshot_index())
        return {step for step, metas in by_step.items() if self._covers(metas)}

    def _all_records(self, local) -> dict[int, dict[int, bytes]]:
        """step -> rank -> record description, over every live agent."""
        by_step: dict[int, dict[int, bytes]] = {}
        for endpoint in local.agents:
            index = local if endpoint == self._client.endpoint else self._index_of(endpoint)
            for info in index.records if index is not None else ():
                by_step.setdefault(info.step, {}).setdefault(info.rank, info.meta)
        return by_step

    def restore(self, step: int | None = None) -> Restored | None:
        """See :meth:`Snapshotter.restore`."""
        if self._client is None:
            return None
        self._snap.wait()
        local = self._client.snapshot_index()
        if step is None:
            step = local.committed_step
            if step < 0:
                return self._restore_from_disk()
        holders = self._holders(local, step)
        if not self._covers({rank: info.meta for rank, (_, info) in holders.items()}):
            # Some owner is gone: its agent-held records are rebuilt from erasure-coded chunks.
            reply = self._client.recover_snapshot(step)
            logger.info("rank %d: %s", self._snap.rank, reply.message)
            holders = self._holders(self._client.snapshot_index(), step)
        if not self._covers({rank: info.meta for rank, (_, info) in holders.items()}):
            raise SnapshotCorruptError(f"step {step} is not whole on the live agents")
        opened: list[ShmSegment] = []
        records: dict[int, tuple[str, bytes, Buffer]] = {}
        try:
            if self._snap.sharded:
                lazy = _LazyRecords(
                    lambda r: self._read(*holders[r], opened) if r in holders else None
                )
                try:
                    mine = holders.get(self._snap.rank)
                    return self._restore_sharded(
                        step, lazy, mine[1].meta if mine else None,
                        {r: e for r, (e, _) in holders.items()}, "memory",
                    )  # fmt: skip
                finally:
                    lazy.clear()
            for rank, (endpoint, info) in holders.items():
                records[rank] = (endpoint, info.meta, self._read(endpoint, info, opened))
            return self._load(step, records, source="memory")
        finally:
            records.clear()  # drop the views before unmapping
            for segment in opened:
                segment.close()

    def _load(self, step: int, records: dict[int, tuple[str, bytes, Buffer]], source: str):
        """Load the state from rank records (rank -> (source, meta, bytes)): each slice is
        copied once, straight into the model's tensors or new ones on their devices."""
        snap = self._snap
        any_meta = RecordMeta.decode(next(iter(records.values()))[1])
        layout = any_meta.state_layout
        pieces: list[tuple[int, torch.Tensor]] = []
        covered = 0
        for _rank, (_endpoint, meta_raw, data) in sorted(records.items()):
            meta = RecordMeta.decode(meta_raw)
            if not snap.replicated and meta.rank != snap.rank:
                continue
            if meta.end - meta.start + meta.rank_bytes > len(data):
                raise SnapshotCorruptError(f"step {step}: rank {meta.rank}'s record is "
                                           f"{len(data)} bytes, shorter than its description")
            if meta.end > meta.start:
                count = meta.end - meta.start
                pieces.append((meta.start, torch.frombuffer(data, dtype=torch.uint8, count=count)))
            covered += meta.end - meta.start
        if covered < layout.total_bytes:
            raise SnapshotCorruptError(
                f"step {step}: slices cover {covered} of {layout.total_bytes} bytes "
                f"(ranks held: {sorted(records)})"
            )
        load_replicated(snap, layout, pieces)
        del pieces
        restored = Restored(step=step, world=any_meta.world, source=source,
                            sources={r: e for r, (e, _, _) in records.items()})  # fmt: skip
        mine = records.get(snap.rank)
        if mine is not None:
            meta = RecordMeta.decode(mine[1])
            blob = bytes(mine[2][meta.end - meta.start : meta.end - meta.start + meta.rank_bytes])
            apply_rank_state(restored, blob)
        return restored

    def _restore_from_disk(self) -> Restored | None:
        """The newest disk-tier step whose node directories hold every rank's record."""
        root = os.environ.get(ENV_SNAPSHOT_DIR)
        if not root or not os.path.isdir(root):
            return None
        from elastictrain.snapshot.disk import list_snapshots, read_snapshot
        from elastictrain.snapshot.disk_records import from_disk_records

        by_step: dict[int, list[str]] = {}
        for node_dir in sorted((p for p in os.scandir(root) if p.is_dir()), key=lambda p: p.name):
            for info in list_snapshots(node_dir.path):
                by_step.setdefault(info.step, []).append(node_dir.path)
        for step in sorted(by_step, reverse=True):
            records: dict[int, tuple[str, bytes, bytearray]] = {}
            for node_root in by_step[step]:
                _manifest, restored = read_snapshot(node_root, step)
                for rank, (meta, checksum, data) in from_disk_records(restored.values()).items():
                    if self._checksum(data) != checksum:
                        raise SnapshotCorruptError(f"rank {rank} of step {step} in {node_root}")
                    records[rank] = (node_root, meta, data)
            if not self._covers({rank: meta for rank, (_, meta, _) in records.items()}):
                continue
            logger.info("rank %d: restoring step %d from disk %s", self._snap.rank, step, root)
            if self._snap.sharded:
                mine = records.get(self._snap.rank)
                return self._restore_sharded(
                    step, {rank: data for rank, (_, _, data) in records.items()},
                    mine[1] if mine else None,
                    {rank: where for rank, (where, _, _) in records.items()}, "disk",
                )  # fmt: skip
            return self._load(step, records, source="disk")
        return None

    def _holders(self, local, step: int) -> dict[int, tuple[str, Any]]:
        """rank -> (agent endpoint, record info) for the records of ``step`` on live agents."""
        holders: dict[int, tuple[str, Any]] = {}
        for endpoint in local.agents:
            index = local if endpoint == self._client.endpoint else self._index_of(endpoint)
            if index is None:
                continue
            for info in index.records:
                if info.step == step:
                    holders.setdefault(info.rank, (endpoint, info))
        return holders

    def _restore_sharded(self, step: int, records: Any, own_meta: bytes | None,
                         sources: dict[int, str], source: str) -> Restored:  # fmt: skip
        """Load sharded state with DCP from ``records`` (``.get(rank)`` -> bytes)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from elastictrain.snapshot.dcp_storage import AgentStorageReader

        snap = self._snap
        state = snap._sharded_state()
        dcp.load(state, storage_reader=AgentStorageReader(step, records))
        set_state_dict(
            snap.model,
            snap.optimizer if snap.optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        if snap.scheduler is not None:
            snap.scheduler.load_state_dict(state["scheduler"])
        restored = Restored(step=step, source=source, sources=sources)
        if own_meta is not None:
            meta = decode_record_meta(own_meta)
            restored.world = meta.world
            data = records.get(snap.rank)
            if isinstance(meta, ShardedRecordMeta) and data is not None and meta.blob_bytes:
                apply_rank_state(restored, bytes(
                    data[meta.blob_offset : meta.blob_offset + meta.blob_bytes]))  # fmt: skip
        return restored

    def _covers(self, metas: dict[int, bytes]) -> bool:
        """Whether records (rank -> their description) hold a whole state: every slice of the
        replicated stream, every rank of a sharded one and its DCP metadata, or our own."""
        if not metas:
            return False
        if self._snap.sharded:
            from elastictrain.snapshot.dcp_storage import METADATA_RANK

            if METADATA_RANK not in metas:
                return False
            world = decode_record_meta(metas[METADATA_RANK]).world
            return all(rank in metas for rank in range(world))
        if not self._snap.replicated:
            return self._snap.rank in metas
        decoded = [RecordMeta.decode(raw) for raw in metas.values()]
        total = decoded[0].state_layout.total_bytes
        return sum(m.end - m.start for m in decoded) >= total and len(metas) >= decoded[0].world

    def _index_of(self, endpoint: str):
        try:
            with AgentClient(endpoint, timeout=10.0) as peer:
                return peer.snapshot_index()
        except Exception as exc:  # a peer that died since is simply not a source
            logger.warning("agent %s gave no snapshot index: %s", endpoint, exc)
            return None

    def _read(self, endpoint: str, info, opened: list[ShmSegment] | None = None) -> Buffer:
        """A record's bytes, checksum verified: mapped straight from the local agent's segment
        (appended to ``opened``, for the caller to close), else streamed over gRPC."""
        if endpoint == self._client.endpoint and info.segment and opened is not None:
            # one this worker wrote is still mapped (and page-locked on GPU: fast to load)
            segment = self._snap._segments.get(info.segment)
            try:
                if segment is None:
                    segment = ShmSegment.attach(info.segment)
                    opened.append(segment)
            except OSError as exc:
                logger.debug("segment %s not mapped (%s); reading over gRPC", info.segment, exc)
            else:
                if segment.size >= info.nbytes:
                    view = segment.view(0, info.nbytes)
                    if self._checksum(view) == info.checksum:
                        return view
                    view.release()
                logger.warning("rank %d step %d: segment %s changed; reading over gRPC",
                               info.rank, info.step, info.segment)  # fmt: skip
        data = bytearray(info.nbytes)
        if endpoint == self._client.endpoint:
            n = self._client.read_snapshot(info.rank, info.step, data)
        else:
            with AgentClient(endpoint, timeout=30.0) as peer:
                n = peer.read_snapshot(info.rank, info.step, data)
        if n != info.nbytes or self._checksum(data) != info.checksum:
            raise SnapshotCorruptError(
                f"record of rank {info.rank} step {info.step} from {endpoint} is corrupt"
            )
        return data

    def _checksum(self, data: Buffer) -> int:
        return crc32c_parallel(data, self._checksum_pool, self.checksum_threads)

    def close(self) -> None:
        """Stop the checksum pool (the client is the snapshotter's to close)."""
        if self._checksum_pool is not None:
            self._checksum_pool.shutdown(wait=True)
