"""The agent's state machine, driven by queued observations (pure: no etcd, no processes)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from elastictrain.agent import machine as M
from elastictrain.agent.plan import NodeSlot, RoundPlan

pytestmark = pytest.mark.unit


def _plan(*nodes: str, me: str = "a", restart_revision: int = 0, restarts: int = 0,
          round_id: str = "r1") -> RoundPlan:  # fmt: skip
    slots = tuple(NodeSlot(i, n, 2, "127.0.0.1", f"127.0.0.1:{9000 + i}")
                  for i, n in enumerate(nodes))  # fmt: skip
    return RoundPlan(round_id, nodes.index(me), slots, "127.0.0.1", 1234, restart_revision,
                     restarts)  # fmt: skip


@dataclass
class Driver:
    """Feeds observations at a fake clock and keeps every effect, like the agent's loop."""

    machine: M.AgentMachine
    now: float = 100.0
    effects: list[M.Effect] = field(default_factory=list)

    @classmethod
    def new(cls, node: str = "a", max_restarts: int = 1, timeout: float = 60.0) -> Driver:
        machine, effects = M.start(node, max_restarts=max_restarts, membership_poll_interval=1.0,
                                   coordination_timeout=timeout)  # fmt: skip
        driver = cls(machine)
        driver.effects += effects
        return driver

    def feed(self, *observations: M.Observation, after: float = 0.0) -> list[M.Effect]:
        self.now += after
        new: list[M.Effect] = []
        for obs in observations:
            self.machine, effects = M.step(self.machine, obs, self.now)
            new += effects
        self.effects += new
        return new

    @property
    def phase(self) -> M.Phase:
        return self.machine.phase

    @property
    def action(self) -> M.Action:
        assert self.machine.verdict is not None
        return self.machine.verdict.action


def _failed(d: Driver, report: str = "") -> M.WorkerExited:
    return M.WorkerExited(d.machine.generation, 1, -9, report)


def _succeeded(d: Driver) -> list[M.WorkerExited]:
    return [M.WorkerExited(d.machine.generation, slot, 0) for slot in (0, 1)]


def _kinds(effects: list[M.Effect]) -> list[type]:
    return [type(e) for e in effects if not isinstance(e, M.Record)]


def _running(*nodes: str, **kwargs) -> Driver:
    d = Driver.new(**kwargs)
    d.feed(M.NodesListed(frozenset(nodes)), M.RoundFormed(_plan(*nodes)))
    assert d.phase is M.Phase.RUNNING
    return d


def test_starts_by_joining_the_rendezvous_then_starts_workers_when_a_round_forms():
    d = Driver.new()
    assert _kinds(d.effects) == [M.Rendezvous]
    effects = d.feed(M.RoundFormed(_plan("a", "b")))
    assert _kinds(effects) == [M.StartWorkers]
    assert (
        d.action is M.Action.START_ROUND
        and "group rank 0 of 2 (nodes a,b)" in d.machine.verdict.reason
    )


def test_a_local_failure_requests_a_restart_which_everyone_follows():
    d = _running("a", "b")
    effects = d.feed(_failed(d, "rank 1 died"))
    assert _kinds(effects) == [M.StopWorkers, M.RequestRestart]
    request = effects[-1]
    assert (request.count, request.expected_revision) == (1, 0)
    assert d.phase is M.Phase.RESTARTING and d.action is M.Action.REQUEST_RESTART
    # our own request (or a peer's that won the compare-and-set) comes back through the watch
    assert _kinds(d.feed(M.RestartRequested(revision=7, by="a"))) == [M.Rendezvous]
    assert d.phase is M.Phase.RENDEZVOUS


def test_a_peers_restart_request_stops_our_workers():
    d = _running("a", "b")
    effects = d.feed(M.RestartRequested(revision=9, by="b"))
    assert _kinds(effects) == [M.StopWorkers, M.Rendezvous]
    assert d.action is M.Action.FOLLOW_RESTART
    # a restart that happened before the round began does not count again
    d = Driver.new()
    d.feed(M.RestartRequested(revision=9, by="b"))
    d.feed(M.RoundFormed(_plan("a", "b", restart_revision=9, restarts=1)))
    assert d.feed(M.RestartRequested(revision=9, by="b")) == []
    assert d.phase is M.Phase.RUNNING


