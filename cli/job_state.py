"""A running job as etcd holds it: every node's status record, the in-place world, the newest
committed snapshot and the events. The one public reader of them: ``etrain status`` (its
table, live view and ``--json``), the chaos runner and the tests use it.

``--json`` prints :meth:`JobState.to_json`, whose schema is ``docs/status.schema.json``
(``version`` 1; fields are added, never changed in meaning, within a version).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from elastictrain.agent.world import World, WorldFormatError

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.events import Event, EventFormatError
from elastictrain.node_status import NodeStatus, NodeStatusFormatError

logger = logging.getLogger(__name__)

JSON_VERSION = 1
ATTENTION = "attention"  # the per-step event kind kept apart (only the newest one)
JSON_EVENTS = 200  # --json carries the newest events, at most this many


@dataclass(frozen=True)
class JobState:
    job_id: str
    etcd: str
    revision: int  # etcd's revision when it was read
    nodes: dict[str, NodeStatus]  # node id -> its status record
    registered: tuple[str, ...] = ()  # node ids with a live registration key
    world: World | None = None
    committed_step: int = -1
    events: tuple[Event, ...] = ()  # every kind but the per-step ``attention``
    skipped: int = 0  # records this version could not read (logged)
    details: dict[str, Any] = field(default_factory=dict)
    attention: Event | None = None  # the newest step's core-attention plan, if the job has one

    @property
    def running(self) -> bool:
        return bool(self.registered or self.nodes)

    def to_json(self) -> dict[str, Any]:
        world = None
        if self.world is not None:
            world = {"round_id": self.world.round_id, "epoch": self.world.epoch,
                     "size": self.world.size,
                     "members": [{"node": m.node, "slot": m.slot} for m in self.world.members]}
        record = {
            "version": JSON_VERSION, "job_id": self.job_id, "etcd": self.etcd,
            "revision": self.revision, "registered": list(self.registered),
            "nodes": [asdict(self.nodes[n]) for n in sorted(self.nodes)],
            "world": world, "committed_step": self.committed_step,
            "events": [_event_json(e) for e in self.events[-JSON_EVENTS:]],
            "attention": _event_json(self.attention) if self.attention is not None else None,
        }  # fmt: skip
        return json.loads(json.dumps(record))  # JSON types only (lists, not tuples)


def _event_json(e: Event) -> dict[str, Any]:
    return {"kind": e.kind, "node": e.node, "time": e.time, "reason": e.reason,
            "details": dict(e.details)}  # fmt: skip


def read_job_state(client: EtcdClient, job_id: str, etcd: str = "") -> JobState:
    """The job's state now (each prefix read once; records that do not decode are skipped)."""
    keys = JobKeys(job_id)
    skipped = 0
    nodes: dict[str, NodeStatus] = {}
    kvs, revision = client.get_prefix(keys.status_prefix)
    for kv in kvs:
        try:
            status = NodeStatus.decode(kv.value)
        except NodeStatusFormatError as exc:
            logger.warning("skipping status key %s: %s", kv.key, exc)
            skipped += 1
            continue
        nodes[status.node_id] = status
    registered, _ = client.get_prefix(keys.nodes_prefix)
    world = None
    world_kv = client.get(keys.world)
    if world_kv is not None:
        try:
            world = World.decode(world_kv.value)
        except WorldFormatError as exc:
            logger.warning("skipping the world record: %s", exc)
            skipped += 1
    committed = -1
    committed_kv = client.get(keys.snapshot_committed)
    if committed_kv is not None:
        try:
            committed = int(json.loads(committed_kv.value)["step"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            logger.warning("skipping the committed-snapshot record: %s", exc)
            skipped += 1
    events: list[Event] = []
    attention = None
    event_kvs, _ = client.get_prefix(keys.events_prefix)
    for kv in sorted(event_kvs, key=lambda kv: kv.create_revision):
        try:
            event = Event.decode(kv.value)
        except EventFormatError as exc:
            logger.warning("skipping event %s: %s", kv.key, exc)
            skipped += 1
            continue
        if event.kind == ATTENTION:
            attention = event
        else:
            events.append(event)
    ids = tuple(sorted(kv.key.rsplit("/", 1)[-1] for kv in registered))
    return JobState(job_id, etcd, revision, nodes, ids, world, committed, tuple(events), skipped,
                    attention=attention)  # fmt: skip
