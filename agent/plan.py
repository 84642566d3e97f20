"""Pure decisions of the agent: rank assignment, the worker env contract, what to do next.

Nothing here touches etcd, gRPC or processes; the agent observes, calls these, and applies
the result. Every decision carries a human-readable reason that ends up in logs and status.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSlot:
    """What each agent publishes about itself for one rendezvous round."""

    group_rank: int
    node_id: str
    local_world_size: int
    host: str
    endpoint: str


@dataclass(frozen=True)
class WorkerAssignment:
    local_rank: int
    global_rank: int
    role_rank: int
    world_size: int
    role_world_size: int
    local_world_size: int
    group_rank: int
    group_world_size: int


def assign_worker_ranks(slots: Sequence[NodeSlot], group_rank: int) -> list[WorkerAssignment]:
    """Global ranks are contiguous per node, in group-rank order (torchrun's layout).

    Nodes may run different numbers of workers; a node's first global rank is the sum of the
    local world sizes of the nodes before it.
    """
    ordered = sorted(slots, key=lambda s: s.group_rank)
    if [s.group_rank for s in ordered] != list(range(len(ordered))):
        raise ValueError(f"group ranks must be 0..{len(ordered) - 1}, got {ordered}")
    world_size = sum(s.local_world_size for s in ordered)
    base = sum(s.local_world_size for s in ordered[:group_rank])
    me = ordered[group_rank]
    return [
        WorkerAssignment(
            local_rank=local_rank,
            global_rank=base + local_rank,
            role_rank=base + local_rank,
            world_size=world_size,
            role_world_size=world_size,
            local_world_size=me.local_world_size,
            group_rank=group_rank,
            group_world_size=len(ordered),
        )
        for local_rank in range(me.local_world_size)
    ]


def worker_env(
    assignment: WorkerAssignment,
    *,
    master_addr: str,
    master_port: int,
    restart_count: int,
    max_restarts: int,
    run_id: str,
    parent_env: Mapping[str, str],
    role: str = "default",
) -> dict[str, str]:
    """torchrun's environment contract for one worker (variables added to the parent's env)."""
    env = {
        "RANK": str(assignment.global_rank),
        "LOCAL_RANK": str(assignment.local_rank),
        "GROUP_RANK": str(assignment.group_rank),
        "ROLE_RANK": str(assignment.role_rank),
        "ROLE_NAME": role,
        "LOCAL_WORLD_SIZE": str(assignment.local_world_size),
        "WORLD_SIZE": str(assignment.world_size),
        "GROUP_WORLD_SIZE": str(assignment.group_world_size),
        "ROLE_WORLD_SIZE": str(assignment.role_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
        # The agent hosts a fresh TCPStore for every round: workers connect as clients.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": parent_env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }
    # torchrun: one thread per worker unless the user chose, when several share a node.
    if "OMP_NUM_THREADS" in parent_env:
        env["OMP_NUM_THREADS"] = parent_env["OMP_NUM_THREADS"]
    elif assignment.local_world_size > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env


class LocalState(enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class Action(enum.Enum):
    """What the agent does after one look at the world."""

    CONTINUE = "continue"  # nothing to do
    WAIT_FOR_PEERS = "wait_for_peers"  # our workers are done, others are not
    REQUEST_RESTART = "request_restart"  # our workers failed: restart the job (counts)
    FOLLOW_RESTART = "follow_restart"  # someone else asked for a restart: re-rendezvous
    REJOIN = "rejoin"  # membership changed: re-rendezvous (does not count)
    FAIL_JOB = "fail_job"  # our workers failed and no restart is left
    EXIT_FAILED = "exit_failed"  # another node failed the job
    FINISH = "finish"  # every node's workers succeeded

    @property
    def restarts_workers(self) -> bool:
        return self in (Action.REQUEST_RESTART, Action.FOLLOW_RESTART, Action.REJOIN)

    @property
    def is_terminal(self) -> bool:
        return self in (Action.FAIL_JOB, Action.EXIT_FAILED, Action.FINISH)


@dataclass(frozen=True)
class Observation:
    """Everything :func:`decide` needs, gathered by the agent."""

    local: LocalState
    restart_requested_by: str | None  # node that asked for a restart since this round began
    job_failed_by: str | None  # node that declared the job failed
    lost_peers: tuple[str, ...]  # participants of this round whose lease expired
    nodes_waiting: int  # nodes waiting to join at the next round
    peers_succeeded: int  # participants (us included) whose workers all succeeded
    group_world_size: int
    restarts_used: int
    max_restarts: int
    self_lost: bool = False  # our own lease expired: peers consider us dead


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(obs: Observation) -> Decision:
    """The agent's policy, with torchrun's semantics for worker failures.

    Precedence: a failed job ends everyone; a local failure restarts the job while restarts
    remain (one restart per incident: if a peer already asked, we follow); then restarts asked
    by peers; lost peers and waiting nodes re-form the group without using a restart; finally
    success once every participant succeeded.
    """
    if obs.job_failed_by is not None:
        return Decision(Action.EXIT_FAILED, f"node {obs.job_failed_by} failed the job")
    if obs.local is LocalState.FAILED:
        if obs.restart_requested_by is not None:
            return Decision(
                Action.FOLLOW_RESTART,
                f"workers failed; restart already requested by node {obs.restart_requested_by}",
            )
        if obs.restarts_used < obs.max_restarts:
            return Decision(
                Action.REQUEST_RESTART,
                f"workers failed; restart {obs.restarts_used + 1} of {obs.max_restarts}",
            )
        return Decision(
            Action.FAIL_JOB, f"workers failed and all {obs.max_restarts} restarts are used"
        )
    if obs.restart_requested_by is not None:
        return Decision(
            Action.FOLLOW_RESTART, f"node {obs.restart_requested_by} requested a restart"
        )
    if obs.self_lost:
        return Decision(Action.REJOIN, "this node's lease expired: joining again")
    if obs.lost_peers:
        return Decision(Action.REJOIN, f"lost node(s) {', '.join(sorted(obs.lost_peers))}")
    if obs.local is LocalState.SUCCEEDED:
        if obs.peers_succeeded >= obs.group_world_size:
            return Decision(Action.FINISH, "every node's workers succeeded")
        return Decision(
            Action.WAIT_FOR_PEERS,
            f"{obs.peers_succeeded} of {obs.group_world_size} nodes done",
        )
    if obs.nodes_waiting > 0:
        return Decision(Action.REJOIN, f"{obs.nodes_waiting} node(s) waiting to join")
    return Decision(Action.CONTINUE, "workers running")
