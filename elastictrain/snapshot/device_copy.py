"""Lazy device-to-host copies of a snapshot, overlapped with the next forward and backward.

Parameters and optimizer state change only in ``optimizer.step()``. So the copy of the state
after step ``s`` may run while step ``s + 1`` computes its forward and backward: on a side CUDA
stream, straight into the agent's page-locked shared memory, and the next ``optimizer.step()``
waits for it on the device (a stream wait: the host never blocks). This is the DataStates-LLM
idea. Everything else is copied at once: CPU tensors (AdamW's step counts) synchronously, and
device tensors that may change before the next optimizer step (module buffers such as
BatchNorm statistics, a state not owned by the optimizer) are first cloned on the compute
stream (*staged*) and their clones copied lazily.

When the link cannot move the whole record during one forward and backward (a 1B model's
11 GB at 55 GB/s take 0.2 s, its step 0.13 s) but can before the next snapshot (every 2 steps,
say), the part that does not fit is staged too, a device copy of about a millisecond per
1.5 GB, and copied during the following steps: the optimizer step waits only for the part
copied from the live tensors. How much fits is learned from the last copy's CUDA events (link
rate, compute time until the next optimizer step, time between snapshots).

:func:`plan_copies` and :func:`plan_staging` decide (pure); :class:`LazyCopier` issues the
copies, fences and measures.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Piece = tuple[int, torch.Tensor]  # (position in the destination, uint8 view of the source)


@dataclass(frozen=True)
class CopyPlan:
    """How each piece of a record reaches host memory."""

    host: tuple[Piece, ...] = ()  # CPU sources: copied now
    lazy: tuple[Piece, ...] = ()  # device sources that only optimizer.step() changes
    staged: tuple[Piece, ...] = ()  # device sources that may change sooner: cloned first

    @functools.cached_property
    def device_bytes(self) -> int:
        return sum(piece.numel() for _, piece in self.lazy + self.staged)

    @property
    def reason(self) -> str:
        return (
            f"{len(self.lazy)} lazy device pieces, {len(self.staged)} staged, "
            f"{len(self.host)} host pieces ({self.device_bytes} device bytes)"
        )


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identifies a tensor's memory: (device, storage address)."""
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def optimizer_storages(optimizer: torch.optim.Optimizer | None) -> frozenset[tuple[str, int]]:
    """The memory only ``optimizer.step()`` writes: its parameters and their state tensors."""
    if optimizer is None:
        return frozenset()
    keys: set[tuple[str, int]] = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            keys.add(storage_key(param))
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor):
                    keys.add(storage_key(value))
    return frozenset(keys)


def plan_copies(pieces: Iterable[Piece], owned: frozenset[tuple[str, int]]) -> CopyPlan:
    """Sort a record's pieces by how they may be copied (pure)."""
    host: list[Piece] = []
    lazy: list[Piece] = []
    staged: list[Piece] = []
    for position, piece in pieces:
        if piece.device.type == "cpu":
            host.append((position, piece))
        elif storage_key(piece) in owned:
            lazy.append((position, piece))
        else:
            staged.append((position, piece))
    return CopyPlan(tuple(host), tuple(lazy), tuple(staged))


@dataclass(frozen=True)
class CopyTargets:
    """Views of a destination buffer where a plan's pieces go: reusable for every record
    written into the same buffer with the same plan."""

    host: list[torch.Tensor]
    device: list[torch.Tensor]  # lazy pieces, then staged ones

    @classmethod
    def of(cls, plan: CopyPlan, dest: torch.Tensor) -> CopyTargets:
        def views(pieces: tuple[Piece, ...]) -> list[torch.Tensor]:
            return [dest[position : position + piece.numel()] for position, piece in pieces]

        return cls(views(plan.host), views(plan.lazy + plan.staged))


def copy_host_pieces(plan: CopyPlan, targets: CopyTargets) -> None:
    """Copy the plan's host pieces now (one foreach call)."""
    if plan.host:
        torch._foreach_copy_(targets.host, [piece for _, piece in plan.host])


@dataclass(frozen=True)
class CopyObservation:
    """What the last snapshot's copy showed, in GPU time (seconds) and bytes per second."""

    rate: float  # device-to-host bytes per second on the side stream
    window: float  # from the snapshot point to the next optimizer step
    interval: float  # between the last two snapshot points (0: not known yet)


@dataclass(frozen=True)
class StagingDecision:
    lazy_bytes: int  # copied from the live tensors, before the next optimizer step
    staged_bytes: int  # cloned on the device first, copied over the following steps
    reason: str


def plan_staging(device_bytes: int, seen: CopyObservation | None, spare_device_bytes: int,
                 margin: float = 0.9) -> StagingDecision:  # fmt: skip
    """How much of a record to copy lazily and how much to stage (pure).

    The lazy part must land before the next optimizer step (``seen.window`` at
    ``seen.rate``). What does not fit is cloned on the device (about a millisecond per
    1.5 GB) and copied during the steps up to the next snapshot, if the whole copy fits
    before it (``seen.interval``) and the clones fit in spare device memory. Otherwise
    everything is lazy and the next optimizer step waits for the link: the job should then
    snapshot less often (``every``)."""
    if seen is None or seen.rate <= 0 or seen.window <= 0:
        return StagingDecision(device_bytes, 0, "no copy observed yet: all lazy")
    fits = int(seen.rate * seen.window * margin)
    if device_bytes <= fits:
        return StagingDecision(device_bytes, 0, f"{device_bytes} B fit before the next step")
    overflow = device_bytes - fits
    if seen.interval <= 0 or device_bytes > seen.rate * seen.interval * margin:
        return StagingDecision(device_bytes, 0, (
            f"{device_bytes} B need {device_bytes / seen.rate:.3f} s of link, more than the "
            f"{seen.interval:.3f} s between snapshots: all lazy, the next step waits"))  # fmt: skip
    if overflow > spare_device_bytes:
        return StagingDecision(device_bytes, 0, (
            f"staging {overflow} B needs more than the {spare_device_bytes} B spare on the "
            "device: all lazy, the next step waits"))  # fmt: skip
    return StagingDecision(fits, overflow, (
        f"{fits} B lazy before the next step, {overflow} B staged on the device"))  # fmt: skip


