"""The agent's whole policy: a pure state machine.

``step(machine, observation, now) -> (machine, effects)``. The machine is an immutable
:class:`AgentMachine` (a :class:`Phase` and what the agent knows of the job); an observation
is something that happened (workers exited, a restart was asked, nodes were lost, a round
formed, etcd failed, a signal, a tick of the clock); effects are what the executors must do
(start or stop workers, run a rendezvous, write to etcd, exit). Every verdict is made here,
once, and announced as a :class:`Record` effect with its reason. Nothing here touches etcd,
gRPC, processes or the real clock: ``now`` is an argument (seconds, monotonic).

Worker failures follow torchrun: a failure restarts the whole job while restarts remain (one
restart per incident: the first agent to compare-and-set the restart key wins, everyone
follows), lost peers and waiting nodes re-form the group without using a restart, and the job
succeeds once every participant's workers succeeded.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from elastictrain.session.protocol import MODE_PLAIN

from .plan import RoundPlan

# Seconds between two attempts of an etcd operation that failed (doubling up to the cap).
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 4.0


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


class Action(enum.Enum):
    """The kinds of verdict."""

    START_ROUND = "start_round"  # a round formed: start its workers
    WAIT_FOR_PEERS = "wait_for_peers"  # our workers are done, others are not
    REQUEST_RESTART = "request_restart"  # our workers failed: restart the job (counts)
    FOLLOW_RESTART = "follow_restart"  # a restart was asked: re-rendezvous
    REJOIN = "rejoin"  # membership changed: re-rendezvous (does not count)
    FAIL_JOB = "fail_job"  # our workers failed and no restart is left
    EXIT_FAILED = "exit_failed"  # another node failed the job, or we cannot go on
    FINISH = "finish"  # every node's workers succeeded
    RETRY = "retry"  # an etcd operation failed: try again later
    NODE_LOST = "node_lost"  # a node's lease expired: it is dropped from the rendezvous
    WORKER_LOST = "worker_lost"  # a worker's session closed or its process began to die
    WORKER_HUNG = "worker_hung"  # a reporting worker made no progress for the hang timeout
    STOP = "stop"  # a signal asked the agent to stop


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON values: ranks, nodes, ...


# -- observations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundFormed:
    plan: RoundPlan


@dataclass(frozen=True)
class RendezvousClosed:
    """The rendezvous is closed: the job ended. ``report`` is its failure, if it failed."""

    failed_by: str | None = None
    report: str = ""


@dataclass(frozen=True)
class RendezvousFailed:
    reason: str
    retryable: bool  # etcd trouble; False: the rendezvous itself gave up (join timeout)


@dataclass(frozen=True)
class WorkersExited:
    """Every local worker has exited; ``report`` is torchrun's failure report if any failed."""

    succeeded: bool
    report: str = ""


@dataclass(frozen=True)
class WorkerLost:
    """A worker's session closed, or its process began to die (seen before it is reaped)."""

    generation: int
    local_rank: int
    reason: str
    finished: bool = False  # it said it was exiting on purpose


@dataclass(frozen=True)
class WorkerHeartbeat:
    """A worker is alive (its session's own thread says so every half second): the last step
    it finished, and whether its training loop is inside a step."""

    generation: int
    local_rank: int
    step: int
    active: bool = False


@dataclass(frozen=True)
class WorkerAttached:
    """A worker's library took its session over in ``mode``."""

    generation: int
    local_rank: int
    mode: str


@dataclass(frozen=True)
class WorkerFinishing:
    """A worker said it is exiting on purpose: it sends no more heartbeats."""

    generation: int
    local_rank: int


@dataclass(frozen=True)
class RestartRequested:
    revision: int  # mod_revision of the restart key
    by: str


@dataclass(frozen=True)
class JobFailed:
    by: str
    report: str = ""


@dataclass(frozen=True)
class NodesLost:
    nodes: frozenset[str]


@dataclass(frozen=True)
class NodesJoined:
    nodes: frozenset[str]


@dataclass(frozen=True)
class NodesListed:
    """Every node registered now (after a start or a compacted watch)."""

    nodes: frozenset[str]


