"""Stragglers end to end: real agents, etcd and worker processes on gloo (2 agents x 2
workers), a rank's compute slowed by a planned fault; the re-plans read from the job's events,
the final parameters against the unslowed run. The ranks time their compute by their own
thread's CPU time: this machine runs more ranks than it has cores, so wall time would mostly
measure its scheduler."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from elastictrain.cli.job_state import read_job_state
from launch_harness import SCRIPTS, Cluster

from elastictrain.constants import ENV_COMPUTE_CLOCK
from elastictrain.coord.etcd import EtcdClient
from elastictrain.errors import ElasticTrainError
from elastictrain.events import read_events

JOB_SCRIPT = SCRIPTS / "job_train.py"
SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "status.schema.json").read_text())
# 64 logical workers of 4 samples: one of 4 ranks at half speed can get 96 % of the ideal
SHAPE = ["--global-batch", "256", "--micro-batch", "4", "--logical-workers", "64",
         "--samples", "512", "--hidden", "512"]  # fmt: skip
# This 2-core machine runs 4 ranks, 2 agents and etcd: a healthy rank's smoothed speed strays
# by up to ~30 % (measured), more than the default threshold (0.2) is made for. A 2x slower
# rank's share is off by 43 %, so it is still found; so is its recovery.
POLICY = ["--threshold", "0.35"]

pytestmark = [pytest.mark.timeout(300), pytest.mark.e2e, pytest.mark.alone]


def _reference(tmp_path, steps: int) -> dict:
    from test_job import _train

    return _train(tmp_path, 1, "--steps", str(steps), *SHAPE)


def _launch(cluster: Cluster, etcd: str, job_id: str, steps: int, fault: str | None,
            *args: str, reduction: str = "deterministic") -> list:  # fmt: skip
    script_args = ["--steps", str(steps), "--out", str(cluster.workdir / "final.pt"),
                   "--reduction", reduction, *SHAPE, *POLICY, *args]  # fmt: skip
    return [
        cluster.agent(node, etcd=etcd, job_id=job_id, nnodes="1:2", nproc=2, max_restarts=0,
                      script=JOB_SCRIPT, script_args=script_args,
                      extra=["--fault", fault] if fault else [],
                      env={ENV_COMPUTE_CLOCK: "thread"})  # fmt: skip
        for node in "ab"
    ]


def _etrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elastictrain.cli.main", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def _workers(etcd: str, job_id: str, cli: bool = False) -> dict[int, dict]:
    """Rank -> its row in ``etrain status --json`` (empty while the job is not up): read
    here through the same reader, or (``cli``) from the command itself."""
    if cli:
        done = _etrain("status", "--json", "--etcd", etcd, "--job-id", job_id)
        if done.returncode != 0:
            return {}
        state = json.loads(done.stdout)
    else:
        client = EtcdClient.from_spec(etcd, timeout=5.0)
        try:
            state = json.loads(json.dumps(read_job_state(client, job_id, etcd).to_json()))
        except ElasticTrainError:
            return {}
        finally:
            client.close()
    jsonschema.validate(state, SCHEMA)
    nodes = state["nodes"]
    return {w["rank"]: w for n in nodes for w in n["workers"] if w["state"] == "RUNNING"}


def _wait_for(condition, procs, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert all(p.popen.poll() is None for p in procs), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def _same(final: dict, reference: dict, reduction: str) -> None:
    for key, value in reference["params"].items():
        if reduction == "deterministic":
            assert torch.equal(final["params"][key], value), f"{key} differs"
        else:
            error = float((final["params"][key] - value).norm() / value.norm())
            assert error < 1e-5, f"{key}: relative error {error}"


@pytest.mark.parametrize("reduction", ["deterministic", "fast"])
def test_a_slow_rank_gets_less_work_and_gets_it_back(cluster, etcd_endpoint, etcd_client,
                                                     job_id, tmp_path, reduction):  # fmt: skip
    steps = 75
    procs = _launch(cluster, etcd_endpoint, job_id, steps, "slow:rank=3:step=10:factor=2:until=60",
                    reduction=reduction)  # fmt: skip
    for proc in procs:
        assert proc.wait(240) == 0, proc.text()
    (fault,) = read_events(etcd_client, job_id, "fault")
    assert (fault.details["kind"], fault.details["step"], fault.details["factor"]) == (
        "slow", 10, 2.0)
    replans = read_events(etcd_client, job_id, "replan")
    seen = [(e.details["step"], e.details["workers"], e.details["speeds"]) for e in replans]
    assert replans, "no re-plan"
    first, last = replans[0], replans[-1]
    # detected within 10 steps of its start, and given less work than any other rank (this
    # machine's own noise moves the healthy ranks' speeds too)
    assert 10 < first.details["step"] <= 20, seen
    workers, speeds = first.details["workers"], first.details["speeds"]
    assert sum(workers) == 64 and workers[3] < min(workers[:3]), seen
    assert speeds[3] < 0.7 * sorted(speeds[:3])[1], seen
    # its work back within 10 steps of its end: at least its even share (on this machine a
    # healthy rank's speed can stray far enough to keep the split uneven; the even split
    # itself is checked on hosts with a core per rank by benchmarks/straggler_bench.py)
    assert 60 < last.details["step"] <= 70 and last.details["workers"][3] >= 16, seen
    assert not read_events(etcd_client, job_id, "straggler_failed")
    assert not read_events(etcd_client, job_id, "reconfigure")
    _same(torch.load(cluster.workdir / "final.pt"), _reference(tmp_path, steps), reduction)


def test_a_rank_far_too_slow_for_too_long_is_failed_and_recovered_in_place(
        cluster, etcd_endpoint, etcd_client, job_id, tmp_path):  # fmt: skip
    steps = 30
    procs = _launch(cluster, etcd_endpoint, job_id, steps, "slow:rank=3:step=4:factor=10",
                    "--fail-after", "6")  # fmt: skip
    for proc in procs:
        assert proc.wait(240) == 0, proc.text()
    (failed,) = read_events(etcd_client, job_id, "straggler_failed")
    assert failed.node == "b" and failed.details["failed"] == [3]
    assert 4 + 6 <= failed.details["step"] <= 4 + 6 + 8
    (lost,) = read_events(etcd_client, job_id, "reconfigure")
    assert lost.details["ranks"] == [3]
    (world,) = read_events(etcd_client, job_id, "world_changed")[:1]
    assert world.details["world_size"] == 3
    assert not read_events(etcd_client, job_id, "request_restart")
    _same(torch.load(cluster.workdir / "final.pt"), _reference(tmp_path, steps), "deterministic")


def test_chaos_slow_through_the_cli_is_seen_in_status_and_ended_with_off(
        cluster, etcd_endpoint, etcd_client, job_id, tmp_path):  # fmt: skip
    steps, target = 100, ["--etcd", etcd_endpoint, "--job-id", job_id]
    procs = _launch(cluster, etcd_endpoint, job_id, steps, None, "--step-sleep", "0.05")
    _wait_for(lambda: _workers(etcd_endpoint, job_id).get(1, {}).get("step", -1) >= 5, procs,
              "step 5")  # fmt: skip
    slow = _etrain("chaos", "slow", "--rank", "1", "--factor", "3", *target)
    assert slow.returncode == 0 and "slowed rank 1 x3" in slow.stdout, slow.stderr
    _wait_for(lambda: read_events(etcd_client, job_id, "replan"), procs, "a re-plan")
    # each node's record is as of its own last write: wait until both show the same plan
    rows = _wait_for(lambda: (w := _workers(etcd_endpoint, job_id)) and len(w) == 4 and
                     abs(sum(row["share"] for row in w.values()) - 1.0) < 1e-4 and
                     w[1]["share"] < min(w[r]["share"] for r in (0, 2, 3)) and w, procs,
                     "rank 1's smaller share in status")  # fmt: skip
    assert all(row["speed"] > 0 for row in rows.values())
    assert len(_workers(etcd_endpoint, job_id, cli=True)) == 4  # the command's own output
    off = _etrain("chaos", "slow", "--rank", "1", "--off", *target)
    assert off.returncode == 0 and "ended the slowdown of rank 1" in off.stdout, off.stderr
    _wait_for(lambda: read_events(etcd_client, job_id, "replan")[-1].details["workers"] ==
              [16] * 4, procs, "the even split again")  # fmt: skip
    for proc in procs:
        assert proc.wait(240) == 0, proc.text()
    faults = read_events(etcd_client, job_id, "fault")
    assert [(e.details["kind"], e.details["factor"]) for e in faults] == [("slow", 3.0),
                                                                           ("slow", 1.0)]
    _same(torch.load(cluster.workdir / "final.pt"), _reference(tmp_path, steps), "deterministic")
