"""The Slurm and Kubernetes recipes (``examples/slurm``, ``examples/kubernetes``), run on
network-namespace hosts: the same commands, each node's in its own host, with the job's sizes
made small. A preemption notice (Slurm's ``--signal``: SIGTERM to a node's task; Kubernetes'
preStop hook: ``etrain drain``) takes one node out and the job goes on without it, bit-identical
to the fault-free run. The manifests are checked for shape here and against the Kubernetes
schemas where ``kubeconform`` is installed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_harness import (
    SCRIPTS,
    Cluster,
    assert_bit_identical,
    committed_step,
    load_params,
    wait_until,
)
from netns_hosts import HOST_INTERFACE, Hosts, netns_unavailable

from elastictrain.coord.embedded import EmbeddedEtcd, free_loopback_port
from elastictrain.coord.etcd import EtcdClient
from elastictrain.credentials import create
from elastictrain.events import read_events

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "examples" / "slurm"
KUBERNETES = ROOT / "examples" / "kubernetes"
JOB_SCRIPT = SCRIPTS / "job_train.py"
STEPS = 40
SHAPE = ["--global-batch", "24", "--micro-batch", "2", "--logical-workers", "12",
         "--fail-after", "-1"]  # fmt: skip
FAST = "--node-ttl 3 --rdzv-conf last_call_timeout=1"  # the tests' usual timings
WHY_NOT = netns_unavailable()
on_hosts = pytest.mark.skipif(bool(WHY_NOT), reason=f"no network-namespace hosts here: {WHY_NOT}")


def _documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERNETES / name).read_text()))


@pytest.mark.unit
def test_the_manifests_have_the_shape_the_recipe_needs():
    etcd = {d["kind"]: d for d in _documents("etcd.yaml")}
    assert etcd["StatefulSet"]["spec"]["replicas"] == 3
    assert etcd["Service"]["spec"]["clusterIP"] == "None"
    job = {d["kind"]: d for d in _documents("job.yaml")}
    spec = job["Job"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == job["Service"]["metadata"]["name"]
    (agent,) = pod["containers"]
    assert agent["command"][:2] == ["etrain", "launch"]
    drain = agent["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[:2] == ["sh", "-c"] and drain[2].startswith("etrain drain")
    grace = pod["terminationGracePeriodSeconds"]
    drain_timeout = int(next(a for a in agent["command"] if a.startswith("--drain-timeout="))
                        .split("=")[1])  # fmt: skip
    assert grace > drain_timeout  # the drain ends before the kubelet's SIGKILL
    secret = next(v for v in pod["volumes"] if "secret" in v)
    assert secret["secret"]["secretName"] == "etrain-credentials"
    for doc in _documents("etcd.yaml") + _documents("job.yaml"):
        assert {"apiVersion", "kind", "metadata"} <= doc.keys() and doc["metadata"]["name"]


@pytest.mark.unit
@pytest.mark.skipif(shutil.which("kubeconform") is None, reason="kubeconform is not installed")
def test_the_manifests_validate_against_the_kubernetes_schemas():
    checked = subprocess.run(["kubeconform", "-strict", "-summary", str(KUBERNETES / "etcd.yaml"),
                              str(KUBERNETES / "job.yaml")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    from test_job import _train

    return _train(tmp_path_factory.mktemp("recipes-ref"), 1, "--steps", str(STEPS), *SHAPE)


@pytest.fixture
def hosts():
    with Hosts(("a", "b", "c")) as made:
        yield made




def _train_args(workdir: Path) -> list[str]:
    return ["--steps", str(STEPS), "--out", str(workdir / "final.pt"), "--reduction",
            "deterministic", "--step-sleep", "0.3", "--workers-dir", str(workdir / "workers"),
            *SHAPE]  # fmt: skip


def _check_drained(client: EtcdClient, job_id: str, node: str, by: str) -> None:
    """``node`` left the world (its drain's events), asked by ``by``; nobody else did."""
    wait_until(lambda: read_events(client, job_id, "drained"), 60, f"{node} to drain")
    drains = {e.node: e for e in read_events(client, job_id, "drain")}
    assert set(drains) == {node} and drains[node].details["by"] == by
    assert {e.node for e in read_events(client, job_id, "drained")} == {node}


def _check_end_state(workdir: Path, kept: list[str], reference: dict) -> None:
    records = [json.loads(p.read_text()) for p in (workdir / "workers").glob("*.json")]
    for other in kept:  # never restarted, and they ended with ranks
        mine = [r for r in records if r["node"] == other]
        assert len(mine) == 2 and all(r.get("done_rank", -1) >= 0 for r in mine), mine
    assert_bit_identical(load_params(workdir / "final.pt")["params"], reference["params"])


# srun on the test's hosts: one task per host, as --ntasks-per-node=1 runs one per node, with
# what Slurm gives each task; the task's own process is the program (ip netns exec and env exec)
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
i=0; pids=()
for spec in $ETRAIN_TEST_HOSTS; do
  IFS== read -r name namespace address <<< "$spec"
  ip netns exec "$namespace" env SLURMD_NODENAME="$name" SLURM_NODEID=$i SLURM_PROCID=$i \\
    SLURM_LOCALID=0 ETRAIN_LOCAL_ADDR="$address" GLOO_SOCKET_IFNAME=@IFNAME@ \\
    "$@" > "$ETRAIN_TEST_LOGS/$name.log" 2>&1 &
  echo $! > "$ETRAIN_TEST_LOGS/$name.pid"; pids+=($!); i=$((i + 1))
done
rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
""".replace("@IFNAME@", HOST_INTERFACE)


@pytest.mark.e2e
@pytest.mark.timeout(360)
@on_hosts
def test_the_slurm_recipe_trains_on_hosts_and_a_preemption_notice_drains_a_node(
        hosts, tmp_path, runtime_dir, reference):  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_loopback_port()
    slurm_job = str(int(time.time() * 1000) % 10**9)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_ID=slurm_job, SLURM_NNODES="3", SLURM_SUBMIT_DIR=str(ROOT),
        ETRAIN_SHARED=str(tmp_path / "shared"), ETRAIN_ETCD_HOST=hosts.bridge_address,
        ETRAIN_ETCD_PORT=str(port), ETRAIN_NPROC_PER_NODE="2", ETRAIN_MAX_RESTARTS="0",
        ETRAIN_MIN_NODES="2", ETRAIN_LAUNCH_ARGS=FAST, ETRAIN_TEST_LOGS=str(logs),
        ETRAIN_TEST_HOSTS=" ".join(f"{h.name}={h.namespace}={h.address}"
                                   for h in hosts.hosts.values()),
        PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
    )  # fmt: skip
    env.pop("ETRAIN_ETCD", None)  # no cluster given: the recipe starts etcd on its node
    with open(logs / "batch.log", "wb") as out:
        batch = subprocess.Popen(["bash", str(SLURM / "etrain.sbatch"), str(JOB_SCRIPT),
                                  *_train_args(tmp_path)], cwd=tmp_path, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    job_id = f"slurm-{slurm_job}"
    client = EtcdClient.from_spec(f"{hosts.bridge_address}:{port}", timeout=30)
    try:
        wait_until(lambda: committed_step(client, job_id) >= 4, 150, "step 4 committed")
        os.kill(int((logs / "c.pid").read_text()), signal.SIGTERM)  # Slurm's --signal=TERM
        _check_drained(client, job_id, "c", "SIGTERM")  # read now: etcd ends with the job
        assert batch.wait(240) == 0, "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs.glob("*.log"))
        _check_end_state(tmp_path, ["a", "b"], reference)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
        for pid_file in logs.glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        client.close()


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in a container's command: a defined variable is replaced,
    an undefined one is left as written, $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)  # fmt: skip


@pytest.mark.e2e
@pytest.mark.timeout(360)
@on_hosts
def test_the_kubernetes_job_trains_on_hosts_and_its_prestop_hook_drains_a_pod(
        hosts, tmp_path, runtime_dir, reference):  # fmt: skip
    """Each host runs the agent container's command, expanded as the kubelet does, with the
    pod's downward-API values; the preStop hook of one pod runs in its host. What differs from
    a cluster: etcd is the test's (not the StatefulSet's DNS names), the Secret is a directory,
    the script and sizes are the test's."""
    job = {d["kind"]: d for d in _documents("job.yaml")}
    (container,) = job["Job"]["spec"]["template"]["spec"]["containers"]
    credentials = tmp_path / "secret"
    create(credentials)
    sizes = {"--nnodes": "2:3", "--nproc-per-node": "2", "--max-restarts": "0"}
    cluster = Cluster(tmp_path)
    with EmbeddedEtcd(host=hosts.bridge_address) as etcd:
        client = EtcdClient.from_spec(etcd.endpoint)
        procs = {}
        try:
            for index, host in enumerate(hosts.hosts.values()):
                pod_env = {"POD_NAME": f"etrain-{index}-{host.name}", "POD_IP": host.address}
                for item in container["env"]:
                    if "value" in item:
                        pod_env[item["name"]] = item["value"]
                pod_env["ETRAIN_ETCD"] = etcd.endpoint
                pod_env["ETRAIN_CREDENTIALS_DIR"] = str(credentials)
                pod_env["JOB_COMPLETION_INDEX"] = str(index)
                argv = [_expand(a, pod_env) for a in container["command"]]
                argv = [f"{a.split('=')[0]}={sizes[a.split('=')[0]]}"
                        if a.split("=")[0] in sizes else a for a in argv]  # fmt: skip
                assert argv[-1] == "train.py"
                argv = [str(Path(sys.executable).parent / "etrain"), *argv[1:-1], *FAST.split(),
                        str(JOB_SCRIPT), *_train_args(tmp_path)]  # fmt: skip
                procs[host.name] = cluster.start(host.name, host.wrap(argv),
                                                 {**pod_env, **host.env})  # fmt: skip
                assert "$(" not in " ".join(argv)
            job_id = container["env"][[e["name"] for e in container["env"]].index(
                "ETRAIN_JOB_ID")]["value"]  # fmt: skip
            wait_until(lambda: committed_step(client, job_id) >= 4, 150, "step 4 committed")
            hook = container["lifecycle"]["preStop"]["exec"]["command"]
            pod_c = {"POD_NAME": "etrain-2-c", "ETRAIN_ETCD": etcd.endpoint,
                     "ETRAIN_JOB_ID": job_id, "ETRAIN_CREDENTIALS_DIR": str(credentials),
                     "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
            drained = subprocess.run(hosts["c"].wrap(hook), env={**os.environ, **pod_c},
                                     capture_output=True, text=True, timeout=150)  # fmt: skip
            assert drained.returncode == 0, drained.stdout + drained.stderr
            _check_drained(client, job_id, "etrain-2-c", "etrain drain")
            for name, proc in procs.items():
                assert proc.wait(240) == 0, f"{name}: {proc.text()[-3000:]}"
            _check_end_state(tmp_path, ["etrain-0-a", "etrain-1-b"], reference)
        finally:
            cluster.close()
            client.close()
