"""The training script's side of snapshots.

::

    snap = Snapshotter(model=model, optimizer=opt, scheduler=sched)
    restored = snap.restore()               # None on a fresh start
    start = restored.step + 1 if restored else 0
    for step in range(start, steps):
        ...; opt.step(); sched.step()
        snap.snapshot(step, data_position={"epoch": e, "index": i})

What is snapshotted: the model's and optimizer's (and scheduler's) state dicts, which DDP keeps
identical on every rank (*replicated*: each rank copies only its slice), and per rank the step,
the data position, the RNG states (torch CPU and CUDA, Python, NumPy) and user extras. The
bytes go straight into a shared-memory segment that the node's agent owns, so a worker crash
loses nothing already snapshotted. Without an agent (``ETRAIN_AGENT_ENDPOINT`` unset) it is a
no-op and ``restore()`` returns None, so a script runs under plain torchrun too.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from elastictrain.rpc.agent_client import AgentClient, SnapshotRefusedError
from elastictrain.snapshot.erasure import chunk_checksum as record_checksum
from elastictrain.snapshot.layout import (
    StateLayout,
    copy_slice,
    flatten_state,
    slice_range,
    unflatten_state,
)
from elastictrain.snapshot.shm import ShmSegment

logger = logging.getLogger(__name__)

ENV_AGENT_ENDPOINT = "ETRAIN_AGENT_ENDPOINT"
ENV_SNAPSHOT_DIR = "ETRAIN_SNAPSHOT_DIR"
_FORMAT = 1
_MAPPED_SEGMENTS = 4


@dataclass(frozen=True)
class RecordMeta:
    """What a rank's record holds, stored beside it by the agent."""

    format: int
    rank: int
    world: int
    step: int
    start: int  # slice of the replicated stream
    end: int
    rank_bytes: int  # the per-rank blob that follows the slice
    layout: bytes  # StateLayout.encode()

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def decode(raw: bytes) -> RecordMeta:
        meta = pickle.loads(raw)
        if not isinstance(meta, RecordMeta) or meta.format != _FORMAT:
            raise ValueError("unknown snapshot record format")
        return meta


@dataclass
class Restored:
    step: int
    data_position: Any = None
    extras: Any = None
    world: int = 0
    source: str = "memory"
    sources: dict[int, str] = field(default_factory=dict)  # rank -> agent it was read from


class _LazyRecords:
    """rank -> record bytes, each read from its agent on first use (DCP reads only some)."""

    def __init__(self, snapshotter: Snapshotter, holders: dict[int, tuple[str, Any]]) -> None:
        self._snap = snapshotter
        self._holders = holders
        self._cache: dict[int, bytearray] = {}

    def get(self, rank: int) -> bytearray | None:
        if rank not in self._cache:
            held = self._holders.get(rank)
            if held is None:
                return None
            self._cache[rank] = self._snap._read(*held)
        return self._cache[rank]


class SnapshotCorruptError(RuntimeError):
    """A record's bytes do not match its checksum."""


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and "numpy" in sys.modules:
        sys.modules["numpy"].random.set_state(state["numpy"])


