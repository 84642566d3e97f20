"""The in-place world of a round: which worker process holds which rank (pure).

Within one rendezvous round, the ranks of a job whose workers use the ``Job`` API can change
without restarting anyone: a lost worker's rank goes to a hot spare, or the world shrinks. A
world is an ordered tuple of members ``(node, slot, incarnation)`` (rank = position; ``slot``
is the worker's id on its node, ``incarnation`` the id of the agent process that started it, so
a node that comes back under the same name is never taken for its earlier self) and an epoch
that only grows. Epoch 0 follows from the round's
rendezvous; later epochs live in one etcd record (``ctl/world``), moved forward by a fenced
compare-and-set: any agent that sees a fault proposes the next world on top of the current
one, and a lost race re-plans on top of the winner. No agent coordinates the others.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from elastictrain.errors import ElasticTrainError

from .plan import RoundPlan

WORLD_VERSION = 3
# version 1: members without their incarnation; version 2: no after_step (every change now)
_READABLE_VERSIONS = (1, 2, 3)


class WorldFormatError(ElasticTrainError):
    """A world record this version cannot read."""


@dataclass(frozen=True, order=True)
class Member:
    node: str
    slot: int
    incarnation: str = ""  # the agent process that started the worker


@dataclass(frozen=True)
class World:
    round_id: str
    epoch: int
    members: tuple[Member, ...]
    restart_revision: int = 0  # the restart key's revision when the round began (its era)
    # -1: the ranks re-form now (the step in flight is given up); n >= 0: a planned change
    # (a drain): they finish their steps up to n, then re-form, and no finished step is lost
    after_step: int = -1

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes with members, in rank order of their first member."""
        return tuple(dict.fromkeys(m.node for m in self.members))

    @property
    def store_prefix(self) -> str:
        """Where this world's process group meets (in the job's etcd store): fresh per epoch,
        hosted by no node."""
        return f"worlds/{self.round_id}/{self.epoch}/"

    def rank_of(self, node: str, slot: int, incarnation: str) -> int | None:
        try:
            return self.members.index(Member(node, slot, incarnation))
        except ValueError:
            return None

    def slots_on(self, node: str, incarnation: str | None) -> dict[int, int]:
        """slot -> rank of this node's members started by agent ``incarnation`` (None: by any
        agent of the node)."""
        return {m.slot: rank for rank, m in enumerate(self.members)
                if m.node == node and incarnation in (None, m.incarnation)}  # fmt: skip

    def encode(self) -> bytes:
        record = {"version": WORLD_VERSION, "round_id": self.round_id, "epoch": self.epoch,
                  "members": [[m.node, m.slot, m.incarnation] for m in self.members],
                  "restart_revision": self.restart_revision,
                  "after_step": self.after_step}  # fmt: skip
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> World:
        try:
            record = json.loads(raw)
            if record.get("version") not in _READABLE_VERSIONS:
                raise WorldFormatError(f"world version {record.get('version')!r} is not one of "
                                       f"{_READABLE_VERSIONS}")  # fmt: skip
            members = tuple(_member(entry) for entry in record["members"])
            after_step = int(record.get("after_step", -1))
            if after_step < -1:
                raise ValueError(f"after_step {after_step}")
            return cls(str(record["round_id"]), int(record["epoch"]), members,
                       int(record.get("restart_revision", 0)), after_step)  # fmt: skip
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError, OverflowError, RecursionError) as exc:  # fmt: skip
            raise WorldFormatError(f"malformed world record: {exc}") from exc


def _member(entry) -> Member:
    if not isinstance(entry, list) or len(entry) not in (2, 3):
        raise ValueError(f"a member is [node, slot, incarnation], not {entry!r}")
    return Member(str(entry[0]), int(entry[1]), str(entry[2]) if len(entry) == 3 else "")


def initial_world(plan: RoundPlan) -> World:
    """Epoch 0: the round's ranks (contiguous per node, in group-rank order)."""
    slots = sorted(plan.slots, key=lambda s: s.group_rank)
    members = tuple(Member(s.node_id, local, s.incarnation)
                    for s in slots for local in range(s.local_world_size))  # fmt: skip
    return World(plan.round_id, 0, members, plan.restart_revision)


def joinable(world: World, *, me: str, restart_revision: int, live: Collection[str],
             done: Collection[str], ended: bool,
             left: bool = False) -> tuple[bool, str]:  # fmt: skip
    """Can a node that starts now join ``world`` in place (instead of a rendezvous)? Only
    while its round runs: no restart since it began, the job not ended, the round not left
    for a rendezvous (``left``), some other node of it alive and none of them done (a round
    that finishes takes nobody)."""
    if ended:
        return False, "the job has ended"
    if world.restart_revision != restart_revision:
        return False, "the job restarted since the world's round began"
    if left:
        return False, "the round was left for a rendezvous"
    others = [n for n in world.nodes if n != me]
    if not any(n in set(live) for n in others):
        return False, "no node of the world is alive"
    finished = [n for n in world.nodes if n in set(done)]
    if finished:
        return False, f"the round is finishing ({', '.join(finished)} done)"
    return True, f"round {world.round_id} runs in place at epoch {world.epoch}"


@dataclass(frozen=True)
class WorldChange:
    world: World | None  # None: nothing to change
    reason: str


def plan_next_world(current: World, lost: Collection[Member], spares: Sequence[Member] = (),
                    joining: Sequence[Member] = (),
                    after_step: int = -1) -> WorldChange:  # fmt: skip
    """The next world without the ``lost`` members and with the ``joining`` ones: each lost
    rank goes to the next idle spare (one that is not a member already), else the world
    shrinks and the ranks after it move down; joining members get the ranks after the last.
    The survivors keep their order. ``after_step``: see :attr:`World.after_step`."""
    gone = [m for m in current.members if m in set(lost)]
    new = [j for j in dict.fromkeys(joining) if j not in current.members and j not in set(lost)]
    if not gone and not new:
        return WorldChange(None, "no lost member is in the current world, none joins")
    idle = [s for s in spares if s not in current.members and s not in set(lost)
            and s not in new]  # fmt: skip
    members: list[Member] = []
    replaced, dropped = [], []
    for rank, member in enumerate(current.members):
        if member not in gone:
            members.append(member)
        elif idle:
            spare = idle.pop(0)
            members.append(spare)
            replaced.append(f"rank {rank} -> spare {spare.node}/{spare.slot}")
        else:
            dropped.append(rank)
    parts = replaced + ([f"ranks {dropped} dropped"] if dropped else [])
    if new:
        first = len(members)
        members += new
        parts.append(f"ranks {first}..{len(members) - 1} join from "
                     f"{', '.join(dict.fromkeys(j.node for j in new))}")  # fmt: skip
    world = World(current.round_id, current.epoch + 1, tuple(members), current.restart_revision,
                  after_step)  # fmt: skip
    when = f" after step {after_step}" if after_step >= 0 else ""
    return WorldChange(world, f"epoch {world.epoch}{when}, {world.size} rank(s): "
                              f"{'; '.join(parts)}")  # fmt: skip
