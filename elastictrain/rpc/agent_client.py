"""A small client for the agent's gRPC service (used by the CLI and tests)."""

from __future__ import annotations

import grpc

from elastictrain.constants import RPC_MAX_MESSAGE_BYTES
from elastictrain.credentials import SERVICE_NAME, JobCredentials
from elastictrain.errors import AgentUnavailableError, ElasticTrainError
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc

STREAM_PIECE_BYTES = 1 << 20  # well under gRPC's default 4 MiB message limit


_CHUNK_FIELDS = ("owner", "step", "index", "k", "m", "redundancy", "payload_bytes", "chunk_bytes")


def chunk_header(info) -> etrain_pb2.ChunkHeader:
    """A ChunkInfo as its wire message."""
    fields = {name: getattr(info, name) for name in _CHUNK_FIELDS}
    return etrain_pb2.ChunkHeader(**fields, checksums=list(info.checksums))


def chunk_info(header: etrain_pb2.ChunkHeader):
    """The wire message back as a ChunkInfo."""
    from elastictrain.snapshot.memory_store import ChunkInfo

    fields = {name: getattr(header, name) for name in _CHUNK_FIELDS}
    return ChunkInfo(**fields, checksums=tuple(header.checksums))


class SnapshotRefusedError(ElasticTrainError):
    """The agent refused a snapshot request (e.g. a step at or before the committed one)."""


_FROM_ENV = object()


