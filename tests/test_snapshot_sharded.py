"""FSDP2 (DTensor) state snapshotted through DCP into agent memory, restored into another
world size after a node is lost (real agents, etcd, gloo workers)."""

from __future__ import annotations

import os
import re
import signal

import pytest
from launch_harness import SCRIPTS, Cluster, wait_until

SHARDED_SCRIPT = SCRIPTS / "sharded_train.py"


@pytest.fixture
def cluster(tmp_path, runtime_dir):
    c = Cluster(tmp_path)
    yield c
    c.close()


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