@dataclass(frozen=True)
class PeerDone:
    round_id: str
    node: str
    done: bool = True


@dataclass(frozen=True)
class NodesWaiting:
    count: int


@dataclass(frozen=True)
class LeaseLost:
    """Our own lease expired: the other nodes consider this one dead."""


@dataclass(frozen=True)
class Registered:
    """This node registered again under a new lease."""


@dataclass(frozen=True)
class CoordinationFailed:
    """An etcd write (``effect``) failed after the client's own retries."""

    effect: Effect
    error: str


@dataclass(frozen=True)
class CoordinationSucceeded:
    """An etcd operation got through after failures."""


@dataclass(frozen=True)
class Stopped:
    signal_name: str


@dataclass(frozen=True)
class Tick:
    """Time passed."""


Observation = (
    RoundFormed | RendezvousClosed | RendezvousFailed | WorkersExited | WorkerLost
    | WorkerHeartbeat | WorkerAttached | WorkerFinishing | RestartRequested
    | JobFailed | NodesLost | NodesJoined | NodesListed | PeerDone | NodesWaiting | LeaseLost
    | Registered | CoordinationFailed | CoordinationSucceeded | Stopped | Tick
)  # fmt: skip


# -- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """Announce a verdict (logged; later also an event in etcd)."""

    verdict: Verdict


@dataclass(frozen=True)
class StartWorkers:
    plan: RoundPlan
    generation: int  # tells this start's workers from earlier ones


@dataclass(frozen=True)
class KillWorker:
    """SIGKILL one local worker (a hung one); its exit is then a failure like any other."""

    local_rank: int
    reason: str


@dataclass(frozen=True)
class StopWorkers:
    pass


@dataclass(frozen=True)
class Rendezvous:
    """Join the next rendezvous round (after ``delay`` seconds); answers ``RoundFormed``,
    ``RendezvousClosed`` or ``RendezvousFailed``."""

    delay: float = 0.0


@dataclass(frozen=True)
class PollMembership:
    """Ask how many nodes wait to join; answers ``NodesWaiting``."""


@dataclass(frozen=True)
class RequestRestart:
    """Compare-and-set the restart key to ``count`` on ``expected_revision`` (a lost CAS means
    a peer asked first: either way the watch then reports ``RestartRequested``)."""

    count: int
    reason: str
    expected_revision: int
    delay: float = 0.0


@dataclass(frozen=True)
class FailJob:
    """Write the job's outcome (with the failure report), then close the rendezvous."""

    reason: str
    report: str
    delay: float = 0.0


@dataclass(frozen=True)
class CloseRendezvous:
    delay: float = 0.0


@dataclass(frozen=True)
class MarkRoundDone:
    round_id: str
    delay: float = 0.0


@dataclass(frozen=True)
class EvictNodes:
    """Drop lost nodes from the rendezvous state now (their lease is gone)."""

    nodes: frozenset[str]


@dataclass(frozen=True)
class Register:
    """Take a new lease and create this node's key again."""

    delay: float = 0.0


@dataclass(frozen=True)
class Exit:
    """End the agent with ``code``; ``flush`` waits for the pending etcd writes first."""

    code: int
    report: str = ""
    flush: bool = True


Effect = (
    Record | StartWorkers | KillWorker | StopWorkers | Rendezvous | PollMembership
    | RequestRestart | FailJob | CloseRendezvous | MarkRoundDone | EvictNodes | Register | Exit
)  # fmt: skip

# Writes that the job cannot do without: retried while etcd is away (until the timeout).
_ESSENTIAL = (RequestRestart, FailJob, CloseRendezvous, MarkRoundDone, Register)

EXIT_OK = 0
EXIT_FAILED = 1  # torchrun exits 1 when the workers failed (ChildFailedError)


# -- the machine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Beat:
    at: float  # when the last heartbeat came
    step: int  # the last step the worker finished
    since: float  # when that step was first reported
    active: bool  # inside the training loop: a step that never ends is a hang


