"""Removes dead nodes from torch's rendezvous state as soon as their etcd lease expires.

torch's handler only drops a node after its heartbeats have been stale for
``keep_alive_interval * keep_alive_max_attempt`` (15 s by default), and every heartbeat is a
compare-and-set of the one state key. The lease on each agent's node key is a cheaper and
faster liveness signal: when it expires, any survivor evicts that node with one CAS, so
heartbeats can stay rare and a lost node leaves the rendezvous within the lease TTL.

Node descriptors are matched by the node id that the agent puts after the last ``/`` of its
rendezvous address (``<local addr>/<node id>``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Collection

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

from elastictrain import safe_pickle

logger = logging.getLogger(__name__)


def node_id_of(node_desc) -> str:
    return str(node_desc.addr).rsplit("/", 1)[-1]


def remove_nodes(state, node_ids: Collection[str], min_nodes: int) -> list[str]:
    """Remove the nodes from a ``_RendezvousState`` in place; returns the removed descriptors.

    Mirrors torch's own removal of a dead node (its sanitizer): a complete round left with no
    participant moves to the next round; an incomplete one below ``min_nodes`` loses its
    deadline.
    """
    victims = [
        desc
        for desc in {
            *state.participants,
            *state.wait_list,
            *state.redundancy_list,
            *state.last_heartbeats,
        }  # fmt: skip
        if node_id_of(desc) in node_ids
    ]
    removed_participant = False
    for desc in victims:
        removed_participant |= state.participants.pop(desc, None) is not None
        state.wait_list.discard(desc)
        state.redundancy_list.discard(desc)
        state.last_heartbeats.pop(desc, None)
    if removed_participant:
        if state.complete:
            if not state.participants:
                state.complete = False
                state.round += 1
        elif len(state.participants) < min_nodes:
            state.deadline = None
    return [repr(desc) for desc in victims]


def evict_nodes(
    backend: RendezvousBackend, node_ids: Collection[str], min_nodes: int, attempts: int = 20
) -> list[str]:
    """Evict ``node_ids`` from the rendezvous (compare-and-set, retried on races).

    Returns what was removed (empty if the nodes were already gone).
    """
    current = backend.get_state()
    for _ in range(attempts):
        if current is None:
            return []
        raw, token = current
        state = safe_pickle.loads(raw, profile="rendezvous")
        removed = remove_nodes(state, node_ids, min_nodes)
        if not removed:
            return []
        result = backend.set_state(pickle.dumps(state), token)
        if result is None:
            return []
        raw, token, written = result
        if written:
            logger.info("evicted lost node(s) %s from the rendezvous", ", ".join(removed))
            return removed
        current = (raw, token)
    logger.warning("could not evict %s after %d attempts", ", ".join(node_ids), attempts)
    return []
