"""Straggler verdicts and work plans (pure)."""

from __future__ import annotations

import random

import pytest

from elastictrain.errors import ConfigError
from elastictrain.train.data_plan import plan_hosting
from elastictrain.train.stragglers import StragglerPolicy, StragglerState, straggler_verdict

pytestmark = pytest.mark.unit


def _run(speeds_of_step, steps: int, policy: StragglerPolicy | None = None, ranks=4):
    policy = policy or StragglerPolicy()
    state, verdicts = StragglerState.even(ranks), []
    for step in range(steps):
        state, verdict = straggler_verdict(state, speeds_of_step(step), policy)
        verdicts.append(verdict)
    return state, verdicts


def test_a_rank_at_half_speed_gets_less_work_and_gets_it_back():
    def speeds(step):
        return [10.0, 10.0, 10.0, 5.0 if 10 <= step < 60 else 10.0]

    _, verdicts = _run(speeds, 100)
    replans = [(step, v) for step, v in enumerate(verdicts) if v.action == "replan"]
    (start, slow), (end, healthy) = replans
    assert 10 < start < 20 and slow.capacities == (1.0, 1.0, 1.0, 0.5)
    assert 60 < end < 70 and healthy.capacities == (1.0, 1.0, 1.0, 1.0)
    # with 64 logical workers the plan reaches 96 % of the ideal throughput
    blocks = plan_hosting(64, slow.capacities)
    time = max((e - s) / c for (s, e), c in zip(blocks, (1, 1, 1, 0.5), strict=True))
    assert 64 / time / 3.5 > 0.95


def test_a_noisy_but_healthy_rank_never_moves_the_plan():
    rng = random.Random(7)
    _, verdicts = _run(lambda step: [10.0, 10.0, 10.0, 10.0 * rng.uniform(0.8, 1.2)], 200)
    assert {v.action for v in verdicts} == {"keep"}
    rng = random.Random(11)  # every rank noisy
    _, verdicts = _run(lambda step: [10.0 * rng.uniform(0.8, 1.2) for _ in range(4)], 200)
    assert {v.action for v in verdicts} == {"keep"}


def test_a_rank_far_slower_for_too_long_is_declared_failed():
    policy = StragglerPolicy(fail_after=20)
    _, verdicts = _run(lambda step: [10.0, 10.0, 10.0, 1.0 if step >= 5 else 10.0], 40, policy)
    failed = [step for step, v in enumerate(verdicts) if v.action == "fail"]
    assert failed and verdicts[failed[0]].failed == (3,) and 20 <= failed[0] < 30


def test_unmeasured_steps_and_bad_policies():
    state, verdict = straggler_verdict(StragglerState.even(2), [0.0, 0.0], StragglerPolicy())
    assert verdict.action == "keep" and verdict.reason == "gathering speeds"
    with pytest.raises(ValueError):
        straggler_verdict(state, [1.0], StragglerPolicy())
    for bad in ({"window": 0}, {"threshold": 1.5}, {"fail_below": -1}):
        with pytest.raises(ConfigError):
            StragglerPolicy(**bad)
