"""The agent's gRPC service: status and fault injection, answered from the agent's state."""

from __future__ import annotations

import logging
import signal
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from elastictrain import constants
from elastictrain.credentials import TOKEN_HEADER, JobCredentials
from elastictrain.events import Event
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc
from elastictrain.rpc.agent_client import chunk_header, chunk_info
from elastictrain.snapshot.memory_store import SnapshotError

from .chaos import ChaosOutcome
from .streams import StreamGuard

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20  # gRPC's default message limit is 4 MiB


class AgentServicer(etrain_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent, streams: StreamGuard) -> None:
        self._agent = agent
        self._streams = streams

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
            disk_error=view.disk_error,
            etcd_silent_ms=view.etcd_silent_ms,
            workers=[
                etrain_pb2.WorkerStatus(
                    rank=w.assignment.global_rank if w.assignment is not None else -1,
                    local_rank=w.assignment.local_rank if w.assignment is not None else -1,
                    pid=w.pid,
                    state=w.state,
                    exited=w.exit_code is not None,
                    exit_code=w.exit_code or 0,
                    step=view.beats[w.slot].step if w.slot in view.beats else -1,
                    speed=view.beats[w.slot].speed if w.slot in view.beats else 0.0,
                    share=view.beats[w.slot].share if w.slot in view.beats else -1.0,
                )
                for w in view.workers
            ],
        )

    def InjectFault(self, request, context) -> etrain_pb2.InjectFaultResponse:  # noqa: N802
        """A chaos fault on this agent (``agent/chaos.py``), recorded as the job's event."""
        kinds = etrain_pb2.InjectFaultRequest
        chaos = self._agent.chaos
        kind = request.kind
        if kind == kinds.KILL:
            sig = request.signal or int(signal.SIGKILL)
            if sig not in {int(s) for s in signal.valid_signals()}:
                outcome = ChaosOutcome(False, f"invalid signal {sig}")
            else:
                outcome = chaos.kill(request.rank, sig)
        elif kind == kinds.SLOW:
            factor, seconds = request.factor, request.seconds
            if not (1 <= factor <= 1000) or not (0 <= seconds <= 7 * 86400):
                outcome = ChaosOutcome(False, f"factor {factor:g} must be in [1, 1000] and "
                                              f"seconds {seconds:g} in [0, 604800]")  # fmt: skip
            else:
                outcome = chaos.slow(request.rank, factor, seconds)
        elif kind == kinds.HANG:
            outcome = chaos.hang(request.rank, request.seconds)
        elif kind == kinds.KILL_AGENT:
            outcome = chaos.kill_agent()
        elif kind == kinds.PARTITION:
            outcome = chaos.partition(request.seconds)
        elif kind == kinds.ETCD_RESTART:
            outcome = chaos.etcd_restart()
        elif kind == kinds.CORRUPT_CHUNK:
            outcome = chaos.corrupt_chunk(request.seconds)
        elif kind == kinds.DISK_FULL:
            outcome = chaos.disk_full(request.seconds, request.max_bytes)
        else:
            outcome = ChaosOutcome(False, f"unknown fault kind {kind}")
        return etrain_pb2.InjectFaultResponse(ok=outcome.ok, message=outcome.message,
                                              pid=outcome.pid,
                                              node_id=self._agent.config.node_id)  # fmt: skip

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
        if request.offset < 0 or request.offset > record.nbytes:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is outside "
                          f"the {record.nbytes}-byte record")  # fmt: skip
        end = (
            record.nbytes
            if request.length < 0
            else min(record.nbytes, request.offset + request.length)
        )
        view = record.segment.view(0, record.nbytes)
        with self._streams.stream(context, "ReadSnapshot") as activity:
            for start in range(request.offset, end, READ_CHUNK_BYTES):
                yield etrain_pb2.DataChunk(data=bytes(view[start : min(start + READ_CHUNK_BYTES,
                                                                        end)]))  # fmt: skip
                activity.touch()

    def PutChunk(self, request_iterator, context) -> etrain_pb2.PutChunkResponse:  # noqa: N802
        with self._streams.stream(context, "PutChunk") as activity:
            return self._put_chunk(request_iterator, context, activity)

    def _put_chunk(self, request_iterator, context, activity) -> etrain_pb2.PutChunkResponse:
        """Reads exactly the bytes the header declares, after checking them against the chunk
        budget and the round; a stream that sends more, or less, is refused."""
        snapshots = self._snapshots()
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a chunk stream starts with a header")
        header = first.header
        activity.touch()
        problem = snapshots.chunk_problem(chunk_info(header))
        if problem:
            context.abort(grpc.StatusCode.PERMISSION_DENIED
                          if "not a member" in problem else grpc.StatusCode.INVALID_ARGUMENT,
                          problem)  # fmt: skip
        self._call(context, snapshots.chunks.reserve, header.chunk_bytes)
        try:
            data = bytearray(header.chunk_bytes)
            position = 0
            piece = first
            while piece is not None:
                n = len(piece.data)
                if position + n > header.chunk_bytes:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the stream sends more "
                                  f"than the {header.chunk_bytes} bytes its header declares")
                data[position : position + n] = piece.data
                position += n
                activity.touch()
                piece = next(request_iterator, None)
            if position != header.chunk_bytes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the stream ended after "
                              f"{position} of {header.chunk_bytes} bytes")  # fmt: skip
            self._call(context, snapshots.put_chunk, chunk_info(header), data)
        finally:
            snapshots.chunks.unreserve(header.chunk_bytes)
        return etrain_pb2.PutChunkResponse(ok=True)

    def GetChunk(self, request, context):  # noqa: N802
        found = self._snapshots().chunks.get(request.owner, request.step, request.index)
        if found is None:
            missing = f"no chunk {request.index} of {request.owner} step {request.step}"
            context.abort(grpc.StatusCode.NOT_FOUND, missing)
        view = memoryview(found[1])
        with self._streams.stream(context, "GetChunk") as activity:
            for start in range(0, len(view), READ_CHUNK_BYTES):
                yield etrain_pb2.DataChunk(data=bytes(view[start : start + READ_CHUNK_BYTES]))
                activity.touch()

    def RecoverSnapshot(  # noqa: N802
        self, request, context
    ) -> etrain_pb2.RecoverSnapshotResponse:
        try:
            owners, ranks = self._snapshots().recover(request.step)
        except Exception as exc:  # reported to the caller, which decides; and in the events
            logger.warning("recovering step %d failed: %s", request.step, exc)
            cause = exc.__cause__
            self._agent.write_event(Event(
                "rebuild_failed", self._agent.config.node_id, time.time(),
                f"step {request.step} could not be rebuilt: {type(exc).__name__}: {exc}",
                {"step": request.step, "error": type(exc).__name__,
                 "cause": type(cause).__name__ if cause is not None else ""}))  # fmt: skip
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


