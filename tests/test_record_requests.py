"""Which records a local worker may begin (pure)."""

from __future__ import annotations

import pytest
from elastictrain.agent.snapshots import record_request_problem

from elastictrain import constants
from elastictrain.snapshot.record_meta import METADATA_RANK

pytestmark = pytest.mark.unit


def _problem(rank=1, step=8, nbytes=100, *, worker_rank=1, newest=7, max_bytes=1000) -> str:
    return record_request_problem(rank, step, nbytes, worker_rank=worker_rank, newest=newest,
                                  max_bytes=max_bytes)  # fmt: skip


def test_a_worker_writes_its_own_rank_at_a_near_step_within_the_budget():
    assert _problem() == ""
    assert _problem(newest=None, step=50_000) == ""  # nothing known yet: a resumed job
    assert _problem(rank=METADATA_RANK, worker_rank=0) == ""  # DCP's metadata, by rank 0
    assert "may not write the record of rank 2" in _problem(rank=2)
    assert "may not write" in _problem(rank=METADATA_RANK, worker_rank=1)
    assert "holds no rank" in _problem(worker_rank=None)
    assert "steps past" in _problem(step=7 + constants.RECORD_STEP_WINDOW + 1)
    assert "budget" in _problem(nbytes=1001)
    assert _problem(nbytes=10**12, max_bytes=0) == ""  # no budget known
    assert _problem(step=-1) != "" and _problem(nbytes=-1) != ""
