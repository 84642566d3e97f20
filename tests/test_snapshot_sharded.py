"""FSDP2 (DTensor) state snapshotted through DCP into agent memory, restored into another
world size after a node is lost (real agents, etcd, gloo workers)."""

from __future__ import annotations

import os
import re
import signal

import pytest
from launch_harness import SCRIPTS, wait_until

SHARDED_SCRIPT = SCRIPTS / "sharded_train.py"


def _hashes(text: str, kind: str) -> dict[int, tuple[int, str]]:
    return {int(step): (int(world), digest) for step, world, digest in
            re.findall(rf"^{kind} step (\d+) world (\d+) hash (\w+)", text, re.M)}  # fmt: skip


@pytest.mark.timeout(300)
def test_sharded_state_is_resharded_from_two_ranks_to_one(cluster, etcd_endpoint, job_id):
    args = ["--steps", "14", "--sleep", "0.4"]
    agents = {
        name: cluster.agent(
            name,
            etcd=etcd_endpoint,
            job_id=job_id,
            nnodes="1:2",
            nproc=1,
            max_restarts=2,
            script=SHARDED_SCRIPT,
            script_args=args,
        )  # fmt: skip
        for name in ("a", "b")
    }
    wait_until(lambda: len(_hashes(agents["a"].text(), "snapshot")) >= 4, 180, "4 snapshots")
    os.kill(agents["b"].popen.pid, signal.SIGKILL)  # b's workers die with it
    assert agents["a"].wait(200) == 0, agents["a"].text()
    text = agents["a"].text()
    taken = _hashes(text, "snapshot")
    restored = _hashes(text, "restored")
    assert len(restored) == 1, text
    ((step, (world, digest)),) = restored.items()
    assert world == 1  # the survivor alone
    assert taken[step][0] == 2  # the state was snapshotted by two ranks
    assert digest == taken[step][1]  # and came back whole, resharded to one rank
    assert max(taken) == 13


@pytest.mark.timeout(300)
def test_sharded_disk_snapshot_restores_a_new_job_of_another_size(
    cluster, etcd_endpoint, job_id, tmp_path
):
    disk = ["--snapshot-dir", str(tmp_path / "snapshots")]
    first = [
        cluster.agent(name, etcd=etcd_endpoint, job_id=job_id, nnodes="2", nproc=1, extra=disk,
                      script=SHARDED_SCRIPT, script_args=["--steps", "5"])  # fmt: skip
        for name in ("a", "b")
    ]
    for agent in first:
        assert agent.wait(150) == 0, agent.text()
    taken = _hashes(first[0].text() + first[1].text(), "snapshot")
    # a whole new job of one rank: DCP reshards the two ranks' disk records into it
    second = cluster.agent("c", etcd=etcd_endpoint, job_id=job_id + "-2", nnodes="1",
                           nproc=1, extra=disk, script=SHARDED_SCRIPT,
                           script_args=["--steps", "7"])  # fmt: skip
    assert second.wait(150) == 0, second.text()
    restored = _hashes(second.text(), "restored")
    assert restored == {4: (1, taken[4][1])}, second.text()
    assert taken[4][0] == 2
