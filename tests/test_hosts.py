"""Jobs across hosts that are network namespaces (``netns_hosts.py``): a partition is a cut
link, not a killed process. 3 agents x 2 workers on the ``Job`` API, deterministic reduction;
etcd on the hosts' bridge. Checked from the job's events and end state. An intruder's host
calls the agents meanwhile and is answered nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_harness import (
    SCRIPTS,
    Cluster,
    assert_bit_identical,
    committed_step,
    load_params,
    wait_until,
)
from netns_hosts import Hosts, netns_unavailable

from elastictrain.coord.embedded import EmbeddedEtcd
from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.coord.nodes import list_nodes
from elastictrain.credentials import create
from elastictrain.events import read_events

JOB_SCRIPT = SCRIPTS / "job_train.py"
STEPS = 40
# divisible over 6 and 4 ranks; no straggler re-plans (this machine's noise)
SHAPE = ["--global-batch", "24", "--micro-batch", "2", "--logical-workers", "12",
         "--fail-after", "-1"]  # fmt: skip

WHY_NOT = netns_unavailable()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.alone,
    pytest.mark.timeout(360),
    pytest.mark.skipif(bool(WHY_NOT), reason=f"no network-namespace hosts here: {WHY_NOT}"),
]


@pytest.fixture
def hosts():
    with Hosts(("a", "b", "c", "x")) as made:  # x: an intruder's host
        yield made


@pytest.fixture
def bridge_etcd(hosts):
    """The job's etcd, on the bridge: every host reaches it over its own link."""
    with EmbeddedEtcd(host=hosts.bridge_address) as etcd:
        yield etcd



def job_credentials_dir(job_id: str):
    from elastictrain import constants

    return Path(constants.runtime_dir()) / job_id / "credentials"



def test_a_cut_link_is_a_lost_node_recovered_in_place_and_the_host_rejoins(
        hosts, bridge_etcd, tmp_path, runtime_dir, job_id):  # fmt: skip
    from test_job import _train

    (tmp_path / "ref").mkdir()
    reference = _train(tmp_path / "ref", 1, "--steps", str(STEPS), *SHAPE)
    client = EtcdClient.from_spec(bridge_etcd.endpoint)
    cluster = Cluster(tmp_path)
    try:
        workers_dir = cluster.workdir / "workers"
        args = ["--steps", str(STEPS), "--out", str(cluster.workdir / "final.pt"),
                "--reduction", "deterministic", "--step-sleep", "0.3",
                "--workers-dir", str(workers_dir), *SHAPE]  # fmt: skip
        agents = {
            name: cluster.agent(name, etcd=bridge_etcd.endpoint, job_id=job_id, nnodes="2:3",
                                nproc=2, max_restarts=0, script=JOB_SCRIPT, script_args=args,
                                host=hosts[name])
            for name in "abc"
        }  # fmt: skip

        def sizes() -> list[int]:
            return [e.details["world_size"] for e in read_events(client, job_id, "world_changed")
                    if e.node == "a"]  # fmt: skip

        wait_until(lambda: committed_step(client, job_id) >= 4, 150, "step 4 committed")
        # from another host, without the job's credentials, the agents answer nothing
        create(tmp_path / "foreign")
        endpoint = {n.node_id: n.endpoint for n in list_nodes(client, JobKeys(job_id))}["a"]
        probe = subprocess.run(
            hosts["x"].wrap([sys.executable, str(SCRIPTS / "probe_agent.py"), endpoint,
                             str(tmp_path / "foreign"), str(job_credentials_dir(job_id))]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout) == {
            "plain": "UNAVAILABLE", "another job's credentials": "UNAVAILABLE",
            "the job's certificate, a wrong token": "UNAUTHENTICATED"}
        hosts.cut("c")
        wait_until(lambda: 4 in sizes(), 60, "the world without host c")
        hosts.mend("c")
        wait_until(lambda: sizes()[-1:] == [6], 120, "host c back in the world")
        for name, agent in agents.items():
            assert agent.wait(240) == 0, f"{name}: {agent.text()}"

        assert sizes() == [4, 6]
        lost = read_events(client, job_id, "node_lost")
        assert lost and {n for e in lost for n in e.details["lost"]} == {"c"}, lost
        fenced = [e for e in read_events(client, job_id, "rejoin") if e.node == "c"]
        assert fenced and "cut off from etcd" in fenced[0].reason
        # c stopped its workers before its lease ran out: nobody took its ranks before that
        assert fenced[0].time < min(e.time for e in lost)
        assert [e.node for e in read_events(client, job_id, "join_world")] == ["c"]
        records = [json.loads(p.read_text()) for p in workers_dir.glob("*.json")]
        for node in "ab":  # the hosts that kept their link kept their processes
            mine = [r for r in records if r["node"] == node]
            assert len(mine) == 2 and all("done_rank" in r for r in mine), mine
        assert_bit_identical(load_params(cluster.workdir / "final.pt")["params"],
                             reference["params"])
    finally:
        cluster.close()
        client.close()
