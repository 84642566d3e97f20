"""Attacks on a running job, replayed against real agents: each is refused, the job goes on,
and its final parameters are bit-identical to a clean run's."""

from __future__ import annotations

import threading
from dataclasses import replace

import grpc
import pytest
from launch_harness import (
    SCRIPTS,
    assert_bit_identical,
    job_credentials,
    load_params,
    torchrun_reference,
    wait_until,
)

from elastictrain import constants
from elastictrain.coord.keys import JobKeys
from elastictrain.coord.nodes import list_nodes
from elastictrain.credentials import SERVICE_NAME, create
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc
from elastictrain.rpc.agent_client import open_channel

pytestmark = [pytest.mark.e2e, pytest.mark.alone]

SCRIPT = SCRIPTS / "snapshot_train.py"
STEPS = 10


def _args(workdir, pause) -> list[str]:
    return ["--steps", str(STEPS), "--out", str(workdir / "final.pt"), "--pause-file", str(pause)]


def _pieces(header: etrain_pb2.ChunkHeader, sizes):
    yield etrain_pb2.ChunkPiece(header=header, data=b"x" * sizes[0])
    for size in sizes[1:]:
        yield etrain_pb2.ChunkPiece(data=b"x" * size)


def _refused(stub, header, sizes) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        stub.PutChunk(_pieces(header, sizes), timeout=10)
    return refused.value.code()


@pytest.mark.timeout(300)
def test_unauthenticated_calls_forged_chunks_and_idle_streams_are_refused(
        cluster, etcd_endpoint, etcd_client, job_id, tmp_path):  # fmt: skip
    reference = torchrun_reference(tmp_path / "ref", SCRIPT, STEPS)
    pause = cluster.workdir / "pause"
    pause.touch()  # the job holds before its first step while the attacks run
    agents = [cluster.agent(n, etcd=etcd_endpoint, job_id=job_id, script=SCRIPT,
                            script_args=_args(cluster.workdir, pause)) for n in "ab"]  # fmt: skip
    wait_until(lambda: len(list_nodes(etcd_client, JobKeys(job_id))) == 2, 60, "both agents")
    endpoint = {n.node_id: n.endpoint for n in list_nodes(etcd_client, JobKeys(job_id))}["a"]
    credentials = job_credentials(job_id)

    # without the job's credentials nothing is answered: no TLS, another CA, no token, a
    # wrong token (a kill, a read of the state, a status)
    other = create(tmp_path / "other")
    no_token = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(
        credentials.ca, credentials.key, credentials.cert),
        options=[("grpc.ssl_target_name_override", SERVICE_NAME)])  # fmt: skip
    wrong_token = open_channel(endpoint, replace(credentials, token="x" * 43))
    for channel, expected in ((grpc.insecure_channel(endpoint), grpc.StatusCode.UNAVAILABLE),
                              (open_channel(endpoint, other), grpc.StatusCode.UNAVAILABLE),
                              (no_token, grpc.StatusCode.UNAUTHENTICATED),
                              (wrong_token, grpc.StatusCode.UNAUTHENTICATED)):  # fmt: skip
        stub = etrain_pb2_grpc.AgentStub(channel)
        calls = (lambda s=stub: s.InjectFault(etrain_pb2.InjectFaultRequest(rank=0), timeout=5),
                 lambda s=stub: list(s.ReadSnapshot(etrain_pb2.ReadSnapshotRequest(
                     rank=0, step=0, offset=0, length=-1), timeout=5)),
                 lambda s=stub: s.GetStatus(etrain_pb2.GetStatusRequest(), timeout=5))  # fmt: skip
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() is expected
        channel.close()

    channel = open_channel(endpoint, credentials)
    stub = etrain_pb2_grpc.AgentStub(channel)
    wait_until(lambda: stub.GetStatus(etrain_pb2.GetStatusRequest(), timeout=5).world_size == 4,
               90, "the world of 4 ranks")  # fmt: skip

    # records begin and end only over a worker's own session, never over gRPC
    begin = channel.unary_unary("/elastictrain.v1.Agent/BeginSnapshot")
    with pytest.raises(grpc.RpcError) as refused:
        begin(b"", timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED

    good = dict(owner="b", step=1, index=0, k=1, m=1, redundancy="erasure", payload_bytes=16,
                chunk_bytes=16, checksums=[0, 0])  # fmt: skip
    # a node that is not a member of the world
    assert _refused(stub, etrain_pb2.ChunkHeader(**{**good, "owner": "zz"}), [16]) is \
        grpc.StatusCode.PERMISSION_DENIED  # fmt: skip
    # a header that claims a huge chunk (nothing is allocated for it)
    huge = {**good, "payload_bytes": 1 << 42, "chunk_bytes": 1 << 42}
    assert _refused(stub, etrain_pb2.ChunkHeader(**huge), [16]) in (
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    # a stream that sends more than its header declares, and one that sends less
    assert _refused(stub, etrain_pb2.ChunkHeader(**good), [16, 16]) is \
        grpc.StatusCode.INVALID_ARGUMENT  # fmt: skip
    assert _refused(stub, etrain_pb2.ChunkHeader(**good), [8]) is \
        grpc.StatusCode.INVALID_ARGUMENT  # fmt: skip
    # a message over the size limit
    big = etrain_pb2.ChunkHeader(**{**good, "payload_bytes": 32 << 20, "chunk_bytes": 32 << 20})
    assert _refused(stub, big, [constants.RPC_MAX_MESSAGE_BYTES + 1]) is \
        grpc.StatusCode.RESOURCE_EXHAUSTED  # fmt: skip

    # 100 idle streams from one client: the agent still answers at once, and cancels them
    stall = threading.Event()

    def idle():
        yield etrain_pb2.ChunkPiece(header=etrain_pb2.ChunkHeader(**good))
        stall.wait(60)

    calls = [stub.PutChunk.future(idle(), timeout=60) for _ in range(100)]

    def refused() -> int:
        return sum(1 for c in calls if c.done() and c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED)

    # the streams beyond the limit come back refused once the admitted ones fill it
    wait_until(lambda: refused() >= 100 - constants.RPC_MAX_STREAMS, 20, "the limit to fill")
    status = stub.GetStatus(etrain_pb2.GetStatusRequest(), timeout=1.0)
    assert status.world_size == 4 and not all(c.done() for c in calls)
    wait_until(lambda: all(c.done() for c in calls), constants.RPC_STREAM_IDLE_S + 10,
               "the idle streams to be cancelled")  # fmt: skip
    stall.set()
    channel.close()

    pause.unlink()
    for agent in agents:
        assert agent.wait(200) == 0, agent.text()
    assert_bit_identical(load_params(cluster.workdir / "final.pt"), reference)
