"""The agent's Prometheus endpoint: the text it renders (pure), its HTTP server, and the
counters moving on a real job around a ``chaos kill``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from elastictrain.agent.metrics import AgentCounters, render_metrics
from elastictrain.agent.metrics_server import MetricsServer
from launch_harness import SCRIPTS, Cluster

from elastictrain.coord.keys import JobKeys
from elastictrain.errors import ConfigError
from elastictrain.events import read_events
from elastictrain.node_status import NodeStatus, SnapshotStatus, WorkerStatus

_SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (\S+)$')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """(name, labels) -> value of every sample; each line checked against the text format."""
    samples: dict[tuple[str, frozenset], float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter", "summary"), line
            declared.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        family = re.sub(r"_(sum|count)$", "", name)
        assert name in declared or family in declared, f"{name} has no TYPE"
        pairs = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels))
        samples[(name, pairs)] = float(value)
    return samples


def _value(samples, name: str, **labels) -> float | None:
    for (n, pairs), value in samples.items():
        if n == name and set(labels.items()) <= pairs:
            return value
    return None


@pytest.mark.unit
def test_the_text_holds_the_world_the_workers_the_snapshots_and_the_counters():
    workers = (WorkerStatus(0, 2, 11, "RUNNING", step=9, step_s=0.25, speed=64.0),
               WorkerStatus(1, 3, 12, "RUNNING", step=10, step_s=0.5),
               WorkerStatus(2, -1, 13, "RUNNING", spare=True))  # fmt: skip
    status = NodeStatus("b", "host", "e:1", 10, "RUNNING", world_size=4, epoch=1,
                        restart_count=2, etcd_silent_ms=1500, workers=workers,
                        snapshot=SnapshotStatus(memory_bytes=4096, records=2, chunks=3,
                                                committed_step=7, disk_error="ENOSPC"))  # fmt: skip
    counters = AgentCounters()
    counters.count("worker_lost", {})
    counters.count("recovered", {"wait_s": 0.1, "reform_s": 0.2, "agree_s": 0.05,
                                 "restore_s": 0.15, "first_step_s": 0.5, "rank": 2})  # fmt: skip
    counters.count("recovered", {"wait_s": "x", "reform_s": float("nan")})  # bad: 0
    samples = parse(render_metrics('j"1', status, counters))
    assert _value(samples, "etrain_agent_up", job='j\\"1', node="b") == 1
    assert _value(samples, "etrain_world_size") == 4
    assert _value(samples, "etrain_world_epoch") == 1
    assert _value(samples, "etrain_restart_count") == 2
    assert _value(samples, "etrain_etcd_silent_seconds") == 1.5
    assert _value(samples, "etrain_workers", state="RUNNING") == 2
    assert _value(samples, "etrain_workers", state="SPARE") == 1
    assert _value(samples, "etrain_worker_steps", rank="3") == 10
    assert _value(samples, "etrain_worker_step_seconds", rank="2") == 0.25
    assert _value(samples, "etrain_worker_samples_per_second", rank="2") == 64
    assert _value(samples, "etrain_worker_samples_per_second", rank="3") is None  # not known
    assert _value(samples, "etrain_snapshot_committed_step") == 7
    assert _value(samples, "etrain_snapshot_lag_steps") == 3
    assert _value(samples, "etrain_snapshot_memory_bytes") == 4096
    assert _value(samples, "etrain_snapshot_chunks") == 3
    assert _value(samples, "etrain_snapshot_disk_failing") == 1
    assert _value(samples, "etrain_verdicts_total", kind="worker_lost") == 1
    assert _value(samples, "etrain_verdicts_total", kind="recovered") == 2
    assert _value(samples, "etrain_recovery_seconds_count") == 2
    assert _value(samples, "etrain_recovery_seconds_sum") == pytest.approx(1.0)
    assert _value(samples, "etrain_recovery_last_seconds") == 0
    # before the first status: the agent is up, the counters are there
    early = parse(render_metrics("j", None, AgentCounters()))
    assert _value(early, "etrain_agent_up") == 1 and _value(early, "etrain_world_size") is None
    assert _value(early, "etrain_recovery_seconds_count") == 0


@pytest.mark.contract
@pytest.mark.timeout(30)
def test_the_server_serves_metrics_only_and_refuses_a_taken_port():
    server = MetricsServer("127.0.0.1", 0, lambda: "etrain_agent_up{} 1\n")
    try:
        url = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert reply.read() == b"etrain_agent_up{} 1\n"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/other", timeout=5)
        assert missing.value.code == 404
        with pytest.raises(ConfigError, match=f"--metrics-port {server.port}"):
            MetricsServer("127.0.0.1", server.port, str)
    finally:
        server.close()
    broken = MetricsServer("127.0.0.1", 0, lambda: 1 / 0)  # a failing render is a 500
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"http://127.0.0.1:{broken.port}/metrics", timeout=5)
        assert failed.value.code == 500
    finally:
        broken.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return parse(reply.read().decode())


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_counters_move_around_a_chaos_kill(tmp_path, runtime_dir, etcd_endpoint,
                                               etcd_client, job_id):  # fmt: skip
    cluster = Cluster(tmp_path)
    ports = {"a": _free_port(), "b": _free_port()}
    args = ["--steps", "40", "--out", str(cluster.workdir / "final.pt"), "--step-sleep", "0.2"]
    try:
        agents = {node: cluster.agent(node, etcd=etcd_endpoint, job_id=job_id, nnodes="2",
                                      nproc=2, max_restarts=0, script=SCRIPTS / "job_train.py",
                                      script_args=args,
                                      extra=["--metrics-port", str(ports[node])])
                  for node in "ab"}  # fmt: skip

        def committed() -> int:
            kv = etcd_client.get(JobKeys(job_id).snapshot_committed)
            return int(json.loads(kv.value)["step"]) if kv is not None else -1

        _wait_for(lambda: committed() >= 5, 150, "step 5 committed")
        before = _scrape(ports["b"])
        assert _value(before, "etrain_world_size") == 4
        assert _value(before, "etrain_workers", state="RUNNING") == 2
        assert _value(before, "etrain_verdicts_total", kind="reconfigure") is None
        assert _value(before, "etrain_recovery_seconds_count") == 0
        steps = _value(before, "etrain_worker_steps", rank="3")
        assert steps is not None and steps >= 1
        killed = subprocess.run(
            [sys.executable, "-m", "elastictrain.cli.main", "chaos", "kill", "--rank", "3",
             "--etcd", etcd_endpoint, "--job-id", job_id],
            capture_output=True, text=True, timeout=30)  # fmt: skip
        assert killed.returncode == 0, killed.stderr
        _wait_for(lambda: len(read_events(etcd_client, job_id, "recovered")) >= 3, 120,
                  "the survivors' recoveries")  # fmt: skip
        def settled():
            samples = _scrape(ports["b"])
            new_world = _value(samples, "etrain_world_size") == 3
            return samples if new_world and _value(samples, "etrain_workers",
                                                   state="FAILED") == 1 else None

        after = _wait_for(settled, 30, "b's status to show the new world and the dead worker")
        # the kill is a lost rank (in place: a reconfigure of the world) and a recovery
        assert _value(after, "etrain_verdicts_total", kind="reconfigure") == 1
        assert _value(after, "etrain_verdicts_total", kind="world_changed") >= 1
        assert _value(after, "etrain_recovery_seconds_count") == 1  # b's survivor, rank 2
        assert _value(after, "etrain_recovery_seconds_sum") > 0
        assert _value(after, "etrain_workers", state="RUNNING") == 1
        assert _value(after, "etrain_worker_steps", rank="2") > steps  # it goes on
        assert _value(_scrape(ports["a"]), "etrain_recovery_seconds_count") == 2
        for agent in agents.values():
            assert agent.wait(200) == 0, agent.text()
    finally:
        cluster.close()
