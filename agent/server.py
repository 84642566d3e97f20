"""The agent's gRPC service: status and fault injection, answered from the agent's state."""

from __future__ import annotations

import logging
import signal
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc
from elastictrain.rpc.agent_client import chunk_header, chunk_info
from elastictrain.snapshot.memory_store import SnapshotError
from elastictrain.snapshot.shm import shm_dir

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20  # gRPC's default message limit is 4 MiB


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
                    rank=w.assignment.global_rank if w.assignment is not None else -1,
                    local_rank=w.assignment.local_rank if w.assignment is not None else -1,
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

    def BeginSnapshot(self, request, context) -> etrain_pb2.BeginSnapshotResponse:  # noqa: N802
        record = self._call(context, self._snapshots().begin, request.rank, request.step,
                            request.nbytes)  # fmt: skip
        return etrain_pb2.BeginSnapshotResponse(segment=record.segment.name, shm_dir=shm_dir())

    def EndSnapshot(self, request, context) -> etrain_pb2.EndSnapshotResponse:  # noqa: N802
        committed = self._call(context, self._snapshots().end, request.rank, request.step,
                               bytes(request.meta))  # fmt: skip
        return etrain_pb2.EndSnapshotResponse(committed=committed)

    def GetSnapshotIndex(self, request, context) -> etrain_pb2.SnapshotIndex:  # noqa: N802
        store = self._snapshots().store
        committed = store.committed
        return etrain_pb2.SnapshotIndex(
            node_id=self._agent.config.node_id,
            committed_step=-1 if committed is None else committed,
            records=[
                etrain_pb2.SnapshotRecordInfo(
                    rank=r.rank,
                    step=r.step,
                    nbytes=r.nbytes,
                    meta=r.meta,
                    checksum=r.checksum,
                    segment=r.segment.name,
                )  # fmt: skip
                for r in store.list()
                if r.complete
            ],
            agents=self._agent.agent_endpoints(),
            memory_bytes=self._snapshots().memory_bytes(),
            chunks=[chunk_header(c) for c in self._snapshots().chunks.list()],
            committed_nodes=list(self._snapshots().committed_nodes),
        )

    def ReadSnapshot(self, request, context):  # noqa: N802
        record = self._snapshots().store.get(request.rank, request.step)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no record of rank {request.rank} step {request.step} here")  # fmt: skip
        end = (
            record.nbytes
            if request.length < 0
            else min(record.nbytes, request.offset + request.length)
        )
        view = record.segment.view(0, record.nbytes)
        for start in range(request.offset, end, READ_CHUNK_BYTES):
            yield etrain_pb2.DataChunk(data=bytes(view[start : min(start + READ_CHUNK_BYTES, end)]))

    def PutChunk(self, request_iterator, context) -> etrain_pb2.PutChunkResponse:  # noqa: N802
        header = None
        data = bytearray()
        for piece in request_iterator:
            if header is None:
                header = piece.header
                data = bytearray(header.chunk_bytes)
                position = 0
            n = len(piece.data)
            data[position : position + n] = piece.data
            position += n
        if header is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty chunk stream")
        self._call(context, self._snapshots().put_chunk, chunk_info(header), data)
        return etrain_pb2.PutChunkResponse(ok=True)

    def GetChunk(self, request, context):  # noqa: N802
        found = self._snapshots().chunks.get(request.owner, request.step, request.index)
        if found is None:
            missing = f"no chunk {request.index} of {request.owner} step {request.step}"
            context.abort(grpc.StatusCode.NOT_FOUND, missing)
        view = memoryview(found[1])
        for start in range(0, len(view), READ_CHUNK_BYTES):
            yield etrain_pb2.DataChunk(data=bytes(view[start : start + READ_CHUNK_BYTES]))

    def RecoverSnapshot(  # noqa: N802
        self, request, context
    ) -> etrain_pb2.RecoverSnapshotResponse:
        try:
            owners, ranks = self._snapshots().recover(request.step)
        except Exception as exc:  # reported to the caller, which decides
            logger.warning("recovering step %d failed: %s", request.step, exc)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{type(exc).__name__}: {exc}")
        return etrain_pb2.RecoverSnapshotResponse(
            recovered_owners=owners, ranks=ranks,
            message=f"rebuilt {len(owners)} node snapshot(s), {len(ranks)} rank record(s)",
        )  # fmt: skip

    def SaveSnapshot(self, request, context) -> etrain_pb2.SaveSnapshotResponse:  # noqa: N802
        coordinator = self._snapshots()
        if coordinator.disk_root is None:
            return etrain_pb2.SaveSnapshotResponse(ok=False, message="no --snapshot-dir")
        future = coordinator.save_to_disk(None if request.step < 0 else request.step)
        if future is None:
            return etrain_pb2.SaveSnapshotResponse(ok=False, message="no complete snapshot here")
        try:
            written = future.result(timeout=600)
        except Exception as exc:  # reported to the caller
            return etrain_pb2.SaveSnapshotResponse(ok=False, message=f"{type(exc).__name__}: {exc}")
        return etrain_pb2.SaveSnapshotResponse(
            ok=True, step=written.step, path=str(written.path), raw_bytes=written.raw_bytes,
            compressed_bytes=written.compressed_bytes, seconds=written.seconds,
            message=f"step {written.step} written",
        )  # fmt: skip

    def _snapshots(self):
        if self._agent.snapshots is None:
            raise RuntimeError("the agent is not set up yet")
        return self._agent.snapshots

    @staticmethod
    def _call(context, fn, *args):
        try:
            return fn(*args)
        except SnapshotError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))


def start_server(agent: Agent, host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="agent-rpc"))
    etrain_pb2_grpc.add_AgentServicer_to_server(AgentServicer(agent), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the agent's gRPC server to {host}:{port}")
    server.start()
    logger.info("agent gRPC server on %s:%d", host, bound)
    return server, bound
