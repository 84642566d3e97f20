"""In-place recovery end to end: real agents, etcd and worker processes on gloo, the ``Job``
API with dropout, faults injected by rank and step; final parameters against the fault-free
run (bit-identical with the deterministic reduction)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from launch_harness import SCRIPTS, Cluster

from elastictrain.coord.keys import JobKeys
from elastictrain.events import read_events

JOB_SCRIPT = SCRIPTS / "job_train.py"
STEPS = 20

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The fault-free run: one process, same steps (the result does not depend on the world)."""
    from test_job import _train

    return _train(tmp_path_factory.mktemp("inplace-ref"), 1, "--steps", str(STEPS))


def _launch(cluster: Cluster, etcd: str, job_id: str, nodes: str, *flags: str,
            reduction: str = "deterministic", step_sleep: float = 0.05) -> list:  # fmt: skip
    args = ["--steps", str(STEPS), "--out", str(cluster.workdir / "final.pt"),
            "--reduction", reduction, "--step-sleep", str(step_sleep),
            "--workers-dir", str(cluster.workdir / "workers")]  # fmt: skip
    return [
        cluster.agent(node, etcd=etcd, job_id=job_id, nnodes="1:2", nproc=2, max_restarts=0,
                      script=JOB_SCRIPT, script_args=args, extra=list(flags))  # fmt: skip
        for node in nodes
    ]


def _workers(cluster: Cluster, node: str | None = None) -> list[dict]:
    """What each worker process of the job recorded: its node, pid, first and last rank."""
    found = [json.loads(p.read_text()) for p in (cluster.workdir / "workers").glob("*.json")]
    return [w for w in found if node is None or w["node"] == node]


def _pids(cluster: Cluster, node: str | None = None) -> tuple[set[int], set[int]]:
    """(pids that started with a rank, pids that finished with one)."""
    workers = _workers(cluster, node)
    return ({w["pid"] for w in workers if w["start_rank"] >= 0},
            {w["pid"] for w in workers if "done_rank" in w})  # fmt: skip


def _wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    """Wait until ``condition()`` holds (the job's own progress: a step done, an event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _committed(client, job_id: str) -> int:
    """The job's newest committed snapshot step (-1: none yet)."""
    kv = client.get(JobKeys(job_id).snapshot_committed)
    return int(json.loads(kv.value)["step"]) if kv is not None else -1


def _check(cluster: Cluster, reference: dict, reduction: str) -> None:
    final = torch.load(cluster.workdir / "final.pt")
    if reduction == "deterministic":
        for key, value in reference["params"].items():
            assert torch.equal(final["params"][key], value), f"{key} differs"
        assert final["losses"][-5:] == reference["losses"][-5:]
    else:
        for key, value in reference["params"].items():
            error = float((final["params"][key] - value).norm() / value.norm())
            assert error < 1e-5, f"{key}: relative error {error}"
        assert final["losses"] == pytest.approx(reference["losses"], rel=1e-5)


@pytest.mark.parametrize("reduction", ["deterministic", "fast"])
def test_a_lost_node_shrinks_the_world_in_place(cluster, etcd_endpoint, etcd_client, job_id,
                                                reference, reduction):  # fmt: skip
    a, b = _launch(cluster, etcd_endpoint, job_id, "ab", "--fault", "kill-agent:rank=2:step=13",
                   reduction=reduction)  # fmt: skip
    assert a.wait(240) == 0, a.text()
    assert b.wait(30) != 0
    started, done = _pids(cluster, "a")
    assert len(started) == 2 and done == started  # the survivors were never restarted
    (lost,) = read_events(etcd_client, job_id, "node_lost")
    assert (lost.node, lost.details["lost"]) == ("a", ["b"])
    (world,) = read_events(etcd_client, job_id, "world_changed")
    assert (world.details["epoch"], world.details["world_size"]) == (1, 2)
    recovered = read_events(etcd_client, job_id, "recovered")
    assert sorted(e.details["rank"] for e in recovered) == [0, 1]
    assert {e.details["resume_step"] for e in recovered} <= {12, 13}
    assert not read_events(etcd_client, job_id, "request_restart")
    _check(cluster, reference, reduction)