@dataclass(frozen=True)
class AgentMachine:
    """What one agent knows, and the phase it is in. Treat as immutable."""

    node_id: str
    max_restarts: int
    membership_poll_interval: float
    coordination_timeout: float
    hang_timeout: float = 0.0  # 0: hangs are not detected
    phase: Phase = Phase.RENDEZVOUS
    round: RoundPlan | None = None
    generation: int = 0  # worker starts so far
    beats: Mapping[int, Beat] = field(default_factory=dict)  # local rank -> its last heartbeat
    lost: Mapping[int, float] = field(default_factory=dict)  # local rank -> when seen lost
    modes: Mapping[int, str] = field(default_factory=dict)  # local rank -> its session's mode
    finishing: frozenset[int] = frozenset()  # local ranks exiting on purpose
    restart_revision: int = 0  # the newest revision of the restart key seen
    restart_by: str = ""
    done: Mapping[str, frozenset[str]] = field(default_factory=dict)  # round id -> nodes
    live_nodes: frozenset[str] = frozenset()
    lease_lost: bool = False
    next_membership_poll: float = 0.0
    failing_since: float | None = None  # etcd has failed since then (None: it works)
    retries: int = 0
    exit_code: int | None = None
    report: str = ""
    verdict: Verdict | None = None  # the last one


def start(
    node_id: str,
    *,
    max_restarts: int,
    membership_poll_interval: float,
    coordination_timeout: float,
    hang_timeout: float = 0.0,
) -> tuple[AgentMachine, list[Effect]]:
    """A new agent's machine, and its first effect: join the rendezvous."""
    machine = AgentMachine(
        node_id=node_id,
        max_restarts=max_restarts,
        membership_poll_interval=membership_poll_interval,
        coordination_timeout=coordination_timeout,
        hang_timeout=hang_timeout,
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
            details: Mapping[str, Any] | None = None):  # fmt: skip
    m = _verdict(m, Action.REJOIN, reason, details, phase=Phase.RENDEZVOUS)
    effects: list[Effect] = [_announce(m), StopWorkers()]
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


def _finish_if_all_done(m: AgentMachine):
    assert m.round is not None
    done = m.done.get(m.round.round_id, frozenset()) & m.round.participants
    if len(done) < len(m.round.participants):
        return m, []
    m = _verdict(m, Action.FINISH, "every node's workers succeeded", phase=Phase.SUCCEEDED,
                 exit_code=EXIT_OK)  # fmt: skip
    return m, [_announce(m), CloseRendezvous(), Exit(EXIT_OK)]


def _on_round_formed(m: AgentMachine, obs: RoundFormed, now: float):
    if m.phase is not Phase.RENDEZVOUS:
        return m, []
    plan = obs.plan
    reason = (
        f"round formed: group rank {plan.group_rank} of {len(plan.slots)} "
        f"(nodes {','.join(s.node_id for s in plan.slots)}), restart count {plan.restart_count}"
    )
    m = _verdict(
        m, Action.START_ROUND, reason, phase=Phase.RUNNING, round=plan,
        done={k: v for k, v in m.done.items() if k == plan.round_id},
        next_membership_poll=now + m.membership_poll_interval, failing_since=None, retries=0,
        generation=m.generation + 1, beats={}, lost={}, modes={}, finishing=frozenset(),
        details={"round_id": plan.round_id, "nodes": [s.node_id for s in plan.slots],
                 "group_rank": plan.group_rank, "restart_count": plan.restart_count},
    )  # fmt: skip
    return m, [_announce(m), StartWorkers(plan, m.generation)]


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


