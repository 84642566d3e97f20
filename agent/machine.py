"""The agent's whole policy: a pure state machine.

``step(machine, observation, now) -> (machine, effects)``. The machine is an immutable
:class:`AgentMachine` (a :class:`Phase` and what the agent knows of the job); observations
(:mod:`.observations`) are things that happened; effects (:mod:`.effects`) are what the
executors must do. Every verdict is made here, once, and announced as a ``Record`` effect
with its reason. Nothing here touches etcd, gRPC, processes or the real clock: ``now`` is an
argument (seconds, monotonic).

Two ways to survive a fault:

- **restart-the-world** (torchrun's semantics, for any script): a failure restarts the whole
  job while restarts remain (one restart per incident: the first agent to compare-and-set
  the restart key wins, everyone follows), lost peers and waiting nodes re-form the group
  without using a restart, and the job succeeds once every participant's workers succeeded;
- **in place**, for workers whose library attached in ``inplace`` mode (the ``Job`` API): a
  lost worker or node is taken out of the round's world (:mod:`.world`); the next world,
  where a hot spare takes the lost rank or the world shrinks, is proposed by compare-and-set
  and pushed to the workers, which re-form without restarting. Only when no rank would be
  left does it fall back to a restart.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from elastictrain.session.protocol import MODE_INPLACE, MODE_PLAIN

from .effects import (
    ESSENTIAL,
    Action,
    CheckPeers,
    CloseRendezvous,
    Effect,
    Exit,
    FailJob,
    FaultPlan,
    JoinWorld,
    KillWorker,
    LeaveRound,
    MarkRoundDone,
    PollMembership,
    ProposeWorld,
    PublishWorld,
    PushFault,
    PushWorld,
    Record,
    Register,
    Rendezvous,
    RequestRestart,
    StartSpares,
    StartWorkers,
    StopWorkers,
    Verdict,
)
from .observations import (
    CoordinationFailed,
    CoordinationSucceeded,
    DrainRequested,
    JobFailed,
    LeaseConfirmed,
    LeaseLost,
    LeaseUnconfirmed,
    NodesJoined,
    NodesListed,
    NodesLost,
    NodesWaiting,
    Observation,
    PeerDone,
    PeersOnEtcd,
    Registered,
    RendezvousClosed,
    RendezvousFailed,
    RestartRequested,
    RoundFormed,
    SnapshotCommitted,
    Stopped,
    Tick,
    WorkerAttached,
    WorkerExited,
    WorkerFinishing,
    WorkerHeartbeat,
    WorkerLost,
    WorkerReport,
    WorldChanged,
    WorldFound,
)
from .plan import RoundPlan
from .world import Member, World, initial_world, plan_next_world

__all__ = [  # the observations and effects, for ``machine.X`` in executors and tests
    "Action", "AgentMachine", "Beat", "CheckPeers", "CloseRendezvous", "CoordinationFailed",
    "CoordinationSucceeded", "DrainRequested", "Effect", "Exit", "FailJob", "FaultPlan",
    "JobFailed",
    "JoinWorld", "KillWorker", "LeaseConfirmed", "LeaseLost", "LeaseUnconfirmed", "LeaveRound",
    "MarkRoundDone", "NodesJoined", "NodesListed", "NodesLost", "NodesWaiting", "Observation",
    "PeerDone", "PeersOnEtcd", "Phase",
    "PollMembership", "ProposeWorld", "PublishWorld", "PushFault", "PushWorld", "Record",
    "Register", "Registered", "Rendezvous", "RendezvousClosed", "RendezvousFailed",
    "RequestRestart", "RestartRequested", "RoundFormed", "SnapshotCommitted", "StartSpares",
    "StartWorkers",
    "StopWorkers", "Stopped", "Tick", "Verdict", "WorkerAttached", "WorkerExited",
    "WorkerFinishing", "WorkerHeartbeat", "WorkerLost", "WorkerReport", "WorldChanged",
    "WorldFound", "start", "step",
]  # fmt: skip

# Seconds between two attempts of an etcd operation that failed (doubling up to the cap).
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 4.0

EXIT_OK = 0
EXIT_FAILED = 1  # torchrun exits 1 when the workers failed (ChildFailedError)


class Phase(enum.Enum):
    RENDEZVOUS = "RENDEZVOUS"  # waiting for a round to form
    RUNNING = "RUNNING"  # this round's workers run
    DONE_WAITING = "DONE_WAITING"  # ours succeeded, some participant's have not yet
    RESTARTING = "RESTARTING"  # ours failed and were stopped; the restart request is on its way
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)

    @property
    def has_workers(self) -> bool:
        return self in (Phase.RUNNING, Phase.DONE_WAITING)


@dataclass(frozen=True)
class Beat:
    at: float  # when the last heartbeat came
    step: int  # the last step the worker finished
    since: float  # when that step was first reported
    active: bool  # inside the training loop: a step that never ends is a hang
    speed: float = 0.0  # samples per compute-second (0: not known)
    share: float = -1.0  # of the global batch (-1: not known)
    step_s: float = -1.0  # seconds per step between its last two reported steps (-1: not known)


@dataclass(frozen=True)
class AgentMachine:
    """What one agent knows, and the phase it is in. Treat as immutable.

    Worker maps are keyed by slot (a worker's id on this node) and reset at each start."""

    node_id: str
    max_restarts: int
    membership_poll_interval: float
    coordination_timeout: float
    incarnation: str = ""  # this agent process's id, in the world members it starts
    node_ttl: float = 5.0  # this node's lease TTL (seconds)
    hang_timeout: float = 0.0  # 0: hangs are not detected
    hot_spares: int = 0  # idle spares to keep on this node while the job runs in place
    drain_timeout: float = 30.0  # how long a drain may take (then the workers are killed)
    faults: tuple[FaultPlan, ...] = ()  # planned faults not handed to a worker yet
    phase: Phase = Phase.RENDEZVOUS
    round: RoundPlan | None = None
    generation: int = 0  # worker starts so far
    world: World | None = None  # the round's in-place world as last seen
    spares: tuple[int, ...] = ()  # hot-spare slots on this node, started and not in the world
    next_slot: int = 0  # the slot the next spare started gets (slots are never reused)
    joining: tuple[int, ...] = ()  # spares that join a running world once all are ready
    beats: Mapping[int, Beat] = field(default_factory=dict)
    lost: Mapping[int, float] = field(default_factory=dict)  # slot -> when it was seen lost
    modes: Mapping[int, str] = field(default_factory=dict)  # slot -> its session's mode
    finishing: frozenset[int] = frozenset()  # slots exiting on purpose
    exited: Mapping[int, int] = field(default_factory=dict)  # slot -> exit code
    restart_revision: int = 0  # the newest revision of the restart key seen
    restart_by: str = ""
    done: Mapping[str, frozenset[str]] = field(default_factory=dict)  # round id -> nodes
    live_nodes: frozenset[str] = frozenset()
    lease_lost: bool = False
    lease_unconfirmed: bool = False  # no keepalive got through for over half the TTL
    checking_peers: bool = False  # asking the other nodes whether they reach etcd
    riding_out: bool = False  # etcd is away for every node: going on without it
    next_peer_check: float = 0.0
    next_membership_poll: float = 0.0
    failing_since: float | None = None  # etcd has failed since then (None: it works)
    retries: int = 0
    exit_code: int | None = None
    report: str = ""
    verdict: Verdict | None = None  # the last one
    drain_deadline: float | None = None  # draining until then (None: not draining)
    drain_step: int = -1  # our ranks leave the world after this many steps (-1: not yet)
    leaving: frozenset[int] = frozenset()  # our slots that leave the world at drain_step
    committed_step: int = -1  # the newest committed snapshot step seen

    @property
    def inplace(self) -> bool:
        """This node's workers recover in place (their library said so)."""
        return any(mode == MODE_INPLACE for mode in self.modes.values())

    @property
    def round_slots(self) -> range:
        """The slots of this node's round workers (their local ranks)."""
        if self.round is None:
            return range(0)
        return range(self.round.slots[self.round.group_rank].local_world_size)

    @property
    def ready_spares(self) -> tuple[int, ...]:
        """Spares whose library is attached (model and optimizer built): ready to take a rank."""
        return tuple(s for s in self.spares
                     if self.modes.get(s) == MODE_INPLACE and s not in self.lost)  # fmt: skip

    def members_here(self) -> dict[int, int]:
        """slot -> rank of this node's members of the current world."""
        if self.world is None:
            return {}
        return self.world.slots_on(self.node_id, self.incarnation)

    def member(self, slot: int) -> Member:
        """This agent's worker ``slot`` as a world member."""
        return Member(self.node_id, slot, self.incarnation)


def start(
    node_id: str,
    *,
    max_restarts: int,
    membership_poll_interval: float,
    coordination_timeout: float,
    hang_timeout: float = 0.0,
    hot_spares: int = 0,
    faults: tuple[FaultPlan, ...] = (),
    incarnation: str = "",
    node_ttl: float = 5.0,
    drain_timeout: float = 30.0,
) -> tuple[AgentMachine, list[Effect]]:
    """A new agent's machine, and its first effect: join the rendezvous."""
    machine = AgentMachine(
        node_id=node_id,
        incarnation=incarnation,
        node_ttl=node_ttl,
        max_restarts=max_restarts,
        membership_poll_interval=membership_poll_interval,
        coordination_timeout=coordination_timeout,
        hang_timeout=hang_timeout,
        hot_spares=hot_spares,
        faults=faults,
        drain_timeout=drain_timeout,
    )
    return machine, [Rendezvous()]


def step(m: AgentMachine, obs: Observation, now: float) -> tuple[AgentMachine, list[Effect]]:
    """The next machine and what to do, after ``obs`` at time ``now``."""
    if m.phase.is_terminal:
        return m, []
    handler = _HANDLERS.get(type(obs))
    if handler is None:
        raise TypeError(f"not an observation: {obs!r}")
    return handler(m, obs, now)


# -- helpers ---------------------------------------------------------------------------------


def _verdict(m: AgentMachine, action: Action, reason: str, details: Mapping[str, Any] | None = None,
             **changes) -> AgentMachine:  # fmt: skip
    return replace(m, verdict=Verdict(action, reason, details or {}), **changes)


def _announce(m: AgentMachine) -> Record:
    assert m.verdict is not None
    return Record(m.verdict)


def _restart_pending(m: AgentMachine) -> bool:
    """A restart was asked after the current round began."""
    return m.round is not None and m.restart_revision > m.round.restart_revision


def _rejoin(m: AgentMachine, reason: str, now: float, *, register: bool = False,
            details: Mapping[str, Any] | None = None, fence: bool = False):  # fmt: skip
    m = _verdict(m, Action.REJOIN, reason, details, phase=Phase.RENDEZVOUS)
    effects: list[Effect] = [_announce(m), StopWorkers(fence=fence)]
    if register:
        effects.append(Register())
    return m, [*effects, Rendezvous()]


def _fail(m: AgentMachine, action: Action, reason: str, report: str = "", *,
          stop_workers: bool = True, flush: bool = True, prefix: tuple = ()):  # fmt: skip
    m = _verdict(m, action, reason, phase=Phase.FAILED, exit_code=EXIT_FAILED, report=report)
    effects: list[Effect] = [_announce(m)]
    if stop_workers:
        effects.append(StopWorkers())
    return m, [*effects, *prefix, Exit(EXIT_FAILED, report, flush=flush)]


def _participants(m: AgentMachine) -> frozenset[str]:
    """The nodes whose success the job waits for: the round's, or, once the world changed in
    place, the nodes that still hold ranks."""
    assert m.round is not None
    if m.world is not None:  # epoch 0: the round's nodes
        return frozenset(m.world.nodes)
    return m.round.participants


def _finish_if_all_done(m: AgentMachine):
    assert m.round is not None
    participants = _participants(m)
    done = m.done.get(m.round.round_id, frozenset()) & participants
    if len(done) < len(participants):
        return m, []
    m = _verdict(m, Action.FINISH, "every node's workers succeeded", phase=Phase.SUCCEEDED,
                 exit_code=EXIT_OK)  # fmt: skip
    return m, [_announce(m), CloseRendezvous(), Exit(EXIT_OK)]


def _current(m: AgentMachine, obs) -> bool:
    """A worker observation about this start, while its workers run."""
    return m.phase.has_workers and m.round is not None and obs.generation == m.generation


def _rank_text(m: AgentMachine, slot: int) -> tuple[str, int | None]:
    rank = m.members_here().get(slot)
    if rank is None and m.round is not None and slot in m.round_slots and m.world is None:
        rank = m.round.global_rank(slot)
    where = f"rank {rank} (slot {slot})" if rank is not None else f"spare slot {slot}"
    return where, rank


# -- rounds ----------------------------------------------------------------------------------


def _on_round_formed(m: AgentMachine, obs: RoundFormed, now: float):
    if m.phase is not Phase.RENDEZVOUS:
        return m, []
    if m.drain_deadline is not None:  # the job re-formed while we drained: take no part
        return _drained_between_rounds(m)
    plan = obs.plan
    reason = (
        f"round formed: group rank {plan.group_rank} of {len(plan.slots)} "
        f"(nodes {','.join(s.node_id for s in plan.slots)}), restart count {plan.restart_count}"
    )
    world = initial_world(plan)
    m = _verdict(
        m, Action.START_ROUND, reason, phase=Phase.RUNNING, round=plan, world=world, spares=(),
        next_slot=plan.slots[plan.group_rank].local_world_size,
        done={k: v for k, v in m.done.items() if k == plan.round_id},
        next_membership_poll=now + m.membership_poll_interval, failing_since=None, retries=0,
        generation=m.generation + 1, beats={}, lost={}, modes={}, finishing=frozenset(),
        exited={},
        details={"round_id": plan.round_id, "nodes": [s.node_id for s in plan.slots],
                 "group_rank": plan.group_rank, "restart_count": plan.restart_count},
    )  # fmt: skip
    return m, [_announce(m), StartWorkers(plan, m.generation, world)]


def _on_world_found(m: AgentMachine, obs: WorldFound, now: float):
    """A live in-place world: join it without a rendezvous (nobody restarts). Its workers start
    as spares; once all are ready, the world grows by them."""
    if m.phase is not Phase.RENDEZVOUS:
        return m, []
    if m.drain_deadline is not None:
        return _drained_between_rounds(m)
    world, plan = obs.world, obs.plan
    if world.slots_on(m.node_id, None):  # this node's earlier workers are still in it: not yet
        m = _verdict(m, Action.RETRY, f"world epoch {world.epoch} still names this node's "
                     "earlier workers; joining once they are out")  # fmt: skip
        return m, [_announce(m), Rendezvous(delay=1.0)]
    nproc = plan.slots[plan.group_rank].local_world_size
    slots = tuple(range(nproc))
    m = _verdict(
        m, Action.JOIN_WORLD, f"joining the running world (epoch {world.epoch}, {world.size} "
        f"rank(s) on {', '.join(world.nodes)}) with {nproc} worker(s)",
        {"round_id": world.round_id, "epoch": world.epoch, "world_size": world.size},
        phase=Phase.RUNNING, round=plan, world=world, spares=slots, next_slot=nproc,
        joining=slots, done={k: v for k, v in m.done.items() if k == plan.round_id},
        next_membership_poll=now + m.membership_poll_interval, failing_since=None, retries=0,
        generation=m.generation + 1, beats={}, lost={}, modes={}, finishing=frozenset(),
        exited={}, faults=(),
    )  # fmt: skip
    return m, [_announce(m), JoinWorld(plan, m.generation, world),
               StartSpares(m.generation, slots)]  # fmt: skip


def _on_rendezvous_closed(m: AgentMachine, obs: RendezvousClosed, now: float):
    if obs.failed_by is not None:
        return _fail(m, Action.EXIT_FAILED, f"node {obs.failed_by} failed the job", obs.report,
                     stop_workers=False)  # fmt: skip
    m = _verdict(m, Action.FINISH, "the rendezvous is closed: the job is done",
                 phase=Phase.SUCCEEDED, exit_code=EXIT_OK)  # fmt: skip
    return m, [_announce(m), Exit(EXIT_OK)]


def _on_rendezvous_failed(m: AgentMachine, obs: RendezvousFailed, now: float):
    if m.phase is not Phase.RENDEZVOUS:
        return m, []
    if not obs.retryable:
        return _fail(m, Action.EXIT_FAILED, f"rendezvous failed: {obs.reason}",
                     stop_workers=False)  # fmt: skip
    return _retry(m, Rendezvous(), f"rendezvous failed: {obs.reason}", now)


def _retry(m: AgentMachine, effect: Effect, reason: str, now: float):
    """Try ``effect`` again after a backoff, or fail once etcd has been away too long."""
    since = now if m.failing_since is None else m.failing_since
    if now - since >= m.coordination_timeout:
        return _fail(m, Action.EXIT_FAILED,
                     f"etcd unreachable for {now - since:.0f} s: {reason}",
                     stop_workers=m.phase.has_workers, flush=False)  # fmt: skip
    delay = min(RETRY_BACKOFF_S * (2**m.retries), RETRY_BACKOFF_MAX_S)
    m = _verdict(m, Action.RETRY, f"{reason}; retrying in {delay:.1f} s", failing_since=since,
                 retries=m.retries + 1)  # fmt: skip
    return m, [_announce(m), replace(effect, delay=delay)]


# -- restart-the-world -----------------------------------------------------------------------


def _workers_failed(m: AgentMachine, report: str):
    """Some local worker failed: restart the job, follow a restart, or fail it."""
    assert m.round is not None
    if _restart_pending(m):
        m = _verdict(m, Action.FOLLOW_RESTART,
                     f"workers failed; restart already requested by node {m.restart_by}",
                     phase=Phase.RENDEZVOUS, report=report)  # fmt: skip
        return m, [_announce(m), StopWorkers(), Rendezvous()]
    used = m.round.restart_count
    if used < m.max_restarts:
        reason = f"workers failed; restart {used + 1} of {m.max_restarts}"
        m = _verdict(m, Action.REQUEST_RESTART, reason, {"restart": used + 1},
                     phase=Phase.RESTARTING, report=report)  # fmt: skip
        return m, [_announce(m), StopWorkers(),
                   RequestRestart(used + 1, reason, m.round.restart_revision)]  # fmt: skip
    reason = f"workers failed and all {m.max_restarts} restarts are used"
    return _fail(m, Action.FAIL_JOB, reason, report, prefix=(FailJob(reason, report),))


def _local_success(m: AgentMachine, slots):
    """Every one of ``slots`` exited 0: mark this node done, and finish if all are."""
    assert m.round is not None
    round_id = m.round.round_id
    done = m.done.get(round_id, frozenset()) | {m.node_id}
    m = replace(m, phase=Phase.DONE_WAITING, done={**m.done, round_id: done})
    finished, effects = _finish_if_all_done(m)
    if effects:
        return finished, [MarkRoundDone(round_id), *effects]
    participants = _participants(m)
    waiting = f"{len(done & participants)} of {len(participants)} nodes done"
    m = _verdict(m, Action.WAIT_FOR_PEERS, f"workers succeeded; {waiting}")
    return m, [_announce(m), MarkRoundDone(round_id)]


def _on_worker_exited(m: AgentMachine, obs: WorkerExited, now: float):
    if not _current(m, obs) or m.phase is not Phase.RUNNING:
        return m, []
    m = replace(m, exited={**m.exited, obs.slot: obs.exit_code})
    if obs.slot in m.leaving:  # drained out of the world: expected
        return _drain_done(m, now)
    if m.modes.get(obs.slot) == MODE_INPLACE:
        if obs.exit_code != 0 or obs.slot not in m.finishing:
            return _lose_in_place(m, [obs.slot], f"exited with code {obs.exit_code}", now,
                                  report=obs.report)  # fmt: skip
        members = set(m.members_here())
        if members and all(m.exited.get(s) == 0 for s in members):
            return _local_success(m, members)
        return m, []
    if obs.slot in m.spares:  # a spare that never became anything (a joining one too)
        m = replace(m, spares=tuple(s for s in m.spares if s != obs.slot),
                    joining=tuple(s for s in m.joining if s != obs.slot))  # fmt: skip
        return _join_when_ready(m, [])
    if obs.exit_code != 0:
        return _workers_failed(m, obs.report)
    if all(m.exited.get(s) == 0 for s in m.round_slots):
        return _local_success(m, m.round_slots)
    return m, []


def _on_restart_requested(m: AgentMachine, obs: RestartRequested, now: float):
    if obs.revision <= m.restart_revision:
        return m, []
    m = replace(m, restart_revision=obs.revision, restart_by=obs.by)
    if not _restart_pending(m):
        return m, []
    if m.phase.has_workers:
        m = _verdict(m, Action.FOLLOW_RESTART, f"node {obs.by} requested a restart",
                     {"by": obs.by}, phase=Phase.RENDEZVOUS)  # fmt: skip
        return m, [_announce(m), StopWorkers(), Rendezvous()]
    if m.phase is Phase.RESTARTING:
        m = _verdict(m, Action.FOLLOW_RESTART, f"restart requested by node {obs.by}",
                     phase=Phase.RENDEZVOUS)  # fmt: skip
        return m, [_announce(m), Rendezvous()]
    return m, []


def _on_job_failed(m: AgentMachine, obs: JobFailed, now: float):
    return _fail(m, Action.EXIT_FAILED, f"node {obs.by} failed the job", obs.report)


# -- in place ---------------------------------------------------------------------------------


def _lose_in_place(m: AgentMachine, slots, how: str, now: float, report: str = ""):
    """Local workers ``slots`` are lost: propose the next world without them."""
    fresh = [s for s in slots if s not in m.lost]
    if not fresh:
        return m, []
    m = replace(m, lost={**m.lost, **{s: now for s in fresh}},
                spares=tuple(s for s in m.spares if s not in fresh),
                joining=tuple(s for s in m.joining if s not in fresh))  # fmt: skip
    members = m.members_here()
    gone = [s for s in fresh if s in members]
    if not gone:  # a spare (not replaced: it may fail again), or a worker out of the world
        where, _ = _rank_text(m, fresh[0])
        m = _verdict(m, Action.WORKER_LOST, f"{where}: {how}", {"slot": fresh[0], "how": how})
        return m, [_announce(m)]
    lost = frozenset(m.member(s) for s in gone)
    return _reconfigure(m, lost, ", ".join(f"rank {members[s]}" for s in gone) + f": {how}",
                        {"ranks": sorted(members[s] for s in gone), "how": how},
                        report)  # fmt: skip


def _reconfigure(m: AgentMachine, lost: frozenset[Member], what: str,
                 details: Mapping[str, Any], report: str = ""):  # fmt: skip
    """Propose the world without ``lost``; with no rank left, restart the world instead."""
    assert m.world is not None
    spares = tuple(m.member(s) for s in m.ready_spares)
    change = plan_next_world(m.world, lost, spares)
    if change.world is None:
        return m, []
    if change.world.size == 0:
        return _workers_failed(replace(m, modes={}), report or f"{what}; no rank is left")
    details = {**details, "epoch": change.world.epoch, "world_size": change.world.size}
    m = _verdict(m, Action.RECONFIGURE, f"{what}; proposing {change.reason}", details)
    return m, [_announce(m), ProposeWorld(change.world, m.world, lost, spares)]


def _on_world_changed(m: AgentMachine, obs: WorldChanged, now: float):
    world = obs.world
    if (not m.phase.has_workers or m.round is None or m.world is None
            or world.round_id != m.round.round_id or world.epoch <= m.world.epoch):  # fmt: skip
        return m, []
    mine = world.slots_on(m.node_id, m.incarnation)
    spares = tuple(s for s in m.spares if s not in mine)
    taken = len(m.spares) - len(spares)
    joining = tuple(s for s in m.joining if s not in mine)
    # the members re-form: a step that takes long now is the re-forming, not a hang
    beats = {s: replace(b, since=now) for s, b in m.beats.items()}
    m = replace(m, world=world, spares=spares, beats=beats, joining=joining)
    m = _verdict(m, Action.WORLD_CHANGED,
                 f"epoch {world.epoch}: {world.size} rank(s) on {', '.join(world.nodes)}",
                 {"epoch": world.epoch, "world_size": world.size,
                  "ranks": sorted(mine.values())})  # fmt: skip
    leaving = tuple(sorted(s for s in m.leaving if s not in m.exited and s not in mine))
    effects: list[Effect] = [_announce(m), PushWorld(world, leaving)]
    for slot in range(m.next_slot):  # a worker left out of the world must not linger
        if slot in m.leaving:  # drained: it finishes its steps to the boundary, then exits
            continue
        if slot not in mine and slot not in m.exited and slot not in spares:
            effects.append(KillWorker(slot, f"slot {slot} is not in world epoch {world.epoch}"))
    if taken and mine:  # a spare took a rank: the next one starts now, before it is needed
        m, more = _top_up_spares(m, f"{taken} spare(s) took a rank in epoch {world.epoch}")
        effects += more
    dead = [s for s in mine if s in m.lost or m.exited.get(s, 0) != 0]
    if dead and m.phase is Phase.RUNNING:  # named while it died (a spare, say): out again
        lost = frozenset(m.member(s) for s in dead)
        m, more = _reconfigure(m, lost, ", ".join(f"rank {mine[s]}" for s in dead)
                               + f" named in epoch {world.epoch} but already lost",
                               {"ranks": sorted(mine[s] for s in dead)})  # fmt: skip
        return m, effects + more
    if (not mine and m.phase is Phase.RUNNING) or m.phase is Phase.DONE_WAITING:
        finished, done = _finish_if_all_done(m)  # the world may have left only done nodes
        if done:
            return finished, effects + done
    return m, effects


# -- workers' sessions -----------------------------------------------------------------------


def _on_worker_lost(m: AgentMachine, obs: WorkerLost, now: float):
    """A worker whose library holds its session and that did not say it was exiting is lost.
    (An unmodified script's session also closes when it succeeds: its exit status decides.)"""
    if not _current(m, obs) or obs.finished or obs.slot in m.lost:
        return m, []
    mode = m.modes.get(obs.slot, MODE_PLAIN)
    if mode == MODE_PLAIN:
        return m, []
    if mode == MODE_INPLACE:
        return _lose_in_place(m, [obs.slot], obs.reason, now)
    where, rank = _rank_text(m, obs.slot)
    m = _verdict(m, Action.WORKER_LOST, f"{where}: {obs.reason}",
                 {"rank": rank, "slot": obs.slot, "how": obs.reason},
                 lost={**m.lost, obs.slot: now})  # fmt: skip
    # Restart-the-world needs the exit status (the failure report): the reap decides.
    return m, [_announce(m)]


def _on_worker_heartbeat(m: AgentMachine, obs: WorkerHeartbeat, now: float):
    if not _current(m, obs):
        return m, []
    last = m.beats.get(obs.slot)
    since = last.since if last is not None and last.step == obs.step else now
    step_s = last.step_s if last is not None else -1.0
    if last is not None and 0 <= last.step < obs.step:
        step_s = round((now - last.since) / (obs.step - last.step), 6)
    beat = Beat(now, obs.step, since, obs.active, obs.speed, obs.share, step_s)
    return replace(m, beats={**m.beats, obs.slot: beat}), []


def _on_worker_attached(m: AgentMachine, obs: WorkerAttached, now: float):
    if not _current(m, obs):
        return m, []
    first_inplace = obs.mode == MODE_INPLACE and not m.inplace
    m, effects = _hand_faults(replace(m, modes={**m.modes, obs.slot: obs.mode}))
    if not (first_inplace and m.phase is Phase.RUNNING):
        return _join_when_ready(m, effects)
    assert m.world is not None
    if m.world.epoch == 0 and not m.joining:  # a node that starts later finds it
        effects.append(PublishWorld(m.world))
    # Only a Job API script can use a spare: they start once its first worker says so.
    m, more = _top_up_spares(m, "the workers recover in place")
    return _join_when_ready(m, effects + more)


def _join_when_ready(m: AgentMachine, effects: list[Effect]):
    """Once every worker of a joining node is ready, propose the world with them."""
    if not m.joining or m.world is None or m.phase is not Phase.RUNNING:
        return m, effects
    if any(m.modes.get(s) != MODE_INPLACE for s in m.joining):
        return m, effects
    joining = tuple(m.member(s) for s in m.joining)
    change = plan_next_world(m.world, frozenset(), (), joining)
    if change.world is None:
        return m, effects
    m = _verdict(m, Action.GROW, f"{len(joining)} worker(s) ready: proposing {change.reason}",
                 {"epoch": change.world.epoch, "world_size": change.world.size})  # fmt: skip
    return m, [*effects, _announce(m), ProposeWorld(change.world, m.world, frozenset(), (),
                                                    joining)]  # fmt: skip


def _top_up_spares(m: AgentMachine, why: str):
    """Start spares until this node has ``hot_spares`` of them (joining workers aside)."""
    want = m.hot_spares - len([s for s in m.spares if s not in m.joining])
    if want <= 0:
        return m, []
    return _start_spares(m, want, why)


def _start_spares(m: AgentMachine, count: int, why: str):
    slots = tuple(range(m.next_slot, m.next_slot + count))
    m = _verdict(m, Action.START_SPARES, f"{why}: starting hot spare(s) in slot(s) "
                 f"{', '.join(map(str, slots))}", {"slots": list(slots)},
                 spares=m.spares + slots, next_slot=m.next_slot + count)  # fmt: skip
    return m, [_announce(m), StartSpares(m.generation, slots)]


def _hand_faults(m: AgentMachine):
    """Planned faults go to the in-place worker that holds their rank in the round's first
    world (every agent plans the same faults; each holds different ranks there, so a fault is
    handed out once in the job). With hot spares, not before this node's are ready: the fault
    is there to exercise them (one whose step has passed fires at the next step)."""
    if m.world is None or m.world.epoch != 0:
        return m, []
    if m.hot_spares and len(m.ready_spares) < m.hot_spares:
        return m, []
    members = m.members_here()
    by_rank = {rank: slot for slot, rank in members.items()
               if m.modes.get(slot) == MODE_INPLACE}  # fmt: skip
    handed = [f for f in m.faults if f.rank in by_rank]
    if not handed:
        return m, []
    m = replace(m, faults=tuple(f for f in m.faults if f not in handed))
    return m, [PushFault(by_rank[f.rank], f) for f in handed]


def _on_worker_report(m: AgentMachine, obs: WorkerReport, now: float):
    if not _current(m, obs):
        return m, []
    where, rank = _rank_text(m, obs.slot)
    details = {**obs.data, "slot": obs.slot}
    if obs.kind == "fault":
        m = _verdict(m, Action.FAULT, f"{where}: planned fault {obs.data.get('kind')} at step "
                     f"{obs.data.get('step')}", {**details, "rank": rank})  # fmt: skip
    elif obs.kind == "recovered":
        m = _verdict(m, Action.RECOVERED, f"{where} re-formed in place at epoch "
                     f"{obs.data.get('epoch')}, resuming after {obs.data.get('resume_step')} "
                     "steps", details)  # fmt: skip
    elif obs.kind == "straggler" and obs.data.get("action") == "replan":
        m = _verdict(m, Action.REPLAN, f"after step {obs.data.get('step')}: "
                     f"{obs.data.get('reason')}", details)  # fmt: skip
    elif obs.kind == "attention":
        m = _verdict(m, Action.ATTENTION, f"step {obs.data.get('step')}: attention max/mean "
                     f"{obs.data.get('naive')} -> {obs.data.get('planned')} over "
                     f"{obs.data.get('rounds')} round(s)", details)  # fmt: skip
    elif obs.kind == "straggler" and obs.data.get("action") == "fail":
        return _straggler_failed(m, obs.slot, where, details, now)
    else:
        return m, []
    return m, [_announce(m)]


def _straggler_failed(m: AgentMachine, slot: int, where: str, details: Mapping[str, Any],
                      now: float):  # fmt: skip
    """A rank found far too slow for too long said so itself: it is failed (killed, and its
    rank recovered in place like a crash: a hot spare takes it or the world shrinks)."""
    if slot in m.lost or slot not in m.members_here():
        return m, []
    reason = f"{where}: {details.get('reason')}"
    m = _verdict(m, Action.STRAGGLER_FAILED, reason, details)
    effects: list[Effect] = [_announce(m), KillWorker(slot, reason)]
    m, more = _lose_in_place(m, [slot], "failed as a straggler", now)
    return m, effects + more


def _on_worker_finishing(m: AgentMachine, obs: WorkerFinishing, now: float):
    if not _current(m, obs):
        return m, []
    return replace(m, finishing=m.finishing | {obs.slot}), []


def _hung_workers(m: AgentMachine, now: float) -> list[tuple[int, str, float]]:
    """(slot, why, idle seconds) of each hung worker. A worker that sends no heartbeat for
    the hang timeout is frozen (stopped, or stuck holding its interpreter): the culprit.
    One whose heartbeats go on but whose step does not end for twice the timeout is stuck;
    the grace lets a frozen peer be found and killed first, which ends its peers' wait."""
    if m.hang_timeout <= 0 or m.phase is not Phase.RUNNING:
        return []
    hung = []
    for slot, beat in sorted(m.beats.items()):
        if slot in m.lost or slot in m.finishing or slot in m.exited:
            continue
        if now - beat.at > m.hang_timeout:
            hung.append((slot, "sent no heartbeat", now - beat.at))
        elif beat.active and now - beat.since > 2 * m.hang_timeout:
            hung.append((slot, f"finished no step after step {beat.step}", now - beat.since))
    return hung


def _on_tick(m: AgentMachine, obs: Tick, now: float):
    effects: list[Effect] = []
    for slot, why, idle in _hung_workers(m, now):
        where, rank = _rank_text(m, slot)
        reason = f"{where} {why} for {idle:.1f} s (hang timeout {m.hang_timeout:g} s)"
        details = {"rank": rank, "slot": slot, "idle_s": round(idle, 3)}
        m = _verdict(m, Action.WORKER_HUNG, reason, details, lost={**m.lost, slot: now})
        effects += [_announce(m), KillWorker(slot, reason)]
        if m.modes.get(slot) == MODE_INPLACE:  # its rank moves on now, not at its reap
            m = replace(m, lost={k: v for k, v in m.lost.items() if k != slot})
            m, more = _lose_in_place(m, [slot], why, now)
            effects += more
    if m.phase is Phase.RUNNING and now >= m.next_membership_poll:
        m = replace(m, next_membership_poll=now + m.membership_poll_interval)
        effects.append(PollMembership())
    m, more = _check_etcd(m, now)
    effects += more
    m, more = _drain_done(m, now)
    return m, effects + more


# -- membership --------------------------------------------------------------------------------


def _on_nodes_lost(m: AgentMachine, obs: NodesLost, now: float):
    lost = obs.nodes - {m.node_id}
    m = replace(m, live_nodes=m.live_nodes - obs.nodes)
    if not lost:
        return m, []
    m = _verdict(m, Action.NODE_LOST, f"node(s) {', '.join(sorted(lost))} lost their lease",
                 {"lost": sorted(lost)})  # fmt: skip
    effects: list[Effect] = [_announce(m)]
    if not (m.phase.has_workers and m.round is not None and lost & _participants(m)):
        return m, effects
    if m.inplace and m.world is not None:
        gone = frozenset(member for member in m.world.members if member.node in lost)
        if not gone:
            return m, effects
        ranks = sorted(m.world.members.index(g) for g in gone)
        m, more = _reconfigure(m, gone, f"node(s) {', '.join(sorted(lost))} lost",
                               {"ranks": ranks, "lost": sorted(lost)})  # fmt: skip
        return m, effects + more
    m, rejoin = _rejoin(m, f"lost node(s) {', '.join(sorted(lost))}", now,
                        details={"lost": sorted(lost)})  # fmt: skip
    return m, [*effects, *rejoin]


def _on_nodes_joined(m: AgentMachine, obs: NodesJoined, now: float):
    return replace(m, live_nodes=m.live_nodes | obs.nodes), []


def _on_nodes_listed(m: AgentMachine, obs: NodesListed, now: float):
    lost = m.live_nodes - obs.nodes
    m = replace(m, live_nodes=obs.nodes)
    return _on_nodes_lost(m, NodesLost(lost), now) if lost else (m, [])


def _on_peer_done(m: AgentMachine, obs: PeerDone, now: float):
    nodes = m.done.get(obs.round_id, frozenset())
    nodes = nodes | {obs.node} if obs.done else nodes - {obs.node}
    m = replace(m, done={**m.done, obs.round_id: nodes})
    memberless = m.world is not None and not m.members_here()  # out of it, or not joined yet
    if m.drain_deadline is not None:  # leaving: the drain's own end decides
        return m, []
    if m.phase is Phase.DONE_WAITING or (m.phase is Phase.RUNNING and memberless):
        return _finish_if_all_done(m)
    return m, []


def _on_nodes_waiting(m: AgentMachine, obs: NodesWaiting, now: float):
    if m.phase is Phase.RUNNING and obs.count > 0 and m.drain_deadline is None:
        left = m.round.round_id if m.round is not None else None
        m, effects = _rejoin(m, f"{obs.count} node(s) waiting to join", now,
                             details={"waiting": obs.count})  # fmt: skip
        if left is not None:  # its world, if it ran in place, takes no joiner any more
            effects.insert(-1, LeaveRound(left))
        return m, effects
    return m, []


def _on_lease_lost(m: AgentMachine, obs: LeaseLost, now: float):
    if m.lease_lost:  # fenced already: registering again is under way
        return m, []
    m = replace(m, lease_lost=True, riding_out=False)
    if m.phase.has_workers:
        return _rejoin(m, "this node's lease expired: joining again", now, register=True)
    m = _verdict(m, Action.REJOIN, "this node's lease expired: registering again")
    return m, [_announce(m), Register()]


def _on_registered(m: AgentMachine, obs: Registered, now: float):
    return replace(m, lease_lost=False, lease_unconfirmed=False, riding_out=False), []


def etcd_outage_verdict(mine: float, answers: Mapping[str, float], ttl: float
                        ) -> tuple[str, str]:  # fmt: skip
    """What to do while no keepalive of ours gets through (pure): ``("fence", why)``,
    ``("ride_out", why)`` or ``("wait", why)``. ``mine``: seconds since ours last got through;
    ``answers``: the other nodes that answered, with theirs. A node refreshes at least every
    third of the TTL while it reaches etcd, so one silent for much less than us reaches etcd
    and we are the one cut off: others may take our ranks once our lease runs out. Silent as
    long as us (within a third of the TTL, the slack between two refreshes), it is cut off too:
    etcd is away for everyone, nobody can take ranks, and etcd extends every lease when it
    comes back. The two cannot be told apart before two thirds of the TTL."""
    reaching = sorted(n for n, silent in answers.items() if silent < mine - ttl / 3)
    if reaching:
        return "fence", f"{', '.join(reaching)} reach(es) etcd"
    if not answers:
        if mine > ttl / 2:
            return "fence", "no other node answered"
        return "wait", "no other node answered yet"
    if mine > 2 * ttl / 3:
        return "ride_out", f"{', '.join(sorted(answers))} cannot reach it either"
    return "wait", "too early to tell an outage from a partition"


def _on_lease_unconfirmed(m: AgentMachine, obs: LeaseUnconfirmed, now: float):
    """etcd may be away for everyone or this node cut off from it: the other nodes tell
    which (asked from ticks while it lasts, see :func:`_check_etcd`)."""
    m = replace(m, lease_unconfirmed=True)
    if not m.phase.has_workers or m.round is None or m.lease_lost:
        return m, []
    peers = tuple(sorted(n for n in _participants(m) if n != m.node_id))
    if peers or m.riding_out:
        return _check_etcd(m, now)
    m = _verdict(m, Action.RIDE_OUT, f"no keepalive reached etcd for {obs.waited:.1f} s; "
                 "no other node holds ranks: going on without etcd",
                 {"waited_s": round(obs.waited, 3)}, riding_out=True)  # fmt: skip
    return m, [_announce(m)]


def _check_etcd(m: AgentMachine, now: float):
    """Ask the other nodes whether they reach etcd, at most every sixth of the TTL."""
    if (not m.lease_unconfirmed or m.lease_lost or not m.phase.has_workers or m.round is None
            or m.checking_peers or now < m.next_peer_check):  # fmt: skip
        return m, []
    peers = tuple(sorted(n for n in _participants(m) if n != m.node_id))
    if not peers:
        return m, []
    m = replace(m, checking_peers=True, next_peer_check=now + m.node_ttl / 6)
    return m, [CheckPeers(peers)]


def _on_peers_on_etcd(m: AgentMachine, obs: PeersOnEtcd, now: float):
    m = replace(m, checking_peers=False)
    if not (m.lease_unconfirmed and m.phase.has_workers) or m.lease_lost:
        return m, []
    decision, why = etcd_outage_verdict(obs.silent, obs.answers, m.node_ttl)
    details = {"silent_s": round(obs.silent, 3), "asked": list(obs.asked),
               "answers": {n: round(s, 3) for n, s in obs.answers.items()}}  # fmt: skip
    if decision == "fence":
        return _rejoin(replace(m, lease_lost=True, riding_out=False),
                       f"this node is cut off from etcd for {obs.silent:.1f} s ({why}): "
                       "stopping its workers before its lease runs out", now, register=True,
                       details=details, fence=True)  # fmt: skip
    if decision == "wait" or m.riding_out:
        return m, []
    m = _verdict(m, Action.RIDE_OUT, f"etcd is away for every node ({why}): going on without "
                 "it", details, riding_out=True)  # fmt: skip
    return m, [_announce(m)]


def _on_lease_confirmed(m: AgentMachine, obs: LeaseConfirmed, now: float):
    was = m.lease_unconfirmed
    m = replace(m, lease_unconfirmed=False, riding_out=False)
    if not was or m.lease_lost:
        return m, []
    m = _verdict(m, Action.ETCD_BACK, "a keepalive reached etcd again: the lease holds")
    return m, [_announce(m)]


# -- etcd and signals ----------------------------------------------------------------------------


def _on_coordination_failed(m: AgentMachine, obs: CoordinationFailed, now: float):
    if not isinstance(obs.effect, ESSENTIAL):
        return m, []
    return _retry(m, obs.effect, f"{type(obs.effect).__name__} failed: {obs.error}", now)


def _on_coordination_succeeded(m: AgentMachine, obs: CoordinationSucceeded, now: float):
    return replace(m, failing_since=None, retries=0), []


def _on_stopped(m: AgentMachine, obs: Stopped, now: float):
    return _fail(m, Action.STOP, f"stopped by signal {obs.signal_name}", flush=False)


# -- draining ------------------------------------------------------------------------------------

# A planned world change takes effect this many steps after the newest one our workers
# reported: time for the record to reach every rank before it is due (one that comes later
# than that still works, as an unplanned change: the step in flight is given up).
DRAIN_STEP_MARGIN = 2


def _on_drain_requested(m: AgentMachine, obs: DrainRequested, now: float):
    """Leave the job, which goes on without this node. In place, with ranks on other nodes:
    propose the world without ours after a step boundary a little ahead; our workers finish
    their steps up to it (their snapshots of it complete) and exit, the others re-form there
    keeping their processes, and we exit once a step at or after it is committed. Otherwise
    (a plain script, or no other node holds ranks): SIGTERM to the workers, SIGKILL after
    the drain timeout, as a lost node (a plain job restarts without us)."""
    if m.drain_deadline is not None:
        return m, []
    deadline = now + m.drain_timeout
    details = {"by": obs.by, "drain_timeout_s": m.drain_timeout}
    if not m.phase.has_workers:
        m = _verdict(m, Action.DRAINED, f"asked to leave by {obs.by}: no workers run here",
                     details, phase=Phase.SUCCEEDED, exit_code=EXIT_OK)  # fmt: skip
        return m, [_announce(m), StopWorkers(), Exit(EXIT_OK)]
    mine = m.members_here()
    others = [] if m.world is None else [x for x in m.world.members if x.node != m.node_id]
    if not (m.inplace and mine and others):
        alone = bool(mine) and not others if m.world is not None else False
        code = EXIT_FAILED if alone else EXIT_OK
        why = "no other node holds ranks" if alone else "the workers do not recover in place"
        m = _verdict(m, Action.DRAIN, f"asked to leave by {obs.by} ({why}): stopping the "
                     f"workers (SIGKILL after {m.drain_timeout:g} s)", details,
                     phase=Phase.FAILED if alone else Phase.SUCCEEDED,
                     exit_code=code)  # fmt: skip
        return m, [_announce(m), StopWorkers(grace=m.drain_timeout), Exit(code)]
    assert m.world is not None
    steps = [m.beats[s].step for s in mine if s in m.beats and m.beats[s].step >= 0]
    after = max(steps) + DRAIN_STEP_MARGIN if steps else -1
    leaving = frozenset(m.member(s) for s in mine)
    change = plan_next_world(m.world, leaving, (), (), after)
    assert change.world is not None  # our members are in the world
    m = replace(m, drain_deadline=deadline, drain_step=after, leaving=frozenset(mine))
    m = _verdict(m, Action.DRAIN, f"asked to leave by {obs.by}: proposing {change.reason}",
                 {**details, "after_step": after, "ranks": sorted(mine.values()),
                  "epoch": change.world.epoch})  # fmt: skip
    return m, [_announce(m), ProposeWorld(change.world, m.world, leaving, ())]


def _drain_done(m: AgentMachine, now: float):
    """While draining in place: done once our leaving workers have exited and a step at or
    after the one they left at is committed (their state is held by the others); at the
    deadline, the rest are killed and we leave anyway."""
    if m.drain_deadline is None or m.phase.is_terminal or not m.leaving:
        return m, []
    gone = all(s in m.exited for s in m.leaving)
    if gone and m.committed_step >= max(m.drain_step, 0):
        m = _verdict(m, Action.DRAINED, f"left the world after step {m.drain_step}; step "
                     f"{m.committed_step} is committed without this node",
                     {"after_step": m.drain_step, "committed_step": m.committed_step},
                     phase=Phase.SUCCEEDED, exit_code=EXIT_OK)  # fmt: skip
        return m, [_announce(m), StopWorkers(), Exit(EXIT_OK)]
    if now >= m.drain_deadline:
        left = sorted(s for s in m.leaving if s not in m.exited)
        m = _verdict(m, Action.DRAIN_TIMEOUT, f"the drain did not end in {m.drain_timeout:g} s "
                     f"(slots still running: {left}; committed step {m.committed_step})",
                     {"slots": left, "committed_step": m.committed_step},
                     phase=Phase.FAILED, exit_code=EXIT_FAILED)  # fmt: skip
        return m, [_announce(m), StopWorkers(fence=True), Exit(EXIT_FAILED)]
    return m, []


def _drained_between_rounds(m: AgentMachine):
    m = _verdict(m, Action.DRAINED, "the job re-formed while this node drained: it takes no "
                 "part", phase=Phase.SUCCEEDED, exit_code=EXIT_OK)  # fmt: skip
    return m, [_announce(m), StopWorkers(), Exit(EXIT_OK)]


def _on_snapshot_committed(m: AgentMachine, obs: SnapshotCommitted, now: float):
    m = replace(m, committed_step=max(m.committed_step, obs.step))
    return _drain_done(m, now)


_HANDLERS = {
    RoundFormed: _on_round_formed,
    WorldFound: _on_world_found,
    RendezvousClosed: _on_rendezvous_closed,
    RendezvousFailed: _on_rendezvous_failed,
    WorkerExited: _on_worker_exited,
    WorkerLost: _on_worker_lost,
    WorkerHeartbeat: _on_worker_heartbeat,
    WorkerAttached: _on_worker_attached,
    WorkerFinishing: _on_worker_finishing,
    WorkerReport: _on_worker_report,
    WorldChanged: _on_world_changed,
    RestartRequested: _on_restart_requested,
    JobFailed: _on_job_failed,
    NodesLost: _on_nodes_lost,
    NodesJoined: _on_nodes_joined,
    NodesListed: _on_nodes_listed,
    PeerDone: _on_peer_done,
    NodesWaiting: _on_nodes_waiting,
    LeaseLost: _on_lease_lost,
    LeaseUnconfirmed: _on_lease_unconfirmed,
    LeaseConfirmed: _on_lease_confirmed,
    PeersOnEtcd: _on_peers_on_etcd,
    Registered: _on_registered,
    CoordinationFailed: _on_coordination_failed,
    CoordinationSucceeded: _on_coordination_succeeded,
    Stopped: _on_stopped,
    DrainRequested: _on_drain_requested,
    SnapshotCommitted: _on_snapshot_committed,
    Tick: _on_tick,
}