@pytest.mark.alone
def test_a_killed_worker_is_dropped_and_the_survivors_go_on(cluster, etcd_endpoint, etcd_client,
                                                            job_id, reference):  # fmt: skip
    a, b = _launch(cluster, etcd_endpoint, job_id, "ab", "--fault", "kill:rank=3:step=7")
    for proc in (a, b):
        assert proc.wait(240) == 0, proc.text()
    started, done = _pids(cluster)
    assert len(started) == 4 and len(done) == 3 and done < started
    (fault,) = read_events(etcd_client, job_id, "fault")
    (lost,) = read_events(etcd_client, job_id, "reconfigure")
    assert lost.details["ranks"] == [3] and lost.time - fault.time < 0.5  # seen at once
    (world,) = read_events(etcd_client, job_id, "world_changed")[:1]
    assert world.details["world_size"] == 3
    assert sorted(e.details["rank"] for e in read_events(etcd_client, job_id, "recovered")) == [
        0, 1, 2
    ]  # fmt: skip
    _check(cluster, reference, "deterministic")


@pytest.mark.alone
def test_a_killed_worker_is_replaced_by_a_hot_spare(cluster, etcd_endpoint, etcd_client, job_id,
                                                    reference):  # fmt: skip
    a, b = _launch(cluster, etcd_endpoint, job_id, "ab", "--fault", "kill:rank=3:step=7",
                   "--hot-spares", "1", step_sleep=0.4)  # fmt: skip
    for proc in (a, b):
        assert proc.wait(240) == 0, proc.text()
    started, done = _pids(cluster)
    assert len(started) == 4 and len(done & started) == 3  # the survivors were never restarted
    (taker,) = [w for w in _workers(cluster) if w["pid"] in done - started]
    assert (taker["start_rank"], taker["done_rank"], taker["world"]) == (-1, 3, 4)  # a spare
    (fault,) = read_events(etcd_client, job_id, "fault")
    assert fault.details["rank"] == 3 and fault.details["step"] >= 7
    (reconfigure,) = read_events(etcd_client, job_id, "reconfigure")
    assert reconfigure.details["ranks"] == [3] and reconfigure.time - fault.time < 0.5
    (world,) = read_events(etcd_client, job_id, "world_changed")[:1]
    assert world.details["world_size"] == 4
    recovered = {e.details["rank"]: e.details for e in read_events(etcd_client, job_id,
                                                                    "recovered")}  # fmt: skip
    assert sorted(recovered) == [0, 1, 2, 3] and recovered[3]["restored"]
    assert not recovered[0]["restored"]  # a survivor keeps its state when it is the step's
    assert len(read_events(etcd_client, job_id, "start_spares")) == 3  # 2, then b's next one
    _check(cluster, reference, "deterministic")


@pytest.mark.alone
def test_a_stopped_worker_is_declared_hung_and_dropped(cluster, etcd_endpoint, etcd_client,
                                                       job_id, reference):  # fmt: skip
    a, b = _launch(cluster, etcd_endpoint, job_id, "ab", "--fault", "stop:rank=1:step=5",
                   "--hang-timeout", "2")  # fmt: skip
    for proc in (a, b):
        assert proc.wait(240) == 0, proc.text()
    (fault,) = read_events(etcd_client, job_id, "fault")
    (hung,) = read_events(etcd_client, job_id, "worker_hung")
    assert hung.details["rank"] == 1 and 1.4 <= hung.time - fault.time < 3.5
    assert read_events(etcd_client, job_id, "world_changed")[0].details["world_size"] == 3
    _check(cluster, reference, "deterministic")


