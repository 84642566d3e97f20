"""Pure plans of one rendezvous round: the round's data, rank assignment, the worker env.

Nothing here touches etcd, gRPC or processes. What the agent does next is decided in
:mod:`elastictrain.agent.machine`.
"""

from __future__ import annotations

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
    incarnation: str = ""  # the agent process's id (a node that comes back gets a new one)


@dataclass(frozen=True)
class RoundPlan:
    """One formed round, as every participant sees it."""

    round_id: str
    group_rank: int
    slots: tuple[NodeSlot, ...]
    master_addr: str
    master_port: int
    restart_revision: int  # mod_revision of the restart key when the round began (0: none)
    restart_count: int

    @property
    def participants(self) -> frozenset[str]:
        return frozenset(s.node_id for s in self.slots)

    def global_rank(self, local_rank: int) -> int:
        """The global rank of this node's worker ``local_rank`` (contiguous per node)."""
        before = sum(s.local_world_size for s in self.slots if s.group_rank < self.group_rank)
        return before + local_rank


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
