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
no-op and ``restore()`` returns None, so a script runs under plain torchrun too. Restoring is
in :mod:`elastictrain.snapshot.restore`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from elastictrain import safe_pickle
from elastictrain.constants import ENV_DEVICE_MIRROR, MAX_PENDING_SNAPSHOTS, MIRROR_POLL_S
from elastictrain.rpc.agent_client import AgentClient, SnapshotRefusedError
from elastictrain.session import protocol as session_protocol
from elastictrain.session.client import SessionRequestError, WorkerSession, worker_session
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
from elastictrain.snapshot.device_mirror import (
    MirrorError,
    MirrorOffer,
    MirrorSlots,
    SlotWriter,
    device_uuid,
    read_newest,
    slot_step,
)
from elastictrain.snapshot.layout import StateLayout, flatten_state, slice_range, stream_pieces
from elastictrain.snapshot.record_meta import RecordMeta, capture_rng
from elastictrain.snapshot.record_meta import restore_rng as restore_rng  # re-exported
from elastictrain.snapshot.restore import ENV_SNAPSHOT_DIR as ENV_SNAPSHOT_DIR  # re-exported
from elastictrain.snapshot.restore import (
    Restored,
    SnapshotReader,
    apply_rank_state,
    load_replicated,
)
from elastictrain.snapshot.restore import SnapshotCorruptError as SnapshotCorruptError
from elastictrain.snapshot.shm import ShmSegment

logger = logging.getLogger(__name__)

