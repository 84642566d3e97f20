"""The agent's gRPC service: status and fault injection, answered from the agent's state."""

from __future__ import annotations

import logging
import signal
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger(__name__)


class AgentServicer(etrain_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def GetStatus(self, request, context) -> etrain_pb2.AgentStatus:  # noqa: N802 - gRPC name
        view = self._agent.status()
        return etrain_pb2.AgentStatus(
            job_id=view.job_id,
            node_id=view.node_id,
            hostname=view.hostname,
            endpoint=view.endpoint,
            state=view.state,
            restart_count=view.restart_count,
            max_restarts=view.max_restarts,
            round=view.round,
            group_rank=view.group_rank,
            group_world_size=view.group_world_size,
            world_size=view.world_size,
            gpus=view.gpus,
            pid=view.pid,
            workers=[
                etrain_pb2.WorkerStatus(
                    rank=w.assignment.global_rank,
                    local_rank=w.assignment.local_rank,
                    pid=w.pid,
                    state=w.state,
                    exited=w.exit_code is not None,
                    exit_code=w.exit_code or 0,
                )
                for w in view.workers
            ],
        )

    def InjectFault(self, request, context) -> etrain_pb2.InjectFaultResponse:  # noqa: N802
        sig = request.signal or int(signal.SIGKILL)
        if sig not in {int(s) for s in signal.valid_signals()}:
            return etrain_pb2.InjectFaultResponse(ok=False, message=f"invalid signal {sig}")
        killed = self._agent.kill_worker(request.rank, sig)
        node_id = self._agent.config.node_id
        if killed is None:
            return etrain_pb2.InjectFaultResponse(
                ok=False, node_id=node_id, message=f"rank {request.rank} is not running here"
            )
        return etrain_pb2.InjectFaultResponse(
            ok=True,
            pid=killed.pid,
            node_id=node_id,
            message=f"sent signal {sig} to rank {request.rank} (pid {killed.pid})",
        )


def start_server(agent: Agent, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-rpc"))
    etrain_pb2_grpc.add_AgentServicer_to_server(AgentServicer(agent), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the agent's gRPC server to {host}:{port}")
    server.start()
    logger.info("agent gRPC server on %s:%d", host, bound)
    return server, bound
