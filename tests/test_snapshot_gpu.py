"""Lazy GPU snapshots under a real agent (skipped without CUDA; run on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from launch_harness import SCRIPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("width,stage", [(256, 0.0), (4096, 0.0), (4096, 0.5)])
def test_lazy_copy_holds_the_state_of_its_step(cluster, etcd_endpoint, job_id, width, stage):
    agent = cluster.agent("a", etcd=etcd_endpoint, job_id=job_id, nnodes="1", nproc=1,
                          script=SCRIPTS / "gpu_snapshot_train.py",
                          script_args=["--width", str(width), "--stage", str(stage)])  # fmt: skip
    assert agent.wait(240) == 0, agent.text()
    assert "restored bit-identical, fresh and in place" in agent.text()
