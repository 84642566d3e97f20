"""What the agent's machine asks its executors to do, and the verdicts it announces.

Immutable values. Worker effects run on the agent's main thread; etcd effects on the
coordinator's lanes (:mod:`elastictrain.agent.coordination`); a ``delay`` asks for the effect
to wait that long first (a retry's backoff).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .plan import RoundPlan
from .world import Member, World


class Action(enum.Enum):
    """The kinds of verdict."""

    START_ROUND = "start_round"  # a round formed: start its workers
    START_SPARES = "start_spares"  # in place: hot spares to start (first, or replacements)
    JOIN_WORLD = "join_world"  # in place: a running world found; its workers start as spares
    GROW = "grow"  # in place: propose the world with this node's new workers
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
    RECONFIGURE = "reconfigure"  # in place: propose the next world without the lost ranks
    WORLD_CHANGED = "world_changed"  # in place: a new world; the survivors keep running
    FAULT = "fault"  # a planned fault fires (``--fault``), or a chaos slowdown begins
    REPLAN = "replan"  # stragglers: the work re-split in proportion to the ranks' speeds
    STRAGGLER_FAILED = "straggler_failed"  # a rank far too slow for too long: lost in place
    RECOVERED = "recovered"  # a worker re-formed in place (with its durations)
    ATTENTION = "attention"  # a step's core-attention plan: imbalance before and after
    STOP = "stop"  # a signal asked the agent to stop
    DRAIN = "drain"  # asked to leave (SIGTERM, ``etrain drain``): the job goes on without us
    DRAINED = "drained"  # our ranks left the world at a step boundary, their state committed
    DRAIN_TIMEOUT = "drain_timeout"  # the drain did not end within --drain-timeout
    CHECK_PEERS = "check_peers"  # our lease is unconfirmed: do the other nodes reach etcd?
    RIDE_OUT = "ride_out"  # etcd is away for every node: nobody can take our ranks, go on
    ETCD_BACK = "etcd_back"  # a keepalive got through again


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON values: ranks, nodes, ...


@dataclass(frozen=True)
class Record:
    """Announce a verdict (logged, and stored as the job's event)."""

    verdict: Verdict


@dataclass(frozen=True)
class StartWorkers:
    plan: RoundPlan
    generation: int  # tells this start's workers from earlier ones
    world: World  # epoch 0 of the round's in-place world


@dataclass(frozen=True)
class JoinWorld:
    """Take part in a running in-place world (``plan`` is this node's view of its round); no
    process starts yet: the workers start as spares (``StartSpares``) and then join."""

    plan: RoundPlan
    generation: int
    world: World


@dataclass(frozen=True)
class PublishWorld:
    """Write the round's first world to the record unless it holds this round already (a
    node that starts later finds the running world there)."""

    world: World


@dataclass(frozen=True)
class StartSpares:
    """Start hot spares in ``slots``: workers that run the script until its ``Job`` needs a
    rank, then wait for a world that names them."""

    generation: int
    slots: tuple[int, ...]


@dataclass(frozen=True)
class KillWorker:
    """SIGKILL one local worker (a hung one); its exit is then a failure like any other."""

    slot: int
    reason: str


@dataclass(frozen=True)
class StopWorkers:
    """Stop every local worker: SIGTERM, then SIGKILL after the stop grace (``grace``: after
    that many seconds instead; ``fence``: SIGKILL at once, so no worker of this node runs once
    its lease may have run out)."""

    fence: bool = False
    grace: float | None = None


@dataclass(frozen=True)
class PushWorld:
    """Tell every local worker of ``world`` its rank in it (the survivors abort the step in
    flight and re-form in place; a spare named in it takes its rank), and the ``leaving``
    slots (a drain) that they hold none: they leave at its step boundary."""

    world: World
    leaving: tuple[int, ...] = ()


@dataclass(frozen=True)
class FaultPlan:
    """A fault to inject when rank ``rank`` reaches step ``step`` (``kill``: the worker
    SIGKILLs itself; ``stop``: SIGSTOPs itself; ``kill-agent``: SIGKILLs its agent). ``at``
    ``"reform"``: not at the step's start but when it next re-forms after it (a second fault
    in the middle of a recovery). ``slow``: its compute becomes ``factor`` times slower from
    ``step`` until step ``until`` (-1: to the end)."""

    kind: str
    rank: int
    step: int
    at: str = "step"
    factor: float = 0.0
    until: int = -1

    KINDS = ("kill", "stop", "kill-agent", "slow")
    MOMENTS = ("step", "reform")


@dataclass(frozen=True)
class PushFault:
    """Hand a planned fault to the local worker that holds its rank."""

    slot: int
    fault: FaultPlan


@dataclass(frozen=True)
class ProposeWorld:
    """Compare-and-set ``world`` over ``base`` (the world it was planned from); if another
    agent moved the record first, plan again on top of it without ``lost`` (with ``spares``,
    and ``joining`` added)."""

    world: World
    base: World
    lost: frozenset[Member]
    spares: tuple[Member, ...] = ()
    joining: tuple[Member, ...] = ()
    delay: float = 0.0


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
class LeaveRound:
    """The round is left for a rendezvous: mark it so that no node joins its world in place."""

    round_id: str


@dataclass(frozen=True)
class CheckPeers:
    """Ask ``nodes``' agents whether they reach etcd (after one more keepalive of our own)."""

    nodes: tuple[str, ...]


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
    Record | StartWorkers | JoinWorld | StartSpares | KillWorker | StopWorkers | PushWorld
    | PushFault | ProposeWorld | PublishWorld | Rendezvous | PollMembership | RequestRestart
    | FailJob | CloseRendezvous | MarkRoundDone | LeaveRound | Register | Exit
    | CheckPeers
)  # fmt: skip

# Writes that the job cannot do without: retried while etcd is away (until the timeout).
ESSENTIAL = (RequestRestart, FailJob, CloseRendezvous, MarkRoundDone, LeaveRound, Register,
             ProposeWorld)  # fmt: skip
