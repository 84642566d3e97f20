"""Where each node's snapshot chunks live: a pure decision on the ordered membership.

Erasure coding: the owner at position ``p`` of the membership puts chunk ``i`` (0..k+m-1) on
the node at position ``(p + i) % n``. Chunk 0 stays on the owner (a restart on the same node
reads it locally), the k + m holders are distinct because k + m <= n, and every node holds
exactly k + m chunks (k data, m parity) across all owners: perfect balance for equal-sized
snapshots. The same rule with one full copy per holder gives replication.

The plan depends only on the membership list (its order, e.g. group rank order, included):
every agent computes the same plan without talking to the others.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from elastictrain.errors import ConfigError
from elastictrain.snapshot.erasure import ErasureScheme

logger = logging.getLogger(__name__)


class Redundancy(enum.Enum):
    """How a snapshot survives the loss of its owner."""

    ERASURE = "erasure"  # k data + m parity chunks on k + m distinct nodes
    REPLICATION = "replication"  # full copies on the owner and r peers
    LOCAL = "local"  # no peer holds anything: the snapshot dies with its node


@dataclass(frozen=True)
class OwnerPlacement:
    """``holders[i]`` holds chunk ``i`` of ``owner``'s snapshot (erasure) or its ``i``-th full
    copy (replication); ``holders[0]`` is the owner itself."""

    owner: str
    holders: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.holders or self.holders[0] != self.owner:
            raise ConfigError(f"holders of {self.owner!r} must start with the owner")
        if len(set(self.holders)) != len(self.holders):
            raise ConfigError(f"holders of {self.owner!r} repeat a node: {self.holders}")


@dataclass(frozen=True)
class ChunkAssignment:
    """One chunk (or copy) a node holds for an owner."""

    owner: str
    index: int


@dataclass(frozen=True)
class PlacementDecision:
    """The plan for every owner of one membership, and why it is this plan."""

    redundancy: Redundancy
    scheme: ErasureScheme
    placements: tuple[OwnerPlacement, ...]
    reason: str

    def __post_init__(self) -> None:
        widths = {len(p.holders) for p in self.placements}
        if len(widths) > 1:
            raise ConfigError(f"owners have different numbers of holders: {sorted(widths)}")
        if self.redundancy is Redundancy.ERASURE and widths != {self.scheme.total}:
            raise ConfigError(f"erasure placements need {self.scheme.total} holders each")

    @property
    def tolerated_losses(self) -> int:
        """Nodes that may fail at once without losing any snapshot."""
        if self.redundancy is Redundancy.ERASURE:
            return self.scheme.m
        return len(self.placements[0].holders) - 1 if self.placements else 0

    def holders_of(self, owner: str) -> tuple[str, ...]:
        for placement in self.placements:
            if placement.owner == owner:
                return placement.holders
        raise KeyError(owner)

    def held_by(self, node: str) -> tuple[ChunkAssignment, ...]:
        """What ``node`` stores, for every owner (its own chunk 0 included)."""
        return tuple(
            ChunkAssignment(p.owner, index)
            for p in self.placements
            for index, holder in enumerate(p.holders)
            if holder == node
        )

    def load(self) -> dict[str, int]:
        """Chunks (or copies) each node holds."""
        counts = Counter(holder for p in self.placements for holder in p.holders)
        return {p.owner: counts[p.owner] for p in self.placements}


def choose_scheme(node_count: int) -> ErasureScheme:
    """The default code for a cluster of ``node_count`` nodes.

    - n >= 6: 4 + 2. Survives any two concurrent node losses (a second failure during recovery
      is the case that matters) for 1.5x memory; a recovery reads from only 4 peers. Wider
      codes (8 + 2: 1.25x) cut memory but double recovery fan-in and per-chunk overheads.
    - 3 <= n <= 5: (n - 1) + 1. Uses every node, survives one loss, n / (n - 1) memory.
    - n == 2: 1 + 1, i.e. replication to the other node (a k = 1 parity chunk is a copy).
    - n == 1: 1 + 0, local only: there is no peer.
    """
    if not isinstance(node_count, int) or node_count < 1:
        raise ConfigError(f"node_count must be an int >= 1, got {node_count!r}")
    if node_count >= 6:
        return ErasureScheme(4, 2)
    if node_count >= 3:
        return ErasureScheme(node_count - 1, 1)
    return ErasureScheme(1, node_count - 1)


def _rotation(members: Sequence[str], position: int, width: int) -> tuple[str, ...]:
    return tuple(members[(position + offset) % len(members)] for offset in range(width))


def plan_placement(members: Sequence[str], scheme: ErasureScheme) -> PlacementDecision:
    """Decide, for every member, which nodes hold its snapshot's chunks (see module doc).

    Falls back to replication when the membership is smaller than k + m (each snapshot copied
    to min(m, n - 1) peers, so up to m losses stay survivable where n allows) and when k == 1
    (the code is replication already, without the encode)."""
    members = tuple(members)
    if not members:
        raise ConfigError("members must name at least one node")
    if len(set(members)) != len(members):
        duplicated = sorted(node for node, count in Counter(members).items() if count > 1)
        raise ConfigError(f"members repeat node ids: {duplicated}")
    n, k, m = len(members), scheme.k, scheme.m
    if n >= scheme.total and k > 1:
        redundancy = Redundancy.ERASURE
        width = scheme.total
        reason = (
            f"{n} nodes >= k+m={scheme.total}: {k} data + {m} parity chunks on "
            f"{scheme.total} distinct nodes, survives any {m} node loss{'es' * (m != 1)}, "
            f"{scheme.memory_overhead:.2f}x memory"
        )
    else:
        peers = min(m, n - 1)
        width = peers + 1
        redundancy = Redundancy.REPLICATION if peers else Redundancy.LOCAL
        copies = f"replicating each snapshot to {peers} peer{'s' * (peers > 1)}"
        if m == 0:
            reason = "m=0: no redundancy; each snapshot stays on its owner and dies with it"
        elif n == 1:
            reason = "1 node: no peer to copy to; each snapshot stays local"
        elif k == 1 and n >= scheme.total:
            reason = f"k=1: a parity chunk is a full copy; {copies}"
        else:
            reason = f"{n} nodes < k+m={scheme.total}: {copies}"
    placements = tuple(
        OwnerPlacement(owner, _rotation(members, position, width))
        for position, owner in enumerate(members)
    )
    logger.debug("placement for %d nodes: %s", n, reason)
    return PlacementDecision(redundancy, scheme, placements, reason)
