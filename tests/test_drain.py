"""Draining nodes end to end: real agents, etcd and worker processes on gloo (3 agents x 2
workers, the ``Job`` API, deterministic reduction). ``etrain drain`` takes one node out and a
SIGTERM to its agent another; the job goes on without them. Checked from the job's events and
end state: each left at the step boundary it planned, no finished step was redone, the last
node's processes never restarted, the final parameters are bit-identical to the fault-free
run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from launch_harness import (
    SCRIPTS,
    Cluster,
    assert_bit_identical,
    committed_step,
    load_params,
    wait_until,
)

from elastictrain.events import read_events

JOB_SCRIPT = SCRIPTS / "job_train.py"
STEPS = 60
# divisible over 6, 4 and 2 ranks; no straggler re-plans (this machine's noise)
SHAPE = ["--global-batch", "24", "--micro-batch", "2", "--logical-workers", "12",
         "--fail-after", "-1"]

# alone: the second drain must come before the job ends, which load can make it miss
pytestmark = [pytest.mark.e2e, pytest.mark.alone, pytest.mark.timeout(360)]


def _workers(cluster: Cluster, node: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in (cluster.workdir / "workers").glob("*.json")]
    return [w for w in found if w["node"] == node]


def test_drained_nodes_leave_at_a_step_boundary_and_no_step_is_lost(
        cluster, etcd_endpoint, etcd_client, job_id, tmp_path):  # fmt: skip
    from test_job import _train

    (tmp_path / "ref").mkdir()
    reference = _train(tmp_path / "ref", 1, "--steps", str(STEPS), *SHAPE)
    args = ["--steps", str(STEPS), "--out", str(cluster.workdir / "final.pt"),
            "--reduction", "deterministic", "--step-sleep", "0.15",
            "--workers-dir", str(cluster.workdir / "workers"), *SHAPE]  # fmt: skip
    a, b, c = (cluster.agent(node, etcd=etcd_endpoint, job_id=job_id, nnodes="3", nproc=2,
                             max_restarts=0, script=JOB_SCRIPT, script_args=args)
               for node in "abc")  # fmt: skip
    wait_until(lambda: committed_step(etcd_client, job_id) >= 4, 150, "step 4 committed")
    drained = subprocess.run(
        [sys.executable, "-m", "elastictrain.cli.main", "drain", "--node", "c", "--etcd",
         etcd_endpoint, "--job-id", job_id, "--wait", "90"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "node c left: left the world after step" in drained.stdout
    assert c.wait(10) == 0, c.text()
    assert a.popen.poll() is None and b.popen.poll() is None, "the job ended early"
    os.kill(b.popen.pid, signal.SIGTERM)  # a preemption notice, while the job trains on
    assert b.wait(90) == 0, b.text()
    assert a.wait(200) == 0, a.text()

    drains = {e.node: e for e in read_events(etcd_client, job_id, "drain")}
    assert drains["c"].details["by"] == "etrain drain" and drains["b"].details["by"] == "SIGTERM"
    assert sorted(drains["c"].details["ranks"]) == [4, 5]
    assert sorted(drains["b"].details["ranks"]) == [2, 3]
    assert {e.node for e in read_events(etcd_client, job_id, "drained")} == {"b", "c"}
    worlds = [(e.details["epoch"], e.details["world_size"])
              for e in read_events(etcd_client, job_id, "world_changed") if e.node == "a"]
    assert worlds == [(1, 4), (2, 2)]
    # every re-forming rank went on from the step it had done: none was redone, and the
    # step was the one each drain planned
    recovered = read_events(etcd_client, job_id, "recovered")
    by_epoch = {1: drains["c"].details["after_step"], 2: drains["b"].details["after_step"]}
    assert sorted((e.details["epoch"], e.details["rank"]) for e in recovered) == [
        (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    for e in recovered:
        assert e.details["resume_step"] == e.details["steps_before"], e.details
        assert e.details["resume_step"] == by_epoch[e.details["epoch"]], e.details
        assert not e.details["restored"]
    # the drained workers left after that step; the last node's never restarted
    for node in ("c", "b"):
        left = _workers(cluster, node)
        assert len(left) == 2 and all(w["done_rank"] == -1 for w in left), left
    kept = _workers(cluster, "a")
    assert len(kept) == 2 and sorted(w["done_rank"] for w in kept) == [0, 1]
    assert sorted(w["start_rank"] for w in kept) == [0, 1]
    assert not read_events(etcd_client, job_id, "request_restart")
    assert not read_events(etcd_client, job_id, "drain_timeout")
    assert_bit_identical(load_params(cluster.workdir / "final.pt")["params"], reference["params"])
