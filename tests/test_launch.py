"""End-to-end: real agents, real etcd, real workers running DDP on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from launch_harness import (
    DDP_SCRIPT,
    assert_bit_identical,
    checkpoint_epoch,
    ddp_args,
    load_params,
    wait_until,
)

from elastictrain.events import read_events

EPOCHS = 6
ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory):
    """Final parameters of the script under torchrun, 4 ranks, no fault."""
    workdir = tmp_path_factory.mktemp("torchrun")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", "4", str(DDP_SCRIPT), *ddp_args(workdir, EPOCHS),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return load_params(workdir / "final.pt")


def _etrain(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*ETRAIN, *args], capture_output=True, text=True, timeout=timeout)


def _status(etcd: str, job_id: str) -> dict:
    done = _etrain("status", "--json", "--etcd", etcd, "--job-id", job_id)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _running_count(etcd: str, job_id: str) -> int:
    """Running workers, or 0 while the job is not (yet) registered."""
    done = _etrain("status", "--json", "--etcd", etcd, "--job-id", job_id)
    return len(_running_workers(json.loads(done.stdout))) if done.returncode == 0 else 0


def _running_workers(status: dict) -> list[dict]:
    return [w for n in status["nodes"] for w in n["workers"] if w["state"] == "RUNNING"]


@pytest.mark.timeout(240)
def test_two_agents_match_torchrun(cluster, etcd_endpoint, job_id, torchrun_reference):
    args = ddp_args(cluster.workdir, EPOCHS)
    a = cluster.agent("a", etcd=etcd_endpoint, job_id=job_id, script_args=args)
    b = cluster.agent("b", etcd=etcd_endpoint, job_id=job_id, script_args=args)
    assert a.wait(180) == 0, a.text()
    assert b.wait(30) == 0, b.text()
    assert_bit_identical(load_params(cluster.workdir / "final.pt"), torchrun_reference)


@pytest.mark.timeout(240)
def test_worker_sigkill_restarts_and_matches(
    cluster, etcd_endpoint, etcd_client, job_id, torchrun_reference
):
    args = ddp_args(cluster.workdir, EPOCHS, sleep=0.4)
    a = cluster.agent("a", etcd=etcd_endpoint, job_id=job_id, script_args=args)
    b = cluster.agent("b", etcd=etcd_endpoint, job_id=job_id, script_args=args)
    wait_until(lambda: checkpoint_epoch(cluster.workdir) >= 1, 150, "epoch 1 checkpoint")

    # While the job runs, status shows both nodes and all four workers with live pids.
    status = _status(etcd_endpoint, job_id)
    assert sorted(n["node_id"] for n in status["nodes"]) == ["a", "b"]
    workers = _running_workers(status)
    assert sorted(w["rank"] for w in workers) == [0, 1, 2, 3]
    for worker in workers:
        os.kill(worker["pid"], 0)  # exists
    text = _etrain("status", "--once", "--etcd", etcd_endpoint, "--job-id", job_id).stdout
    for worker in workers:
        assert str(worker["pid"]) in text

    killed = _etrain("chaos", "kill", "--rank", "3", "--etcd", etcd_endpoint, "--job-id", job_id)
    assert killed.returncode == 0, killed.stderr
    assert "rank 3" in killed.stdout

    assert a.wait(180) == 0, a.text()
    assert b.wait(30) == 0, b.text()
    # whichever node reaped a failed worker first asked (rank 3's, or a peer of the broken
    # collective): one restart either way
    assert read_events(etcd_client, job_id, "request_restart")
    rounds = read_events(etcd_client, job_id, "start_round")
    assert {(e.node, e.details["restart_count"]) for e in rounds} == {
        ("a", 0),
        ("b", 0),
        ("a", 1),
        ("b", 1),
    }
    assert_bit_identical(load_params(cluster.workdir / "final.pt"), torchrun_reference)


@pytest.mark.timeout(240)
def test_restarts_exhausted_fails_with_root_cause(cluster, etcd_endpoint, job_id):
    args = ddp_args(cluster.workdir, 40, sleep=0.3)
    a = cluster.agent("a", etcd=etcd_endpoint, job_id=job_id, max_restarts=0, script_args=args)
    b = cluster.agent("b", etcd=etcd_endpoint, job_id=job_id, max_restarts=0, script_args=args)
    wait_until(lambda: checkpoint_epoch(cluster.workdir) >= 0, 150, "first checkpoint")
    status = _status(etcd_endpoint, job_id)
    victim = next(w for w in _running_workers(status) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    assert a.wait(60) == 1, a.text()
    assert b.wait(60) == 1, b.text()
    for proc in (a, b):
        text = proc.text()
        assert "Root Cause (first observed failure)" in text
        assert f"exitcode  : -9 (pid: {victim['pid']})" in text
        # workers print their own tracebacks ("[rankN]: ..."); the agent itself must not
        agent_lines = [line for line in text.splitlines() if not line.startswith("[rank")]
        assert not any("Traceback (most recent call last)" in line for line in agent_lines)


@pytest.mark.timeout(240)
def test_lost_agent_survivor_finishes_alone(cluster, etcd_endpoint, etcd_client, job_id):
    args = ddp_args(cluster.workdir, EPOCHS, sleep=0.4)
    a = cluster.agent("a", etcd=etcd_endpoint, job_id=job_id, nnodes="1:2", script_args=args)
    b = cluster.agent("b", etcd=etcd_endpoint, job_id=job_id, nnodes="1:2", script_args=args)
    wait_until(lambda: _running_count(etcd_endpoint, job_id) == 4, 150, "4 workers", poll=0.5)
    wait_until(lambda: checkpoint_epoch(cluster.workdir) >= 1, 150, "epoch 1 checkpoint")
    b_workers = [w["pid"] for n in _status(etcd_endpoint, job_id)["nodes"] if n["node_id"] == "b"
                 for w in n["workers"]]  # fmt: skip
    os.kill(b.popen.pid, signal.SIGKILL)
    assert a.wait(180) == 0, a.text()
    rounds = [e.details["nodes"] for e in read_events(etcd_client, job_id, "start_round")
              if e.node == "a"]  # fmt: skip
    assert rounds[0] == ["a", "b"] and rounds[-1] == ["a"]
    # the lease, not stale rendezvous heartbeats, dropped b
    lost = read_events(etcd_client, job_id, "node_lost")
    assert [(e.node, e.details["lost"]) for e in lost] == [("a", ["b"])]
    # the dead agent's workers died with it (parent-death signal), none is left behind
    for pid in b_workers:
        wait_until(lambda pid=pid: not _alive(pid), 10, f"worker {pid} of the dead agent to exit")
    assert (cluster.workdir / "final.pt").exists()


@pytest.mark.timeout(300)
def test_third_agent_joins_at_next_round(cluster, etcd_endpoint, etcd_client, job_id):
    args = ddp_args(cluster.workdir, 10, sleep=0.5)
    procs = [
        cluster.agent(n, etcd=etcd_endpoint, job_id=job_id, nnodes="2:3", nproc=1, script_args=args)
        for n in ("a", "b")
    ]
    wait_until(lambda: checkpoint_epoch(cluster.workdir) >= 1, 150, "epoch 1 checkpoint")
    procs.append(
        cluster.agent(
            "c", etcd=etcd_endpoint, job_id=job_id, nnodes="2:3", nproc=1, script_args=args
        )  # fmt: skip
    )
    for proc in procs:
        assert proc.wait(200) == 0, proc.text()
    rounds = [e.details["nodes"] for e in read_events(etcd_client, job_id, "start_round")]
    assert ["a", "b", "c"] in rounds
    assert any(e.details.get("waiting") for e in read_events(etcd_client, job_id, "rejoin"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_embedded_etcd_default_runs_and_cleans_up(cluster, job_id, runtime_dir):
    args = ddp_args(cluster.workdir, 2)
    argv = [*ETRAIN, "launch", "--nproc-per-node", "2", "--job-id", job_id, str(DDP_SCRIPT), *args]
    proc = cluster.start("solo", argv)
    assert proc.wait(100) == 0, proc.text()
    assert "started a private etcd" in proc.text()
    assert (cluster.workdir / "final.pt").exists()
    assert not (runtime_dir / job_id / "etcd.json").exists()
    etcd_pids = subprocess.run(
        ["pgrep", "-f", "--", f"--name etrain-{job_id} "], capture_output=True
    )
    assert etcd_pids.returncode == 1, etcd_pids.stdout  # no such process left


@pytest.mark.timeout(120)
def test_torchrun_runs_on_our_etcd_v3_backend(tmp_path, etcd_endpoint, job_id):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "etcd-v3", "--rdzv-endpoint", etcd_endpoint, "--rdzv-id", job_id,
        str(DDP_SCRIPT), *ddp_args(tmp_path, 2),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Exception while registering out of tree plugin" not in done.stderr
    assert (tmp_path / "final.pt").exists()
