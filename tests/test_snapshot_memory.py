"""In-memory snapshots: layout, retention, the agent's store, commits in etcd, and restore
after a worker crash with real agents, workers and etcd."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from elastictrain.agent.snapshots import RoundView, SnapshotCoordinator, committable
from launch_harness import (
    SCRIPTS,
    assert_bit_identical,
    job_credentials,
    load_params,
    wait_until,
)

from elastictrain.coord.keys import JobKeys
from elastictrain.events import read_events
from elastictrain.snapshot.erasure import ErasureScheme
from elastictrain.snapshot.layout import (
    flatten_state,
    slice_range,
    stream_pieces,
    unflatten_state,
)
from elastictrain.snapshot.memory_store import (
    SnapshotError,
    SnapshotStore,
    plan_retention,
    segment_size_for,
)
from elastictrain.snapshot.record_meta import ShardedRecordMeta
from elastictrain.snapshot.shm import ShmSegment

SNAPSHOT_SCRIPT = SCRIPTS / "snapshot_train.py"


def copy_slice(layout, tensors, start: int, end: int, dest: torch.Tensor) -> None:
    """Stream bytes ``[start, end)`` into ``dest``, as a rank's snapshot copies them."""
    for position, piece in stream_pieces(layout, tensors, start, end):
        dest[position : position + piece.numel()].copy_(piece)


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "n": 3,
            "empty": torch.empty(0), "bf16": torch.randn(3, 3).bfloat16()}  # fmt: skip


