"""A ``Job``'s view of its in-place world: the world its agent pushes, and the process group
that each epoch of it forms.

The agent pushes a ``world`` message whenever the round's world changes (a rank lost, a spare
taking it, the world shrinking or growing). From then on, every collective of the older epoch
is abandoned: its wait (in slices of :data:`WAIT_SLICE`) sees the newer epoch and raises
:class:`WorldChanged`, and a collective that fails by itself (a dead peer closes its
connection) raises :class:`CollectiveFailed`. A planned world (one with an ``after_step``, a
node draining) is due only once this worker has done that many steps: until then its steps
go on in the old group, so every rank re-forms at the same step boundary and none is lost; a
worker that holds no rank in it has left the job (:class:`WorldLeft`). The group of the new
epoch meets in the job's etcd store under a prefix of its own (no node hosts it); a wait there
for a peer that never comes is given up as soon as a still newer world arrives. The old group
is aborted, never destroyed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from elastictrain.constants import ENV_ETCD, ENV_SPARE
from elastictrain.errors import ElasticTrainError
from elastictrain.session import protocol as P
from elastictrain.session.client import WorkerSession, worker_session
from elastictrain.train.collectives import Collectives
from elastictrain.train.timing import Slowdown

logger = logging.getLogger(__name__)

WAIT_SLICE = timedelta(milliseconds=20)
FORM_TIMEOUT = timedelta(seconds=120)  # a process group's meeting, at the most
WORLD_WAIT_S = 300.0  # a worker waits this long for its agent's next world
IDLE_EVERY_S = 2.0  # a waiting spare refreshes its mapped snapshot segments this often


class WorldChanged(ElasticTrainError):
    """A newer world came: the step in flight is abandoned."""


class CollectiveFailed(ElasticTrainError):
    """A collective failed by itself (a peer died)."""


class NoWorldError(ElasticTrainError):
    """The agent gave this worker no world to join in time."""


class WorldLeft(ElasticTrainError):
    """This worker held a rank, and the newest world has none for it: its node was drained."""


@dataclass(frozen=True)
class WorldView:
    """This worker's place in one epoch of the world (``rank`` -1: not a member)."""

    round_id: str
    epoch: int
    rank: int
    size: int
    store: str
    etcd: str
    job_id: str
    received: float  # time.monotonic() when it arrived
    after_step: int = -1  # due once this many steps are done (-1: at once)

    @classmethod
    def of(cls, message: dict[str, Any]) -> WorldView:
        return cls(str(message["round_id"]), int(message["epoch"]), int(message["rank"]),
                   int(message["world_size"]), str(message["store"]), str(message["etcd"]),
                   str(message["job_id"]), time.monotonic(),
                   int(message.get("after_step", -1)))  # fmt: skip

    def newer_than(self, other: WorldView | None) -> bool:
        """(A worker process lives in one round: epochs order its worlds.)"""
        return other is None or self.epoch > other.epoch