def open_channel(endpoint: str, credentials: JobCredentials | None) -> grpc.Channel:
    """A channel to an agent: mutual TLS with the job's certificate (checked against the
    service name, not the host) and its token on every call; plain with no credentials."""
    options = [("grpc.max_receive_message_length", RPC_MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", RPC_MAX_MESSAGE_BYTES)]  # fmt: skip
    if credentials is None:
        return grpc.insecure_channel(endpoint, options=options)
    transport = grpc.ssl_channel_credentials(root_certificates=credentials.ca,
                                             private_key=credentials.key,
                                             certificate_chain=credentials.cert)  # fmt: skip
    token = grpc.access_token_call_credentials(credentials.token)
    return grpc.secure_channel(endpoint, grpc.composite_channel_credentials(transport, token),
                               options=[*options,
                                        ("grpc.ssl_target_name_override", SERVICE_NAME)])


class AgentClient:
    """Calls to one agent. ``credentials``: the job's (default: those this process was
    handed, ``ETRAIN_CREDENTIALS``; None: a plain channel, for a job run with --insecure)."""

    def __init__(self, endpoint: str, timeout: float = 5.0,
                 credentials: JobCredentials | None | object = _FROM_ENV) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.timeout = timeout
        if credentials is _FROM_ENV:
            credentials = JobCredentials.from_env()
        assert credentials is None or isinstance(credentials, JobCredentials)
        self._channel = open_channel(endpoint, credentials)
        self._stub = etrain_pb2_grpc.AgentStub(self._channel)

    def get_status(self) -> etrain_pb2.AgentStatus:
        try:
            return self._stub.GetStatus(etrain_pb2.GetStatusRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise AgentUnavailableError(
                f"agent at {self.endpoint} did not answer: {exc.code().name}"
            ) from exc

    def kill(self, rank: int, signal: int = 0) -> etrain_pb2.InjectFaultResponse:
        request = etrain_pb2.InjectFaultRequest(
            rank=rank, kind=etrain_pb2.InjectFaultRequest.KILL, signal=signal
        )
        try:
            return self._stub.InjectFault(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise AgentUnavailableError(
                f"agent at {self.endpoint} did not answer: {exc.code().name}"
            ) from exc

    def slow(self, rank: int, factor: float, seconds: float = 0.0
             ) -> etrain_pb2.InjectFaultResponse:  # fmt: skip
        """Slow rank ``rank``'s compute ``factor`` times (1: end it) for ``seconds`` (0: until
        ended)."""
        request = etrain_pb2.InjectFaultRequest(rank=rank, kind=etrain_pb2.InjectFaultRequest.SLOW,
                                                factor=factor, seconds=seconds)  # fmt: skip
        return self._call("InjectFault", self._stub.InjectFault, request)

    def inject(self, kind: str, *, rank: int = 0, seconds: float = 0.0,
               max_bytes: int = 0) -> etrain_pb2.InjectFaultResponse:  # fmt: skip
        """Make fault ``kind`` (``hang``, ``kill_agent``, ``partition``, ``etcd_restart``,
        ``corrupt_chunk``, ``disk_full``: see ``InjectFaultRequest.Kind``) on this agent."""
        request = etrain_pb2.InjectFaultRequest(
            kind=etrain_pb2.InjectFaultRequest.Kind.Value(kind.upper()), rank=rank,
            seconds=seconds, max_bytes=max_bytes)  # fmt: skip
        return self._call("InjectFault", self._stub.InjectFault, request)

    def snapshot_index(self) -> etrain_pb2.SnapshotIndex:
        return self._call("GetSnapshotIndex", self._stub.GetSnapshotIndex,
                          etrain_pb2.GetSnapshotIndexRequest())  # fmt: skip

    def read_snapshot(self, rank: int, step: int, into: bytearray | memoryview) -> int:
        """Stream one record into ``into``; returns the number of bytes read."""
        request = etrain_pb2.ReadSnapshotRequest(rank=rank, step=step, offset=0, length=-1)
        return self._stream_into("ReadSnapshot", self._stub.ReadSnapshot, request, into)

    def put_chunk(self, info, data) -> None:
        """Send one chunk (``info``: a ChunkInfo) in messages of at most 1 MiB. ``data`` is a
        buffer, or a list of buffers whose concatenation is the chunk (sent from where
        they lie, not joined first)."""
        header = chunk_header(info)
        parts = list(data) if isinstance(data, list | tuple) else [data]

        def messages():
            first = True
            for part in parts:
                raw = memoryview(part).cast("B")
                for start in range(0, len(raw), STREAM_PIECE_BYTES):
                    piece = bytes(raw[start : start + STREAM_PIECE_BYTES])
                    yield etrain_pb2.ChunkPiece(header=header, data=piece) if first else \
                        etrain_pb2.ChunkPiece(data=piece)  # fmt: skip
                    first = False
            if first:  # an empty chunk still carries its header
                yield etrain_pb2.ChunkPiece(header=header)

        self._call("PutChunk", self._stub.PutChunk, messages())

    def get_chunk(self, owner: str, step: int, index: int, into: bytearray) -> int:
        request = etrain_pb2.GetChunkRequest(owner=owner, step=step, index=index)
        return self._stream_into("GetChunk", self._stub.GetChunk, request, into)

    def recover_snapshot(self, step: int) -> etrain_pb2.RecoverSnapshotResponse:
        request = etrain_pb2.RecoverSnapshotRequest(step=step)
        try:
            return self._stub.RecoverSnapshot(request, timeout=max(self.timeout, 120.0))
        except grpc.RpcError as exc:
            raise AgentUnavailableError(
                f"agent at {self.endpoint}: RecoverSnapshot failed: {exc.code().name}: "
                f"{exc.details()}"
            ) from exc

    def save_snapshot(self, step: int = -1) -> etrain_pb2.SaveSnapshotResponse:
        request = etrain_pb2.SaveSnapshotRequest(step=step)
        return self._call("SaveSnapshot", self._stub.SaveSnapshot, request)

    def _stream_into(self, what: str, method, request, into) -> int:
        position = 0
        try:
            for chunk in method(request, timeout=max(self.timeout, 60.0)):
                n = len(chunk.data)
                into[position : position + n] = chunk.data
                position += n
        except grpc.RpcError as exc:
            raise AgentUnavailableError(
                f"agent at {self.endpoint}: {what} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        return position

    def _call(self, what: str, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise SnapshotRefusedError(exc.details()) from exc
            raise AgentUnavailableError(
                f"agent at {self.endpoint}: {what} failed: {exc.code().name}"
            ) from exc

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
