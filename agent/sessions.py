"""The agent's end of the worker sessions (a thin executor: it reports, the machine decides).

One abstract-namespace Unix socket per agent; each worker's exec shim connects to it and
says ``hello`` with the token the agent put in that worker's environment. A session is
accepted only with a token the agent is expecting and from a process of the agent's own user
(``SO_PEERCRED``); the peer's pid is what the kernel says, not what the worker claims. One
thread multiplexes every session. What happens on them is posted as observations: a session
closed (a crash, unless the worker said ``finished`` first), a heartbeat, an attach. Requests
(the snapshot calls) are answered from a small pool, so a slow one never delays the
detection of a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from elastictrain.errors import ElasticTrainError
from elastictrain.session import protocol as P

from . import machine as M

logger = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_SEND_TIMEOUT_S = 2.0

Handler = Callable[["WorkerKey", dict[str, Any]], dict[str, Any]]  # (who asks, request)


@dataclass(frozen=True)
class WorkerKey:
    generation: int  # the machine's count of worker starts
    slot: int  # the worker's id on this node (round workers: their local rank)


@dataclass
class _Session:
    sock: socket.socket
    reader: P.FrameReader = field(default_factory=P.FrameReader)
    key: WorkerKey | None = None
    pid: int = 0
    mode: str = P.MODE_PLAIN
    finished: bool = False
    shape: tuple[int, int] = (0, 0)  # its job's global batch and logical workers (0: not said)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class SessionServer:
    """Accepts and watches worker sessions; posts what they say as observations.

    Args:
        name: a unique name for the abstract socket (job, node, agent pid).
        post: where observations go.
        handlers: request methods (``begin_snapshot``, ...) → functions of the request.
    """

    def __init__(self, name: str, post: Callable[[M.Observation], None],
                 handlers: dict[str, Handler] | None = None) -> None:  # fmt: skip
        self.address = f"\0etrain/{name}/{secrets.token_hex(6)}"
        self.env_address = "@" + self.address[1:]  # NUL cannot travel in an environment
        self._post = post
        self._handlers = dict(handlers or {})
        self._expected: dict[str, WorkerKey] = {}
        self._sessions: dict[WorkerKey, _Session] = {}
        self._finished: set[WorkerKey] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(256)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="session-rpc")
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="agent-sessions", daemon=True)
        self._thread.start()

    # -- the agent's side -----------------------------------------------------------------

    def expect(self, key: WorkerKey) -> str:
        """A new token for the worker ``key`` (to put in its environment)."""
        token = secrets.token_hex(16)
        with self._lock:
            self._expected[token] = key
        return token

    def forget(self, generation: int) -> None:
        """Drop what is left of an older generation of workers."""
        with self._lock:
            self._expected = {t: k for t, k in self._expected.items() if k.generation >= generation}
            self._finished = {k for k in self._finished if k.generation >= generation}
            stale = [k for k in self._sessions if k.generation < generation]
        for key in stale:
            self._drop(key)

    def finished(self, key: WorkerKey) -> bool:
        """The worker said it is exiting on purpose (its session may be closed by now)."""
        with self._lock:
            return key in self._finished

    def job_shape(self, generation: int) -> tuple[int, int]:
        """(global batch, logical workers) as a worker of ``generation`` said ((0, 0): none)."""
        with self._lock:
            sessions = list(self._sessions.items())
        return max((s.shape for k, s in sessions if k.generation == generation), default=(0, 0))

    def pid_of(self, key: WorkerKey) -> int | None:
        with self._lock:
            session = self._sessions.get(key)
        return session.pid if session else None

    def push(self, key: WorkerKey, message: dict[str, Any]) -> bool:
        """Send a push (``world``, ``abort``) to one worker; False if it has no session."""
        with self._lock:
            session = self._sessions.get(key)
        if session is None:
            return False
        return self._send(session, message)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            for selected, _mask in self._selector.select(timeout=1.0):
                data = selected.data
                if data is None:
                    self._accept()
                elif data == "wake":
                    self._wake_r.recv(64)
                else:
                    self._readable(data)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                logger.debug("accepting a session failed", exc_info=True)
                return
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.getuid():
                logger.warning("refused a session from pid %d of another user (%d)", pid, uid)
                sock.close()
                continue
            sock.setblocking(False)
            session = _Session(sock, pid=pid)
            self._selector.register(sock, selectors.EVENT_READ, session)

    def _readable(self, session: _Session) -> None:
        try:
            data = session.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._closed(session)
            return
        try:
            messages = session.reader.feed(data)
            for message in messages:
                self._handle(session, message)
        except (P.SessionError, KeyError, TypeError, ValueError) as exc:
            logger.warning("closing a malformed session (pid %d): %s", session.pid, exc)
            self._closed(session)

    def _handle(self, session: _Session, message: dict[str, Any]) -> None:
        kind = message["type"]
        if session.key is None:
            if kind != P.HELLO:
                raise P.SessionError(f"expected hello, got {kind!r}")
            self._hello(session, message)
            return
        key = session.key
        if kind == P.HEARTBEAT:
            self._post(M.WorkerHeartbeat(key.generation, key.slot, int(message["step"]),
                                         bool(message.get("active")),
                                         float(message.get("speed") or 0.0),
                                         float(message.get("share", -1.0))))  # fmt: skip
        elif kind == P.REQUEST:
            self._pool.submit(self._answer, session, message)
        elif kind == P.JOB_SHAPE:
            batch, logical = message.get("global_batch"), message.get("logical_workers")
            if not all(type(v) is int and 0 < v < 1 << 40 for v in (batch, logical)):
                raise P.SessionError(f"a job shape of {batch!r} x {logical!r}")
            session.shape = (batch, logical)
        elif kind == P.ATTACH:
            session.mode = str(message["mode"])
            self._post(M.WorkerAttached(key.generation, key.slot, session.mode))
        elif kind in (P.FAULT, P.RECOVERED, P.STRAGGLER, P.ATTENTION):
            data = {k: v for k, v in message.items() if k != "type"}
            self._post(M.WorkerReport(key.generation, key.slot, kind, data))
        elif kind == P.FINISHED:
            session.finished = True
            with self._lock:
                self._finished.add(key)
            self._post(M.WorkerFinishing(key.generation, key.slot))
        else:
            raise P.SessionError(f"unknown message type {kind!r}")

    def _hello(self, session: _Session, message: dict[str, Any]) -> None:
        if message.get("version") != P.VERSION:
            raise P.SessionError(f"protocol version {message.get('version')!r} is not {P.VERSION}")
        with self._lock:
            key = self._expected.pop(str(message.get("token")), None)
            if key is not None:
                self._sessions[key] = session
        if key is None:
            raise P.SessionError("unknown session token")
        session.key = key

    def _answer(self, session: _Session, message: dict[str, Any]) -> None:
        method = str(message.get("method"))
        reply: dict[str, Any] = {"type": P.REPLY, "id": message.get("id")}
        handler = self._handlers.get(method)
        try:
            if handler is None:
                raise P.SessionError(f"unknown method {method!r}")
            assert session.key is not None
            reply |= {"ok": True, **handler(session.key, message)}
        except ElasticTrainError as exc:
            reply |= {"ok": False, "error": str(exc), "kind": type(exc).__name__}
        except Exception as exc:  # reported to the worker, which raises it
            logger.exception("session request %s failed", method)
            reply |= {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "internal"}
        self._send(session, reply)

    def _send(self, session: _Session, message: dict[str, Any]) -> bool:
        """Write one frame; False if the worker does not take it within the send timeout (a
        stopped worker must not stall the agent)."""
        view = memoryview(P.encode(message))
        deadline = time.monotonic() + _SEND_TIMEOUT_S
        with session.send_lock:
            while view:
                try:
                    view = view[session.sock.send(view) :]
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                select.select([], [session.sock], [], remaining)
        return True

    def _closed(self, session: _Session) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(session.sock)
        session.sock.close()
        key = session.key
        if key is None:
            return
        with self._lock:
            if self._sessions.get(key) is session:
                del self._sessions[key]
        self._post(M.WorkerLost(key.generation, key.slot,
                                "exited" if session.finished else "session closed",
                                finished=session.finished))  # fmt: skip

    def _drop(self, key: WorkerKey) -> None:
        """Close a session without reporting it (its worker is being stopped on purpose)."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.key = None
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(timeout=2)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for key in list(self._sessions):
            self._drop(key)
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
