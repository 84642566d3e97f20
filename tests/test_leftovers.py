"""Nothing outlives a killed agent for long: its workers and embedded etcd die with it, and
the next agent on the machine removes the segments and data it left."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from launch_harness import SCRIPTS, Cluster, process_alive, wait_until

from elastictrain import leftovers

ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]


@pytest.mark.unit
def test_only_names_of_dead_owners_are_stale():
    names = ["etrain-job-a-p10-1f2e", "etrain-etcd-p11-abcd", "etrain-x-p12-y-p13-z",
             "etrain-job-a-1f2e", "other-p10-x"]  # fmt: skip
    assert leftovers.owner_of("etrain-x-p12-y-p13-z") == 13
    assert leftovers.stale(names, alive=lambda pid: pid == 11) == [
        "etrain-job-a-p10-1f2e", "etrain-x-p12-y-p13-z"]
    assert leftovers.owned_name("job-a", pid=7) == "etrain-job-a-p7"


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_after_kill_9_the_next_job_starts_clean(tmp_path, runtime_dir, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("ETRAIN_SHM_DIR", str(shm))
    cluster = Cluster(tmp_path)
    try:
        pause = tmp_path / "pause"
        argv = [*ETRAIN, "launch", "--standalone", "--nproc-per-node", "2", "--job-id", "old",
                str(SCRIPTS / "snapshot_train.py"), "--steps", "40", "--out",
                str(tmp_path / "old.pt"), "--pause-file", str(pause)]  # fmt: skip
        old = cluster.start("old", argv)
        wait_until(lambda: any(n.startswith("etrain-old-") for n in os.listdir(shm)), 90,
                   "the old job's snapshot segments")  # fmt: skip
        pause.touch()
        owner = old.popen.pid
        etcd_dirs = [n for n in os.listdir("/dev/shm")
                     if n.startswith(f"etrain-etcd-p{owner}-")]  # fmt: skip
        assert etcd_dirs, "the old job's embedded etcd keeps its data in /dev/shm"
        children = [int(p) for p in os.popen(f"pgrep -P {owner}").read().split()]
        os.kill(owner, signal.SIGKILL)
        old.popen.wait(10)
        wait_until(lambda: not any(process_alive(pid) for pid in children), 20,
                   "the old job's workers and etcd to die with it")  # fmt: skip
        assert any(n.startswith("etrain-old-") for n in os.listdir(shm))  # left behind

        argv = [*ETRAIN, "launch", "--standalone", "--nproc-per-node", "1", "--job-id", "new",
                str(SCRIPTS / "snapshot_train.py"), "--steps", "3", "--out",
                str(tmp_path / "new.pt")]  # fmt: skip
        new = cluster.start("new", argv)
        assert new.wait(120) == 0, new.text()
        assert not [n for n in os.listdir(shm) if n.startswith("etrain-old-")]
        assert not [n for n in os.listdir("/dev/shm") if n in etcd_dirs]
    finally:
        cluster.close()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_failing_disk_tier_is_not_silent(tmp_path, runtime_dir):
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "n1").symlink_to("/proc/1")  # the node's directory: one where nothing can be made
    cluster = Cluster(tmp_path)
    try:
        argv = [*ETRAIN, "launch", "--standalone", "--nproc-per-node", "1", "--node-id", "n1",
                "--snapshot-dir", str(disk), str(SCRIPTS / "snapshot_train.py"), "--steps", "3",
                "--out", str(tmp_path / "final.pt")]  # fmt: skip
        job = cluster.start("job", argv)
        assert job.wait(100) == 1, job.text()
        assert (tmp_path / "final.pt").exists()  # it trained; only the disk snapshot is lost
        assert "the job finished but its disk snapshot failed" in job.text()
    finally:
        cluster.close()