@pytest.mark.parametrize("world", [1, 2, 3, 5, 64])
def test_slices_of_any_world_rebuild_the_state_bit_for_bit(world):
    state = _state()
    layout, tensors = flatten_state(state)
    stream = torch.full((layout.total_bytes,), 0xAB, dtype=torch.uint8)
    ranges = [slice_range(layout.total_bytes, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.total_bytes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for start, end in ranges:
        part = torch.zeros(end - start, dtype=torch.uint8)
        copy_slice(layout, tensors, start, end, part)
        stream[start:end] = part
    back = unflatten_state(layout, stream)
    assert back["n"] == 3 and back["empty"].numel() == 0
    assert torch.equal(back["bf16"], state["bf16"])
    for key, value in state["model"].items():
        assert torch.equal(back["model"][key], value)
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


@pytest.mark.parametrize("world", [1, 3])
def test_rank_slices_load_without_a_stream_and_into_existing_tensors(world):
    state = _state()
    layout, tensors = flatten_state(state)
    pieces = []
    for rank in range(world):
        start, end = slice_range(layout.total_bytes, world, rank)
        part = torch.zeros(end - start, dtype=torch.uint8)
        copy_slice(layout, tensors, start, end, part)
        pieces.append((start, part))
    targets = {"/model/0.weight": torch.zeros(5, 7), "/bf16": torch.zeros(3, 3)}  # bf16: no
    back = unflatten_state(layout, list(reversed(pieces)), into=targets)
    assert back["model"]["0.weight"] is targets["/model/0.weight"]  # written in place
    assert torch.equal(targets["/model/0.weight"], state["model"]["0.weight"])
    assert back["bf16"] is not targets["/bf16"] and torch.equal(back["bf16"], state["bf16"])
    for _, part in pieces:
        part.fill_(0)  # the sources may be reused: nothing aliases them
    assert torch.equal(back["model"]["1.bias"], state["model"]["1.bias"])
    with pytest.raises(ValueError, match="cover"):
        unflatten_state(layout, pieces[1:] if world > 1 else [(0, pieces[0][1][:10])])


def test_retention_keeps_committed_and_bounded_pending():
    plan = plan_retention([3, 4, 5, 6], committed=4, max_pending=2)
    assert plan.free == {3}
    plan = plan_retention([5, 6, 7, 8], committed=4, max_pending=2)
    assert plan.free == {5, 6} and "dropped" in plan.reason
    assert plan_retention([1, 2], committed=None, max_pending=2).free == set()


def test_store_records_outlive_their_writer_and_are_reused(tmp_path):
    store = SnapshotStore(prefix=f"etrain-test-{os.getpid()}", max_pending=2)
    try:
        record = store.begin(rank=0, step=1, nbytes=100)
        writer = ShmSegment.attach(record.segment.name)  # what a worker does
        writer.tensor()[:100] = torch.arange(100, dtype=torch.uint8)
        writer.close()  # the worker goes away; the data stay
        store.end(0, 1, b"meta", 7)
        assert bytes(store.get(0, 1).segment.view(0, 5)) == bytes(range(5))
        assert store.complete_steps([0]) == [1]
        store.mark_committed(1)
        with pytest.raises(SnapshotError, match="not after the committed step"):
            store.begin(0, 1, 10)
        second = store.begin(0, 2, 100)
        store.end(0, 2, b"", 0)
        store.mark_committed(2)  # step 1 is freed, its segment pooled
        third = store.begin(0, 3, 50)
        assert third.segment is record.segment  # reused, no new allocation
        assert store.get(0, 1) is None and store.get(0, 2) is second
        assert store.memory_bytes() == 2 * segment_size_for(100)
    finally:
        store.close()


def test_store_refuses_beyond_its_memory_limit():
    limit = segment_size_for(100) * 5 // 2  # room for two records, not three
    store = SnapshotStore(prefix=f"etrain-test-limit-{os.getpid()}", max_pending=2, max_bytes=limit)
    try:
        store.begin(0, 1, 100)
        store.begin(1, 1, 100)
        with pytest.raises(SnapshotError, match="memory limit"):
            store.begin(2, 1, 100)
        assert store.memory_bytes() == 2 * segment_size_for(100)
    finally:
        store.close()


def test_commit_rule():
    assert committable({"a", "b"}, {"a", "b"})
    assert not committable({"a"}, {"a", "b"})
    assert not committable({"a"}, set())


@pytest.mark.timeout(60)
def test_interrupted_snapshot_never_commits_nor_shadows(etcd_client, job_id):
    keys = JobKeys(job_id)
    nodes = {
        name: SnapshotCoordinator(
            etcd_client, keys, name, SnapshotStore(prefix=f"etrain-{job_id}-{name}"),
            lambda rank=rank: RoundView(("a", "b"), {}, frozenset({rank})),
            scheme=ErasureScheme(1, 0),  # local only: this test is about the commit protocol
        )
        for rank, name in enumerate(("a", "b"))
    }  # fmt: skip

    def committed() -> int | None:
        kv = etcd_client.get(keys.snapshot_committed)
        return None if kv is None else json.loads(kv.value)["step"]

    def snapshot(node: str, rank: int, step: int, finish: bool = True) -> None:
        coord = nodes[node]
        record = coord.begin(rank, step, 16)
        record.segment.tensor()[:16] = step
        if finish:
            with pytest.raises(SnapshotError):  # a description that is not one is refused
                coord.end(rank, step, b"m")
            with pytest.raises(SnapshotError):  # so is one of another rank or step
                coord.end(rank, step, ShardedRecordMeta(rank, 2, step + 1, 0, 16).encode())
            coord.end(rank, step, ShardedRecordMeta(rank, 2, step, 0, 16).encode())

    try:
        for step in (1, 2):
            snapshot("a", 0, step)
            snapshot("b", 1, step)
        wait_until(lambda: committed() == 2, 10, "step 2 committed")
        for coord in nodes.values():  # what the agents' watches do
            coord.on_committed(etcd_client.get(keys.snapshot_committed).value)
        # step 3: a finishes, b dies between begin and end (its agent never announces)
        snapshot("a", 0, 3)
        snapshot("b", 1, 3, finish=False)
        time.sleep(1.0)
        assert committed() == 2
        assert nodes["a"].store.get(0, 2) is not None  # the committed one is still held
        assert nodes["b"].store.get(1, 3) is None  # incomplete: not readable
    finally:
        for coord in nodes.values():
            coord.close()


@pytest.mark.timeout(60)
def test_a_commit_of_a_thousand_nodes_is_one_small_transaction(etcd_client, job_id):
    """etcd refuses a transaction of more than 128 operations by default: the commit's
    compares do not grow with the world (the fence and the committed key only)."""
    keys = JobKeys(job_id)
    members = [f"n{i:04d}" for i in range(1000)]
    coord = SnapshotCoordinator(
        etcd_client, keys, members[0], SnapshotStore(prefix=f"etrain-{job_id}-wide"),
        lambda: RoundView(tuple(members), {}, frozenset()),
    )  # fmt: skip
    try:
        for node in members[:-1]:
            etcd_client.put(keys.snapshot_done(5, node), b"1")
        assert not coord.commit(5, members)  # one mark missing
        etcd_client.put(keys.snapshot_done(5, members[-1]), b"1")
        assert coord.commit(5, members)
        assert _committed_step(etcd_client, job_id) == 5
    finally:
        coord.close()


def _two_nodes(client, keys: JobKeys, tag: str) -> dict[str, SnapshotCoordinator]:
    """Coordinators of nodes a and b (rank 0 and 1), each record kept by its owner only."""
    return {
        name: SnapshotCoordinator(
            client, keys, name, SnapshotStore(prefix=f"etrain-{keys.job_id}-{tag}-{name}"),
            lambda rank=rank: RoundView(("a", "b"), {}, frozenset({rank})),
            scheme=ErasureScheme(1, 0),
        )
        for rank, name in enumerate(("a", "b"))
    }  # fmt: skip


@pytest.mark.timeout(60)
def test_a_new_round_keeps_a_step_committed_while_the_node_was_cut_off(etcd_client, job_id):
    """b never saw ``ctl/snapshot`` reach step 2 (its watch was cut off): its new round must
    still keep its records of step 2, which a restores from."""
    keys = JobKeys(job_id)
    nodes = _two_nodes(etcd_client, keys, "cut")

    def committed() -> int:
        return _committed_step(etcd_client, job_id)

    try:
        for step in (1, 2):
            for rank, coord in enumerate(nodes.values()):
                coord.begin(rank, step, 16).segment.tensor()[:16] = step
                coord.end(rank, step, ShardedRecordMeta(rank, 2, step, 0, 16).encode())
            wait_until(lambda s=step: committed() == s, 10, f"step {step} committed")
            nodes["a"].on_committed(etcd_client.get(keys.snapshot_committed).value)
            if step == 1:
                nodes["b"].on_committed(etcd_client.get(keys.snapshot_committed).value)
        assert nodes["b"].store.committed == 1  # the commit of step 2 never reached b
        for coord in nodes.values():
            coord.new_round()
        assert nodes["b"].store.committed == 2
        assert nodes["b"].store.get(1, 2) is not None  # kept: a restores step 2 from it
        assert nodes["b"].store.get(1, 1) is None  # older than the committed step: freed
    finally:
        for coord in nodes.values():
            coord.close()


@pytest.mark.timeout(60)
def test_a_step_dropped_by_a_new_round_is_never_committed_late(etcd_client, job_id):
    """b's done mark of step 2 was held up (b was cut off from etcd) while a began a new round
    and dropped step 2: once b's mark lands, step 2 must not be committed (it would be
    restored, and a holds no part of it); the steps of the new round still are."""
    keys = JobKeys(job_id)
    nodes = _two_nodes(etcd_client, keys, "late")

    def committed() -> int:
        return _committed_step(etcd_client, job_id)

    def write(rank: int, step: int, announce: bool = True) -> None:
        coord = nodes["ab"[rank]]
        owner = coord if announce else coord.store  # the store alone: no mark goes out
        owner.begin(rank, step, 16).segment.tensor()[:16] = step
        owner.end(rank, step, ShardedRecordMeta(rank, 2, step, 0, 16).encode())

    try:
        for rank in (0, 1):
            write(rank, 1)
        wait_until(lambda: committed() == 1, 10, "step 1 committed")
        write(0, 2)
        write(1, 2, announce=False)
        wait_until(lambda: etcd_client.get(keys.snapshot_done(2, "a")) is not None, 10,
                   "a's mark of step 2")  # fmt: skip
        nodes["a"].new_round()  # the fence moves past a's mark, then step 2 is dropped
        assert nodes["a"].store.get(0, 2) is None
        etcd_client.put(keys.snapshot_done(2, "b"), b"1")  # b's mark lands late
        assert not nodes["b"].commit(2, ("a", "b"))  # a's mark predates the fence
        assert committed() == 1
        # the new round's steps are committed as before
        for rank in (0, 1):
            write(rank, 2)
        wait_until(lambda: committed() == 2, 10, "step 2 of the new round committed")
        assert nodes["a"].store.get(0, 2) is not None
    finally:
        for coord in nodes.values():
            coord.close()


def _snapshot_args(workdir, steps: int, sleep: float) -> list[str]:
    return ["--steps", str(steps), "--out", str(workdir / "final.pt"), "--sleep", str(sleep)]


def _last_step(text: str, rank: int) -> int:
    steps = [int(line.split()[3]) for line in text.splitlines()
             if line.startswith(f"rank {rank}: step ")]  # fmt: skip
    return max(steps, default=-1)


@pytest.fixture(scope="module")
def snapshot_reference(tmp_path_factory):
    """The script's final parameters under torchrun (no agent: snapshots are a no-op)."""
    ref_dir = tmp_path_factory.mktemp("snapshot-ref")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(SNAPSHOT_SCRIPT), *_snapshot_args(ref_dir, REFERENCE_STEPS, 0)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ref_dir, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return load_params(ref_dir / "final.pt")


REFERENCE_STEPS = 12


def _restored_steps(text: str) -> list[int]:
    return [int(line.split()[4]) for line in text.splitlines() if "from memory" in line]


@pytest.mark.alone
@pytest.mark.timeout(240)
def test_worker_crash_restores_bit_identical_state_from_memory(
    cluster, etcd_endpoint, job_id, etcd_client, snapshot_reference
):
    args = _snapshot_args(cluster.workdir, REFERENCE_STEPS, 0.3)
    agents = [
        cluster.agent(
            n, etcd=etcd_endpoint, job_id=job_id, script=SNAPSHOT_SCRIPT, script_args=args
        )  # fmt: skip
        for n in ("a", "b")
    ]
    wait_until(lambda: _last_step(agents[1].text(), 3) >= 4, 150, "rank 3 at step 4")
    victim = random.choice([2, 3])
    killed_at = time.time()
    killed = subprocess.run(
        [sys.executable, "-m", "elastictrain.cli.main", "chaos", "kill", "--rank", str(victim),
         "--etcd", etcd_endpoint, "--job-id", job_id],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert killed.returncode == 0, killed.stderr
    for agent in agents:
        assert agent.wait(180) == 0, agent.text()
    # the crash was seen from the worker's session, before the agent reaped the process
    (lost,) = [e for e in read_events(etcd_client, job_id, "worker_lost") if e.node == "b"]
    assert lost.details["rank"] == victim and lost.time - killed_at < 0.5
    restart = read_events(etcd_client, job_id, "request_restart")
    assert "b" in [e.node for e in restart] and restart[0].time >= lost.time
    restored = _restored_steps(agents[0].text() + agents[1].text())
    assert len(restored) == 4 and len(set(restored)) == 1, restored  # every rank, one step
    assert restored[0] >= 3
    assert_bit_identical(load_params(cluster.workdir / "final.pt"), snapshot_reference)


@pytest.mark.alone
@pytest.mark.timeout(240)
def test_a_stopped_worker_is_declared_hung_and_the_job_recovers(
    cluster, etcd_endpoint, job_id, etcd_client, snapshot_reference
):
    args = _snapshot_args(cluster.workdir, REFERENCE_STEPS, 0.3)
    agents = [
        cluster.agent(
            n,
            etcd=etcd_endpoint,
            job_id=job_id,
            script=SNAPSHOT_SCRIPT,
            script_args=args,
            extra=["--hang-timeout", "2"],
        )  # fmt: skip
        for n in ("a", "b")
    ]
    wait_until(lambda: _last_step(agents[0].text(), 1) >= 3, 150, "rank 1 at step 3")
    status = subprocess.run(
        [sys.executable, "-m", "elastictrain.cli.main", "status", "--json", "--etcd",
         etcd_endpoint, "--job-id", job_id], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    workers = [w for n in json.loads(status.stdout)["nodes"] for w in n["workers"]]
    (victim,) = [w for w in workers if w["rank"] == 1]
    stopped_at = time.time()
    os.kill(victim["pid"], signal.SIGSTOP)
    for agent in agents:
        assert agent.wait(180) == 0, agent.text()
    (hung,) = read_events(etcd_client, job_id, "worker_hung")
    assert hung.node == "a" and hung.details["rank"] == 1
    # the timeout after its last heartbeat (at most one heartbeat interval before the stop)
    assert 2.0 - 0.6 <= hung.time - stopped_at < 2.0 + 1.0
    assert "a" in [e.node for e in read_events(etcd_client, job_id, "request_restart")]
    assert len(set(_restored_steps(agents[0].text() + agents[1].text()))) == 1
    assert_bit_identical(load_params(cluster.workdir / "final.pt"), snapshot_reference)


def _committed_step(client, job_id: str) -> int:
    kv = client.get(JobKeys(job_id).snapshot_committed)
    return -1 if kv is None else int(json.loads(kv.value)["step"])


def _records(endpoint: str, step: int, job_id: str) -> dict[int, bytes]:
    from elastictrain.rpc.agent_client import AgentClient

    with AgentClient(endpoint, credentials=job_credentials(job_id)) as agent:
        index = agent.snapshot_index()
        out = {}
        for info in index.records:
            if info.step == step:
                data = bytearray(info.nbytes)
                agent.read_snapshot(info.rank, step, data)
                out[info.rank] = bytes(data)
        return out


@pytest.mark.timeout(300)
def test_lost_node_snapshot_is_rebuilt_from_the_other_two(cluster, etcd_endpoint, etcd_client,
                                                          job_id):  # fmt: skip
    from elastictrain.coord.nodes import list_nodes
    from elastictrain.rpc.agent_client import AgentClient

    pause = cluster.workdir / "pause"
    args = [*_snapshot_args(cluster.workdir, 30, 0.2), "--pause-file", str(pause)]
    agents = {
        n: cluster.agent(
            n,
            etcd=etcd_endpoint,
            job_id=job_id,
            nnodes="2:3",
            nproc=1,
            max_restarts=2,
            extra=["--snapshot-ec", "2+1"],
            script=SNAPSHOT_SCRIPT,
            script_args=args,
        )  # fmt: skip
        for n in ("a", "b", "c")
    }
    wait_until(lambda: _committed_step(etcd_client, job_id) >= 3, 150, "step 3 committed")
    pause.touch()
    # let the last steps settle: the committed step stops moving
    previous = -2
    while (step := _committed_step(etcd_client, job_id)) != previous:
        previous = step
        time.sleep(1.5)
    endpoints = {n.node_id: n.endpoint for n in list_nodes(etcd_client, JobKeys(job_id))}
    cli = [sys.executable, "-m", "elastictrain.cli.main", "snapshot"]
    where = ["--etcd", etcd_endpoint, "--job-id", job_id]
    listed = subprocess.run([*cli, "list", *where, "--json"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    listing = json.loads(listed.stdout)
    assert {n["node"] for n in listing["nodes"]} == {"a", "b", "c"}
    assert {n["committed"] for n in listing["nodes"]} == {step}
    health = listing["chunk_health"]
    assert health["step"] == step and set(health["owners"]) == {"a", "b", "c"}
    for info in health["owners"].values():  # 2+1 erasure over 3 nodes, 2 chunks on peers
        assert (info["redundancy"], info["present"], info["total"], info["k"]) == (
            "erasure",
            2,
            2,
            2,
        )
    verified = subprocess.run([*cli, "verify", *where], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "0 problem(s)" in verified.stdout, verified.stdout
    original = _records(endpoints["c"], step, job_id)
    assert original, "node c holds no record of the committed step"

    os.kill(agents["c"].popen.pid, 9)
    wait_until(lambda: "c" not in {n.node_id for n in list_nodes(etcd_client, JobKeys(job_id))},
               20, "c's lease to expire")  # fmt: skip
    with AgentClient(endpoints["a"], timeout=60, credentials=job_credentials(job_id)) as a:
        reply = a.recover_snapshot(step)
    assert list(reply.recovered_owners) == ["c"]
    assert sorted(reply.ranks) == sorted(original)
    rebuilt = _records(endpoints["a"], step, job_id)
    for rank, data in original.items():
        assert rebuilt[rank] == data, f"rank {rank}'s record differs after the rebuild"
    pause.unlink()
    for name in ("a", "b"):
        assert agents[name].wait(200) == 0, agents[name].text()
    text = agents["a"].text() + agents["b"].text()
    assert f"restored step {step} from memory" in text


@pytest.mark.timeout(300)
def test_disk_tier_snapshot_restores_a_whole_new_job(cluster, etcd_endpoint, job_id, tmp_path):
    steps_first, steps_total = 5, 9
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(SNAPSHOT_SCRIPT), *_snapshot_args(ref_dir, steps_total, 0)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ref_dir, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    snapshots = tmp_path / "snapshots"
    disk = ["--snapshot-dir", str(snapshots)]
    first = [
        cluster.agent(
            n,
            etcd=etcd_endpoint,
            job_id=job_id,
            extra=disk,
            script=SNAPSHOT_SCRIPT,
            script_args=_snapshot_args(cluster.workdir, steps_first, 0),
        )  # fmt: skip
        for n in ("a", "b")
    ]
    for agent in first:
        assert agent.wait(150) == 0, agent.text()
    assert sorted(p.name for p in snapshots.iterdir()) == ["a", "b"]  # one root per node
    # a whole new job (new id, new agents, new etcd keys) starts from the disk tier
    second = [
        cluster.agent(
            f"{n}2",
            etcd=etcd_endpoint,
            job_id=job_id + "-2",
            extra=disk,
            script=SNAPSHOT_SCRIPT,
            script_args=_snapshot_args(cluster.workdir, steps_total, 0),
        )  # fmt: skip
        for n in ("a", "b")
    ]
    for agent in second:
        assert agent.wait(150) == 0, agent.text()
    text = second[0].text() + second[1].text()
    assert text.count(f"restored step {steps_first - 1} from disk") == 4, text
    assert_bit_identical(
        load_params(cluster.workdir / "final.pt"), load_params(ref_dir / "final.pt")
    )