def _on_workers_exited(m: AgentMachine, obs: WorkersExited, now: float):
    if m.phase is not Phase.RUNNING or m.round is None:
        return m, []
    if obs.succeeded:
        round_id = m.round.round_id
        done = m.done.get(round_id, frozenset()) | {m.node_id}
        m = replace(m, phase=Phase.DONE_WAITING, done={**m.done, round_id: done})
        finished, effects = _finish_if_all_done(m)
        if effects:
            return finished, [MarkRoundDone(round_id), *effects]
        waiting = f"{len(done & m.round.participants)} of {len(m.round.participants)} nodes done"
        m = _verdict(m, Action.WAIT_FOR_PEERS, f"workers succeeded; {waiting}")
        return m, [_announce(m), MarkRoundDone(round_id)]
    if _restart_pending(m):
        m = _verdict(m, Action.FOLLOW_RESTART,
                     f"workers failed; restart already requested by node {m.restart_by}",
                     phase=Phase.RENDEZVOUS, report=obs.report)  # fmt: skip
        return m, [_announce(m), StopWorkers(), Rendezvous()]
    used = m.round.restart_count
    if used < m.max_restarts:
        reason = f"workers failed; restart {used + 1} of {m.max_restarts}"
        m = _verdict(m, Action.REQUEST_RESTART, reason, {"restart": used + 1},
                     phase=Phase.RESTARTING, report=obs.report)  # fmt: skip
        return m, [_announce(m), StopWorkers(),
                   RequestRestart(used + 1, reason, m.round.restart_revision)]  # fmt: skip
    reason = f"workers failed and all {m.max_restarts} restarts are used"
    return _fail(m, Action.FAIL_JOB, reason, obs.report, prefix=(FailJob(reason, obs.report),))


def _current_worker(m: AgentMachine, obs) -> bool:
    return m.phase is Phase.RUNNING and m.round is not None and obs.generation == m.generation


def _on_worker_lost(m: AgentMachine, obs: WorkerLost, now: float):
    """A worker whose library holds its session and that did not say it was exiting is lost.
    (An unmodified script's session also closes when it succeeds: its exit status decides.)"""
    if not _current_worker(m, obs) or obs.finished or obs.local_rank in m.lost:
        return m, []
    if m.modes.get(obs.local_rank, MODE_PLAIN) == MODE_PLAIN:
        return m, []
    rank = m.round.global_rank(obs.local_rank)
    m = _verdict(m, Action.WORKER_LOST, f"rank {rank} (local {obs.local_rank}): {obs.reason}",
                 {"rank": rank, "local_rank": obs.local_rank, "how": obs.reason},
                 lost={**m.lost, obs.local_rank: now})  # fmt: skip
    # Restart-the-world needs the exit status (the failure report): the reap decides.
    return m, [_announce(m)]


def _on_worker_heartbeat(m: AgentMachine, obs: WorkerHeartbeat, now: float):
    if not _current_worker(m, obs):
        return m, []
    last = m.beats.get(obs.local_rank)
    since = last.since if last is not None and last.step == obs.step else now
    beat = Beat(now, obs.step, since, obs.active)
    return replace(m, beats={**m.beats, obs.local_rank: beat}), []


def _on_worker_attached(m: AgentMachine, obs: WorkerAttached, now: float):
    if not _current_worker(m, obs):
        return m, []
    return replace(m, modes={**m.modes, obs.local_rank: obs.mode}), []


def _on_worker_finishing(m: AgentMachine, obs: WorkerFinishing, now: float):
    if not _current_worker(m, obs):
        return m, []
    return replace(m, finishing=m.finishing | {obs.local_rank}), []


def _hung_workers(m: AgentMachine, now: float) -> list[tuple[int, str, float]]:
    """(local rank, why, idle seconds) of each hung worker. A worker that sends no heartbeat
    for the hang timeout is frozen (stopped, or stuck holding its interpreter): the culprit.
    One whose heartbeats go on but whose step does not end for twice the timeout is stuck;
    the grace lets a frozen peer be found and killed first, which ends its peers' wait."""
    if m.hang_timeout <= 0 or m.phase is not Phase.RUNNING:
        return []
    hung = []
    for rank, beat in sorted(m.beats.items()):
        if rank in m.lost or rank in m.finishing:
            continue
        if now - beat.at > m.hang_timeout:
            hung.append((rank, "sent no heartbeat", now - beat.at))
        elif beat.active and now - beat.since > 2 * m.hang_timeout:
            hung.append((rank, f"finished no step after step {beat.step}", now - beat.since))
    return hung


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


