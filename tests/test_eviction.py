"""Lease-based eviction of lost nodes from torch's rendezvous state (real etcd)."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

from elastictrain.rendezvous.backend import EtcdV3RendezvousBackend
from elastictrain.rendezvous.eviction import evict_nodes, node_id_of, remove_nodes


def _desc(node: str) -> _NodeDesc:
    return _NodeDesc(f"127.0.0.1/{node}", 1000, 0)


def _state(participants: list[str], complete: bool, waiting: list[str] = ()) -> _RendezvousState:
    state = _RendezvousState()
    now = datetime.now(timezone.utc)
    for rank, node in enumerate(participants):
        state.participants[_desc(node)] = rank
        state.last_heartbeats[_desc(node)] = now
    for node in waiting:
        state.wait_list.add(_desc(node))
        state.last_heartbeats[_desc(node)] = now
    state.complete = complete
    state.round = 3
    return state


def test_node_id_is_the_last_path_part_of_the_address():
    assert node_id_of(_desc("node-a")) == "node-a"


def test_removing_the_last_participant_of_a_complete_round_opens_the_next():
    state = _state(["a"], complete=True, waiting=["c"])
    removed = remove_nodes(state, {"a"}, min_nodes=1)
    assert removed == [repr(_desc("a"))]
    assert not state.participants and state.round == 4 and not state.complete
    assert _desc("c") in state.wait_list and _desc("a") not in state.last_heartbeats


def test_removing_below_min_in_an_open_round_clears_the_deadline():
    state = _state(["a", "b"], complete=False)
    state.deadline = datetime.now(timezone.utc)
    remove_nodes(state, {"b"}, min_nodes=2)
    assert state.deadline is None and list(state.participants) == [_desc("a")]
    assert state.round == 3


def test_unknown_nodes_change_nothing():
    state = _state(["a", "b"], complete=True)
    assert remove_nodes(state, {"zz"}, min_nodes=1) == []
    assert len(state.participants) == 2


def test_evict_nodes_against_etcd_with_a_concurrent_writer(etcd_client, job_id):
    backend = EtcdV3RendezvousBackend(etcd_client, f"/test/{job_id}/state")
    backend.set_state(pickle.dumps(_state(["a", "b"], complete=True)))
    # a concurrent writer changes the state between our read and our write: we retry on it
    original = backend.set_state
    raced = []

    def racing_set(state, token=None):
        if not raced:
            raced.append(True)
            current, current_token = backend.get_state()
            other = pickle.loads(current)
            other.wait_list.add(_desc("c"))
            original(pickle.dumps(other), current_token)
        return original(state, token)

    backend.set_state = racing_set
    assert evict_nodes(backend, {"b"}, min_nodes=1) == [repr(_desc("b"))]
    final = pickle.loads(backend.get_state()[0])
    assert list(final.participants) == [_desc("a")]
    assert _desc("c") in final.wait_list  # the concurrent change survived
    assert evict_nodes(backend, {"b"}, min_nodes=1) == []  # idempotent
