"""What the agent's machine is told: things that happened (immutable values, no behaviour).

The executors turn etcd watches, the coordination lanes' results, the worker processes and
sessions, the lease keeper, signals and the clock into these; :func:`machine.step` decides.
Worker observations carry the ``generation`` (the machine's count of worker starts), so a
late report about an earlier start is told apart, and the worker's ``slot`` on its node
(round workers: their local rank; hot spares after them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .effects import Effect
from .plan import RoundPlan
from .world import World


@dataclass(frozen=True)
class RoundFormed:
    plan: RoundPlan


@dataclass(frozen=True)
class WorldFound:
    """Instead of a rendezvous: the job runs in place in a live round, which this node can
    join without anyone restarting (``plan``: this node's part in it)."""

    plan: RoundPlan
    world: World


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
class WorkerExited:
    """A worker process was reaped; ``report`` is torchrun's failure report if it failed."""

    generation: int
    slot: int
    exit_code: int
    report: str = ""


@dataclass(frozen=True)
class WorkerLost:
    """A worker's session closed, or its process began to die (seen before it is reaped)."""

    generation: int
    slot: int
    reason: str
    finished: bool = False  # it said it was exiting on purpose


@dataclass(frozen=True)
class WorkerHeartbeat:
    """A worker is alive (its session's own thread says so every half second): the last step
    it finished, and whether its training loop is inside a step."""

    generation: int
    slot: int
    step: int
    active: bool = False
    speed: float = 0.0  # samples per compute-second, as last measured (0: not known)
    share: float = -1.0  # its share of the global batch (-1: not known)


@dataclass(frozen=True)
class WorkerAttached:
    """A worker's library took its session over in ``mode``."""

    generation: int
    slot: int
    mode: str


@dataclass(frozen=True)
class WorkerFinishing:
    """A worker said it is exiting on purpose: it sends no more heartbeats."""

    generation: int
    slot: int


@dataclass(frozen=True)
class WorkerReport:
    """A worker told its agent something worth an event: a planned fault fires
    (``"fault"``), or it re-formed in place (``"recovered"``, with its durations)."""

    generation: int
    slot: int
    kind: str
    data: dict


@dataclass(frozen=True)
class WorldChanged:
    """The job's in-place world record moved (any agent may have written it)."""

    world: World


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
class LeaseUnconfirmed:
    """No keepalive got through for ``waited`` seconds (over a quarter of the TTL): etcd is
    away for everyone, or this node is cut off from it."""

    waited: float


@dataclass(frozen=True)
class LeaseConfirmed:
    """A keepalive got through again after :class:`LeaseUnconfirmed`."""


@dataclass(frozen=True)
class PeersOnEtcd:
    """What the other nodes of the world said when asked, while our lease was unconfirmed:
    ``answers``, how long etcd has been silent for each that answered; ``silent``, for us."""

    asked: tuple[str, ...]
    silent: float
    answers: Mapping[str, float]


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
class DrainRequested:
    """Leave the job, which goes on without this node (SIGTERM: a preemption notice, a
    preStop hook; or ``etrain drain``)."""

    by: str


@dataclass(frozen=True)
class SnapshotCommitted:
    """``ctl/snapshot`` moved to ``step``: every rank's state of that step is held."""

    step: int


@dataclass(frozen=True)
class Tick:
    """Time passed."""


Observation = (
    RoundFormed | WorldFound | RendezvousClosed | RendezvousFailed | WorkerExited | WorkerLost
    | WorkerHeartbeat | WorkerAttached | WorkerFinishing | WorkerReport | WorldChanged
    | RestartRequested | JobFailed | NodesLost | NodesJoined | NodesListed | PeerDone
    | NodesWaiting | LeaseLost | LeaseUnconfirmed | LeaseConfirmed | PeersOnEtcd | Registered
    | CoordinationFailed | CoordinationSucceeded
    | Stopped | DrainRequested | SnapshotCommitted | Tick
)  # fmt: skip
