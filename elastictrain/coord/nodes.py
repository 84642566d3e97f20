"""Node records: what each agent registers under ``/etrain/<job>/nodes/<node>`` (leased)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys


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
        data = json.loads(raw)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def list_nodes(client: EtcdClient, keys: JobKeys) -> list[NodeRecord]:
    """The job's live agents (registration keys vanish with their agent's lease)."""
    kvs, _ = client.get_prefix(keys.nodes_prefix)
    return [NodeRecord.decode(kv.value) for kv in kvs]
