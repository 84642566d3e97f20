"""A small client for the agent's gRPC service (used by the CLI and tests)."""

from __future__ import annotations

import grpc

from elastictrain.errors import AgentUnavailableError
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc


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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
