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
from elastictrain.cli.status_view import render
from rich.console import Console

from elastictrain.coord.embedded import free_loopback_port
from elastictrain.coord.keys import JobKeys
from elastictrain.events import Event
from elastictrain.node_status import NodeStatus, SnapshotStatus, WorkerStatus

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "status.schema.json").read_text())
ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]


def _node(node_id: str, step: int, updated: float = 100.0) -> NodeStatus:
    return NodeStatus(node_id, f"host-{node_id}", "127.0.0.1:1", 42, "RUNNING", round=1,
                      world_size=4, epoch=0, started=50.0, updated=updated, global_batch=64,
                      logical_workers=16, workers=(
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


def _recorded_state():
    from elastictrain.cli.job_state import JobState

    world = World("r", 1, tuple(Member(n, s) for n in "ab" for s in (0, 1)))
    events = (
        Event("fault", "b", 90.0, "rank 3: planned fault kill at step 7", {"rank": 3}),
        Event("reconfigure", "b", 90.1, "rank 3: session closed; proposing ..."),
        Event("world_changed", "a", 90.2, "epoch 1: a spare takes rank 3"),
        Event("recovered", "b", 91.5, "", {"rank": 3, "wait_s": 0.01, "reform_s": 0.04,
                                          "agree_s": 0.37, "restore_s": 0.45,
                                          "first_step_s": 0.32}),
        Event("replan", "a", 95.0, "after step 20: rank 1's share off by 43%"),
    )  # fmt: skip
    attention = Event("attention", "a", 96.0, "step 12: attention max/mean 3.21 -> 1.01",
                      {"step": 12, "rounds": 4, "ranks": 4, "naive": 3.21, "planned": 1.01})
    return JobState("job", "127.0.0.1:2379", 7, {"a": _node("a", 12), "b": _node("b", 12)},
                    ("a", "b", "c"), world, 11, events, attention=attention)  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize("width", [80, 140])
def test_the_view_shows_every_section_with_live_values(width):
    state = _recorded_state()
    console = Console(width=width, color_system=None, record=True)
    console.print(render(state, now=101.0, history=[0.12, 0.13, 0.5, 0.12], width=width))
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines()), text
    assert "job job" in text and "2 node(s), 4 rank(s), 16 logical workers, 2 spare(s)" in text
    assert "epoch 1" in text and "batch 64  512 samples/s" in text  # 64 / 0.125 s
    assert "step 12" in text and "0.125 s/step" in text and "up 51s" in text
    assert text.count("812/s") == 2 and text.count("31.2%") == 2 and text.count("spare") >= 2
    assert "starting" in text  # c registered, no record yet
    assert "step 11 committed" in text and text.count("3.00 GiB") == 2
    assert "recovered" in text and "r3 wait .01 reform .04 agree .37" in text
    assert any("│ b │ fault" in line for line in text.splitlines())  # every column shown
    assert "re-plan" in text and "-10s" in text and "-6s" in text  # times before now
    assert "▁" in text and "█" in text  # the sparkline
    assert "attention 3.21->1.01" in text  # the newest step's plan, in the header
    assert state.to_json()["attention"]["details"]["planned"] == 1.01
    jsonschema.validate(state.to_json(), SCHEMA)


@pytest.mark.unit
def test_in_an_80_by_24_terminal_the_newest_events_are_shown_first_and_it_fits():
    state = _recorded_state()
    console = Console(width=80, height=24, color_system=None, record=True)
    console.print(render(state, now=101.0, history=[0.12, 0.13], width=80, height=24))
    lines = console.export_text().splitlines()
    assert len(lines) <= 23 and all(len(line) <= 80 for line in lines)  # room for the cursor
    events = [line for line in lines if line.startswith("│") and " s " not in line
              and ("-" in line.split("│")[1])]  # fmt: skip
    assert "re-plan" in events[0]  # the newest first: an old one is what gives way


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
    for step in range(3):  # one a step: only the newest is kept, apart from the others
        plan = Event("attention", "a", 2.0 + step, "", {"step": step, "planned": 1.0})
        etcd_client.put(keys.event("a", "w", 1 + step), plan.encode())
    state = read_job_state(etcd_client, job_id, "here")
    assert list(state.nodes) == ["a"] and state.skipped == 1 and state.registered == ("a",)
    assert (state.world.epoch, state.committed_step) == (2, 4)
    assert [e.kind for e in state.events] == ["fault"]
    assert state.attention is not None and state.attention.details["step"] == 2
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


@pytest.mark.unit
def test_a_large_job_is_a_row_per_node_cut_to_the_terminal():
    from dataclasses import replace

    from elastictrain.cli.job_state import JobState

    nodes = {f"n{i:02d}": replace(_node(f"n{i:02d}", 40), node_id=f"n{i:02d}") for i in range(64)}
    sick = replace(nodes["n33"], workers=(replace(nodes["n33"].workers[0], state="FAILED"),))
    nodes["n33"] = sick
    state = JobState("big", "e", 1, nodes, tuple(nodes), None, 39, ())
    console = Console(width=80, height=40, color_system=None, record=True)
    console.print(render(state, now=101.0, width=80, height=40))
    text = console.export_text()
    assert "a row per node" in text and "... 48 more" in text  # 16 rows fit 40 lines
    first = next(line for line in text.splitlines() if line.startswith("│ n"))
    assert "n33" in first and "0/1" in first  # the failed node comes first
