"""Registers ``etcd-v3`` as a torch rendezvous backend.

Our agent uses :func:`create_handler` directly. The ``torchrun.handlers`` entry point
(:mod:`elastictrain.rendezvous.plugin`) also makes
``torchrun --rdzv-backend etcd-v3 --rdzv-endpoint host:port`` work.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousParameters,
    dynamic_rendezvous,
)
from torch.distributed.elastic.rendezvous.registry import handler_registry

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.rendezvous.backend import BACKEND_NAME, CheckedBackend, EtcdV3RendezvousBackend
from elastictrain.rendezvous.store import EtcdStore


def create_handler(
    params: RendezvousParameters, client: EtcdClient | None = None
) -> RendezvousHandler:
    """A ``DynamicRendezvousHandler`` whose state and store live in etcd under the job's keys.

    ``params.endpoint`` is ``host:port[,host:port]``; ``params.run_id`` is the job id.
    """
    if client is None:
        client = EtcdClient.from_spec(
            params.endpoint, timeout=params.get_as_int("etcd_timeout", 10)
        )
    keys = JobKeys(params.run_id)
    backend = CheckedBackend(EtcdV3RendezvousBackend(client, keys.rendezvous_state))
    store_timeout = params.get_as_int("store_timeout", 300)
    store = EtcdStore(client, keys.store_prefix, timeout=timedelta(seconds=store_timeout))
    return dynamic_rendezvous.create_handler(store, backend, params)


def register() -> None:
    """Register the backend in this process's torch handler registry (idempotent)."""
    # Already registered (by us or by the entry point) is fine.
    with contextlib.suppress(ValueError):
        handler_registry.register(BACKEND_NAME, create_handler)
