"""Registers ``etcd-v3`` as a torch rendezvous backend: the join
(:mod:`elastictrain.rendezvous.join`) for ``torchrun``.

The ``torchrun.handlers`` entry point (:mod:`elastictrain.rendezvous.plugin`) makes
``torchrun --rdzv-backend etcd-v3 --rdzv-endpoint host:port`` work; our agent builds its
:class:`~elastictrain.rendezvous.join.EtcdJoinHandler` itself.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import handler_registry

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.rendezvous.join import BACKEND_NAME, EtcdJoinHandler, JoinPolicy

# torch's dynamic rendezvous defaults, for the same --rdzv-conf keys
_LAST_CALL_S = 30
_JOIN_TIMEOUT_S = 600
_LEASE_TTL_S = 10


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The join of job ``params.run_id`` on etcd at ``params.endpoint``
    (``host:port[,host:port]``). ``--rdzv-conf`` keys: ``join_timeout``,
    ``last_call_timeout``, ``lease_ttl`` (seconds a dead node's key outlives it),
    ``etcd_timeout``, ``store_timeout``. Shutting it down closes the job, as torch's own
    handler does when torchrun ends."""
    client = EtcdClient.from_spec(params.endpoint, timeout=params.get_as_int("etcd_timeout", 10))
    policy = JoinPolicy(
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        last_call_s=params.get_as_int("last_call_timeout", _LAST_CALL_S),
        join_timeout_s=params.get_as_int("join_timeout", _JOIN_TIMEOUT_S),
    )
    return EtcdJoinHandler(
        client, JobKeys(params.run_id), policy, local_addr=params.local_addr,
        lease_ttl=params.get_as_int("lease_ttl", _LEASE_TTL_S),
        store_timeout=timedelta(seconds=params.get_as_int("store_timeout", 300)),
        close_on_shutdown=True, owns_client=True,
    )  # fmt: skip


def register() -> None:
    """Register the backend in this process's torch handler registry (idempotent)."""
    # Already registered (by us or by the entry point) is fine.
    with contextlib.suppress(ValueError):
        handler_registry.register(BACKEND_NAME, create_handler)
