"""The agent's coordination executor against a real etcd: effects in, observations out."""

from __future__ import annotations

import queue

import pytest
from elastictrain.agent import machine as M
from elastictrain.agent.config import AgentConfig
from elastictrain.agent.coordination import JobCoordinator

from elastictrain.coord.embedded import EmbeddedEtcd
from elastictrain.coord.etcd import EtcdClient

pytestmark = [pytest.mark.contract, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def _scoped_torch_env(monkeypatch):
    """The coordinator sets a process-wide torch variable; undo it after each test."""
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


class Observed:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, observation) -> None:
        self.queue.put(observation)

    def next(self, kind: type, timeout: float = 15.0):
        """The next observation of ``kind`` (others are skipped)."""
        while True:
            observation = self.queue.get(timeout=timeout)
            if isinstance(observation, kind):
                return observation


def _coordinator(endpoint: str, job_id: str, node: str, observed: Observed,
                 **config) -> JobCoordinator:  # fmt: skip
    cfg = AgentConfig(entrypoint="true", args=[], etcd=endpoint, job_id=job_id, node_id=node,
                      max_nodes=2, node_ttl=2, **config)  # fmt: skip
    client = EtcdClient.from_spec(endpoint, timeout=3.0)
    coordinator = JobCoordinator(cfg, client, observed)
    coordinator.prepare_job()
    coordinator.register(f"127.0.0.1:{9000 + len(node)}", "host")
    coordinator.start()
    return coordinator


@pytest.fixture
def pair(etcd_endpoint, job_id):
    observed = (Observed(), Observed())
    coordinators = [
        _coordinator(etcd_endpoint, job_id, n, o) for n, o in zip("ab", observed, strict=True)
    ]
    yield coordinators, observed
    for c in coordinators:
        c.close()
        c.client.close()


def test_start_lists_the_live_nodes(pair):
    _, (seen_a, seen_b) = pair
    assert "a" in seen_a.next(M.NodesListed).nodes
    assert seen_b.next(M.NodesListed).nodes == {"a", "b"}


def test_restart_request_reaches_every_agent_and_only_one_wins(pair):
    (a, b), (seen_a, seen_b) = pair
    a.apply(M.RequestRestart(1, "workers failed", expected_revision=0))
    assert a.flush(10)  # each agent's write lane is its own thread: a's request goes first
    b.apply(M.RequestRestart(1, "workers failed", expected_revision=0))  # loses the CAS
    assert b.flush(10)
    first = seen_b.next(M.RestartRequested)
    assert first.by == "a"
    assert seen_a.next(M.RestartRequested).revision == first.revision
    kv = a.client.get(a.keys.restart_signal)
    assert kv.mod_revision == first.revision  # b's request did not overwrite it


def test_round_done_marks_and_failed_job_are_observed(pair):
    (a, b), (seen_a, seen_b) = pair
    a.apply(M.MarkRoundDone("r1"))
    done = seen_b.next(M.PeerDone)
    assert (done.round_id, done.node, done.done) == ("r1", "a", True)
    b.apply(M.FailJob("workers failed", "b's report"))
    assert b.flush(10)
    failed = seen_a.next(M.JobFailed)
    assert (failed.by, failed.report) == ("b", "b's report")


def test_a_node_whose_lease_is_revoked_is_lost_for_the_others(pair):
    (a, b), (seen_a, _) = pair
    seen_a.next(M.NodesListed)
    b.close()
    assert seen_a.next(M.NodesLost).nodes == {"b"}


def test_a_round_forms_through_torchs_handler_on_etcd(etcd_endpoint, job_id):
    observed = [Observed(), Observed()]
    coordinators = [
        _coordinator(etcd_endpoint, job_id, n, o, min_nodes=2)
        for n, o in zip("ab", observed, strict=True)
    ]
    try:
        for c in coordinators:
            c.apply(M.Rendezvous())
        plans = [o.next(M.RoundFormed, timeout=30).plan for o in observed]
        assert plans[0].round_id == plans[1].round_id
        assert sorted(p.group_rank for p in plans) == [0, 1]
        assert plans[0].participants == {"a", "b"}
        assert plans[0].master_port == plans[1].master_port > 0
    finally:
        for c in coordinators:
            c.close()
            c.client.close()


def test_etcd_going_away_is_an_observation_not_an_exception(job_id, runtime_dir):
    observed = Observed()
    with EmbeddedEtcd() as etcd:
        coordinator = _coordinator(etcd.endpoint, job_id, "a", observed)
        coordinator.client.timeout = 1.0
        etcd.kill()
        effect = M.MarkRoundDone("r1")
        coordinator.apply(effect)
        failed = observed.next(M.CoordinationFailed)
        assert failed.effect == effect and failed.error
        etcd.start_again()
        coordinator.apply(effect)
        observed.next(M.CoordinationSucceeded)
        coordinator.close()
        coordinator.client.close()


def test_a_world_is_joined_only_while_its_round_runs_and_never_overwritten_by_another(pair):
    from elastictrain.agent.world import Member, World

    (a, b), (seen_a, _) = pair
    seen_a.next(M.NodesListed)
    first = World("r1", 0, (Member("a", 0),))
    a.apply(M.PublishWorld(first))
    assert a.flush(10)
    found = b._joinable_world()
    assert found is not None and found.world == first
    a.apply(M.LeaveRound("r1"))  # a's round goes to a rendezvous
    assert a.flush(10)
    assert b._joinable_world() is None

    # a newer round's world is there: a late proposal of round r1 must not replace it
    newer = World("r2", 0, (Member("a", 0), Member("b", 0)))
    a.apply(M.PublishWorld(newer))
    assert a.flush(10)
    late = World("r1", 1, (Member("a", 0), Member("b", 0)))
    b.apply(M.ProposeWorld(late, first, frozenset(), joining=(Member("b", 0),)))
    assert b.flush(10)
    assert World.decode(a.client.get(a.keys.world).value) == newer

    # node b came back (a new incarnation, b2) and joined round r3 again: a's proposal to drop
    # b's earlier workers (b1), planned on the round's first world and retried on top of b's
    # return, drops nobody
    base = World("r3", 0, (Member("a", 0, "a1"), Member("b", 0, "b1")))
    back = World("r3", 2, (Member("a", 0, "a1"), Member("b", 0, "b2")))
    a.apply(M.PublishWorld(base))
    assert a.flush(10)
    kv = a.client.get(a.keys.world)
    assert a.client.compare_and_swap(a.keys.world, back.encode(), kv.mod_revision)[0]
    drop = World("r3", 1, (Member("a", 0, "a1"),))
    a.apply(M.ProposeWorld(drop, base, frozenset({Member("b", 0, "b1")})))
    assert a.flush(10)
    assert World.decode(a.client.get(a.keys.world).value) == back


def test_a_job_never_mixes_agents_of_different_credentials(pair):
    from elastictrain.errors import ConfigError

    (a, b), _ = pair
    a.check_job_ca("f" * 32)
    b.check_job_ca("f" * 32)  # the same CA: fine, any number of times
    with pytest.raises(ConfigError, match="give it the job's --credentials"):
        b.check_job_ca("e" * 32)
    with pytest.raises(ConfigError, match="this agent none"):
        b.check_job_ca("")
