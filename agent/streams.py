"""Bounds on the agent's gRPC streams: how many run at once, and how long one may stay idle.

The server's threads are shared by every call. A stream holds its thread for as long as it
runs, so without bounds a handful of idle or slow streams (a peer that opens ``PutChunk`` and
sends nothing, a reader that stops reading) take every thread and the agent stops answering
even ``GetStatus``. :class:`StreamGuard` admits at most ``limit`` streams (the rest are refused
at once with ``RESOURCE_EXHAUSTED``) and cancels any that moves no message for ``idle_s``;
unary calls always find a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

logger = logging.getLogger(__name__)


class StreamActivity:
    """One admitted stream: call :meth:`touch` at every message it moves."""

    def __init__(self, context: grpc.ServicerContext, what: str,
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.context = context
        self.what = what
        self._clock = clock
        self.last = clock()

    def touch(self) -> None:
        self.last = self._clock()


class StreamGuard:
    def __init__(self, limit: int, idle_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if limit < 1 or idle_s <= 0:
            raise ValueError(f"a stream guard needs limit >= 1 and idle_s > 0, got {limit}, "
                             f"{idle_s}")  # fmt: skip
        self.limit = limit
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._active: set[StreamActivity] = set()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._cancel_idle, name="agent-rpc-idle",
                                       daemon=True)  # fmt: skip
        self._watch.start()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    @contextmanager
    def stream(self, context: grpc.ServicerContext, what: str) -> Iterator[StreamActivity]:
        """Admit one stream for the body of the ``with`` (aborts the call when full)."""
        activity = StreamActivity(context, what, self._clock)
        with self._lock:
            admitted = len(self._active) < self.limit
            if admitted:
                self._active.add(activity)
        if not admitted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.limit} streams are running: {what} refused")  # fmt: skip
        try:
            yield activity
        finally:
            with self._lock:
                self._active.discard(activity)

    def idle(self, now: float) -> list[StreamActivity]:
        """The admitted streams that moved nothing for ``idle_s`` at ``now`` (pure read)."""
        with self._lock:
            return [a for a in self._active if now - a.last > self.idle_s]

    def _cancel_idle(self) -> None:
        while not self._stop.wait(min(0.5, self.idle_s / 4)):
            for activity in self.idle(self._clock()):
                logger.warning("cancelling %s from %s: idle for %.0f s", activity.what,
                               activity.context.peer(), self.idle_s)  # fmt: skip
                with self._lock:
                    self._active.discard(activity)  # its slot is free at once
                activity.context.cancel()

    def close(self) -> None:
        self._stop.set()
