"""Pure decisions of the lazy GPU copy: which pieces go how, and how much to stage."""

from __future__ import annotations

import torch

from elastictrain.snapshot.device_copy import (
    CopyObservation,
    CopyPlan,
    lazy_count,
    optimizer_storages,
    plan_copies,
    plan_staging,
)

GB = 10**9


def test_cpu_pieces_are_copied_on_the_host():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    pieces = [(0, p.detach().reshape(-1).view(torch.uint8)) for p in model.parameters()]
    plan = plan_copies(pieces, optimizer_storages(opt))
    assert len(plan.host) == 2 and not plan.lazy and not plan.staged
    assert plan.device_bytes == 0


def test_optimizer_storages_cover_parameters_and_their_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    assert len(optimizer_storages(opt)) == 2  # no state before the first step
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    assert len(optimizer_storages(opt)) == 2 + 2 * 3  # exp_avg, exp_avg_sq, step per param
    assert optimizer_storages(None) == frozenset()


def test_nothing_seen_yet_copies_everything_lazily():
    decision = plan_staging(11 * GB, None, 40 * GB)
    assert (decision.lazy_bytes, decision.staged_bytes) == (11 * GB, 0)


def test_what_fits_before_the_next_step_stays_lazy():
    seen = CopyObservation(rate=55 * GB, window=0.105, interval=0.13)
    decision = plan_staging(5 * GB, seen, 40 * GB)
    assert decision.staged_bytes == 0 and "fit" in decision.reason


def test_the_overflow_is_staged_when_the_copy_fits_before_the_next_snapshot():
    seen = CopyObservation(rate=55 * GB, window=0.105, interval=0.26)  # every 2 steps
    decision = plan_staging(11 * GB, seen, 40 * GB)
    assert decision.lazy_bytes == int(55 * GB * 0.105 * 0.9)
    assert decision.lazy_bytes + decision.staged_bytes == 11 * GB


def test_no_staging_when_the_link_is_too_slow_for_the_snapshot_rate():
    seen = CopyObservation(rate=55 * GB, window=0.105, interval=0.13)  # every step
    decision = plan_staging(11 * GB, seen, 40 * GB)
    assert decision.staged_bytes == 0 and "waits" in decision.reason


def test_no_staging_without_spare_device_memory():
    seen = CopyObservation(rate=55 * GB, window=0.105, interval=0.26)
    decision = plan_staging(11 * GB, seen, 1 * GB)
    assert decision.staged_bytes == 0 and "spare" in decision.reason


def test_lazy_count_stops_before_the_piece_that_overflows():
    pieces = tuple((i * 10, torch.empty(10, dtype=torch.uint8)) for i in range(5))
    plan = CopyPlan(lazy=pieces)
    assert lazy_count(plan, 0) == 0
    assert lazy_count(plan, 25) == 2
    assert lazy_count(plan, 50) == 5
