"""The agent's numbers in Prometheus' text format (pure: a function of what the agent keeps).

:class:`AgentCounters` counts the agent's verdicts by kind (failures, recoveries, drains, ...)
and the durations of its workers' in-place recoveries; :func:`render_metrics` writes them with
the node's status record (:mod:`elastictrain.node_status`: the world, each worker's step, step
time and speed, the snapshots held) as text format 0.0.4. No bookkeeping of its own beyond
the counters: the status record is the one the agent publishes to etcd.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from elastictrain.node_status import NodeStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# what a recovery's report splits its time into (the worker's ``recovered`` details)
RECOVERY_PARTS = ("wait_s", "reform_s", "agree_s", "restore_s", "first_step_s")


@dataclass
class AgentCounters:
    """Counted as the agent announces its verdicts (any thread; read as a copy)."""

    verdicts: dict[str, int] = field(default_factory=dict)  # kind -> count
    recoveries: int = 0
    recovery_seconds: float = 0.0  # the sum over the recoveries
    last_recovery_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, details: Mapping[str, object]) -> None:
        with self._lock:
            self.verdicts[kind] = self.verdicts.get(kind, 0) + 1
            if kind == "recovered":
                seconds = sum(_number(details.get(part)) for part in RECOVERY_PARTS)
                self.recoveries += 1
                self.recovery_seconds += seconds
                self.last_recovery_seconds = seconds

    def copy(self) -> AgentCounters:
        with self._lock:
            return AgentCounters(dict(self.verdicts), self.recoveries, self.recovery_seconds,
                                 self.last_recovery_seconds)  # fmt: skip


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    return ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Writer:
    def __init__(self, common: Mapping[str, object]) -> None:
        self.lines: list[str] = []
        self._common = dict(common)

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, object], float]]) -> None:  # fmt: skip
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{{{_labels({**self._common, **labels})}}} {_value(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])


def render_metrics(job_id: str, status: NodeStatus | None, counters: AgentCounters) -> str:
    """The exposition text: every sample labelled with the job and the node."""
    node = status.node_id if status is not None else ""
    w = _Writer({"job": job_id, "node": node})
    w.one("etrain_agent_up", "gauge", "1 while the agent runs", 1)
    if status is not None:
        w.family("etrain_agent_state", "gauge", "the agent's state (1 for the current one)",
                 [({"state": status.state}, 1)])  # fmt: skip
        w.one("etrain_world_size", "gauge", "ranks in the job's current world",
              status.world_size)
        w.one("etrain_world_epoch", "gauge", "the in-place world's epoch (-1: none)",
              status.epoch)
        w.one("etrain_restart_count", "gauge", "restarts of the whole job so far",
              status.restart_count)
        w.one("etrain_etcd_silent_seconds", "gauge", "time since etcd last answered this agent",
              status.etcd_silent_ms / 1000)
        states: dict[str, int] = {}
        for worker in status.workers:
            state = "SPARE" if worker.spare else worker.state
            states[state] = states.get(state, 0) + 1
        w.family("etrain_workers", "gauge", "this node's workers by state",
                 [({"state": s}, n) for s, n in sorted(states.items())])  # fmt: skip
        ranked = [x for x in status.workers if x.rank >= 0 and x.state == "RUNNING"]
        w.family("etrain_worker_steps", "gauge", "optimizer steps a worker has done",
                 [({"rank": x.rank}, x.step) for x in ranked if x.step >= 0])  # fmt: skip
        w.family("etrain_worker_step_seconds", "gauge",
                 "seconds per step between a worker's last two reported steps",
                 [({"rank": x.rank}, x.step_s) for x in ranked if x.step_s >= 0])  # fmt: skip
        w.family("etrain_worker_samples_per_second", "gauge",
                 "samples a worker computes per second of its own compute",
                 [({"rank": x.rank}, x.speed) for x in ranked if x.speed > 0])  # fmt: skip
        snap = status.snapshot
        newest = max((x.step for x in ranked), default=-1)
        w.one("etrain_snapshot_committed_step", "gauge",
              "the job's newest committed snapshot step (-1: none)", snap.committed_step)
        if newest >= 0 and snap.committed_step >= 0:
            w.one("etrain_snapshot_lag_steps", "gauge",
                  "steps this node's workers are past the committed snapshot",
                  max(newest - snap.committed_step, 0))
        w.one("etrain_snapshot_memory_bytes", "gauge",
              "snapshot records and chunks held in this agent's memory", snap.memory_bytes)
        w.one("etrain_snapshot_records", "gauge", "whole snapshot records held", snap.records)
        w.one("etrain_snapshot_chunks", "gauge",
              "erasure-coded chunks held for other nodes", snap.chunks)
        w.one("etrain_snapshot_disk_failing", "gauge",
              "1 if the disk tier's last write failed", 1 if snap.disk_error else 0)
    w.family("etrain_verdicts_total", "counter",
             "the agent's verdicts by kind (worker_lost, node_lost, request_restart, "
             "reconfigure, recovered, drain, ...)",
             [({"kind": k}, n) for k, n in sorted(counters.verdicts.items())])  # fmt: skip
    w.one("etrain_recovery_last_seconds", "gauge", "the newest in-place recovery's duration",
          counters.last_recovery_seconds)
    w.family("etrain_recovery_seconds", "summary",
             "in-place recoveries of this node's workers: wait, re-form, agree, restore and "
             "first step", [])  # fmt: skip
    common = _labels({"job": job_id, "node": node})
    w.lines.append(f"etrain_recovery_seconds_sum{{{common}}} {_value(counters.recovery_seconds)}")
    w.lines.append(f"etrain_recovery_seconds_count{{{common}}} {counters.recoveries}")
    return "\n".join(w.lines) + "\n"
