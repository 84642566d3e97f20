"""Where a re-formed world goes on from (pure).

Every member of a new world reports the steps its live state has done (-1: none, as for a
hot spare or a fresh process). A member's own memory holds one step; the live agents' records
hold the others that are whole. The world resumes at the newest step that every member can
have: from its own memory, or by restoring that step's records in place. A member that
already stepped past it rolls back (the step in flight is discarded and redone); nobody
waits for a step that no one can have. When no step is whole for everyone (the records of a
lost node unreadable: a double fault), the members that lack the newest live step take it
from a member that has it (``heal_from``): under data parallelism that state is the same on
every rank, and the data plan and random seeds derive from the step alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ResumePlan:
    step: int  # steps done when the world goes on
    restore: tuple[bool, ...]  # by rank: load ``step`` from the records
    fresh: bool  # nobody has anything: a new job (rank 0's initial state is shared)
    reason: str
    heal_from: int = -1  # >= 0: this member sends its state to those that restore


def plan_resume(steps_done: Sequence[int], complete: Collection[int],
                heal: bool = False) -> ResumePlan | None:  # fmt: skip
    """The plan, or None when the members share no step (their states and the records have
    nothing in common). With ``heal``, a member's live state is shared instead then."""
    live = {s for s in steps_done if s >= 0}
    whole = set(complete)
    if not live and not whole:
        return ResumePlan(0, tuple(False for _ in steps_done), True,
                          "a new job: every member starts from rank 0's initial state")  # fmt: skip
    for step in sorted(live | whole, reverse=True):
        if all(s == step or step in whole for s in steps_done):
            restore = tuple(s != step for s in steps_done)
            keep = sum(1 for r in restore if not r)
            return ResumePlan(step, restore, False,
                              f"resume after {step} steps: {keep} member(s) keep their state, "
                              f"{len(restore) - keep} restore it")  # fmt: skip
    if not heal:
        return None
    step = max(live)
    source = list(steps_done).index(step)
    restore = tuple(s != step for s in steps_done)
    return ResumePlan(step, restore, False,
                      f"resume after {step} steps: no step is whole in the records; "
                      f"{sum(restore)} member(s) take rank {source}'s state", source)  # fmt: skip