class Snapshotter:
    """Takes per-step snapshots into the agent's memory and restores from them.

    Args:
        model, optimizer, scheduler: objects with ``state_dict()``/``load_state_dict()``
            (a DDP-wrapped model is fine: its ``module`` is used).
        extras: a picklable object, or a callable returning one, kept per rank.
        every: snapshot every N steps (``snapshot()`` skips the others).
        replicated: the model/optimizer state is identical on all ranks (DDP), so each rank
            keeps 1/world of it. Set False to keep each rank's whole state.
        sharded: the state is sharded (FSDP2/DTensor): it goes through
            ``torch.distributed.checkpoint`` (``snapshot`` and ``restore`` become collective
            calls) and can be restored into another world size.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extras: Any | Callable[[], Any] = None,
        *,
        every: int = 1,
        replicated: bool = True,
        sharded: bool = False,
        rank: int | None = None,
        world: int | None = None,
        agent: str | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model = getattr(model, "module", model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extras = extras
        self.every = every
        self.replicated = replicated and not sharded
        self.sharded = sharded
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
        endpoint = agent or os.environ.get(ENV_AGENT_ENDPOINT)
        self._client = AgentClient(endpoint, timeout=30.0) if endpoint else None
        self._segments: dict[str, ShmSegment] = {}
        # The checksum and EndSnapshot of step s run beside training (ISA-L's CRC releases the
        # GIL); step s+1 waits for them first, so records end in order.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-end")
        self._pending: Future | None = None

    @property
    def enabled(self) -> bool:
        return self._client is not None

    # -- taking --------------------------------------------------------------------------------

    def _replicated_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.model is not None:
            state["model"] = self.model.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def _rank_state(self, step: int, data_position: Any) -> bytes:
        extras = self.extras() if callable(self.extras) else self.extras
        state = {"step": step, "data": data_position, "rng": capture_rng(), "extras": extras}
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    def snapshot(self, step: int, data_position: Any = None) -> bool:
        """Snapshot the state after ``step`` (call after ``optimizer.step()``).

        Returns False when skipped (not a multiple of ``every``, or no agent).
        """
        if self._client is None or step % self.every:
            return False
        if self.sharded:
            return self._snapshot_sharded(step, data_position)
        layout, tensors = flatten_state(self._replicated_state())
        world, rank = (self.world, self.rank) if self.replicated else (1, 0)
        start, end = slice_range(layout.total_bytes, world, rank)
        rank_blob = self._rank_state(step, data_position)
        nbytes = (end - start) + len(rank_blob)
        segment = self._begin_record(self.rank, step, nbytes)
        if segment is None:
            return False
        buffer = segment.tensor()
        copy_slice(layout, tensors, start, end, buffer[: end - start])
        if rank_blob:
            blob = torch.frombuffer(bytearray(rank_blob), dtype=torch.uint8)
            buffer[end - start : nbytes].copy_(blob)
        meta = RecordMeta(_FORMAT, self.rank, self.world, step, start, end, len(rank_blob),
                          layout.encode())  # fmt: skip
        self._end_record(segment, self.rank, step, nbytes, meta.encode())
        return True

    def _snapshot_sharded(self, step: int, data_position: Any) -> bool:
        """DTensor/FSDP2 state through DCP into this rank's record (a collective call)."""
        import torch.distributed.checkpoint as dcp

        from elastictrain.snapshot.dcp_storage import AgentStorageWriter

        writer = AgentStorageWriter(self, step, self._rank_state(step, data_position))
        dcp.save(self._sharded_state(), storage_writer=writer)
        return True

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(
            self.model, self.optimizer if self.optimizer is not None else []
        )
        state: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def _begin_record(self, rank: int, step: int, nbytes: int) -> ShmSegment | None:
        """A mapped segment for (rank, step) from the agent, or None if it refused."""
        self.wait()
        try:
            reply = self._client.begin_snapshot(rank, step, nbytes)
        except SnapshotRefusedError as exc:
            logger.warning("rank %d: snapshot of step %d skipped: %s", self.rank, step, exc)
            return None
        return self._segment(reply.segment)

    def _end_record(self, segment: ShmSegment, rank: int, step: int, nbytes: int,
                    meta: bytes) -> None:  # fmt: skip
        """Checksum and hand over the record beside training; records end in order."""
        self._pending = self._finisher.submit(self._end, segment, rank, step, nbytes, meta)

    def _end(self, segment: ShmSegment, rank: int, step: int, nbytes: int, meta: bytes) -> None:
        checksum = record_checksum(segment.view(0, nbytes))
        self._client.end_snapshot(rank, step, meta, checksum)

    def wait(self) -> None:
        """Block until the last snapshot has been handed to the agent (raises its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _segment(self, name: str) -> ShmSegment:
        """The mapped segment ``name``; only the few most recent stay mapped (the agent frees
        and unlinks old ones, and a mapping would keep their memory alive)."""
        segment = self._segments.pop(name, None)
        if segment is None:
            segment = ShmSegment.attach(name)
        self._segments[name] = segment  # most recently used last
        while len(self._segments) > _MAPPED_SEGMENTS:
            oldest = next(iter(self._segments))
            self._segments.pop(oldest).close()
        return segment

    # -- restoring ------------------------------------------------------------------------------

    def restore(self) -> Restored | None:
        """Load the job's newest committed snapshot into the registered objects.

        Returns None when there is none (a fresh start). Reads every rank's slice from the
        agent that holds it; the world size may differ from the one that took the snapshot.
        """
        if self._client is None:
            return None
        self.wait()
        local = self._client.snapshot_index()
        step = local.committed_step
        if step < 0:
            return self._restore_from_disk()
        if self.sharded and step < 0:
            return None  # the disk tier holds replicated records only, for now
        holders = self._holders(local, step)
        if not self._covers(holders):
            # Some owner is gone: its agent-held records are rebuilt from erasure-coded chunks.
            reply = self._client.recover_snapshot(step)
            logger.info("rank %d: %s", self.rank, reply.message)
            holders = self._holders(self._client.snapshot_index(), step)
        if not holders:
            raise SnapshotCorruptError(f"committed step {step} is held by no live agent")
        if self.sharded:
            return self._restore_sharded(step, holders)
        records = {
            rank: (endpoint, info.meta, self._read(endpoint, info))
            for rank, (endpoint, info) in holders.items()
        }
        return self._load(step, records, source="memory")

    def _load(self, step: int, records: dict[int, tuple[str, bytes, bytearray]], source: str):
        """Assemble the stream from rank records (rank -> (source, meta, bytes)) and load it."""
        any_meta = RecordMeta.decode(next(iter(records.values()))[1])
        layout = StateLayout.decode(any_meta.layout)
        stream = torch.zeros(layout.total_bytes, dtype=torch.uint8)
        covered = 0
        for _rank, (_endpoint, meta_raw, data) in sorted(records.items()):
            meta = RecordMeta.decode(meta_raw)
            if not self.replicated and meta.rank != self.rank:
                continue
            if meta.end > meta.start:
                piece = torch.frombuffer(data, dtype=torch.uint8, count=meta.end - meta.start)
                stream[meta.start : meta.end] = piece
            covered += meta.end - meta.start
        if covered < layout.total_bytes:
            raise SnapshotCorruptError(
                f"step {step}: slices cover {covered} of {layout.total_bytes} bytes "
                f"(ranks held: {sorted(records)})"
            )
        state = unflatten_state(layout, stream)
        if self.model is not None:
            self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        restored = Restored(step=step, world=any_meta.world, source=source,
                            sources={r: e for r, (e, _, _) in records.items()})  # fmt: skip
        mine = records.get(self.rank)
        if mine is not None:
            meta = RecordMeta.decode(mine[1])
            blob = bytes(mine[2][meta.end - meta.start : meta.end - meta.start + meta.rank_bytes])
            rank_state = pickle.loads(blob)
            restore_rng(rank_state["rng"])
            restored.data_position = rank_state["data"]
            restored.extras = rank_state["extras"]
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
                    if record_checksum(data) != checksum:
                        raise SnapshotCorruptError(f"rank {rank} of step {step} in {node_root}")
                    records[rank] = (node_root, meta, data)
            if records and self._disk_records_cover(records):
                logger.info("rank %d: restoring step %d from disk %s", self.rank, step, root)
                return self._load(step, records, source="disk")
        return None

    def _disk_records_cover(self, records: dict[int, tuple[str, bytes, bytearray]]) -> bool:
        metas = [RecordMeta.decode(meta) for _, meta, _ in records.values()]
        return len({m.rank for m in metas}) >= metas[0].world

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

    def _restore_sharded(self, step: int, holders: dict[int, tuple[str, Any]]) -> Restored:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from elastictrain.snapshot.dcp_storage import AgentStorageReader

        records = _LazyRecords(self, holders)
        state = self._sharded_state()
        dcp.load(state, storage_reader=AgentStorageReader(step, records))
        set_state_dict(
            self.model,
            self.optimizer if self.optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        restored = Restored(step=step, source="memory",
                            sources={r: e for r, (e, _) in holders.items()})  # fmt: skip
        mine = holders.get(self.rank)
        if mine is not None:
            meta = pickle.loads(mine[1].meta)
            restored.world = meta.world
            data = records.get(self.rank)
            blob = bytes(data[meta.blob_offset : meta.blob_offset + meta.blob_bytes])
            if blob:
                rank_state = pickle.loads(blob)
                restore_rng(rank_state["rng"])
                restored.data_position = rank_state["data"]
                restored.extras = rank_state["extras"]
        return restored

    def _covers(self, holders: dict[int, tuple[str, Any]]) -> bool:
        """Whether the records cover the whole replicated stream (or hold our own state)."""
        if not holders:
            return False
        if self.sharded:
            from elastictrain.snapshot.dcp_storage import METADATA_RANK

            if METADATA_RANK not in holders:
                return False
            world = pickle.loads(holders[METADATA_RANK][1].meta).world
            return all(rank in holders for rank in range(world))
        if not self.replicated:
            return self.rank in holders
        metas = [RecordMeta.decode(info.meta) for _, info in holders.values()]
        total = StateLayout.decode(metas[0].layout).total_bytes
        return sum(m.end - m.start for m in metas) >= total and len(holders) >= metas[0].world

    def _index_of(self, endpoint: str):
        try:
            with AgentClient(endpoint, timeout=10.0) as peer:
                return peer.snapshot_index()
        except Exception as exc:  # a peer that died since is simply not a source
            logger.warning("agent %s gave no snapshot index: %s", endpoint, exc)
            return None

    def _read(self, endpoint: str, info) -> bytearray:
        data = bytearray(info.nbytes)
        if endpoint == self._client.endpoint:
            n = self._client.read_snapshot(info.rank, info.step, data)
        else:
            with AgentClient(endpoint, timeout=30.0) as peer:
                n = peer.read_snapshot(info.rank, info.step, data)
        if n != info.nbytes or record_checksum(data) != info.checksum:
            raise SnapshotCorruptError(
                f"record of rank {info.rank} step {info.step} from {endpoint} is corrupt"
            )
        return data

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._finisher.shutdown(wait=True)
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        if self._client is not None:
            self._client.close()