def test_local_failure_after_a_peer_asked_follows_without_a_second_restart():
    d = _running("a", "b")
    d.feed(M.RestartRequested(revision=5, by="b"))
    d.feed(M.RoundFormed(_plan("a", "b", restart_revision=5, restarts=1)))
    d.feed(M.RestartRequested(revision=8, by="b"))  # the next incident, already asked
    assert d.phase is M.Phase.RENDEZVOUS  # followed at once
    d = _running("a", "b")
    d.machine = replace(d.machine, restart_revision=3, restart_by="b")
    d.machine = replace(d.machine, round=_plan("a", "b", restart_revision=1))
    effects = d.feed(_failed(d))
    assert _kinds(effects) == [M.StopWorkers, M.Rendezvous]
    assert d.action is M.Action.FOLLOW_RESTART


def test_no_restart_left_fails_the_job_with_the_report():
    d = _running("a", "b", max_restarts=0)
    effects = d.feed(_failed(d, "Root Cause: rank 1"))
    assert _kinds(effects) == [M.StopWorkers, M.FailJob, M.Exit]
    assert effects[-1] == M.Exit(M.EXIT_FAILED, "Root Cause: rank 1", flush=True)
    assert d.phase is M.Phase.FAILED and d.action is M.Action.FAIL_JOB
    assert d.feed(M.Tick(), M.RestartRequested(99, "b")) == []  # terminal: nothing more


def test_another_node_failing_the_job_ends_ours_with_its_report():
    d = _running("a", "b")
    effects = d.feed(M.JobFailed(by="b", report="b's report"))
    assert _kinds(effects) == [M.StopWorkers, M.Exit]
    assert effects[-1].code == M.EXIT_FAILED and effects[-1].report == "b's report"
    d = Driver.new()
    effects = d.feed(M.RendezvousClosed(failed_by="b", report="b's report"))
    assert _kinds(effects) == [M.Exit] and effects[-1].code == M.EXIT_FAILED


def test_success_waits_for_every_participant_then_finishes():
    d = _running("a", "b")
    effects = d.feed(*_succeeded(d))
    assert _kinds(effects) == [M.MarkRoundDone]
    assert d.phase is M.Phase.DONE_WAITING and "1 of 2 nodes done" in d.machine.verdict.reason
    assert d.feed(M.NodesWaiting(3)) == []  # a joiner does not restart a finished node
    effects = d.feed(M.PeerDone("r1", "b"))
    assert _kinds(effects) == [M.CloseRendezvous, M.Exit]
    assert effects[-1].code == M.EXIT_OK and d.phase is M.Phase.SUCCEEDED


def test_a_peer_that_finished_first_is_remembered():
    d = _running("a", "b")
    d.feed(M.PeerDone("r1", "b"), M.PeerDone("old-round", "b"))
    effects = d.feed(*_succeeded(d))
    assert _kinds(effects) == [M.MarkRoundDone, M.CloseRendezvous, M.Exit]


def test_lost_peer_reforms_the_group_without_a_restart():
    d = _running("a", "b", "c")
    effects = d.feed(M.NodesLost(frozenset({"c"})))
    assert _kinds(effects) == [M.StopWorkers, M.Rendezvous]
    records = [e.verdict for e in effects if isinstance(e, M.Record)]
    assert [r.action for r in records] == [M.Action.NODE_LOST, M.Action.REJOIN]
    assert records[0].details == {"lost": ["c"]}
    assert d.action is M.Action.REJOIN
    assert "lost node(s) c" in d.machine.verdict.reason
    # a lost node that is not a participant is only recorded (its join key went with its lease)
    d = _running("a", "b")
    assert _kinds(d.feed(M.NodesLost(frozenset({"x"})))) == []
    # a node missing from a re-read after a compaction is lost too
    d = _running("a", "b")
    assert _kinds(d.feed(M.NodesListed(frozenset({"a"})))) == [M.StopWorkers, M.Rendezvous]


def test_waiting_nodes_are_let_in_at_the_next_round():
    d = _running("a", "b")
    assert d.feed(M.NodesWaiting(0)) == []
    effects = d.feed(M.NodesWaiting(1))
    assert _kinds(effects) == [M.StopWorkers, M.LeaveRound, M.Rendezvous]
    assert d.action is M.Action.REJOIN
    (left,) = [e for e in effects if isinstance(e, M.LeaveRound)]
    assert left.round_id == d.machine.round.round_id  # its world takes no joiner any more


def test_membership_is_polled_on_the_clock():
    d = _running("a", "b")
    assert d.feed(M.Tick(), after=0.5) == []
    assert _kinds(d.feed(M.Tick(), after=0.6)) == [M.PollMembership]
    assert d.feed(M.Tick(), after=0.1) == []
    assert _kinds(d.feed(M.Tick(), after=1.0)) == [M.PollMembership]


