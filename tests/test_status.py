"""Node status records and ``etrain status``: the publisher, the reader against a real etcd,
the table rendered into a captured console, the JSON against its schema, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from elastictrain.agent.status_record import StatusPublisher
from elastictrain.agent.world import Member, World
from elastictrain.cli.job_state import read_job_state
from elastictrain.cli.status import render_table
from rich.console import Console

from elastictrain.coord.embedded import free_loopback_port
from elastictrain.coord.keys import JobKeys
from elastictrain.events import Event
from elastictrain.node_status import NodeStatus, SnapshotStatus, WorkerStatus

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "status.schema.json").read_text())
ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]


def _node(node_id: str, step: int, updated: float = 100.0) -> NodeStatus:
    return NodeStatus(node_id, f"host-{node_id}", "127.0.0.1:1", 42, "RUNNING", round=1,
                      world_size=4, epoch=0, started=50.0, updated=updated, workers=(
                          WorkerStatus(0, 0 if node_id == "a" else 2, 100, "RUNNING", step=step,
                                       step_s=0.125, speed=812.5, share=0.3125),
                          WorkerStatus(1, 1 if node_id == "a" else 3, 101, "RUNNING", step=step,
                                       step_s=0.125, speed=400.0, share=0.1875),
                          WorkerStatus(2, -1, 102, "RUNNING", spare=True)),
                      snapshot=SnapshotStatus(memory_bytes=3 << 30, records=2,
                                              committed_step=step - 1))  # fmt: skip


@pytest.mark.unit
def test_the_publisher_writes_a_change_once_and_at_most_every_interval():
    written = []
    out = StatusPublisher(written.append, interval=0.5)
    out.offer(lambda: _node("a", 1), 0.0)
    out.offer(lambda: _node("a", 2), 0.1)  # within the interval: not yet
    out.offer(lambda: _node("a", 1, updated=200.0), 0.6)  # the same but for its time
    out.offer(lambda: _node("a", 2), 1.2)
    assert [NodeStatus.decode(raw).workers[0].step for raw in written] == [1, 2]


@pytest.mark.unit
def test_the_table_shows_every_worker_with_its_pace():
    world = World("r", 0, tuple(Member(n, s) for n in "ab" for s in (0, 1)))
    from elastictrain.cli.job_state import JobState

    state = JobState("job", "127.0.0.1:2379", 7, {"a": _node("a", 12), "b": _node("b", 12)},
                     ("a", "b", "c"), world, 11, ())  # fmt: skip
    console = Console(width=140, color_system=None, record=True)
    console.print(render_table(state, now=101.0))
    text = console.export_text()
    assert "world 4 ranks, epoch 0" in text and "snapshot step 11" in text
    assert text.count("812/s") == 2 and text.count("31.2%") == 2 and text.count("spare") == 2
    assert "STARTING" in text  # c registered, no record yet
    jsonschema.validate(state.to_json(), SCHEMA)


@pytest.mark.contract
def test_the_reader_takes_every_record_and_skips_what_it_cannot_read(etcd_client, job_id):
    keys = JobKeys(job_id)
    etcd_client.put(keys.node_status("a"), _node("a", 5).encode())
    etcd_client.put(keys.node_status("b"), b'{"version": 99}')
    etcd_client.put(keys.node("a"), b"{}")
    world = World("r", 2, (Member("a", 0, "x"), Member("a", 1, "x")))
    etcd_client.put(keys.world, world.encode())
    etcd_client.put(keys.snapshot_committed, json.dumps({"step": 4}))
    etcd_client.put(keys.event("a", "w", 0), Event("fault", "a", 1.0, "kill").encode())
    state = read_job_state(etcd_client, job_id, "here")
    assert list(state.nodes) == ["a"] and state.skipped == 1 and state.registered == ("a",)
    assert (state.world.epoch, state.committed_step) == (2, 4)
    assert [e.kind for e in state.events] == ["fault"]
    jsonschema.validate(state.to_json(), SCHEMA)


def _etrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ETRAIN, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.contract
@pytest.mark.timeout(120)
def test_status_of_a_missing_or_unreachable_job_is_one_line(etcd_endpoint, runtime_dir):
    cases = [
        (["--etcd", etcd_endpoint, "--job-id", "nosuch"], "no agent of job 'nosuch'"),
        (["--etcd", f"127.0.0.1:{free_loopback_port()}", "--job-id", "x"], "did not answer"),
        (["--etcd", etcd_endpoint, "--job-id", "bad/id"], "job id 'bad/id'"),
        (["--job-id", "bad/id"], "job id 'bad/id'"),
    ]
    for args, needle in cases:
        for form in ([], ["--json"], ["--once"]):
            done = _etrain("status", *form, *args)
            assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
            assert needle in done.stderr and len(done.stderr.strip().splitlines()) <= 2, (
                done.stderr)
