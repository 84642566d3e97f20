"""A node's status record: what its agent publishes under ``/etrain/<job>/status/<node>``.

One versioned JSON object per node, under the agent's lease (it goes with the node), written
when something in it changes and at most every ``STATUS_INTERVAL_S``: the agent's state and
round, each worker's rank, pid, state, step, step time, speed and share of the batch, and what
the node holds of the snapshots. ``etrain status`` reads these records (one watch on the job),
never the agents one by one. Every field is checked when read: a record is data from another
process.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from elastictrain.errors import ElasticTrainError
from elastictrain.json_records import open_record

STATUS_VERSION = 1
MAX_STATUS_BYTES = 1 << 20
MAX_WORKERS = 4096


class NodeStatusFormatError(ElasticTrainError, ValueError):
    """A status key's value is not a node status record this version reads."""


@dataclass(frozen=True)
class WorkerStatus:
    slot: int  # its id on the node (round workers: their local rank; spares after)
    rank: int  # its global rank in the current world (-1: a hot spare, or none yet)
    pid: int
    state: str  # RUNNING, SUCCEEDED, FAILED, STOPPED
    exit_code: int | None = None  # negative: killed by that signal
    step: int = -1  # steps done, as its last heartbeat said (-1: not known)
    step_s: float = -1.0  # seconds per step, between its last two reported steps (-1: not known)
    speed: float = 0.0  # samples per second of its own compute (0: not known)
    share: float = -1.0  # its share of the global batch (-1: not known)
    spare: bool = False  # a hot spare ready to take a rank (``rank`` -1 until it does)


@dataclass(frozen=True)
class SnapshotStatus:
    memory_bytes: int = 0  # snapshot records and chunks this node holds in memory
    records: int = 0  # complete records held
    chunks: int = 0  # erasure-coded chunks held for other nodes
    committed_step: int = -1  # the job's newest committed step, as this node knows it
    disk_error: str = ""  # the disk tier's last failure ("": none, or no disk tier)


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    hostname: str
    endpoint: str
    pid: int
    state: str  # INIT, RENDEZVOUS, RUNNING, SUCCEEDED, FAILED, STOPPING, ...
    round: int = 0
    restart_count: int = 0
    max_restarts: int = 0
    world_size: int = 0
    epoch: int = -1  # the in-place world's epoch (-1: no in-place world)
    started: float = 0.0  # wall time the agent started
    updated: float = 0.0  # wall time of this record
    etcd_silent_ms: int = 0
    global_batch: int = 0  # samples per step, as the job's workers said (0: not said)
    logical_workers: int = 0  # the job's logical workers (0: not said)
    workers: tuple[WorkerStatus, ...] = ()
    snapshot: SnapshotStatus = field(default_factory=SnapshotStatus)

    def encode(self) -> bytes:
        record = {"version": STATUS_VERSION, **asdict(self)}
        return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()

    def same_as(self, other: NodeStatus | None) -> bool:
        """Equal but for when it was written."""
        return other is not None and _without_time(self) == _without_time(other)

    @classmethod
    def decode(cls, raw: bytes) -> NodeStatus:
        if len(raw) > MAX_STATUS_BYTES:
            raise NodeStatusFormatError(f"a node status of {len(raw)} bytes is too large")
        record = open_record(raw, STATUS_VERSION, "a node status", NodeStatusFormatError)
        workers = record.get("workers")
        if not isinstance(workers, list) or len(workers) > MAX_WORKERS:
            raise NodeStatusFormatError("a node status needs a list of workers")
        snapshot = record.get("snapshot")
        if not isinstance(snapshot, dict):
            raise NodeStatusFormatError("a node status needs a snapshot object")
        fields = {k: v for k, v in record.items() if k not in ("version", "workers", "snapshot")}
        return cls(**_checked(cls, fields, skip=("workers", "snapshot")),
                   workers=tuple(WorkerStatus(**_checked(WorkerStatus, w)) for w in workers),
                   snapshot=SnapshotStatus(**_checked(SnapshotStatus, snapshot)))  # fmt: skip


def _without_time(status: NodeStatus) -> dict[str, Any]:
    data = asdict(status)
    data.pop("updated")
    return data


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _checked(cls, data: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data``'s fields for ``cls``, each of its declared type (missing: the default)."""
    if not isinstance(data, dict):
        raise NodeStatusFormatError(f"a {cls.__name__} must be a JSON object")
    known = {name: f for name, f in cls.__dataclass_fields__.items() if name not in skip}
    unknown = set(data) - set(known)
    if unknown:
        raise NodeStatusFormatError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in data:
            if spec.default is spec.default_factory:  # both MISSING: required
                raise NodeStatusFormatError(f"a {cls.__name__} needs {name!r}")
            continue
        value, kind = data[name], str(spec.type)
        optional = kind.endswith("| None")
        base = kind.removesuffix(" | None")
        if value is None and optional:
            out[name] = None
            continue
        allowed = _KINDS[base]
        if type(value) is bool and base != "bool" or not isinstance(value, allowed):
            raise NodeStatusFormatError(f"{cls.__name__}.{name} must be {base}, got "
                                        f"{type(value).__name__}")  # fmt: skip
        if base == "float" and not math.isfinite(value):
            raise NodeStatusFormatError(f"{cls.__name__}.{name} must be finite")
        if base == "int" and not -(2**63) <= value < 2**63:
            raise NodeStatusFormatError(f"{cls.__name__}.{name} is out of range")
        if base == "str" and len(value) > 4096:
            raise NodeStatusFormatError(f"{cls.__name__}.{name} is too long")
        out[name] = float(value) if base == "float" else value
    return out