def test_own_lease_lost_registers_again_and_rejoins():
    d = _running("a", "b")
    effects = d.feed(M.LeaseLost())
    assert _kinds(effects) == [M.StopWorkers, M.Register, M.Rendezvous]
    assert d.machine.lease_lost
    d.feed(M.Registered())
    assert not d.machine.lease_lost


def test_an_etcd_outage_is_told_from_a_partition_by_the_other_nodes():
    verdict = M.etcd_outage_verdict
    ttl = 3.0
    # b refreshed 0.2 s ago while we are silent for 2.5 s: we are the one cut off
    assert verdict(2.5, {"b": 0.2}, ttl)[0] == "fence"
    # everyone silent about as long: etcd is away; too early before two thirds of the TTL
    assert verdict(1.5, {"b": 1.3}, ttl)[0] == "wait"
    assert verdict(2.1, {"b": 1.8}, ttl) == ("ride_out", "b cannot reach it either")
    assert verdict(1.0, {}, ttl)[0] == "wait" and verdict(1.6, {}, ttl)[0] == "fence"


def test_a_node_cut_off_from_etcd_fences_itself_and_an_outage_is_ridden_out():
    d = _running("a", "b")
    d.machine = replace(d.machine, node_ttl=3.0)
    effects = d.feed(M.LeaseUnconfirmed(0.8))
    assert effects == [M.CheckPeers(("b",))]
    assert d.feed(M.Tick(), after=0.1) == []  # one question at a time
    assert d.feed(M.PeersOnEtcd(("b",), 1.0, {"b": 0.9})) == []  # too early to tell
    assert d.feed(M.Tick(), after=0.1) == []  # and not again before a sixth of the TTL
    assert _kinds(d.feed(M.Tick(), after=0.5)) == [M.CheckPeers]
    effects = d.feed(M.PeersOnEtcd(("b",), 2.2, {"b": 2.0}))
    assert d.action is M.Action.RIDE_OUT and d.phase is M.Phase.RUNNING
    assert not [e for e in effects if isinstance(e, M.StopWorkers)]
    effects = d.feed(M.LeaseConfirmed())
    assert d.action is M.Action.ETCD_BACK and not d.machine.riding_out

    # later b reaches etcd while we do not: our workers stop at once, before our lease runs out
    d.feed(M.LeaseUnconfirmed(0.8), after=5.0)
    effects = d.feed(M.PeersOnEtcd(("b",), 2.1, {"b": 0.3}))
    assert M.StopWorkers(fence=True) in effects and M.Register() in effects
    assert d.action is M.Action.REJOIN and d.machine.lease_lost
    assert d.feed(M.LeaseLost()) == []  # fenced already


def test_a_single_node_rides_out_an_etcd_outage():
    d = _running("a")
    effects = d.feed(M.LeaseUnconfirmed(2.0))
    assert d.action is M.Action.RIDE_OUT and not [e for e in effects
                                                  if isinstance(e, M.StopWorkers)]


def test_etcd_trouble_is_retried_with_backoff_then_fails_cleanly():
    d = Driver.new(timeout=10.0)
    effects = d.feed(M.RendezvousFailed("etcd unreachable", retryable=True))
    assert effects[-1] == M.Rendezvous(delay=M.RETRY_BACKOFF_S) and d.action is M.Action.RETRY
    effects = d.feed(M.RendezvousFailed("etcd unreachable", retryable=True), after=1.0)
    assert effects[-1] == M.Rendezvous(delay=2 * M.RETRY_BACKOFF_S)
    effects = d.feed(M.RendezvousFailed("etcd unreachable", retryable=True), after=9.5)
    assert _kinds(effects) == [M.Exit] and d.phase is M.Phase.FAILED
    assert "etcd unreachable for 10 s" in d.machine.verdict.reason


def test_an_essential_write_is_retried_and_success_resets_the_backoff():
    d = _running("a", "b")
    d.feed(_failed(d))
    request = d.effects[-1]
    effects = d.feed(M.CoordinationFailed(request, "connection refused"))
    assert effects[-1] == replace(request, delay=M.RETRY_BACKOFF_S)
    d.feed(M.CoordinationSucceeded())
    assert d.machine.failing_since is None and d.machine.retries == 0
    # a failed question to peers is not worth a retry: the next silence asks again
    assert d.feed(M.CoordinationFailed(M.CheckPeers(("b",)), "refused")) == []


