"""The job's events: every verdict, failure, world change and recovery, in etcd.

Each event is one versioned JSON record under ``/etrain/<job>/events/<node>/<writer>/<seq>``
(``writer`` is unique to one agent process, so a restarted agent never overwrites its
predecessor's). :func:`read_events` is the one public reader: ``etrain status``, the demo and
the tests use it; events come back in the order etcd created them. Times are wall-clock
seconds (``time.time()``) of the node that wrote the event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.errors import ElasticTrainError
from elastictrain.json_records import open_record

EVENT_VERSION = 1


class EventFormatError(ElasticTrainError):
    """A stored event is not a record this version can read."""


@dataclass(frozen=True)
class Event:
    """One thing that happened to the job.

    ``kind`` is the verdict's action (``request_restart``, ``worker_lost``, ...) or another
    event kind (``recovered``); ``details`` holds its data (ranks, steps, durations in
    seconds), JSON values only."""

    kind: str
    node: str
    time: float
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        record = {
            "version": EVENT_VERSION, "kind": self.kind, "node": self.node, "time": self.time,
            "reason": self.reason, "details": dict(self.details),
        }  # fmt: skip
        return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        record = open_record(raw, EVENT_VERSION, "an event", EventFormatError)
        try:
            return cls(
                str(record["kind"]), str(record["node"]), float(record["time"]),
                str(record.get("reason", "")), dict(record.get("details") or {}),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise EventFormatError(f"malformed event: {exc}") from exc


def read_events(client: EtcdClient, job_id: str, kind: str | None = None) -> list[Event]:
    """The job's events in creation order (only those of ``kind``, if given)."""
    kvs, _ = client.get_prefix(JobKeys(job_id).events_prefix)
    events = [Event.decode(kv.value) for kv in sorted(kvs, key=lambda kv: kv.create_revision)]
    return [e for e in events if kind is None or e.kind == kind]
