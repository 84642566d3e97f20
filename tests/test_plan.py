"""Pure plans of a round: rank layout and the worker env contract."""

from __future__ import annotations

import pytest
from elastictrain.agent.plan import NodeSlot, assign_worker_ranks, worker_env


def _slots(*sizes: int) -> list[NodeSlot]:
    return [
        NodeSlot(i, f"n{i}", size, "127.0.0.1", f"127.0.0.1:{9000 + i}")
        for i, size in enumerate(sizes)
    ]


def test_ranks_are_contiguous_per_node_in_group_rank_order():
    slots = _slots(2, 3, 1)
    layout = [[a.global_rank for a in assign_worker_ranks(slots, g)] for g in range(3)]
    assert layout == [[0, 1], [2, 3, 4], [5]]
    mid = assign_worker_ranks(list(reversed(slots)), 1)
    assert {a.world_size for a in mid} == {6}
    assert [a.local_rank for a in mid] == [0, 1, 2]
    assert {(a.group_rank, a.group_world_size, a.local_world_size) for a in mid} == {(1, 3, 3)}


def test_ranks_reject_gaps_in_group_ranks():
    slots = [NodeSlot(0, "a", 1, "h", "e"), NodeSlot(2, "b", 1, "h", "e")]
    with pytest.raises(ValueError, match="group ranks"):
        assign_worker_ranks(slots, 0)


def test_worker_env_is_torchruns_contract():
    a = assign_worker_ranks(_slots(2, 2), 1)[1]
    env = worker_env(a, master_addr="10.0.0.1", master_port=1234, restart_count=2,
                     max_restarts=3, run_id="job", parent_env={})  # fmt: skip
    assert env["RANK"] == "3" and env["LOCAL_RANK"] == "1" and env["WORLD_SIZE"] == "4"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "1"
    assert env["ROLE_RANK"] == "3" and env["ROLE_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "1234"
    assert env["TORCHELASTIC_RESTART_COUNT"] == "2" and env["TORCHELASTIC_MAX_RESTARTS"] == "3"
    assert env["TORCHELASTIC_RUN_ID"] == "job" and env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert env["OMP_NUM_THREADS"] == "1"  # several workers per node, user did not choose


def test_worker_env_keeps_users_omp_threads_and_single_worker_default():
    one = assign_worker_ranks(_slots(1), 0)[0]
    env = worker_env(one, master_addr="h", master_port=1, restart_count=0, max_restarts=0,
                     run_id="j", parent_env={})  # fmt: skip
    assert "OMP_NUM_THREADS" not in env
    two = assign_worker_ranks(_slots(2), 0)[0]
    env = worker_env(two, master_addr="h", master_port=1, restart_count=0, max_restarts=0,
                     run_id="j", parent_env={"OMP_NUM_THREADS": "7"})  # fmt: skip
    assert env["OMP_NUM_THREADS"] == "7"
