"""In-place worlds, their next epochs and where a re-formed world resumes (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from elastictrain.agent import machine as M
from elastictrain.agent.plan import NodeSlot, RoundPlan
from elastictrain.agent.world import Member, World, WorldFormatError, initial_world, plan_next_world

from elastictrain.train.resume import plan_resume

pytestmark = pytest.mark.unit


def _plan(*sizes: int, me: int = 0) -> RoundPlan:
    slots = tuple(NodeSlot(i, "abc"[i], n, "h", f"e{i}") for i, n in enumerate(sizes))
    return RoundPlan("r1", me, slots, "h", 1, 0, 0)


def test_the_first_world_is_the_rounds_ranks_and_records_round_trip():
    world = initial_world(_plan(2, 2))
    assert world.members == (Member("a", 0), Member("a", 1), Member("b", 0), Member("b", 1))
    assert world.rank_of("b", 1, "") == 3 and world.slots_on("b", "") == {0: 2, 1: 3}
    assert World.decode(world.encode()) == world
    # version 1 records (members without their incarnation) are still read
    old = b'{"version":1,"round_id":"r1","epoch":0,"members":[["a",0],["a",1]]}'
    assert World.decode(old).members == (Member("a", 0), Member("a", 1))
    assert world.store_prefix == "worlds/r1/0/"
    for raw in (b"{", b'{"version": 9}', b'{"version": 1, "round_id": "r"}'):
        with pytest.raises(WorldFormatError):
            World.decode(raw)


def test_a_lost_rank_goes_to_a_spare_else_the_world_shrinks():
    world = initial_world(_plan(2, 2))
    spare = Member("b", 2)
    taken = plan_next_world(world, {Member("b", 0)}, [spare]).world
    assert taken.members[2] == spare and taken.size == 4 and taken.epoch == 1
    shrunk = plan_next_world(taken, {Member("a", 0), Member("a", 1)}).world
    assert shrunk.members == (spare, Member("b", 1)) and shrunk.epoch == 2
    assert plan_next_world(shrunk, {Member("a", 0)}).world is None  # already out
    # a spare already holding a rank is not offered twice
    again = plan_next_world(taken, {Member("b", 1)}, [spare]).world
    assert again.size == 3


def test_a_node_that_came_back_is_not_its_earlier_self():
    slots = (NodeSlot(0, "a", 1, "h", "e0", "a1"), NodeSlot(1, "b", 1, "h", "e1", "b1"))
    world = initial_world(RoundPlan("r1", 0, slots, "h", 1, 0, 0))
    assert world.members == (Member("a", 0, "a1"), Member("b", 0, "b1"))
    shrunk = plan_next_world(world, {Member("b", 0, "b1")}).world
    back = plan_next_world(shrunk, frozenset(), joining=[Member("b", 0, "b2")]).world
    assert back.slots_on("b", "b2") == {0: 1} and back.slots_on("b", "b1") == {}
    assert back.rank_of("b", 0, "b1") is None and back.slots_on("b", None) == {0: 1}
    # a proposal to drop node b's earlier workers, retried on top of its return, drops nobody
    assert plan_next_world(back, {Member("b", 0, "b1")}).world is None
    assert World.decode(back.encode()) == back


def test_resume_at_the_newest_step_everyone_can_have():
    fresh = plan_resume([-1, -1], set())
    assert fresh.fresh and fresh.step == 0
    same = plan_resume([7, 7, 7], {5, 6})
    assert (same.step, same.restore) == (7, (False, False, False))
    spare = plan_resume([7, 7, -1], {6, 7})
    assert (spare.step, spare.restore) == (7, (False, False, True))
    ahead = plan_resume([13, 12], {12})  # one rank stepped past the others: it rolls back
    assert (ahead.step, ahead.restore) == (12, (True, False))
    behind = plan_resume([13, 12], {12, 13})
    assert (behind.step, behind.restore) == (13, (False, True))
    assert plan_resume([5, 9], set()) is None
    # a double fault: the spare's records are gone too; it takes a survivor's state instead
    healed = plan_resume([18, 18, -1], set(), heal=True)
    assert (healed.step, healed.restore, healed.heal_from) == (18, (False, False, True), 0)
    assert plan_resume([9, 5], set(), heal=True).heal_from == 0
    assert plan_resume([7, 7, -1], {7}, heal=True).heal_from == -1  # records first


def _inplace(sizes=(2, 2), me=0, hot_spares=0) -> M.AgentMachine:
    m, _ = M.start("ab"[me], max_restarts=1, membership_poll_interval=1.0,
                   coordination_timeout=60.0, hot_spares=hot_spares)  # fmt: skip
    m, _ = M.step(m, M.RoundFormed(_plan(*sizes, me=me)), 0.0)
    for slot in range(sizes[me]):
        m, _ = M.step(m, M.WorkerAttached(m.generation, slot, "inplace"), 0.0)
    return m


def test_a_lost_in_place_worker_is_proposed_out_of_the_world():
    m = _inplace()
    m, effects = M.step(m, M.WorkerLost(m.generation, 1, "session closed"), 1.0)
    (propose,) = [e for e in effects if isinstance(e, M.ProposeWorld)]
    assert propose.lost == {Member("a", 1)} and propose.world.size == 3
    assert m.verdict.action is M.Action.RECONFIGURE and m.verdict.details["ranks"] == [1]
    assert not [e for e in effects if isinstance(e, M.StopWorkers)]  # nobody is restarted
    # its exit later changes nothing; the new world is pushed to the survivors
    m, effects = M.step(m, M.WorkerExited(m.generation, 1, -9), 1.1)
    assert effects == []
    m, effects = M.step(m, M.WorldChanged(propose.world), 1.2)
    assert [type(e) for e in effects if not isinstance(e, M.Record)] == [M.PushWorld]
    assert m.world.epoch == 1 and m.members_here() == {0: 0}


def test_a_lost_node_is_taken_out_in_place_and_the_last_rank_falls_back_to_a_restart():
    m = _inplace()
    m, effects = M.step(m, M.NodesLost(frozenset({"b"})), 1.0)
    (propose,) = [e for e in effects if isinstance(e, M.ProposeWorld)]
    assert propose.world.members == (Member("a", 0), Member("a", 1))
    assert not [e for e in effects if isinstance(e, M.Rendezvous)]
    single = _inplace(sizes=(1,))
    single, effects = M.step(single, M.WorkerLost(single.generation, 0, "closed"), 1.0)
    assert single.verdict.action is M.Action.REQUEST_RESTART  # no rank left to go on with


def test_planned_faults_go_to_the_holder_of_the_rank_in_the_first_world_only():
    m, _ = M.start("b", max_restarts=0, membership_poll_interval=1.0, coordination_timeout=60.0,
                   faults=(M.FaultPlan("kill", 3, 7), M.FaultPlan("kill", 1, 2)))  # fmt: skip
    m, _ = M.step(m, M.RoundFormed(_plan(2, 2, me=1)), 0.0)
    m, effects = M.step(m, M.WorkerAttached(m.generation, 1, "inplace"), 0.0)
    assert _effects(effects, M.PushFault) == [M.PushFault(1, M.FaultPlan("kill", 3, 7))]
    m = replace(m, world=replace(m.world, epoch=1))
    m, effects = M.step(m, M.WorkerAttached(m.generation, 0, "inplace"), 0.0)
    assert not _effects(effects, M.PushFault)


def _effects(effects, kind):
    return [e for e in effects if isinstance(e, kind)]


def test_spares_start_once_the_workers_recover_in_place_and_are_used_when_ready():
    m, _ = M.start("a", max_restarts=0, membership_poll_interval=1.0, coordination_timeout=60.0,
                   hot_spares=1)  # fmt: skip
    m, effects = M.step(m, M.RoundFormed(_plan(2, 2)), 0.0)
    assert not _effects(effects, M.StartSpares)  # an unmodified script has no use for them
    m, effects = M.step(m, M.WorkerAttached(m.generation, 0, "snapshot"), 0.1)
    assert not _effects(effects, M.StartSpares)
    m, effects = M.step(m, M.WorkerAttached(m.generation, 1, "inplace"), 0.2)
    assert _effects(effects, M.StartSpares) == [M.StartSpares(m.generation, (2,))]
    m, effects = M.step(m, M.WorkerAttached(m.generation, 0, "inplace"), 0.3)
    assert not _effects(effects, M.StartSpares)  # once
    # not attached yet: a lost rank shrinks the world
    _, effects = M.step(m, M.WorkerLost(m.generation, 1, "closed"), 1.0)
    assert _effects(effects, M.ProposeWorld)[0].world.size == 3
    # ready: the spare takes the rank; once it is in the world, a new spare starts
    m, _ = M.step(m, M.WorkerAttached(m.generation, 2, "inplace"), 1.0)
    assert m.ready_spares == (2,)
    m, effects = M.step(m, M.WorkerLost(m.generation, 1, "closed"), 1.1)
    (propose,) = _effects(effects, M.ProposeWorld)
    assert propose.world.members[1] == Member("a", 2) and propose.world.size == 4
    m, effects = M.step(m, M.WorldChanged(propose.world), 1.2)
    assert _effects(effects, M.StartSpares) == [M.StartSpares(m.generation, (3,))]
    assert m.members_here() == {0: 0, 2: 1} and m.spares == (3,)


def test_a_spare_that_dies_is_dropped_and_only_ready_spares_take_ranks():
    m = _inplace(hot_spares=2)
    assert m.spares == (2, 3)
    m, _ = M.step(m, M.WorkerAttached(m.generation, 2, "inplace"), 0.5)
    m, _ = M.step(m, M.WorkerAttached(m.generation, 3, "inplace"), 0.5)
    m, effects = M.step(m, M.WorkerLost(m.generation, 2, "session closed"), 1.0)
    assert m.verdict.action is M.Action.WORKER_LOST and "spare slot 2" in m.verdict.reason
    assert not _effects(effects, M.ProposeWorld) and m.spares == (3,)
    m, effects = M.step(m, M.WorkerExited(m.generation, 2, -9), 1.1)
    assert not _effects(effects, M.ProposeWorld) and not _effects(effects, M.StopWorkers)
    m, effects = M.step(m, M.WorkerLost(m.generation, 0, "session closed"), 1.2)
    assert _effects(effects, M.ProposeWorld)[0].world.members[0] == Member("a", 3)


def test_a_world_that_leaves_out_a_live_worker_kills_it():
    m = _inplace(hot_spares=1)
    m, _ = M.step(m, M.WorkerAttached(m.generation, 2, "inplace"), 0.5)
    world = World(m.world.round_id, 1, (Member("a", 2), Member("b", 0), Member("b", 1)))
    m, effects = M.step(m, M.WorldChanged(world), 1.0)
    assert sorted(e.slot for e in _effects(effects, M.KillWorker)) == [0, 1]
    assert _effects(effects, M.StartSpares) == [M.StartSpares(m.generation, (3,))]


def test_a_node_joins_a_running_world_once_its_workers_are_ready():
    from elastictrain.agent.world import joinable

    running = World("r1", 1, (Member("a", 0), Member("a", 1)), restart_revision=5)
    ok, _ = joinable(running, me="b", restart_revision=5, live=["a"], done=[], ended=False)
    assert ok
    for facts in ({"restart_revision": 6}, {"live": []}, {"done": ["a"]}, {"ended": True},
                  {"left": True}):  # fmt: skip
        args = {"restart_revision": 5, "live": ["a"], "done": [], "ended": False} | facts
        assert not joinable(running, me="b", **args)[0], facts

    m, _ = M.start("b", max_restarts=0, membership_poll_interval=1.0, coordination_timeout=60.0)
    plan = RoundPlan("r1", 0, (NodeSlot(0, "b", 2, "127.0.0.1", "127.0.0.1:9001"),), "", 0, 5, 0)
    m, effects = M.step(m, M.WorldFound(plan, running), 0.0)
    assert m.phase is M.Phase.RUNNING and m.verdict.action is M.Action.JOIN_WORLD
    assert [type(e) for e in effects if not isinstance(e, M.Record)] == [M.JoinWorld,
                                                                          M.StartSpares]
    m, effects = M.step(m, M.WorkerAttached(m.generation, 0, "inplace"), 0.5)
    assert not _effects(effects, M.ProposeWorld) and not _effects(effects, M.PublishWorld)
    m, effects = M.step(m, M.WorkerAttached(m.generation, 1, "inplace"), 0.6)
    (grow,) = _effects(effects, M.ProposeWorld)
    assert grow.world.members == running.members + (Member("b", 0), Member("b", 1))
    assert grow.world.epoch == 2 and grow.world.restart_revision == 5
    m, effects = M.step(m, M.WorldChanged(grow.world), 0.7)
    assert m.members_here() == {0: 2, 1: 3} and m.joining == () and m.spares == ()
    assert not _effects(effects, M.KillWorker) and not _effects(effects, M.StartSpares)


def test_a_node_whose_old_workers_are_still_in_the_world_waits_to_join():
    m, _ = M.start("b", max_restarts=0, membership_poll_interval=1.0, coordination_timeout=60.0)
    plan = RoundPlan("r1", 0, (NodeSlot(0, "b", 2, "127.0.0.1", "127.0.0.1:9001"),), "", 0, 0, 0)
    stale = World("r1", 0, (Member("a", 0), Member("b", 0)))
    m, effects = M.step(m, M.WorldFound(plan, stale), 0.0)
    assert m.phase is M.Phase.RENDEZVOUS and _effects(effects, M.Rendezvous)[0].delay > 0


def test_the_first_world_is_published_once_the_workers_recover_in_place():
    m, _ = M.start("a", max_restarts=0, membership_poll_interval=1.0, coordination_timeout=60.0)
    m, _ = M.step(m, M.RoundFormed(_plan(2, 2)), 0.0)
    m, effects = M.step(m, M.WorkerAttached(m.generation, 0, "inplace"), 0.1)
    assert _effects(effects, M.PublishWorld) == [M.PublishWorld(m.world)]
    m, effects = M.step(m, M.WorkerAttached(m.generation, 1, "inplace"), 0.1)
    assert not _effects(effects, M.PublishWorld)


def test_planned_faults_parse_with_their_moment():
    from elastictrain.agent.config import parse_fault

    from elastictrain.errors import ConfigError

    assert parse_fault("kill:rank=3:step=7") == M.FaultPlan("kill", 3, 7, "step")
    assert parse_fault("stop:step=2:rank=0:at=reform") == M.FaultPlan("stop", 0, 2, "reform")
    assert parse_fault("slow:rank=3:step=10:factor=2:until=60") == M.FaultPlan(
        "slow", 3, 10, "step", 2.0, 60)
    assert parse_fault("slow:rank=1:step=4:factor=10").until == -1
    bad_faults = ("kill:rank=3", "kill:rank=x:step=1", "nuke:rank=1:step=1",
                  "kill:rank=1:step=1:at=x", "slow:rank=1:step=1", "slow:rank=1:step=1:factor=1",
                  "slow:rank=1:step=5:factor=2:until=5", "kill:rank=1:step=1:factor=2",
                  "slow:rank=1:step=1:factor=x", "kill:rank=1:step=1:until=3")  # fmt: skip
    for bad in bad_faults:
        with pytest.raises(ConfigError):
            parse_fault(bad)


def test_a_straggler_report_is_an_event_and_a_failed_straggler_is_recovered_in_place():
    m = _inplace()
    replan = {"action": "replan", "reason": "rank 3 slow", "step": 14, "speeds": [4.0, 4, 4, 2],
              "capacities": [1.0, 1, 1, 0.5], "workers": [18, 18, 18, 10]}  # fmt: skip
    m, effects = M.step(m, M.WorkerReport(m.generation, 0, "straggler", replan), 1.0)
    assert m.verdict.action is M.Action.REPLAN and m.verdict.details["workers"][3] == 10
    assert [type(e) for e in effects] == [M.Record]
    failed = replan | {"action": "fail", "reason": "rank 1 far too slow", "failed": [1]}
    m, effects = M.step(m, M.WorkerReport(m.generation, 1, "straggler", failed), 2.0)
    assert _effects(effects, M.KillWorker)[0].slot == 1
    (propose,) = _effects(effects, M.ProposeWorld)
    assert propose.lost == {Member("a", 1)} and propose.world.size == 3
    stored = [e.verdict.action for e in _effects(effects, M.Record)]
    assert stored == [M.Action.STRAGGLER_FAILED, M.Action.RECONFIGURE]
    # said twice (or its session closing next): nothing more
    _, effects = M.step(m, M.WorkerReport(m.generation, 1, "straggler", failed), 2.1)
    assert effects == []
    _, effects = M.step(m, M.WorkerLost(m.generation, 1, "session closed"), 2.2)
    assert not _effects(effects, M.ProposeWorld)


def test_a_steps_attention_plan_is_an_event():
    m = _inplace()
    plan = {"step": 9, "rounds": 4, "ranks": 4, "naive": 3.21, "planned": 1.01}
    m, effects = M.step(m, M.WorkerReport(m.generation, 0, "attention", plan), 1.0)
    assert m.verdict.action is M.Action.ATTENTION and m.verdict.details["planned"] == 1.01
    assert "3.21 -> 1.01 over 4 round(s)" in m.verdict.reason
    assert [type(e) for e in effects] == [M.Record]


def test_a_world_that_names_a_spare_which_died_meanwhile_is_planned_again():
    m = _inplace(hot_spares=1)
    m, _ = M.step(m, M.WorkerAttached(m.generation, 2, "inplace"), 0.5)
    m, effects = M.step(m, M.WorkerLost(m.generation, 1, "closed"), 1.0)
    (propose,) = _effects(effects, M.ProposeWorld)  # rank 1 -> the spare in slot 2
    m, _ = M.step(m, M.WorkerLost(m.generation, 2, "closed"), 1.01)  # the spare dies too
    m, effects = M.step(m, M.WorldChanged(propose.world), 1.02)
    (again,) = _effects(effects, M.ProposeWorld)
    assert Member("a", 2) in again.lost and again.world.size == 3


def test_a_node_done_waiting_finishes_when_the_world_drops_the_peer_it_waited_for():
    m = _inplace()
    m, _ = M.step(m, M.WorkerFinishing(m.generation, 0), 1.0)
    m, _ = M.step(m, M.WorkerFinishing(m.generation, 1), 1.0)
    m, _ = M.step(m, M.WorkerExited(m.generation, 0, 0), 1.1)
    m, _ = M.step(m, M.WorkerExited(m.generation, 1, 0), 1.1)
    assert m.phase is M.Phase.DONE_WAITING
    world = World(m.world.round_id, 1, (Member("a", 0), Member("a", 1)))
    m, effects = M.step(m, M.WorldChanged(world), 2.0)
    assert m.phase is M.Phase.SUCCEEDED and _effects(effects, M.Exit)


def test_a_joining_worker_that_dies_before_attaching_does_not_hold_the_join():
    m, _ = M.start("b", max_restarts=0, membership_poll_interval=1.0, coordination_timeout=60.0)
    plan = RoundPlan("r1", 0, (NodeSlot(0, "b", 2, "127.0.0.1", "127.0.0.1:9001"),), "", 0, 0, 0)
    running = World("r1", 1, (Member("a", 0), Member("a", 1)))
    m, _ = M.step(m, M.WorldFound(plan, running), 0.0)
    m, _ = M.step(m, M.WorkerAttached(m.generation, 0, "inplace"), 0.5)
    m, effects = M.step(m, M.WorkerExited(m.generation, 1, 1), 0.6)
    (grow,) = _effects(effects, M.ProposeWorld)
    assert grow.world.members[-1] == Member("b", 0) and grow.world.size == 3


def test_a_planned_world_round_trips_and_plans_its_step():
    world = initial_world(_plan(2, 2))
    change = plan_next_world(world, [Member("b", 0), Member("b", 1)], after_step=9)
    assert change.world.after_step == 9 and "after step 9" in change.reason
    assert World.decode(change.world.encode()) == change.world
    assert World.decode(world.encode()).after_step == -1  # a change now
    old = b'{"version":2,"round_id":"r1","epoch":0,"members":[["a",0,""]]}'
    assert World.decode(old).after_step == -1
    with pytest.raises(WorldFormatError):
        World.decode(old.replace(b'"version":2', b'"version":3,"after_step":-5'))


def _beat(m: M.AgentMachine, slot: int, step: int) -> M.AgentMachine:
    m, _ = M.step(m, M.WorkerHeartbeat(m.generation, slot, step, True), 0.5)
    return m


def test_a_drained_node_leaves_the_world_at_a_step_boundary_ahead():
    m = _inplace(me=1)
    m = _beat(_beat(m, 0, 6), 1, 7)
    m, effects = M.step(m, M.DrainRequested("SIGTERM"), 1.0)
    (propose,) = _effects(effects, M.ProposeWorld)
    # two steps past the newest one its workers reported; nobody else's rank moves
    assert propose.world.after_step == 7 + M.DRAIN_STEP_MARGIN
    assert propose.world.members == (Member("a", 0), Member("a", 1))
    assert propose.spares == () and not _effects(effects, M.StopWorkers)
    assert m.verdict.action is M.Action.DRAIN and m.verdict.details["ranks"] == [2, 3]
    assert M.step(m, M.DrainRequested("etrain drain"), 1.1)[1] == []  # once
    # the world changes: its workers are not killed, they finish their steps and exit
    m, effects = M.step(m, M.WorldChanged(propose.world), 1.2)
    assert not _effects(effects, M.KillWorker) and m.members_here() == {}
    assert _effects(effects, M.PushWorld)[0].leaving == (0, 1)  # told they hold no rank
    m, effects = M.step(m, M.WorkerFinishing(m.generation, 0), 2.0)
    m, effects = M.step(m, M.WorkerExited(m.generation, 0, 0), 2.0)
    m, effects = M.step(m, M.WorkerExited(m.generation, 1, 0), 2.0)
    assert effects == [] and not m.phase.is_terminal  # its last step is not committed yet
    m, effects = M.step(m, M.SnapshotCommitted(8), 2.1)
    assert effects == []
    m, effects = M.step(m, M.SnapshotCommitted(9), 2.2)
    assert m.verdict.action is M.Action.DRAINED and m.exit_code == 0
    assert _effects(effects, M.Exit) == [M.Exit(0)]


def test_a_drain_that_does_not_end_in_time_kills_the_workers():
    m, _ = M.start("b", max_restarts=1, membership_poll_interval=1.0, coordination_timeout=60.0,
                   drain_timeout=5.0)  # fmt: skip
    m, _ = M.step(m, M.RoundFormed(_plan(2, 2, me=1)), 0.0)
    for slot in (0, 1):
        m, _ = M.step(m, M.WorkerAttached(m.generation, slot, "inplace"), 0.0)
    m, _ = M.step(m, M.DrainRequested("SIGTERM"), 1.0)
    m, effects = M.step(m, M.Tick(), 5.9)
    assert not m.phase.is_terminal
    m, effects = M.step(m, M.Tick(), 6.0)
    assert m.verdict.action is M.Action.DRAIN_TIMEOUT and m.exit_code == 1
    assert _effects(effects, M.StopWorkers) == [M.StopWorkers(fence=True)]


def test_a_drain_without_in_place_workers_stops_them_with_the_grace():
    m, _ = M.start("b", max_restarts=1, membership_poll_interval=1.0, coordination_timeout=60.0,
                   drain_timeout=7.0)  # fmt: skip
    m, _ = M.step(m, M.RoundFormed(_plan(2, 2, me=1)), 0.0)
    m, effects = M.step(m, M.DrainRequested("SIGTERM"), 1.0)
    assert m.verdict.action is M.Action.DRAIN and m.exit_code == 0  # the others go on
    assert _effects(effects, M.StopWorkers) == [M.StopWorkers(grace=7.0)]
    assert _effects(effects, M.Exit) == [M.Exit(0)]
    alone = _inplace(sizes=(2,))
    alone, effects = M.step(alone, M.DrainRequested("SIGTERM"), 1.0)
    assert alone.exit_code == 1 and "no other node" in alone.verdict.reason
    idle, _ = M.start("c", max_restarts=1, membership_poll_interval=1.0, coordination_timeout=60.0)
    idle, effects = M.step(idle, M.DrainRequested("etrain drain"), 1.0)
    assert idle.verdict.action is M.Action.DRAINED and idle.exit_code == 0
