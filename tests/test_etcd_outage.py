"""etcd goes away mid-run and comes back: the job rides it out and ends as if it never left."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from launch_harness import SCRIPTS, Cluster, assert_bit_identical, load_params, wait_until

from elastictrain.coord.embedded import EmbeddedEtcd

pytestmark = pytest.mark.e2e

SCRIPT = SCRIPTS / "snapshot_train.py"
STEPS = 30


def _args(workdir) -> list[str]:
    return ["--steps", str(STEPS), "--out", str(workdir / "final.pt"), "--sleep", "0.25"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("outage-ref")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(SCRIPT), "--steps", str(STEPS), "--out", str(ref / "final.pt")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ref, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return load_params(ref / "final.pt")


def _steps(text: str) -> int:
    return sum(1 for line in text.splitlines() if ": step " in line)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("outage_s", [5.0, 10.0])
def test_the_job_rides_out_an_etcd_outage(tmp_path, runtime_dir, job_id, reference, outage_s):
    etcd = EmbeddedEtcd().start()
    cluster = Cluster(tmp_path)
    try:
        agents = [cluster.agent(n, etcd=etcd.endpoint, job_id=job_id, script=SCRIPT,
                                script_args=_args(cluster.workdir)) for n in "ab"]  # fmt: skip
        wait_until(lambda: _steps(agents[0].text()) >= 6, 120, "training under way")
        etcd.kill()
        time.sleep(outage_s)
        etcd.start_again()
        for agent in agents:
            assert agent.wait(200) == 0, agent.text()
        assert_bit_identical(load_params(cluster.workdir / "final.pt"), reference)
    finally:
        cluster.close()
        etcd.stop()