ENV_AGENT_ENDPOINT = "ETRAIN_AGENT_ENDPOINT"
# Segments a worker keeps mapped (and, on GPU, page-locked): the agent rotates a few per rank
# (committed, pending, being written); a mapping of a freed segment would keep its memory.
_MAPPED_SEGMENTS = 2 * MAX_PENDING_SNAPSHOTS + 2


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
        # records begin and end over the worker's session with its own agent, when it has one
        self._session = worker_session() if self._client is not None and agent is None else None
        if self._session is not None:
            self._session.attach(session_protocol.MODE_SNAPSHOT)
        self._segments: dict[str, ShmSegment] = {}
        # EndSnapshot of step s (on GPU, once its copy has landed) runs beside training on one
        # thread, in order: records end in step order. The agent checksums them.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-end")
        self._pending: deque[Future] = deque()
        self._reader = SnapshotReader(self, self._client)
        self._copier: LazyCopier | None = None
        self._layout: StateLayout | None = None  # the last one: its entries are reused
        self._plan: tuple[tuple, tuple, CopyPlan] | None = None  # (entries, key, plan)
        self._targets: dict[str, CopyTargets] = {}  # segment name -> where the pieces go
        # page-locking cost, paid when a segment is first used on GPU (reported by benchmarks)
        self.pinned_bytes = 0
        self.pin_seconds = 0.0
        self.staging: StagingDecision | None = None  # the last GPU snapshot's, with its reason
        self._inflight: InflightCopy | None = None
        # device mirrors (``ETRAIN_DEVICE_MIRROR``): the slots a worker writes every step, the
        # slots a hot spare holds for it
        self._mirror_feed: tuple[MirrorSlots, SlotWriter] | None = None
        self._mirror_held: MirrorSlots | None = None
        self._mirror_spent: MirrorSlots | None = None  # loaded, to free after the first step
        self._mirror_polled = float("-inf")
        self._fence_handle = None
        if self._client is not None and hasattr(optimizer, "register_step_pre_hook"):
            self._fence_handle = optimizer.register_step_pre_hook(self._fence_hook)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    @property
    def session(self) -> WorkerSession | None:
        """The worker's session with its agent (None without one)."""
        return self._session

    @property
    def checksum_threads(self) -> int:
        """Threads that verify what a restore reads."""
        return self._reader.checksum_threads

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
        return safe_pickle.dumps_inline(state)

    def snapshot(self, step: int, data_position: Any = None) -> bool:
        """Snapshot the state after ``step`` (call after ``optimizer.step()``).

        On CPU the bytes are copied before it returns. On GPU the parameters and optimizer
        state are copied lazily, during the next forward and backward, and the next
        ``optimizer.step()`` waits for that copy on the device; anything else that changes
        them in between must call :meth:`fence` first. Returns False when skipped (not a
        multiple of ``every``, no agent, or the agent refused it). Records are taken only by a
        worker with a session with its own agent (one ``etrain launch`` started); with an
        explicit ``agent`` endpoint a snapshotter only restores.
        """
        if self._session is None:
            return False
        self._session.progress(step)
        mirrored = self._mirror_feed is not None and not self.sharded
        if step % self.every and not mirrored:
            return False
        if self.sharded:
            return self._snapshot_sharded(step, data_position)
        layout, tensors = flatten_state(self._replicated_state(), self._layout)
        self._layout = layout
        rank_blob = self._rank_state(step, data_position)
        if mirrored:
            assert self._mirror_feed is not None
            self._mirror_feed[1].write(step, layout, tensors, rank_blob,
                                       lambda: optimizer_storages(self.optimizer))  # fmt: skip
        if step % self.every:
            return False
        world, rank = (self.world, self.rank) if self.replicated else (1, 0)
        start, end = slice_range(layout.total_bytes, world, rank)
        nbytes = (end - start) + len(rank_blob)
        segment = self._begin_record(self.rank, step, nbytes)
        if segment is None:
            return False
        buffer = segment.tensor()
        plan = self._copy_plan(layout, tensors, start, end)
        if rank_blob:
            blob = torch.frombuffer(bytearray(rank_blob), dtype=torch.uint8)
            buffer[end - start : nbytes].copy_(blob)
        meta = RecordMeta(self.rank, self.world, step, start, end, len(rank_blob),
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
            logger.debug("rank %d: new copy plan: %s", self.rank, plan.reason)
        return self._plan[2]

    def _end_device(self, copy: InflightCopy, step: int, meta: bytes) -> None:
        assert self._copier is not None
        self._copier.wait_done(copy)
        self._end(self.rank, step, meta)

    def _fence_hook(self, *_args: Any) -> None:
        self.fence()

    def fence(self) -> None:
        """Order the current CUDA stream after the last snapshot's device copy: call before
        changing parameters or optimizer state other than through ``optimizer.step()``
        (which fences by itself). The host does not wait."""
        copy, self._inflight = self._inflight, None
        if copy is not None and self._copier is not None:
            self._copier.fence(copy)
        if self._mirror_feed is not None:
            self._mirror_feed[1].fence()

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
            name = self._begin(rank, step, nbytes)
        except SnapshotRefusedError as exc:
            logger.warning("rank %d: snapshot of step %d skipped: %s", self.rank, step, exc)
            return None
        return self._segment(name)

    def _begin(self, rank: int, step: int, nbytes: int) -> str:
        """The agent's segment for (rank, step); SnapshotRefusedError if it refuses."""
        if self._session is None:
            raise SnapshotRefusedError("no worker session: records begin only over it")
        try:
            reply = self._session.call("begin_snapshot", rank=rank, step=step, nbytes=nbytes)
        except SessionRequestError as exc:
            if exc.kind == "SnapshotError":
                raise SnapshotRefusedError(str(exc)) from exc
            raise
        return str(reply["segment"])

    def _end(self, rank: int, step: int, meta: bytes) -> None:
        if self._session is None:
            raise SnapshotRefusedError("no worker session: records end only over it")
        try:
            self._session.call("end_snapshot", rank=rank, step=step,
                               meta=session_protocol.b64(meta))  # fmt: skip
        except SessionRequestError as exc:
            if exc.kind != "SnapshotError":
                raise
            # refused (a world change moved this rank meanwhile, say): that step is not kept
            logger.warning("rank %d: snapshot of step %d not kept: %s", self.rank, step, exc)

    def _end_record(self, rank: int, step: int, meta: bytes) -> None:
        """Hand the record over beside training (the agent checksums it); in step order."""
        self._pending.append(self._finisher.submit(self._end, rank, step, meta))

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

    def premap(self, device: torch.device) -> int:
        """A hot spare, ahead of its restore: map this node's snapshot segments and, for a
        CUDA ``device``, page-lock them (seconds for many GB: never on the recovery path), so
        the restore copies from pinned memory. Returns the bytes mapped."""
        if self._session is None:
            return 0
        names = self._session.call("snapshot_segments")["segments"][:_MAPPED_SEGMENTS]
        for stale in [n for n in self._segments if n not in names]:  # freed by the agent
            self._targets.pop(stale, None)
            self._segments.pop(stale).close()
        mapped = 0
        for name in names:
            try:
                segment = self._segments.get(name) or ShmSegment.attach(name)
            except OSError:  # freed meanwhile
                continue
            self._segments[name] = segment
            if device.type == "cuda" and not segment.pinned:
                started = time.perf_counter()
                segment.pin()
                self.pinned_bytes += segment.size
                self.pin_seconds += time.perf_counter() - started
            mapped += segment.size
        return mapped

    # -- device mirrors -------------------------------------------------------------------------

    @staticmethod
    def mirrors_enabled(device: torch.device) -> bool:
        """Whether this job keeps device mirrors (``etrain launch --device-mirror``, CUDA)."""
        return device.type == "cuda" and os.environ.get(ENV_DEVICE_MIRROR) == "1"

    def offer_mirror(self, device: torch.device) -> int:
        """A hot spare: allocate two slots for this state on ``device`` and offer them, through
        the agent, to the worker on the same GPU. Returns the bytes allocated (0: none)."""
        if self._session is None or not self.mirrors_enabled(device) or self.sharded:
            return 0
        layout, _ = flatten_state(self._replicated_state(), self._layout)
        try:
            held = MirrorSlots.allocate(layout.total_bytes, device)
        except MirrorError as exc:
            logger.warning("no device mirror: %s", exc)
            return 0
        try:
            self._session.call("offer_mirror", offer=held.offer.to_json())
        except Exception:
            held.close()
            raise
        self._mirror_held = held
        return held.offer.slot_bytes * len(held.offer.handles)

    def wait_mirror(self, timeout: float) -> bool:
        """A hot spare: wait until its worker has written a whole step into the mirror (it
        claims it within a few seconds of the offer). False if none came in time; True at once
        without a mirror."""
        held = self._mirror_held
        if held is None:
            return True
        deadline = time.monotonic() + timeout
        while not any(slot_step(slot) >= 0 for slot in held.tensors):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def poll_mirror(self, device: torch.device) -> None:
        """A worker, at a step boundary: every few seconds, ask the agent which spare's
        mirror to write into (none: stop writing)."""
        if self._session is None or not self.mirrors_enabled(device) or self.sharded:
            return
        now = time.monotonic()
        if now - self._mirror_polled < MIRROR_POLL_S:
            return
        self._mirror_polled = now
        try:
            raw = self._session.call("claim_mirror", device=device_uuid(device)).get("offer")
            offer = MirrorOffer.from_json(raw) if raw is not None else None
        except (SessionRequestError, MirrorError) as exc:
            logger.warning("rank %d: no device mirror: %s", self.rank, exc)
            offer = None
        feed = self._mirror_feed
        if feed is not None and feed[0].offer == offer:
            return
        self._close_feed()
        if offer is None:
            return
        try:
            slots = MirrorSlots.open(offer, device)
        except MirrorError as exc:
            logger.warning("rank %d: the spare's device mirror did not open: %s", self.rank, exc)
            return
        self._mirror_feed = (slots, SlotWriter(slots.tensors))
        logger.info("rank %d: writing a device mirror every step (2 x %.2f GB)", self.rank,
                    offer.slot_bytes / 1e9)  # fmt: skip

    def _close_feed(self) -> None:
        feed, self._mirror_feed = self._mirror_feed, None
        if feed is not None:
            feed[1].synchronize()
            feed[0].close()

    def restore_mirror(self) -> Restored | None:
        """A hot spare named in a world: load the newest whole step of the mirror it held
        into its own objects (None: it held none, or none whole). Once no live worker writes
        into them, the slots are freed by :meth:`release_spent_mirror` (freeing 20 GB waits
        for the device: not on the recovery path)."""
        held = self._mirror_held
        if held is None or self._session is None:
            return None
        reply = self._session.call("withdraw_mirror")
        restored: Restored | None = None
        try:
            state = read_newest(held.tensors)
            if state is not None:
                load_replicated(self, state.layout, state.pieces)
                torch.cuda.synchronize(held.memory[0].device)
                if slot_step(held.tensors[state.slot]) != state.step:  # a live writer
                    raise MirrorError(f"slot {state.slot} was overwritten while it was loaded")
                restored = Restored(step=state.step, source="device mirror")
                if state.blob:
                    apply_rank_state(restored, state.blob)
        except MirrorError as exc:
            logger.warning("the device mirror could not be loaded: %s", exc)
            restored = None
        if not reply.get("feeder_alive"):
            self._mirror_spent, self._mirror_held = held, None
        return restored

    def release_spent_mirror(self) -> None:
        """Free the slots of a mirror that was loaded (after the first step that followed)."""
        spent, self._mirror_spent = self._mirror_spent, None
        if spent is not None:
            spent.close()

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> Restored | None:
        """Load the job's newest committed snapshot (or ``step``, committed or not, if it is
        whole on the live agents) into the registered objects.

        Returns None when there is none (a fresh start). Reads every rank's slice from the
        agent that holds it; the world size may differ from the one that took the snapshot.
        """
        return self._reader.restore(step)

    def complete_steps(self) -> set[int]:
        """Steps that :meth:`restore` can load now (whole on the live agents)."""
        return self._reader.complete_steps()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._finisher.shutdown(wait=True)
            self._reader.close()
            if self._fence_handle is not None:
                self._fence_handle.remove()
        self._inflight = None
        self._close_feed()
        self.release_spent_mirror()
        if self._mirror_held is not None:
            self._mirror_held.close()
            self._mirror_held = None
        self._targets.clear()
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
        if self._client is not None:
            self._client.close()
