"""Node records: what each agent registers under ``/etrain/<job>/nodes/<node>`` (leased)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.errors import ElasticTrainError, JobNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    endpoint: str  # the agent's gRPC host:port
    hostname: str
    gpus: int
    nproc_per_node: int
    pid: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> NodeRecord:
        try:
            data = json.loads(raw)
            record = cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                RecursionError) as exc:  # fmt: skip
            raise NodeRecordFormatError(f"malformed node record: {exc}") from exc
        if not (isinstance(record.node_id, str) and isinstance(record.endpoint, str)
                and isinstance(record.hostname, str)
                and all(type(v) is int for v in (record.gpus, record.nproc_per_node, record.pid))):
            raise NodeRecordFormatError("a node record's fields have the wrong types")
        return record


class NodeRecordFormatError(ElasticTrainError, ValueError):
    """A node key's value is not a node record this version reads."""


def list_nodes(client: EtcdClient, keys: JobKeys) -> list[NodeRecord]:
    """The job's live agents (registration keys vanish with their agent's lease)."""
    kvs, _ = client.get_prefix(keys.nodes_prefix)
    records = []
    for kv in kvs:
        try:
            records.append(NodeRecord.decode(kv.value))
        except NodeRecordFormatError as exc:
            logger.warning("skipping node key %s: %s", kv.key, exc)
    return records


def running_job_nodes(etcd: str, job_id: str) -> list[NodeRecord]:
    """The live agents of a running job, read once; :class:`JobNotFoundError` if none."""
    client = EtcdClient.from_spec(etcd, timeout=5.0)
    try:
        records = list_nodes(client, JobKeys(job_id))
    finally:
        client.close()
    if not records:
        raise JobNotFoundError(f"no agent of job {job_id!r} is registered in etcd at {etcd}")
    return records
