"""Straggler verdicts and work plans (pure)."""

from __future__ import annotations

import random

import pytest

from elastictrain.errors import ConfigError
from elastictrain.train.data_plan import plan_hosting
from elastictrain.train.stragglers import (
    StragglerPolicy,
    StragglerState,
    hosting_capacities,
    straggler_verdict,
)

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


def test_every_rank_keeps_at_least_one_logical_worker():
    raised = hosting_capacities((1.0, 1.0, 1.0, 0.001), 64)
    assert all(end > start for start, end in plan_hosting(64, raised))
    assert hosting_capacities((1.0, 0.5), 64) == (1.0, 0.5)
    assert hosting_capacities((1.0, 0.0), 64) == (1.0, 0.0)  # no capacity: no work


def test_a_plan_near_the_even_split_is_the_even_split():
    def speeds(step):
        return [10.0, 10.0, 10.0, 5.0 if step < 30 else 9.0]

    _, verdicts = _run(speeds, 60)
    replans = [v for v in verdicts if v.action == "replan"]
    assert replans[-1].capacities == (1.0, 1.0, 1.0, 1.0)


def test_the_compute_clock_times_only_what_it_brackets():
    import torch

    from elastictrain.train.timing import ComputeClock, Slowdown, cpu_clock, slowed

    now = [0.0]
    clock = ComputeClock(torch.device("cpu"), clock=lambda: now[0])
    assert clock.speed() == 0.0
    clock.start()
    now[0] += 0.5
    clock.stop(samples=10)
    now[0] += 3.0  # waiting in the reduction: not counted
    assert clock.speed() == 20.0
    clock.forget()
    assert clock.speed() == 0.0
    # a slowdown does its work again on the same clock
    ticks = iter(range(100))
    fake = lambda: float(next(ticks))  # noqa: E731
    assert slowed(lambda: "done", 3.0, torch.device("cpu"), fake) == "done"
    assert next(ticks) > 4  # 1 tick of work, then at least 2 more
    assert Slowdown(2.0, until_step=60).active(59, 0.0)
    assert not Slowdown(2.0, until_step=60).active(60, 0.0)
    assert not Slowdown(2.0, until_time=5.0).active(1, 6.0)
    assert not Slowdown(1.0).active(1, 0.0)
    with pytest.raises(ConfigError):
        cpu_clock("sundial")


def test_a_measuring_policy_never_moves_work():
    def speeds(step):
        return [10.0, 10.0, 10.0, 5.0]

    _, verdicts = _run(speeds, 30, StragglerPolicy(replan=False))
    assert {v.action for v in verdicts} == {"keep"} and verdicts[-1].speeds[3] == 5.0