@pytest.mark.alone  # the node must join before the job ends
def test_a_job_grows_from_one_node_to_two_in_place(cluster, etcd_endpoint, etcd_client, job_id,
                                                   reference):  # fmt: skip
    reduction = "deterministic"  # the fast reduction in place: the shrink test's [fast] case
    (a,) = _launch(cluster, etcd_endpoint, job_id, "a", step_sleep=0.6, reduction=reduction)
    _wait_for(lambda: _committed(etcd_client, job_id) >= 2, what="step 2 committed on node a")
    (b,) = _launch(cluster, etcd_endpoint, job_id, "b", step_sleep=0.6, reduction=reduction)
    for proc in (a, b):
        assert proc.wait(240) == 0, proc.text()
    started, done = _pids(cluster, "a")
    assert len(started) == 2 and done == started  # node a's workers were never restarted
    joined = _workers(cluster, "b")
    assert sorted(w.get("done_rank") for w in joined) == [2, 3]
    (join,) = read_events(etcd_client, job_id, "join_world")
    assert join.node == "b"
    (grow,) = read_events(etcd_client, job_id, "world_changed")[:1]
    assert grow.details["world_size"] == 4
    recovered = {e.details["rank"]: e.details for e in read_events(etcd_client, job_id,
                                                                    "recovered")}  # fmt: skip
    assert sorted(recovered) == [0, 1, 2, 3] and recovered[2]["restored"]
    assert not read_events(etcd_client, job_id, "request_restart")
    _check(cluster, reference, reduction)


@pytest.mark.alone  # the node must come back before the job ends
def test_a_lost_node_comes_back_in_place(cluster, etcd_endpoint, etcd_client, job_id, reference):
    a, b = _launch(cluster, etcd_endpoint, job_id, "ab", "--fault", "kill-agent:rank=2:step=4",
                   step_sleep=0.6)  # fmt: skip
    sizes = lambda: [e.details["world_size"]  # noqa: E731
                     for e in read_events(etcd_client, job_id, "world_changed")]  # fmt: skip
    _wait_for(lambda: 2 in sizes(), what="the world without node b")
    assert b.wait(30) != 0
    (back,) = [cluster.agent("b-again", etcd=etcd_endpoint, job_id=job_id, nnodes="1:2", nproc=2,
                             max_restarts=0, script=JOB_SCRIPT,
                             script_args=["--steps", str(STEPS), "--step-sleep", "0.6"],
                             extra=["--node-id", "b"])]  # fmt: skip
    for proc in (a, back):
        assert proc.wait(240) == 0, proc.text()
    started, done = _pids(cluster, "a")
    assert len(started) == 2 and done == started
    assert sizes()[:2] == [2, 4]
    assert [e.node for e in read_events(etcd_client, job_id, "join_world")] == ["b"]
    _check(cluster, reference, "deterministic")


def test_a_second_fault_during_the_recovery_still_recovers(cluster, etcd_endpoint, etcd_client,
                                                           job_id, reference):  # fmt: skip
    a, b = _launch(cluster, etcd_endpoint, job_id, "ab", "--fault", "kill:rank=3:step=7",
                   "--fault", "kill:rank=1:step=7:at=reform")  # fmt: skip
    for proc in (a, b):
        assert proc.wait(240) == 0, proc.text()
    faults = read_events(etcd_client, job_id, "fault")
    assert sorted(f.details["rank"] for f in faults) == [1, 3]
    worlds = [(e.details["epoch"], e.details["world_size"])
              for e in read_events(etcd_client, job_id, "world_changed")]  # fmt: skip
    assert (1, 3) in worlds and (2, 2) in worlds
    final = {e.details["rank"] for e in read_events(etcd_client, job_id, "recovered")
             if e.details["epoch"] == 2}  # fmt: skip
    assert final == {0, 1}
    _check(cluster, reference, "deterministic")
