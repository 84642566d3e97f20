"""Core attention in a ``Job``: a transformer over packed documents whose attention is planned
over the ranks every round. Its results do not depend on the world (bit for bit with the
deterministic reduction), and a rank SIGKILLed mid-run under ``etrain launch`` leaves the next
step planned over the survivors with the fault-free run's final parameters."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from launch_harness import SCRIPTS, Cluster

from elastictrain.events import read_events

SCRIPT = SCRIPTS / "attention_train.py"
STEPS = 6


def _train(tmp_path, world: int, *args: str) -> dict:
    import job_train

    out = tmp_path / f"w{world}-{'-'.join(args) or 'default'}.pt"
    argv = ["--out", str(out), "--steps", str(STEPS), *args]
    mp.start_processes(job_train.run, args=(world, str(tmp_path / f"store-{out.stem}"), argv,
                                            "attention_train"),
                       nprocs=world, start_method="spawn")  # fmt: skip
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The fault-free run on one process: every round is one micro-batch, planned alone."""
    return _train(tmp_path_factory.mktemp("attention-ref"), 1)


@pytest.mark.contract
@pytest.mark.timeout(240)
def test_planned_attention_is_bit_identical_at_any_world_size(tmp_path, reference):
    three = _train(tmp_path, 3)  # 12 micro-batches on 3 ranks: 4 rounds each
    for key, value in reference["params"].items():
        assert torch.equal(three["params"][key], value), key
    assert three["losses"] == reference["losses"]
    plans = three["plans"]
    assert all(p["rounds"] == 4 for p in plans)
    assert max(p["naive"] for p in plans) > 1.2  # the batches' attention work differs ...
    assert all(p["planned"] < p["naive"] and p["worst_planned"] <= 1.15 for p in plans)  # ...
    assert all(p["moved_tokens"] > 0 for p in plans)  # ... and the plans moved some of it
    assert all(p["rounds"] == 12 and p["naive"] == 1.0 for p in reference["plans"])


@pytest.mark.contract
@pytest.mark.timeout(240)
def test_a_slower_rank_gets_less_attention_with_the_fast_reduction_too(tmp_path, reference):
    # rank 1 at a third of rank 0's pace; the fast reduction (reduced after the rounds)
    uneven = _train(tmp_path, 2, "--capacities", "3,1", "--reduction", "fast")
    for key, value in reference["params"].items():
        error = float((uneven["params"][key] - value).norm() / value.norm())
        assert error < 1e-5, (key, error)
    plans = uneven["plans"]
    assert all(p["speeds"] == [3.0, 1.0] for p in plans)  # the Job's capacities, as speeds
    # rank 0 hosts 9 of the 12 micro-batches: in the rounds where rank 1 has none it still
    # gets attention work, in proportion to its speed (as far as 192-token batches allow)
    assert all(p["rounds"] == 9 and p["planned"] < p["naive"] for p in plans)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_rank_killed_mid_run_leaves_a_plan_over_the_survivors(tmp_path, runtime_dir,
                                                                etcd_endpoint, etcd_client,
                                                                job_id, reference):  # fmt: skip
    cluster = Cluster(tmp_path)
    try:
        args = ["--steps", str(STEPS), "--out", str(tmp_path / "final.pt"), "--step-sleep",
                "0.1", "--workers-dir", str(tmp_path / "workers")]  # fmt: skip
        procs = [cluster.agent(node, etcd=etcd_endpoint, job_id=job_id, nnodes="1:2", nproc=2,
                               max_restarts=0, script=SCRIPT, script_args=args,
                               extra=["--fault", "kill:rank=3:step=4"])
                 for node in "ab"]  # fmt: skip
        for proc in procs:
            assert proc.wait(240) == 0, proc.text()
    finally:
        cluster.close()
    (fault,) = read_events(etcd_client, job_id, "fault")
    assert fault.details["rank"] == 3
    (world,) = read_events(etcd_client, job_id, "world_changed")[:1]
    assert world.details["world_size"] == 3
    plans = {e.details["step"]: e.details for e in read_events(etcd_client, job_id,
                                                                "attention")}  # fmt: skip
    assert sorted(plans) == list(range(STEPS))  # every step, once (rank 0 reports it)
    assert plans[0]["ranks"] == 4 and plans[STEPS - 1]["ranks"] == 3  # over the survivors
    after = [p for p in plans.values() if p["ranks"] == 3]
    assert after and all(p["rounds"] == 4 for p in after)  # 12 micro-batches on 3 ranks
    final = torch.load(tmp_path / "final.pt")
    for key, value in reference["params"].items():
        assert torch.equal(final["params"][key], value), key
    assert final["losses"] == reference["losses"]
