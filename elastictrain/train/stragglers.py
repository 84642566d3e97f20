"""Which ranks are slow, and how much work each should get (pure: no timing, no I/O).

Every rank computes the same verdict from the same numbers at the same step (the speeds travel
with the step's reduction), so the plan changes everywhere at once. A rank's speed is samples
per second of its own compute (time waiting in collectives left out), smoothed as the median of
the last ``window`` steps; a re-plan needs a share to be off by more than ``threshold`` for
``patience`` steps in a row (in either direction: the plan moves back the same way once the
rank recovers), so single noisy steps never move it. A wanted plan within the threshold of
the even split is the even split (so a recovered rank gets exactly its share back). A rank
slower than ``fail_below`` of the median rank for ``fail_after`` steps is declared failed: the
in-place path recovers it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from elastictrain.errors import ConfigError


@dataclass(frozen=True)
class StragglerPolicy:
    window: int = 7  # steps of speeds a rank's speed is the median of
    threshold: float = 0.2  # relative error of a rank's share of the work that re-plans
    patience: int = 4  # consecutive steps the error must last
    fail_below: float = 0.2  # a rank slower than this fraction of the median rank ...
    fail_after: int = 50  # ... for this many steps is declared failed (0: never)
    replan: bool = True  # False: measure and report only, never move work

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1 or self.fail_after < 0:
            raise ConfigError(f"straggler window and patience must be >= 1, fail_after >= 0: "
                              f"{self}")  # fmt: skip
        if not 0 < self.threshold < 1 or not 0 <= self.fail_below < 1:
            raise ConfigError(f"straggler threshold must be in (0, 1), fail_below in [0, 1): "
                              f"{self}")  # fmt: skip


@dataclass(frozen=True)
class StragglerState:
    """What the verdict remembers between steps."""

    capacities: tuple[float, ...]  # the plan in force (relative speeds, the fastest 1.0)
    recent: tuple[tuple[float, ...], ...] = ()  # the last ``window`` steps' speeds, per rank
    off_for: int = 0  # consecutive steps the wanted plan has differed from the one in force
    slow_for: tuple[int, ...] = field(default=())  # per rank: consecutive steps below fail_below

    @classmethod
    def even(cls, ranks: int) -> StragglerState:
        return cls(capacities=(1.0,) * ranks, slow_for=(0,) * ranks)


@dataclass(frozen=True)
class StragglerVerdict:
    action: str  # "keep", "replan" or "fail"
    reason: str
    capacities: tuple[float, ...]  # the plan to use from the next step
    speeds: tuple[float, ...] = ()  # the smoothed speeds the verdict used
    failed: tuple[int, ...] = ()  # ranks declared failed ("fail")


def _shares(capacities: Sequence[float]) -> list[float]:
    total = sum(capacities)
    return [c / total for c in capacities]


def straggler_verdict(
    state: StragglerState, speeds: Sequence[float], policy: StragglerPolicy
) -> tuple[StragglerState, StragglerVerdict]:
    """The next state and the verdict after a step whose ranks ran at ``speeds`` (samples per
    compute-second; 0 or less: not measured this step)."""
    ranks = len(state.capacities)
    if len(speeds) != ranks:
        raise ValueError(f"{len(speeds)} speeds for {ranks} ranks")
    recent = (*state.recent, tuple(float(s) for s in speeds))[-policy.window:]
    columns = [[row[r] for row in recent if row[r] > 0] for r in range(ranks)]
    if any(len(column) < (policy.window + 1) // 2 for column in columns):
        keep = StragglerVerdict("keep", "gathering speeds", state.capacities)
        return StragglerState(state.capacities, recent, 0, state.slow_for), keep
    smoothed = tuple(statistics.median(column) for column in columns)
    fastest, middle = max(smoothed), statistics.median(smoothed)
    before = state.slow_for or (0,) * ranks
    slow_for = tuple((n + 1) if s < policy.fail_below * middle else 0
                     for n, s in zip(before, smoothed, strict=True))  # fmt: skip
    failed = tuple(r for r, n in enumerate(slow_for) if policy.fail_after and
                   n >= policy.fail_after)  # fmt: skip
    if failed:
        reason = (f"rank(s) {list(failed)} below {policy.fail_below:g} of the median speed for "
                  f"{policy.fail_after} steps")  # fmt: skip
        verdict = StragglerVerdict("fail", reason, state.capacities, smoothed, failed)
        return StragglerState(state.capacities, recent, 0, slow_for), verdict
    wanted = tuple(round(s / fastest, 3) for s in smoothed)
    even = 1.0 / ranks
    if all(abs(share - even) / even <= policy.threshold for share in _shares(wanted)):
        wanted = (1.0,) * ranks
    errors = [abs(w - c) / c for w, c in zip(_shares(wanted), _shares(state.capacities),
                                             strict=True)]  # fmt: skip
    worst = max(range(ranks), key=lambda r: errors[r])
    if errors[worst] <= policy.threshold or not policy.replan:
        why = "shares within the threshold" if policy.replan else "re-plans are off"
        keep = StragglerVerdict("keep", why, state.capacities, smoothed)
        return StragglerState(state.capacities, recent, 0, slow_for), keep
    off_for = state.off_for + 1
    if off_for < policy.patience:
        keep = StragglerVerdict("keep", f"rank {worst}'s share off by {errors[worst]:.0%} for "
                                f"{off_for} step(s)", state.capacities, smoothed)  # fmt: skip
        return StragglerState(state.capacities, recent, off_for, slow_for), keep
    reason = (f"rank {worst}'s share off by {errors[worst]:.0%} for {off_for} steps: work in "
              f"proportion to speeds {', '.join(f'{s:.3g}' for s in smoothed)}")  # fmt: skip
    verdict = StragglerVerdict("replan", reason, wanted, smoothed)
    return StragglerState(wanted, recent, 0, slow_for), verdict


def hosting_capacities(capacities: Sequence[float], logical_workers: int) -> tuple[float, ...]:
    """``capacities`` raised where needed so that every rank with a capacity hosts at least one
    logical worker (a rank with no work would never be measured again, so never get work
    back)."""
    if logical_workers < len(capacities):
        return tuple(capacities)
    raised = [float(c) for c in capacities]
    for _ in range(len(raised)):
        floor = sum(raised) / logical_workers
        low = [r for r, c in enumerate(raised) if 0 < c < floor]
        if not low:
            break
        for r in low:
            raised[r] = floor
    return tuple(raised)