class TokenCheck(grpc.ServerInterceptor):
    """Every call must carry the job's token (``authorization: Bearer <token>``); the TLS
    layer has already checked the caller's certificate against the job's CA."""

    def __init__(self, credentials: JobCredentials) -> None:
        self._credentials = credentials

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the job's token is required")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)
        self._stream_refusal = grpc.stream_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_HEADER and self._credentials.token_matches(str(value)):
                return continuation(handler_call_details)
        logger.warning("refused %s: no valid token", handler_call_details.method)
        if handler_call_details.method.endswith("/PutChunk"):
            return self._stream_refusal
        return self._refusal


def start_server(agent: Agent, host: str, port: int,
                 credentials: JobCredentials | None) -> tuple[grpc.Server, int]:  # fmt: skip
    """The agent's server: mutual TLS with the job's CA and its token on every call (none
    with ``credentials`` None: --insecure); ``RPC_THREADS`` threads, at most
    ``RPC_MAX_CONCURRENT`` calls at once (the rest refused at once), at most
    ``RPC_MAX_STREAMS`` of them streams (so unary calls always find a thread), none idle for
    more than ``RPC_STREAM_IDLE_S``, messages bounded."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=constants.RPC_THREADS,
                                   thread_name_prefix="agent-rpc"),
        maximum_concurrent_rpcs=constants.RPC_MAX_CONCURRENT,
        interceptors=[TokenCheck(credentials)] if credentials is not None else [],
        options=[("grpc.max_receive_message_length", constants.RPC_MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", constants.RPC_MAX_MESSAGE_BYTES)],
    )  # fmt: skip
    streams = StreamGuard(constants.RPC_MAX_STREAMS, constants.RPC_STREAM_IDLE_S)
    etrain_pb2_grpc.add_AgentServicer_to_server(AgentServicer(agent, streams), server)
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        tls = grpc.ssl_server_credentials([(credentials.key, credentials.cert)],
                                          root_certificates=credentials.ca,
                                          require_client_auth=True)  # fmt: skip
        bound = server.add_secure_port(f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"could not bind the agent's gRPC server to {host}:{port}")
    server.start()
    logger.info("agent gRPC server on %s:%d (%s)", host, bound,
                "mutual TLS and token" if credentials is not None else "INSECURE: no TLS, no token")
    return server, bound
