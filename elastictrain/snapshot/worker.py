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
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from elastictrain.constants import MAX_PENDING_SNAPSHOTS, snapshot_threads
from elastictrain.rpc.agent_client import AgentClient, SnapshotRefusedError
from elastictrain.snapshot.checksum import crc32c_parallel
from elastictrain.snapshot.device_copy import (
    CopyPlan,
    CopyTargets,
    InflightCopy,
    LazyCopier,
    StagingDecision,
    copy_host_pieces,
    optimizer_storages,
    plan_copies,
)
from elastictrain.snapshot.layout import (
    StateLayout,
    flatten_state,
    slice_range,
    stream_pieces,
    tensors_by_path,
    unflatten_state,
)
from elastictrain.snapshot.shm import ShmSegment

logger = logging.getLogger(__name__)

ENV_AGENT_ENDPOINT = "ETRAIN_AGENT_ENDPOINT"
ENV_SNAPSHOT_DIR = "ETRAIN_SNAPSHOT_DIR"
_FORMAT = 1
# Segments a worker keeps mapped (and, on GPU, page-locked): the agent rotates a few per rank
# (committed, pending, being written); a mapping of a freed segment would keep its memory.
_MAPPED_SEGMENTS = 2 * MAX_PENDING_SNAPSHOTS + 2


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
        # The checksum and EndSnapshot of step s (after its device copy landed, on GPU) run
        # beside training on one thread, in order: records end in step order.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-end")
        self._pending: deque[Future] = deque()
        self.checksum_threads = snapshot_threads()
        self._checksum_pool = (
            ThreadPoolExecutor(self.checksum_threads - 1, thread_name_prefix="snapshot-crc")
            if self.checksum_threads > 1 and self._client is not None
            else None
        )
        self._copier: LazyCopier | None = None
        self._layout: StateLayout | None = None  # the last one: its entries are reused
        self._plan: tuple[tuple, tuple, CopyPlan] | None = None  # (entries, key, plan)
        self._targets: dict[str, CopyTargets] = {}  # segment name -> where the pieces go
        # page-locking cost, paid when a segment is first used on GPU (reported by benchmarks)
        self.pinned_bytes = 0
        self.pin_seconds = 0.0
        self.staging: StagingDecision | None = None  # the last GPU snapshot's, with its reason
        self._inflight: InflightCopy | None = None
        self._fence_handle = None
        if self._client is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._fence_handle = optimizer.register_step_pre_hook(self._fence_hook)

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

        On CPU the bytes are copied before it returns. On GPU the parameters and optimizer
        state are copied lazily, during the next forward and backward, and the next
        ``optimizer.step()`` waits for that copy on the device; anything else that changes
        them in between must call :meth:`fence` first. Returns False when skipped (not a
        multiple of ``every``, no agent, or the agent refused it).
        """
        if self._client is None or step % self.every:
            return False
        if self.sharded:
            return self._snapshot_sharded(step, data_position)
        layout, tensors = flatten_state(self._replicated_state(), self._layout)
        self._layout = layout
        world, rank = (self.world, self.rank) if self.replicated else (1, 0)
        start, end = slice_range(layout.total_bytes, world, rank)
        rank_blob = self._rank_state(step, data_position)
        nbytes = (end - start) + len(rank_blob)
        segment = self._begin_record(self.rank, step, nbytes)
        if segment is None:
            return False
        buffer = segment.tensor()
        plan = self._copy_plan(layout, tensors, start, end)
        if rank_blob:
            blob = torch.frombuffer(bytearray(rank_blob), dtype=torch.uint8)
            buffer[end - start : nbytes].copy_(blob)
        meta = RecordMeta(_FORMAT, self.rank, self.world, step, start, end, len(rank_blob),
                          layout.encode()).encode()  # fmt: skip
        targets = self._targets.get(segment.name)
        if targets is None:
            targets = self._targets[segment.name] = CopyTargets.of(plan, buffer)
        if not plan.device_bytes:
            copy_host_pieces(plan, targets)
            self._end_record(self.rank, step, meta)
            return True
        device = next(piece.device for _, piece in plan.lazy + plan.staged)
        if self._copier is None:
            self._copier = LazyCopier(device)
        if not segment.pinned:
            started = time.perf_counter()
            segment.pin()
            self.pinned_bytes += segment.size
            self.pin_seconds += time.perf_counter() - started
        copy = self._copier.start(step, plan, targets)
        self.staging = copy.decision
        self._inflight = copy
        self._pending.append(self._finisher.submit(self._end_device, copy, step, meta))
        return True

    def _copy_plan(self, layout: StateLayout, tensors: list[torch.Tensor], start: int,
                   end: int) -> CopyPlan:  # fmt: skip
        """How this rank's slice is copied: kept while the tensors stay where they are (the
        pieces are views of their memory), so a step costs no per-tensor planning."""
        key = (start, end, tuple(t.data_ptr() for t in tensors))
        reusable = all(t.is_contiguous() for t in tensors)  # else pieces are fresh copies
        if not (reusable and self._plan is not None and self._plan[0] is layout.entries
                and self._plan[1] == key):  # fmt: skip
            plan = plan_copies(
                stream_pieces(layout, tensors, start, end), optimizer_storages(self.optimizer)
            )
            self._plan = (layout.entries, key, plan)
            self._targets.clear()
        return self._plan[2]

    def _end_device(self, copy: InflightCopy, step: int, meta: bytes) -> None:
        assert self._copier is not None
        self._copier.wait_done(copy)
        self._client.end_snapshot(self.rank, step, meta)

    def _fence_hook(self, *_args: Any) -> None:
        self.fence()

    def fence(self) -> None:
        """Order the current CUDA stream after the last snapshot's device copy: call before
        changing parameters or optimizer state other than through ``optimizer.step()``
        (which fences by itself). The host does not wait."""
        copy, self._inflight = self._inflight, None
        if copy is not None and self._copier is not None:
            self._copier.fence(copy)

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
        self._drain(keep=MAX_PENDING_SNAPSHOTS - 1)  # the agent keeps that many unended
        try:
            reply = self._client.begin_snapshot(rank, step, nbytes)
        except SnapshotRefusedError as exc:
            logger.warning("rank %d: snapshot of step %d skipped: %s", self.rank, step, exc)
            return None
        return self._segment(reply.segment)

    def _end_record(self, rank: int, step: int, meta: bytes) -> None:
        """Hand the record over beside training (the agent checksums it); in step order."""
        self._pending.append(self._finisher.submit(self._client.end_snapshot, rank, step, meta))

    def _drain(self, keep: int) -> None:
        """Wait until at most ``keep`` snapshots are still being finished (raises their error)."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def wait(self) -> None:
        """Block until every snapshot has been copied and handed to the agent (raises the
        first error)."""
        self._drain(keep=0)

    def _segment(self, name: str) -> ShmSegment:
        """The mapped segment ``name``; only the few most recent stay mapped (the agent frees
        and unlinks old ones, and a mapping would keep their memory alive)."""
        segment = self._segments.pop(name, None)
        if segment is None:
            segment = ShmSegment.attach(name)
        self._segments[name] = segment  # most recently used last
        while len(self._segments) > _MAPPED_SEGMENTS:
            oldest = next(iter(self._segments))
            self._targets.pop(oldest, None)
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
        holders = self._holders(local, step)
        if not self._covers({rank: info.meta for rank, (_, info) in holders.items()}):
            # Some owner is gone: its agent-held records are rebuilt from erasure-coded chunks.
            reply = self._client.recover_snapshot(step)
            logger.info("rank %d: %s", self.rank, reply.message)
            holders = self._holders(self._client.snapshot_index(), step)
        if not holders:
            raise SnapshotCorruptError(f"committed step {step} is held by no live agent")
        opened: list[ShmSegment] = []
        records: dict[int, tuple[str, bytes, Buffer]] = {}
        try:
            if self.sharded:
                lazy = _LazyRecords(
                    lambda r: self._read(*holders[r], opened) if r in holders else None
                )
                try:
                    mine = holders.get(self.rank)
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
        any_meta = RecordMeta.decode(next(iter(records.values()))[1])
        layout = StateLayout.decode(any_meta.layout)
        pieces: list[tuple[int, torch.Tensor]] = []
        covered = 0
        for _rank, (_endpoint, meta_raw, data) in sorted(records.items()):
            meta = RecordMeta.decode(meta_raw)
            if not self.replicated and meta.rank != self.rank:
                continue
            if meta.end > meta.start:
                count = meta.end - meta.start
                pieces.append((meta.start, torch.frombuffer(data, dtype=torch.uint8, count=count)))
            covered += meta.end - meta.start
        if covered < layout.total_bytes:
            raise SnapshotCorruptError(
                f"step {step}: slices cover {covered} of {layout.total_bytes} bytes "
                f"(ranks held: {sorted(records)})"
            )
        into = tensors_by_path(self._replicated_state())
        with torch.no_grad():
            state = unflatten_state(layout, pieces, into=into)
        del pieces
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
                    if self._checksum(data) != checksum:
                        raise SnapshotCorruptError(f"rank {rank} of step {step} in {node_root}")
                    records[rank] = (node_root, meta, data)
            if not self._covers({rank: meta for rank, (_, meta, _) in records.items()}):
                continue
            logger.info("rank %d: restoring step %d from disk %s", self.rank, step, root)
            if self.sharded:
                mine = records.get(self.rank)
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
        restored = Restored(step=step, source=source, sources=sources)
        if own_meta is not None:
            meta = pickle.loads(own_meta)
            restored.world = meta.world
            data = records.get(self.rank)
            blob = bytes(data[meta.blob_offset : meta.blob_offset + meta.blob_bytes])
            if blob:
                rank_state = pickle.loads(blob)
                restore_rng(rank_state["rng"])
                restored.data_position = rank_state["data"]
                restored.extras = rank_state["extras"]
        return restored

    def _covers(self, metas: dict[int, bytes]) -> bool:
        """Whether records (rank -> their description) hold a whole state: every slice of the
        replicated stream, every rank of a sharded one and its DCP metadata, or our own."""
        if not metas:
            return False
        if self.sharded:
            from elastictrain.snapshot.dcp_storage import METADATA_RANK

            if METADATA_RANK not in metas:
                return False
            world = pickle.loads(metas[METADATA_RANK]).world
            return all(rank in metas for rank in range(world))
        if not self.replicated:
            return self.rank in metas
        decoded = [RecordMeta.decode(raw) for raw in metas.values()]
        total = StateLayout.decode(decoded[0].layout).total_bytes
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
            segment = self._segments.get(info.segment)
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
        try:
            self.wait()
        finally:
            self._finisher.shutdown(wait=True)
            if self._checksum_pool is not None:
                self._checksum_pool.shutdown(wait=True)
            if self._fence_handle is not None:
                self._fence_handle.remove()
        self._inflight = None
        self._targets.clear()
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        if self._client is not None:
            self._client.close()
