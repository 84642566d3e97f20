"""A small client for the agent's gRPC service (used by the CLI and tests)."""

from __future__ import annotations

import grpc

from elastictrain.errors import AgentUnavailableError, ElasticTrainError
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc


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

    def end_snapshot(
        self, rank: int, step: int, meta: bytes, checksum: int
    ) -> etrain_pb2.EndSnapshotResponse:
        request = etrain_pb2.EndSnapshotRequest(rank=rank, step=step, meta=meta, checksum=checksum)
        return self._call("EndSnapshot", self._stub.EndSnapshot, request)

    def snapshot_index(self) -> etrain_pb2.SnapshotIndex:
        return self._call("GetSnapshotIndex", self._stub.GetSnapshotIndex,
                          etrain_pb2.GetSnapshotIndexRequest())  # fmt: skip

    def read_snapshot(self, rank: int, step: int, into: bytearray | memoryview) -> int:
        """Stream one record into ``into``; returns the number of bytes read."""
        request = etrain_pb2.ReadSnapshotRequest(rank=rank, step=step, offset=0, length=-1)
        position = 0
        try:
            for chunk in self._stub.ReadSnapshot(request, timeout=max(self.timeout, 60.0)):
                n = len(chunk.data)
                into[position : position + n] = chunk.data
                position += n
        except grpc.RpcError as exc:
            raise AgentUnavailableError(
                f"agent at {self.endpoint}: ReadSnapshot failed: {exc.code().name}: {exc.details()}"
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