class InPlaceWorld:
    """The worlds pushed to this worker, and the faults planned for it."""

    def __init__(self, session: WorkerSession, device: torch.device) -> None:
        self.session = session
        self.device = device
        self._lock = threading.Condition()
        self._latest: WorldView | None = None
        self._faults: list[dict[str, Any]] = []
        self._slowdown: Slowdown | None = None  # chaos: this rank's compute slowed
        self._slow_said: dict[str, Any] | None = None  # a pushed slowdown to report at a step
        self._group: dist.ProcessGroup | None = None
        self._store: dist.Store | None = None  # the current group's
        self._abandoned: list[tuple[dist.ProcessGroup, dist.Store | None]] = []
        self._client = None
        self.steps_done = -1  # set by the Job before each step: when a planned world is due
        session.on_push(self._on_push)
        if os.environ.get(ENV_SPARE) != "1":  # a spare says so once it is warm (ready)
            session.attach(P.MODE_INPLACE)
        self._on_push(session.call("world")["world"])

    def ready(self) -> None:
        """A hot spare is warm: from now on its agent may give it a rank."""
        self.session.attach(P.MODE_INPLACE)

    @classmethod
    def attach(cls, device: torch.device) -> InPlaceWorld | None:
        """The in-place world, when this worker was started by an agent; else None."""
        session = worker_session()
        if session is None or not os.environ.get(ENV_ETCD):
            return None
        return cls(session, device)

    # -- what the agent pushes ------------------------------------------------------------------

    def _on_push(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == P.WORLD:
            view = WorldView.of(message)
            with self._lock:
                if view.newer_than(self._latest):
                    self._latest = view
                    self._lock.notify_all()
            if self.device.type == "cuda" and self._due(view):
                self._abort_group()  # NCCL: pending collectives fail now
        elif kind == P.FAULT:
            with self._lock:
                self._faults.append(message)
        elif kind == P.SLOW:
            factor, seconds = float(message["factor"]), float(message.get("seconds") or 0)
            until = time.monotonic() + seconds if seconds > 0 else float("inf")
            with self._lock:
                self._slowdown = Slowdown(factor, until_time=until) if factor > 1 else None
                self._slow_said = {"factor": factor, "seconds": seconds}
        elif kind == "closed":
            with self._lock:
                self._lock.notify_all()

    def latest(self) -> WorldView | None:
        with self._lock:
            return self._latest

    def changed_since(self, view: WorldView) -> bool:
        """A world newer than ``view`` is due: now, or (planned) at the steps done."""
        latest = self.latest()
        return latest is not None and latest.newer_than(view) and self._due(latest)

    def _due(self, view: WorldView) -> bool:
        return view.after_step < 0 or self.steps_done >= view.after_step

    @property
    def is_spare(self) -> bool:
        """Started as a hot spare, and no world has named it yet."""
        latest = self.latest()
        return os.environ.get(ENV_SPARE) == "1" and (latest is None or latest.rank < 0)

    def next_world(self, after: WorldView | None, timeout: float = WORLD_WAIT_S,
                   idle: Callable[[], object] | None = None) -> WorldView:  # fmt: skip
        """The first world newer than ``after`` in which this worker holds a rank. A worker
        that never held one (a hot spare) waits as long as its session lasts, calling
        ``idle`` every :data:`IDLE_EVERY_S` meanwhile. One that held a rank in ``after`` and
        holds none in the newest world raises :class:`WorldLeft`."""
        deadline = time.monotonic() + timeout if after is not None else float("inf")
        next_idle = time.monotonic() + IDLE_EVERY_S
        with self._lock:
            while True:
                if idle is not None and time.monotonic() >= next_idle:
                    self._lock.release()
                    try:
                        idle()
                    except Exception:  # a failed refresh only costs speed later
                        logger.debug("idle work while waiting failed", exc_info=True)
                    finally:
                        self._lock.acquire()
                    next_idle = time.monotonic() + IDLE_EVERY_S
                latest = self._latest
                if latest is not None and latest.rank >= 0 and latest.newer_than(after):
                    return latest
                if (latest is not None and latest.newer_than(after) and after is not None
                        and after.rank >= 0):  # fmt: skip
                    raise WorldLeft(f"world epoch {latest.epoch} has no rank for this worker")
                if self.session.closed.is_set():
                    raise NoWorldError("the session with the agent closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoWorldError(f"no world from the agent within {timeout:.0f} s")
                self._lock.wait(min(remaining, 1.0))

    # -- faults planned by rank and step ------------------------------------------------------

    def fire_faults(self, step: int, at: str = "step") -> None:
        """Carry out the faults planned for this step (``etrain launch --fault``), or for an
        earlier one (a fault held back until this node's hot spares were ready); ``at``:
        the moment, a step's start or a re-forming."""
        with self._lock:
            due = [f for f in self._faults
                   if int(f["step"]) <= step and f.get("at", "step") == at]  # fmt: skip
            self._faults = [f for f in self._faults if f not in due]
        with self._lock:
            said, self._slow_said = self._slow_said, None
        if said is not None:  # a chaos command's slowdown: in force from this step
            logger.warning("injected slowdown x%g at step %d", said["factor"], step)
            self.session.notify_fault("slow", step, **said)
        for fault in due:
            kind = str(fault["kind"])
            logger.warning("injected fault %s at step %d", kind, step)
            if kind == "slow":
                factor, until = float(fault["factor"]), int(fault["until"])
                self.session.notify_fault(kind, step, factor=factor, until=until)
                with self._lock:
                    self._slowdown = Slowdown(factor, until_step=until)
                continue
            self.session.notify_fault(kind, step)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif kind == "kill-agent":
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(30)  # the parent-death signal follows

    def slowdown(self, step: int) -> float:
        """The factor this rank's compute is slowed by at ``step`` (1.0: not slowed)."""
        with self._lock:
            slow = self._slowdown
        return slow.factor if slow is not None and slow.active(step, time.monotonic()) else 1.0

    # -- process groups ---------------------------------------------------------------------

    def form(self, view: WorldView) -> Collectives:
        """This epoch's process group (raises :class:`WorldChanged` if a newer world comes
        while its members meet)."""
        from elastictrain.coord.etcd import EtcdClient
        from elastictrain.coord.keys import JobKeys
        from elastictrain.rendezvous.store import EtcdStore, StoreInterruptedError

        if self._client is None:
            self._client = EtcdClient.from_spec(view.etcd, timeout=10.0)
        store = EtcdStore(self._client, JobKeys(view.job_id).store_prefix + view.store,
                          timeout=FORM_TIMEOUT,
                          interrupted=lambda: self.changed_since(view))  # fmt: skip
        try:
            if self.device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                group = dist.ProcessGroupNCCL(store, view.rank, view.size, options)
            else:
                group = dist.ProcessGroupGloo(store, view.rank, view.size, FORM_TIMEOUT)
        except StoreInterruptedError as exc:
            raise WorldChanged(f"world epoch {view.epoch} superseded while forming") from exc
        except (RuntimeError, dist.DistError) as exc:
            if self.changed_since(view):
                raise WorldChanged(f"world epoch {view.epoch} superseded: {exc}") from exc
            raise CollectiveFailed(f"world epoch {view.epoch} did not form: {exc}") from exc
        self._group = group
        # The store is a Python object that the group calls back into: NCCL meets its peers
        # at the first collective, long after this returns, so it must stay alive with it.
        self._store = store
        return Collectives(group, view.rank, view.size, wait=self._waiter(view))

    def _waiter(self, view: WorldView):
        def wait(work: dist.Work) -> None:
            if self.device.type == "cuda":
                self._wait_device(work, view)
                return
            while True:
                try:
                    work.wait(WAIT_SLICE)
                    return
                except RuntimeError as exc:
                    if work.is_completed():  # it ended meanwhile: done, or failed by itself
                        try:
                            work.wait()
                            return
                        except RuntimeError as failed:
                            raise CollectiveFailed(str(failed).splitlines()[0]) from failed
                    if self.changed_since(view):
                        raise WorldChanged(f"world epoch {view.epoch} superseded") from exc

        return wait

    def _wait_device(self, work: dist.Work, view: WorldView) -> None:
        """NCCL: the host waits for nothing; an aborted group makes the op fail."""
        try:
            work.wait()
        except (RuntimeError, dist.DistError) as exc:
            if self.changed_since(view):
                raise WorldChanged(f"world epoch {view.epoch} superseded") from exc
            raise CollectiveFailed(str(exc).splitlines()[0]) from exc

    def _abort_group(self) -> None:
        group = self._group
        if group is not None:
            try:
                group.abort()
            except Exception:  # an aborted group is gone either way
                logger.debug("aborting the process group failed", exc_info=True)

    def abandon(self) -> None:
        """Leave the current group behind: aborted, never destroyed (its pending operations
        may still be blocked on a dead peer)."""
        if self.device.type != "cuda":
            self._abort_group()
        if self._group is not None:  # kept, with the store its threads may still call
            self._abandoned.append((self._group, self._store))
        self._group, self._store = None, None

    def close(self) -> None:
        self.abandon()
        if self._client is not None:
            self._client.close()