def _on_nodes_lost(m: AgentMachine, obs: NodesLost, now: float):
    lost = obs.nodes - {m.node_id}
    m = replace(m, live_nodes=m.live_nodes - obs.nodes)
    if not lost:
        return m, []
    m = _verdict(m, Action.NODE_LOST, f"node(s) {', '.join(sorted(lost))} lost their lease",
                 {"lost": sorted(lost)})  # fmt: skip
    effects: list[Effect] = [_announce(m), EvictNodes(lost)]
    if m.phase.has_workers and m.round is not None and lost & m.round.participants:
        m, rejoin = _rejoin(m, f"lost node(s) {', '.join(sorted(lost))}", now,
                            details={"lost": sorted(lost)})  # fmt: skip
        return m, [*effects, *rejoin]
    return m, effects


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
    if m.phase is Phase.DONE_WAITING:
        return _finish_if_all_done(m)
    return m, []


def _on_nodes_waiting(m: AgentMachine, obs: NodesWaiting, now: float):
    if m.phase is Phase.RUNNING and obs.count > 0:
        return _rejoin(m, f"{obs.count} node(s) waiting to join", now,
                       details={"waiting": obs.count})  # fmt: skip
    return m, []


def _on_lease_lost(m: AgentMachine, obs: LeaseLost, now: float):
    m = replace(m, lease_lost=True)
    if m.phase.has_workers:
        return _rejoin(m, "this node's lease expired: joining again", now, register=True)
    m = _verdict(m, Action.REJOIN, "this node's lease expired: registering again")
    return m, [_announce(m), Register()]


def _on_registered(m: AgentMachine, obs: Registered, now: float):
    return replace(m, lease_lost=False), []


def _on_coordination_failed(m: AgentMachine, obs: CoordinationFailed, now: float):
    if not isinstance(obs.effect, _ESSENTIAL):
        return m, []
    return _retry(m, obs.effect, f"{type(obs.effect).__name__} failed: {obs.error}", now)


def _on_coordination_succeeded(m: AgentMachine, obs: CoordinationSucceeded, now: float):
    return replace(m, failing_since=None, retries=0), []


def _on_stopped(m: AgentMachine, obs: Stopped, now: float):
    return _fail(m, Action.STOP, f"stopped by signal {obs.signal_name}", flush=False)


def _on_tick(m: AgentMachine, obs: Tick, now: float):
    effects: list[Effect] = []
    for local_rank, why, idle in _hung_workers(m, now):
        assert m.round is not None
        reason = (f"rank {m.round.global_rank(local_rank)} (local {local_rank}) {why} for "
                  f"{idle:.1f} s (hang timeout {m.hang_timeout:g} s)")  # fmt: skip
        details = {"rank": m.round.global_rank(local_rank), "local_rank": local_rank,
                   "idle_s": round(idle, 3)}  # fmt: skip
        m = _verdict(m, Action.WORKER_HUNG, reason, details, lost={**m.lost, local_rank: now})
        effects += [_announce(m), KillWorker(local_rank, reason)]
    if m.phase is Phase.RUNNING and now >= m.next_membership_poll:
        m = replace(m, next_membership_poll=now + m.membership_poll_interval)
        effects.append(PollMembership())
    return m, effects


_HANDLERS = {
    RoundFormed: _on_round_formed,
    RendezvousClosed: _on_rendezvous_closed,
    RendezvousFailed: _on_rendezvous_failed,
    WorkersExited: _on_workers_exited,
    WorkerLost: _on_worker_lost,
    WorkerHeartbeat: _on_worker_heartbeat,
    WorkerFinishing: _on_worker_finishing,
    WorkerAttached: _on_worker_attached,
    RestartRequested: _on_restart_requested,
    JobFailed: _on_job_failed,
    NodesLost: _on_nodes_lost,
    NodesJoined: _on_nodes_joined,
    NodesListed: _on_nodes_listed,
    PeerDone: _on_peer_done,
    NodesWaiting: _on_nodes_waiting,
    LeaseLost: _on_lease_lost,
    Registered: _on_registered,
    CoordinationFailed: _on_coordination_failed,
    CoordinationSucceeded: _on_coordination_succeeded,
    Stopped: _on_stopped,
    Tick: _on_tick,
}
