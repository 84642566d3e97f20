"""A small client for the agent's gRPC service (used by the CLI and tests)."""

from __future__ import annotations

import grpc

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


class AgentClient:
    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel = grpc.insecure_channel(endpoint)
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

    def begin_snapshot(self, rank: int, step: int, nbytes: int) -> etrain_pb2.BeginSnapshotResponse:
        request = etrain_pb2.BeginSnapshotRequest(rank=rank, step=step, nbytes=nbytes)
        return self._call("BeginSnapshot", self._stub.BeginSnapshot, request)

    def end_snapshot(self, rank: int, step: int, meta: bytes) -> etrain_pb2.EndSnapshotResponse:
        """The record of (rank, step) is written; the agent checksums it."""
        request = etrain_pb2.EndSnapshotRequest(rank=rank, step=step, meta=meta)
        return self._call("EndSnapshot", self._stub.EndSnapshot, request)

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
