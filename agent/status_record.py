"""This node's status record in etcd (a thin executor: built from the agent's view, written
when it changed, at most every ``STATUS_INTERVAL_S``). See :mod:`elastictrain.node_status`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from elastictrain.node_status import NodeStatus, SnapshotStatus, WorkerStatus
from elastictrain.session import protocol as P

from . import machine as M

logger = logging.getLogger(__name__)


def build_node_status(view, machine: M.AgentMachine | None, snapshot: SnapshotStatus,
                      started: float, now: float,
                      shape: tuple[int, int] = (0, 0)) -> NodeStatus:  # fmt: skip
    """The record of ``view`` (the agent's :class:`StatusView`) at wall time ``now`` (pure)."""
    # a hot spare counts once it is ready to take a rank (its session says in place)
    spares = ({s for s in machine.spares if machine.modes.get(s) == P.MODE_INPLACE}
              if machine is not None else set())  # fmt: skip
    epoch = machine.world.epoch if machine is not None and machine.world is not None else -1
    workers = []
    for w in view.workers:
        beat = view.beats.get(w.slot)
        rank = w.assignment.global_rank if w.assignment is not None else -1
        workers.append(WorkerStatus(
            slot=w.slot, rank=rank, pid=w.pid, state=w.state, exit_code=w.exit_code,
            step=beat.step if beat else -1, step_s=beat.step_s if beat else -1.0,
            speed=beat.speed if beat else 0.0, share=beat.share if beat else -1.0,
            spare=w.slot in spares and rank < 0,
        ))  # fmt: skip
    return NodeStatus(
        node_id=view.node_id, hostname=view.hostname, endpoint=view.endpoint, pid=view.pid,
        state=view.state, round=view.round, restart_count=view.restart_count,
        max_restarts=view.max_restarts, world_size=view.world_size, epoch=epoch,
        started=started, updated=now, etcd_silent_ms=view.etcd_silent_ms,
        global_batch=shape[0], logical_workers=shape[1],
        workers=tuple(sorted(workers, key=lambda w: w.slot)), snapshot=snapshot,
    )  # fmt: skip


class StatusPublisher:
    """Writes the node's record through ``put`` when it changed, at most every ``interval``
    seconds (a change within the interval goes out at its end)."""

    def __init__(self, put: Callable[[bytes], None], interval: float) -> None:
        self._put = put
        self._interval = interval
        self._next = 0.0
        self._last: NodeStatus | None = None
        self.latest: NodeStatus | None = None  # the newest built (for the metrics endpoint)

    def offer(self, build: Callable[[], NodeStatus], now: float) -> None:
        """Called often (each turn of the agent's loop); ``now``: ``time.monotonic()``."""
        if now < self._next:
            return
        self._next = now + self._interval
        status = build()
        self.latest = status
        if status.same_as(self._last):
            return
        self._last = status
        self._put(status.encode())
