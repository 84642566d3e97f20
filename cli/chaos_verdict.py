"""What a scenario run shows: per fault, whether and how the job recovered; per run, whether
the final state is the fault-free one. Pure functions of the job's events, the fault times
and the final tensors; :mod:`cli.chaos_run` does the running.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from elastictrain.events import Event

# events that show the job noticed a fault (the first after it is its detection)
DETECTION_KINDS = frozenset({"worker_lost", "worker_hung", "node_lost", "reconfigure",
                             "straggler_failed", "request_restart", "check_peers"})  # fmt: skip
SPLIT_KEYS = ("wait", "reform", "agree", "restore", "first_step")


@dataclass(frozen=True)
class FaultOutcome:
    """One fault of one run. ``recovered`` is None when the job rode it out (no recovery was
    needed: a short hang, an etcd restart, a full disk)."""

    fault: str
    fired: bool
    detect_s: float | None = None
    split: Mapping[str, float] = field(default_factory=dict)  # the slowest rank's, per phase,
    # in the first world re-formed after the fault
    total_s: float | None = None  # fault → the last rank's first step in the last world
    steps_redone: int | None = None
    recoveries: int = 0  # ranks that re-formed (in all its epochs)
    epochs: int = 0  # worlds the job re-formed into because of it
    healed: bool = False  # a member's state went to the others: no step was whole in the records


def fault_outcomes(fired: Sequence[tuple[str, float | None]], events: Sequence[Event]
                   ) -> list[FaultOutcome]:  # fmt: skip
    """``fired``: each fault's description and the wall time its ``chaos`` event says it was
    made (None: never made). A recovery belongs to the newest fault made before it."""
    times = sorted(t for _, t in fired if t is not None)
    outcomes = []
    for name, at in fired:
        if at is None:
            outcomes.append(FaultOutcome(name, False))
            continue
        later = [t for t in times if t > at]
        until = later[0] if later else float("inf")
        mine = [e for e in events if at <= e.time < until]
        detected = [e.time for e in mine if e.kind in DETECTION_KINDS]
        recovered = [e for e in mine if e.kind == "recovered"]
        epochs: dict[int, list[Event]] = {}  # a fault can take several (a loss, a return)
        for e in recovered:
            epochs.setdefault(int(e.details.get("epoch", -1)), []).append(e)
        first = epochs[min(epochs)] if epochs else []
        split = {key: max(float(e.details.get(f"{key}_s", 0.0)) for e in first)
                 for key in SPLIT_KEYS} if first else {}  # fmt: skip
        redone = None
        if recovered:
            redone = sum(max(0, max(int(e.details.get("steps_before", 0)) for e in group)
                             - min(int(e.details.get("resume_step", 0)) for e in group))
                         for group in epochs.values())  # fmt: skip
        outcomes.append(FaultOutcome(
            name, True, detect_s=min(detected) - at if detected else None, split=split,
            total_s=max(e.time for e in recovered) - at if recovered else None,
            steps_redone=redone, recoveries=len(recovered), epochs=len(epochs),
            healed=any(int(e.details.get("healed_from", -1)) >= 0 for e in recovered),
        ))  # fmt: skip
    return outcomes


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            found |= _tensors(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found |= _tensors(item, f"{prefix}[{i}]")
    return found


@dataclass(frozen=True)
class Difference:
    identical: bool
    max_rel_diff: float
    problem: str = ""  # the states cannot be compared (a tensor missing, another shape)


def compare_states(result, reference) -> Difference:
    """Bit-identical, or the largest difference of any tensor relative to its largest
    value."""
    mine, theirs = _tensors(result), _tensors(reference)
    if mine.keys() != theirs.keys():
        missing = sorted(mine.keys() ^ theirs.keys())
        return Difference(False, float("inf"), f"tensor {missing[0]!r} is in only one of them")
    if not mine:
        return Difference(False, float("inf"), "no tensor in the result")
    identical, worst = True, 0.0
    for name, a in mine.items():
        b = theirs[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            return Difference(False, float("inf"), f"{name}: {a.dtype}{list(a.shape)} vs "
                                                   f"{b.dtype}{list(b.shape)}")  # fmt: skip
        same = a.numel() == 0 or torch.equal(a.contiguous().view(torch.uint8),
                                             b.contiguous().view(torch.uint8))  # fmt: skip
        if same:
            continue
        identical = False
        if a.is_floating_point():
            a64, b64 = a.double(), b.double()  # relative to the tensor's largest value
            scale = max(float(b64.abs().max()), torch.finfo(torch.float64).tiny)
            worst = max(worst, float((a64 - b64).abs().max()) / scale)
        else:
            worst = float("inf")
    return Difference(identical, worst)