def test_a_join_timeout_is_final():
    d = Driver.new()
    effects = d.feed(M.RendezvousFailed("not enough nodes", retryable=False))
    assert _kinds(effects) == [M.Exit] and d.phase is M.Phase.FAILED


def test_a_signal_stops_the_agent_without_waiting_for_etcd():
    d = _running("a", "b")
    effects = d.feed(M.Stopped("SIGINT"))
    assert _kinds(effects) == [M.StopWorkers, M.Exit]
    assert effects[-1] == M.Exit(M.EXIT_FAILED, "", flush=False)
    assert d.action is M.Action.STOP


def test_rendezvous_closed_without_an_outcome_is_success():
    d = Driver.new()
    effects = d.feed(M.RendezvousClosed())
    assert effects[-1] == M.Exit(M.EXIT_OK) and d.phase is M.Phase.SUCCEEDED


def test_stale_observations_are_ignored():
    d = Driver.new()
    assert d.feed(_failed(d), M.NodesWaiting(2), M.Tick()) == []
    d = _running("a", "b")
    assert d.feed(M.RoundFormed(_plan("a", "b", round_id="r2"))) == []
    assert d.feed(M.RendezvousFailed("late", retryable=True)) == []
    with pytest.raises(TypeError):
        d.feed(object())  # type: ignore[arg-type]


def test_a_frozen_worker_is_killed_once_and_its_busy_peers_are_not():
    d = _running("a", "b", max_restarts=1)
    d.machine = replace(d.machine, hang_timeout=2.0)
    gen = d.machine.generation
    d.feed(M.WorkerHeartbeat(gen, 0, step=3, active=True), M.WorkerHeartbeat(gen, 1, 3, True))
    for _ in range(4):  # rank 0 keeps beating (blocked in a collective), rank 1 is frozen
        d.feed(M.WorkerHeartbeat(gen, 0, step=3, active=True), M.Tick(), after=0.5)
    effects = d.feed(M.WorkerHeartbeat(gen, 0, step=3, active=True), M.Tick(), after=0.5)
    kills = [e for e in effects if isinstance(e, M.KillWorker)]
    assert [k.slot for k in kills] == [1] and "sent no heartbeat for 2.5 s" in kills[0].reason
    assert d.action is M.Action.WORKER_HUNG and d.machine.verdict.details["rank"] == 1
    assert not [e for e in d.feed(M.Tick(), after=0.5) if isinstance(e, M.KillWorker)]
    # a worker that said it is exiting sends no more heartbeats: that is no hang
    d.feed(M.WorkerFinishing(gen, 0))
    assert not [e for e in d.feed(M.Tick(), after=5.0) if isinstance(e, M.KillWorker)]


def test_a_worker_whose_step_never_ends_is_hung_after_twice_the_timeout():
    d = _running("a", "b")
    d.machine = replace(d.machine, hang_timeout=2.0)
    gen = d.machine.generation
    kills = []
    for _ in range(10):
        effects = d.feed(M.WorkerHeartbeat(gen, 0, step=7, active=True), M.Tick(), after=0.5)
        kills += [e for e in effects if isinstance(e, M.KillWorker)]
    assert [k.slot for k in kills] == [0] and "finished no step after step 7" in kills[
        0
    ].reason
    # not in a step (before the loop, after it, or a script without the Job API): never hung
    d = _running("a", "b")
    d.machine = replace(d.machine, hang_timeout=2.0)
    for _ in range(12):
        effects = d.feed(M.WorkerHeartbeat(d.machine.generation, 0, 7, False), M.Tick(), after=0.5)
        assert not [e for e in effects if isinstance(e, M.KillWorker)]


def test_worker_observations_of_an_earlier_start_are_ignored():
    d = _running("a", "b")
    old = d.machine.generation - 1
    assert d.feed(M.WorkerAttached(old, 0, "snapshot"), M.WorkerLost(old, 0, "closed")) == []
    gen = d.machine.generation
    assert d.feed(M.WorkerLost(gen, 0, "session closed")) == []  # a plain script: its exit decides
    d.feed(M.WorkerAttached(gen, 0, "snapshot"))
    assert d.feed(M.WorkerLost(gen, 0, "session closed", finished=True)) == []
    effects = d.feed(M.WorkerLost(gen, 0, "session closed"))
    assert d.action is M.Action.WORKER_LOST and d.machine.verdict.details == {
        "rank": 0,
        "slot": 0,
        "how": "session closed",
    }
    assert _kinds(effects) == []  # restart-the-world waits for the exit status
