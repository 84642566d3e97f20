"""The join (``elastictrain.rendezvous.join``): the pure close verdict, and rounds formed by
real handlers on real etcd, one thread per node."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousTimeoutError

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.errors import ConfigError
from elastictrain.rendezvous.join import (
    EtcdJoinHandler,
    Joiner,
    JoinPolicy,
    decide_close,
    decode_result,
    encode_result,
)


@pytest.mark.unit
def test_a_round_closes_at_max_nodes_or_when_the_last_call_ends():
    policy = JoinPolicy(min_nodes=2, max_nodes=3, last_call_s=5.0)
    one = [Joiner("b", 7)]
    verdict = decide_close(one, policy, 100.0, None)
    assert not verdict.close and verdict.wait_s is None and "1 of at least 2" in verdict.reason
    two = [Joiner("b", 7), Joiner("a", 3)]
    verdict = decide_close(two, policy, 100.0, None)
    assert not verdict.close and verdict.wait_s == 5.0 and verdict.quorum_since == 100.0
    verdict = decide_close(two, policy, 104.0, verdict.quorum_since)
    assert not verdict.close and verdict.wait_s == pytest.approx(1.0)
    verdict = decide_close(two, policy, 105.0, verdict.quorum_since)
    assert verdict.close and verdict.members == ("a", "b")
    four = [*two, Joiner("d", 1), Joiner("c", 8)]
    verdict = decide_close(four, policy, 100.0, None)
    assert verdict.close and verdict.members == ("a", "b", "d")  # the first three, by id
    # below the minimum again: the last call starts over when it is reached
    assert decide_close(one, policy, 106.0, 100.0).quorum_since is None
    for bad in ({"min_nodes": 0, "max_nodes": 1}, {"min_nodes": 3, "max_nodes": 2},
                {"min_nodes": 1, "max_nodes": 1, "last_call_s": -1},
                {"min_nodes": 1, "max_nodes": 1, "join_timeout_s": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            JoinPolicy(**bad)


@pytest.mark.unit
def test_a_round_stays_open_while_the_running_round_has_not_come_back():
    policy = JoinPolicy(min_nodes=1, max_nodes=4, last_call_s=0.0)
    waiting = [Joiner("new", 5)]
    verdict = decide_close(waiting, policy, 0.0, None, running={"a", "b"})
    assert not verdict.close and "have not come back" in verdict.reason
    back = [*waiting, Joiner("a", 6)]  # one member restarted: the others follow
    assert decide_close(back, policy, 0.0, None, running={"a", "b"}).members == ("a", "new")
    assert decide_close(waiting, policy, 0.0, None, running=()).close  # none of them left


@pytest.mark.unit
def test_a_result_round_trips_and_a_bad_one_reads_as_closed():
    assert decode_result(encode_result(4, ["a", "b"], master=("h", 5))) == (("a", "b"), False,
                                                                           ("h", 5))
    assert decode_result(encode_result(4, [], closed=True)) == ((), True, None)
    for raw in (b"", b"{}", b'{"version": 9, "members": [], "closed": false}',
                b'{"version": 1, "members": ["../x"], "closed": false}',
                b'{"version": 1, "members": [], "closed": false, "master": ["h", 0]}'):  # fmt: skip
        assert decode_result(raw) == ((), True, None)


@contextlib.contextmanager
def _handlers(endpoint, job_id, names, policy, **kwargs):
    """One handler per name, each with its own client; shut down and closed after."""
    clients = [EtcdClient.from_spec(endpoint, timeout=5.0) for _ in names]
    handlers = [EtcdJoinHandler(c, JobKeys(job_id), policy, node_id=n, local_addr="127.0.0.1",
                                **kwargs) for c, n in zip(clients, names, strict=True)]
    try:
        yield clients, handlers
    finally:
        for h in handlers:
            h.shutdown()
        for c in clients:
            c.close()


def _join_all(handlers, gap_s: float = 0.0, results: dict | None = None,
              masters: dict | None = None):
    """Each handler's next_rendezvous on its own thread (joining ``gap_s`` apart): rank,
    world size and round, or the exception, into ``results`` as they come (and the workers'
    store address into ``masters``)."""
    results = {} if results is None else results
    masters = {} if masters is None else masters

    def run(h):
        try:
            info = h.next_rendezvous()
            masters[h.node_id] = (info.bootstrap_store_info.master_addr,
                                  info.bootstrap_store_info.master_port)
            results[h.node_id] = (info.rank, info.world_size, h.round_number)
        except Exception as exc:  # the test asserts it
            results[h.node_id] = exc

    threads = []
    for h in handlers:
        threads.append(threading.Thread(target=run, args=(h,)))
        threads[-1].start()
        time.sleep(gap_s)
    for t in threads:
        t.join(30)
    return results


def _wait_for_keys(client: EtcdClient, prefix: str, count: int, timeout: float = 10.0) -> None:
    """Until ``count`` keys are under ``prefix`` (a joiner's key is in: it joined)."""
    deadline = time.monotonic() + timeout
    while client.count_prefix(prefix) != count:
        assert time.monotonic() < deadline, f"{count} key(s) under {prefix}"
        time.sleep(0.02)


@pytest.mark.contract
@pytest.mark.timeout(60)
def test_nodes_form_a_round_ranked_by_id_and_a_latecomer_waits_for_the_next(etcd_endpoint,
                                                                            job_id):
    policy = JoinPolicy(min_nodes=2, max_nodes=3, last_call_s=0.5, join_timeout_s=20)
    with _handlers(etcd_endpoint, job_id, ["n0", "n1", "n2", "n3"], policy) as (clients, handlers):
        masters: dict = {}
        found = _join_all(handlers[:3], gap_s=0.05, masters=masters)
        assert found == {"n0": (0, 3, 0), "n1": (1, 3, 0), "n2": (2, 3, 0)}  # max: at once
        # rank 0 offered its address and a free port for the workers' store
        (addr, port), = set(masters.values())
        assert addr == "127.0.0.1" and port > 0
        # round 0 formed: a new node waits in round 1, and the running ones can see it
        late = threading.Thread(target=lambda: found.update(_join_all(handlers[3:])))
        late.start()
        _wait_for_keys(clients[0], JobKeys(job_id).join_nodes(1), 1)
        assert handlers[0].num_nodes_waiting() == 0  # round 0 has max_nodes: none taken in
        # the running nodes come back for the next round (a restart): 4 > max, so the last
        # of them waits for round 2, until the job is closed
        again: dict = {}
        back = threading.Thread(target=_join_all, args=(handlers[:3], 0.0, again))
        back.start()
        late.join(30)
        assert found["n3"] == (2, 3, 1)  # it joined round 1 first; ranks go by id
        while sum(isinstance(v, tuple) for v in again.values()) < 2 and back.is_alive():
            time.sleep(0.05)
        handlers[3].set_closed()
        back.join(30)
        formed = sorted(v for v in again.values() if isinstance(v, tuple))
        assert formed == [(0, 3, 1), (1, 3, 1)]
        assert sum(isinstance(v, RendezvousClosedError) for v in again.values()) == 1


@pytest.mark.contract
@pytest.mark.timeout(60)
def test_a_closer_that_dies_is_replaced_and_a_closed_job_ends_the_wait(etcd_endpoint, job_id):
    policy = JoinPolicy(min_nodes=3, max_nodes=3, last_call_s=0.0, join_timeout_s=20)
    nodes = _handlers(etcd_endpoint, job_id, ["a", "b", "c"], policy, lease_ttl=2)
    with nodes as (clients, handlers):
        keys = JobKeys(job_id)
        # "a" joins first (the closer) and dies: its lease ends, its key goes
        dead = clients[0]
        lease = dead.grant_lease(2)
        dead.put(keys.join_node(0, "a"), b"{}", lease=lease)
        found: dict = {}
        waiting = threading.Thread(target=_join_all, args=(handlers[1:2], 0.0, found))
        waiting.start()
        _wait_for_keys(dead, keys.join_nodes(0), 2)  # "b" is in, after "a"
        waiting_c = threading.Thread(target=_join_all, args=(handlers[2:], 0.0, found))
        waiting_c.start()
        _wait_for_keys(dead, keys.join_nodes(0), 3)
        dead.revoke_lease(lease)
        _wait_for_keys(dead, keys.join_nodes(0), 2)
        # "b" is the oldest now and closes when a third node comes
        found.update(_join_all(handlers[:1]))
        waiting.join(30)
        waiting_c.join(30)
        assert found == {"a": (0, 3, 0), "b": (1, 3, 0), "c": (2, 3, 0)}
        # a closed job: waiting joiners stop, later ones are refused
        stuck = {}
        t = threading.Thread(target=lambda: stuck.update(_join_all(handlers[:1])))
        t.start()
        _wait_for_keys(dead, keys.join_nodes(1), 1)
        handlers[1].set_closed()
        t.join(10)
        assert isinstance(stuck["a"], RendezvousClosedError)
        assert handlers[2].is_closed()
        with pytest.raises(RendezvousClosedError):
            handlers[2].next_rendezvous()


@pytest.mark.contract
@pytest.mark.timeout(30)
def test_too_few_nodes_time_out_and_leave_no_key(etcd_endpoint, etcd_client, job_id):
    policy = JoinPolicy(min_nodes=2, max_nodes=2, join_timeout_s=1.0)
    with _handlers(etcd_endpoint, job_id, ["lonely"], policy) as (clients, handlers):
        with pytest.raises(RendezvousTimeoutError):
            handlers[0].next_rendezvous()
        assert etcd_client.count_prefix(JobKeys(job_id).join_nodes(0)) == 0


@pytest.mark.contract
@pytest.mark.timeout(60)
def test_waiting_nodes_form_no_round_beside_a_running_one(etcd_endpoint, job_id):
    """min 1: a node that comes while "a" runs round 0 waits until "a" restarts, or until
    "a" is gone (its lease ended): never a second world beside a running one."""
    policy = JoinPolicy(min_nodes=1, max_nodes=3, last_call_s=0.2, join_timeout_s=20)
    with _handlers(etcd_endpoint, job_id, ["a", "b", "c"], policy) as (clients, handlers):
        keys = JobKeys(job_id)
        lease = clients[0].grant_lease(30)
        handlers[0]._owned_lease = lambda: lease  # "a"'s keys live and die with this lease
        assert _join_all(handlers[:1]) == {"a": (0, 1, 0)}
        found: dict = {}
        b = threading.Thread(target=_join_all, args=(handlers[1:2], 0.0, found))
        b.start()
        _wait_for_keys(clients[1], keys.join_nodes(1), 1)
        assert handlers[0].num_nodes_waiting() == 1
        b.join(1.0)  # far past the last call: still waiting, as "a" runs round 0
        assert found == {} and b.is_alive()
        found.update(_join_all(handlers[:1]))  # "a" restarts: round 1 forms with both
        b.join(30)
        assert found == {"a": (0, 2, 1), "b": (1, 2, 1)}
        # round 1 runs; "c" waits until its members are gone (their leases ended)
        c = threading.Thread(target=_join_all, args=(handlers[2:], 0.0, found))
        c.start()
        _wait_for_keys(clients[2], keys.join_nodes(2), 1)
        clients[0].revoke_lease(lease)
        assert c.is_alive()
        handlers[1].shutdown()  # "b"'s own lease goes too
        c.join(30)
        assert found["c"] == (0, 1, 2)
