"""The wire format of a worker session: the local channel between a worker and its agent.

A session is one Unix stream socket per worker. The worker's exec shim connects it before the
training program starts (so its descriptor is among the lowest: the kernel closes it first
when the process dies, before the slow release of device memory) and hands it down to the
program as ``$ETRAIN_SESSION_FD``. Frames are a 4-byte big-endian length and a UTF-8 JSON
object with a ``type``; the first frame of a session is ``hello`` with the protocol version.
Binary fields travel as base64. Nothing is pickled.

Worker → agent: ``hello`` (the worker's token and pid), ``attach`` (the library takes the
session over: its mode), ``heartbeat`` (every ``HEARTBEAT_INTERVAL_S`` from a thread of its
own: the last step finished, and whether the training loop is inside a step), ``finished``
(exiting on purpose), ``request`` (a call the agent answers with a ``reply`` of the same
``id``).
Agent → worker: ``reply``, and the pushes ``world`` (the worker's rank in the round's
current world) and ``fault`` (a fault planned for a step). Worker → agent also: ``fault`` (a
planned fault fires now) and ``recovered`` (the worker re-formed in place, with the times it
took). Worker → agent also: ``straggler`` (a straggler verdict that changed something: a
re-plan, said by rank 0, or its own failure, said by the failed rank, with the speeds used).
Agent → worker also: ``slow`` (a chaos slowdown of its compute: a factor, for some seconds;
factor 1 ends it). Heartbeats also carry the rank's speed (samples per compute-second) and its
share of the global batch.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from typing import Any

from elastictrain.errors import ElasticTrainError

VERSION = 1
MAX_FRAME_BYTES = 1 << 20
HEARTBEAT_INTERVAL_S = 0.5
_HEADER = struct.Struct(">I")

# message types
HELLO = "hello"
ATTACH = "attach"
HEARTBEAT = "heartbeat"
FINISHED = "finished"
REQUEST = "request"
REPLY = "reply"
WORLD = "world"
FAULT = "fault"  # agent → worker: a fault planned for a step; worker → agent: it fires now
RECOVERED = "recovered"  # worker → agent: it re-formed in place (with the durations)
STRAGGLER = "straggler"  # worker → agent: a re-plan or a straggler's failure (with speeds)
SLOW = "slow"  # agent → worker: slow its compute by a factor (chaos)
ATTENTION = "attention"  # worker → agent: a step's attention plan (imbalance before and after)
JOB_SHAPE = "job_shape"  # worker → agent: its job's global batch and logical workers (status)

# what a worker's library does with its session (``attach``)
MODE_PLAIN = "plain"  # an unmodified script: the shim's hello only
MODE_SNAPSHOT = "snapshot"  # in-memory snapshots, restart-the-world recovery
MODE_INPLACE = "inplace"  # the Job API: in-place recovery


class SessionError(ElasticTrainError):
    """The session's peer sent something malformed, or the session is closed."""


class SessionClosedError(SessionError):
    """The peer closed the session."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise SessionError(f"session frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SessionError(f"malformed session frame: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise SessionError("a session frame must be a JSON object with a 'type'")
    return message


class FrameReader:
    """Cuts a byte stream into frames (for non-blocking readers: feed what arrives)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise SessionError(f"session frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            if len(self._buffer) < _HEADER.size + length:
                break
            body = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
            del self._buffer[: _HEADER.size + length]
            messages.append(decode(body))
        return messages


def receive(sock: socket.socket) -> dict[str, Any]:
    """One frame from a blocking socket."""
    header = _read_exactly(sock, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise SessionError(f"session frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return decode(_read_exactly(sock, length))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SessionClosedError("the session was closed by its peer")
        data += chunk
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise SessionError(f"malformed base64 field: {exc}") from exc