def lazy_count(plan: CopyPlan, lazy_bytes: int) -> int:
    """How many of the plan's lazy pieces (in order) fit in ``lazy_bytes``."""
    total = 0
    for count, (_, piece) in enumerate(plan.lazy):
        total += piece.numel()
        if total > lazy_bytes:
            return count
    return len(plan.lazy)


@dataclass
class InflightCopy:
    """One record's device copies on the side stream: the lazy part (which the next
    optimizer step waits for) lands at ``lazy_done``, everything at ``done``."""

    step: int
    nbytes: int
    ready: torch.cuda.Event  # compute stream, at the snapshot point
    started: torch.cuda.Event  # side stream, before the first copy
    lazy_done: torch.cuda.Event
    done: torch.cuda.Event
    sources: tuple[torch.Tensor, ...]  # lazy sources and staged clones, alive until done
    decision: StagingDecision
    fenced: torch.cuda.Event | None = None  # compute stream, at the next optimizer step
    resumed: torch.cuda.Event | None = None  # compute stream, once the lazy part had landed


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


class LazyCopier:
    """Queues a record's device-to-host copies on one side stream and fences them.

    ``start`` runs on the training thread: it copies the host pieces, clones the staged ones on
    the compute stream and queues every device piece on the side stream behind an event of the
    compute stream (one ``_foreach_copy_`` call: the host spends microseconds per piece and
    never waits for the GPU). ``fence`` makes the current stream wait for the lazy part;
    ``wait_done`` (any thread) blocks until everything has landed. Each copy's events tell
    the next one how much it may leave lazy (:func:`plan_staging`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.seen: CopyObservation | None = None
        self._unseen: deque[InflightCopy] = deque(maxlen=8)  # events not read yet
        self._last_seen: InflightCopy | None = None  # the last copy read

    def _observe(self) -> None:
        """Learn from the newest earlier copies whose events have all completed."""
        while self._unseen:
            copy = self._unseen[0]
            if copy.resumed is None or not (copy.done.query() and copy.resumed.query()):
                return
            self._unseen.popleft()
            copy_s = copy.started.elapsed_time(copy.done) / 1e3
            before, self._last_seen = self._last_seen, copy
            interval = 0.0
            if before is not None:  # compute time between the snapshots, not waiting for copies
                waited = before.fenced.elapsed_time(before.resumed) / 1e3
                interval = before.ready.elapsed_time(copy.ready) / 1e3 - waited
            self.seen = CopyObservation(
                rate=copy.nbytes / copy_s if copy_s > 0 else 0.0,
                window=copy.ready.elapsed_time(copy.fenced) / 1e3,
                interval=interval,
            )

    def start(self, step: int, plan: CopyPlan, targets: CopyTargets) -> InflightCopy:
        """Copy ``plan`` into its ``targets``: host pieces now, device pieces queued."""
        self._observe()
        decision = plan_staging(plan.device_bytes, self.seen, self._spare_device_bytes())
        split = lazy_count(plan, decision.lazy_bytes) if decision.staged_bytes else len(plan.lazy)
        copy_host_pieces(plan, targets)
        sources = [piece for _, piece in plan.lazy[:split]]
        sources += [piece.clone() for _, piece in plan.lazy[split:] + plan.staged]
        ready = _timing_event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)
        for clone in sources[split:]:
            clone.record_stream(self.stream)  # not reused before the side stream read it
        started, lazy_done, done = _timing_event(), _timing_event(), _timing_event()
        with torch.cuda.stream(self.stream):
            started.record(self.stream)
            torch._foreach_copy_(targets.device[:split], sources[:split], non_blocking=True)
            lazy_done.record(self.stream)
            if split < len(sources):
                torch._foreach_copy_(targets.device[split:], sources[split:], non_blocking=True)
            done.record(self.stream)
        copy = InflightCopy(step, plan.device_bytes, ready, started, lazy_done, done,
                            tuple(sources), decision)  # fmt: skip
        self._unseen.append(copy)
        return copy

    def _spare_device_bytes(self) -> int:
        """Free device memory plus what the caching allocator holds unused, halved: staging
        must not starve the next forward."""
        free, _total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return (free + cached) // 2

    def fence(self, copy: InflightCopy) -> None:
        """Make the current stream wait for the lazy part (the host does not block)."""
        compute = torch.cuda.current_stream(self.device)
        fenced, resumed = _timing_event(), _timing_event()
        fenced.record(compute)  # before the wait: the compute time the copy had
        compute.wait_event(copy.lazy_done)
        resumed.record(compute)
        copy.fenced, copy.resumed = fenced, resumed

    def wait_done(self, copy: InflightCopy) -> None:
        """Block until the copies have landed in host memory; drops the sources."""
        copy.done.synchronize()
        copy.sources = ()
