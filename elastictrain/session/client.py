"""The worker's end of its session with the node's agent.

The exec shim that started this process connected the session and said ``hello``; the
descriptor is in ``$ETRAIN_SESSION_FD``. :func:`worker_session` takes it over once per
process (the snapshot library and the ``Job`` share it). A reader thread answers replies to
calls and hands pushes (``world``, ``abort``) to the registered listeners, so the training
thread never blocks on the agent except in :meth:`WorkerSession.call`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from elastictrain.constants import ENV_SESSION_FD
from elastictrain.errors import AgentUnavailableError, ElasticTrainError
from elastictrain.session import protocol as P

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


class SessionRequestError(ElasticTrainError):
    """The agent answered a session call with an error."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class WorkerSession:
    """A connected session; thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: dict[int, Future] = {}
        self._calls_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.closed = threading.Event()
        self.mode = P.MODE_PLAIN
        self._step = -1
        self._active = False
        self._speed: float | None = None
        self._share: float | None = None
        self._beating: threading.Thread | None = None
        self._thread = threading.Thread(target=self._read, name="etrain-session", daemon=True)
        self._thread.start()

    def attach(self, mode: str) -> None:
        """Tell the agent what this worker's library does (the strongest mode wins), and start
        the heartbeats."""
        order = (P.MODE_PLAIN, P.MODE_SNAPSHOT, P.MODE_INPLACE)
        if order.index(mode) > order.index(self.mode):
            self.mode = mode
            self._notify({"type": P.ATTACH, "mode": mode})
        if self._beating is None:
            self._beating = threading.Thread(target=self._beat, name="etrain-heartbeat",
                                             daemon=True)  # fmt: skip
            self._beating.start()

    def progress(self, step: int, active: bool | None = None, speed: float | None = None,
                 share: float | None = None) -> None:  # fmt: skip
        """Step ``step`` is done (the next heartbeat says so; nothing is sent now).
        ``active``: the training loop is inside its steps, so no progress for long is a hang.
        ``speed`` (samples per compute-second) and ``share`` (of the global batch): as last
        measured and planned."""
        self._step = int(step)
        if active is not None:
            self._active = active
        if speed is not None:
            self._speed = float(speed)
        if share is not None:
            self._share = float(share)

    def _beat(self) -> None:
        while not self.closed.wait(P.HEARTBEAT_INTERVAL_S):
            beat: dict[str, Any] = {"type": P.HEARTBEAT, "step": self._step,
                                    "active": self._active}  # fmt: skip
            if self._speed is not None:
                beat["speed"] = round(self._speed, 3)
            if self._share is not None:
                beat["share"] = round(self._share, 5)
            self._notify(beat)

    def describe_job(self, global_batch: int, logical_workers: int) -> None:
        """The job's shape, for ``etrain status`` (sent once)."""
        self._notify({"type": P.JOB_SHAPE, "global_batch": int(global_batch),
                      "logical_workers": int(logical_workers)})  # fmt: skip

    def finished(self) -> None:
        """This worker is about to exit on purpose: its session closing is not a crash."""
        self._notify({"type": P.FINISHED})

    def _notify(self, message: dict[str, Any]) -> None:
        """A notification is best effort: training goes on without an agent to hear it (a
        worker whose agent is gone is killed by its parent-death signal anyway)."""
        try:
            self._send(message)
        except AgentUnavailableError as exc:
            logger.debug("session notification %s not sent: %s", message["type"], exc)

    def notify_fault(self, kind: str, step: int, **details: Any) -> None:
        """A planned fault fires now (the agent records when); ``details``: JSON values."""
        self._notify({**details, "type": P.FAULT, "kind": kind, "step": step})

    def straggler(self, report: dict[str, Any]) -> None:
        """A straggler verdict that changed something (JSON values: the action, the reason,
        the step, the speeds and the plan)."""
        self._notify({**report, "type": P.STRAGGLER})

    def attention(self, report: dict[str, Any]) -> None:
        """A step's core-attention planning (JSON values: the step, its rounds, max/mean
        before and after planning, the tokens moved)."""
        self._notify({**report, "type": P.ATTENTION})

    def recovered(self, report: dict[str, Any]) -> None:
        """This worker re-formed in place; ``report`` holds the epoch, steps and durations."""
        self._notify({"type": P.RECOVERED, **report})

    def on_push(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def call(self, method: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """One request to the agent; its reply's fields, or :class:`SessionRequestError`."""
        call_id = next(self._ids)
        future: Future = Future()
        with self._calls_lock:
            self._calls[call_id] = future
        try:
            self._send({"type": P.REQUEST, "id": call_id, "method": method, **fields})
            reply = future.result(timeout=timeout)
        except FutureTimeout as exc:
            what = f"the agent did not answer {method} within {timeout} s"
            raise AgentUnavailableError(what) from exc
        finally:
            with self._calls_lock:
                self._calls.pop(call_id, None)
        if not reply.get("ok"):
            raise SessionRequestError(str(reply.get("error")), str(reply.get("kind")))
        return reply

    def _send(self, message: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise AgentUnavailableError("the session with the agent is closed")
        with self._send_lock:
            try:
                P.send(self._sock, message)
            except OSError as exc:
                raise AgentUnavailableError(f"the session with the agent broke: {exc}") from exc

    def _read(self) -> None:
        try:
            while True:
                message = P.receive(self._sock)
                if message["type"] == P.REPLY:
                    with self._calls_lock:
                        future = self._calls.get(message.get("id"))
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                for listener in list(self._listeners):
                    try:
                        listener(message)
                    except Exception:
                        logger.exception("a session listener failed on %s", message["type"])
        except (P.SessionError, OSError) as exc:
            logger.debug("session ended: %s", exc)
        finally:
            self.closed.set()
            with self._calls_lock:
                calls = list(self._calls.values())
            for future in calls:
                if not future.done():
                    future.set_exception(AgentUnavailableError("the session with the agent closed"))
            for listener in list(self._listeners):
                try:
                    listener({"type": "closed"})
                except Exception:
                    logger.exception("a session listener failed on close")


_session: WorkerSession | None = None
_session_lock = threading.Lock()


def worker_session() -> WorkerSession | None:
    """This process's session with its agent, or None when it was not started by one."""
    global _session
    with _session_lock:
        if _session is not None:
            return _session
        raw = os.environ.get(ENV_SESSION_FD)
        if not raw:
            return None
        try:
            fd = int(raw)
            sock = socket.socket(fileno=fd)
        except (ValueError, OSError) as exc:
            logger.warning("%s=%r is not an open session: %s", ENV_SESSION_FD, raw, exc)
            return None
        if sock.family != socket.AF_UNIX:
            sock.detach()
            logger.warning("%s=%r is not a Unix socket", ENV_SESSION_FD, raw)
            return None
        os.set_inheritable(fd, False)  # programs this worker starts do not hold it open
        del os.environ[ENV_SESSION_FD]  # nor find it
        _session = WorkerSession(sock)
        # An interpreter that exits through its own shutdown did so on purpose (its status,
        # good or bad, is then the agent's to read); a killed one never gets here.
        atexit.register(_session.finished)
        return _session
