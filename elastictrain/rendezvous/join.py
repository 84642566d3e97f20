"""The join: nodes form rounds of a job through one etcd key each, O(N) in writes.

torch's dynamic rendezvous keeps one shared state that every joiner rewrites by
compare-and-set: N joiners make O(N^2) attempts. Here a round is a directory:

- a joiner puts ``join/<round>/nodes/<node>`` under its lease (one write): its address and
  a free port of its host, offered for the workers' store should it be rank 0;
- the joiner with the oldest key (the lowest create revision) is the round's **closer**. It
  alone watches the round's node keys, and :func:`decide_close` (pure) tells it when to
  write ``join/<round>/result``: the members (the first ``max_nodes`` to join) ranked by node
  id, so a node keeps its group rank across rounds, and rank 0's offered address, created
  once, in one transaction with ``join/last``. Every
  other joiner watches the result alone, and every ``lease_ttl / 2`` while it waits reads
  which key was created just before its own: when none is left (the closer died, and its
  lease ended), it is the closer now. One watch per joiner, on a key written once;
- a joiner that finds the round formed without it joins the next one. The keys under the
  next round are the nodes waiting (:meth:`EtcdJoinHandler.num_nodes_waiting`, none while
  the running round has ``max_nodes``, as torch's redundancy list); a closed job
  (:meth:`EtcdJoinHandler.set_closed`) writes its closed key and closes the open round;
- the next round closes only once a member of the running one has come back to it (a
  restart), or none of its members is left: nodes waiting never form a world of their own
  beside a running one.

:class:`EtcdJoinHandler` is a torch ``RendezvousHandler``; each round's agents get a c10d
store on etcd under the round (``join/<round>/store/``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.utils.distributed import get_free_port

from elastictrain.coord.etcd import EtcdClient, LeaseKeeper, WatchEvent
from elastictrain.coord.keys import JobKeys, validate_name
from elastictrain.errors import ConfigError, CoordinationUnavailableError
from elastictrain.rendezvous.store import EtcdStore

logger = logging.getLogger(__name__)

BACKEND_NAME = "etcd-v3"
RESULT_VERSION = 1


@dataclass(frozen=True)
class JoinPolicy:
    """When a round closes: at ``max_nodes`` joiners at once; with ``min_nodes`` or more,
    ``last_call_s`` after the count first reached ``min_nodes`` (latecomers get that long);
    a joiner gives up after ``join_timeout_s`` without a round."""

    min_nodes: int
    max_nodes: int
    last_call_s: float = 30.0
    join_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ConfigError(f"nodes {self.min_nodes}:{self.max_nodes}: need 1 <= min <= max")
        if self.last_call_s < 0 or not math.isfinite(self.last_call_s):
            raise ConfigError(f"last call {self.last_call_s} s: must be >= 0")
        if self.join_timeout_s <= 0:
            raise ConfigError(f"join timeout {self.join_timeout_s} s: must be > 0")


class Joiner(NamedTuple):
    node: str
    revision: int  # when its key was created: the join order
    offer: tuple[str, int] | None = None  # its address and free port, for rank 0's store


@dataclass(frozen=True)
class CloseVerdict:
    close: bool
    members: tuple[str, ...] = ()  # by node id: their group ranks
    wait_s: float | None = None  # look again after this long (None: at the next change)
    quorum_since: float | None = None  # when the count reached min_nodes (carried along)
    reason: str = ""


def decide_close(joined: Sequence[Joiner], policy: JoinPolicy, now: float,
                 quorum_since: float | None,
                 running: Collection[str] = ()) -> CloseVerdict:  # fmt: skip
    """Whether the closer closes the round now, given who has joined (pure). ``quorum_since``
    is what the previous verdict returned (None at first); ``running``: the members of the
    previous round still alive in it. Until one of them has joined this round, it stays
    open (they run; whoever joined waits for their restart)."""
    order = tuple(j.node for j in sorted(joined, key=lambda j: j.revision))
    if running and not set(running) & set(order):
        return CloseVerdict(False, reason=f"{len(order)} node(s) wait; the running round's "
                                          f"{len(running)} node(s) have not come back")  # fmt: skip
    if len(order) >= policy.max_nodes:
        return CloseVerdict(True, tuple(sorted(order[: policy.max_nodes])),
                            reason=f"{policy.max_nodes} nodes, the most a round takes")
    if len(order) < policy.min_nodes:
        return CloseVerdict(False, reason=f"{len(order)} of at least {policy.min_nodes} nodes")
    since = now if quorum_since is None else quorum_since
    left = since + policy.last_call_s - now
    if left <= 0:
        return CloseVerdict(True, tuple(sorted(order)), quorum_since=since,
                            reason=f"{len(order)} nodes at the end of the last call")
    return CloseVerdict(False, wait_s=left, quorum_since=since,
                        reason=f"{len(order)} nodes; the last call ends in {left:.1f} s")


def encode_result(round_number: int, members: Sequence[str], closed: bool = False,
                  master: tuple[str, int] | None = None) -> bytes:  # fmt: skip
    """A round's result: its members in rank order, and rank 0's address and a free port of
    its host for the workers' store (torch's ``MASTER_ADDR``/``MASTER_PORT``)."""
    return json.dumps({"version": RESULT_VERSION, "round": round_number,
                       "members": list(members), "closed": closed,
                       "master": list(master) if master else None}).encode()  # fmt: skip


class Result(NamedTuple):
    members: tuple[str, ...]
    closed: bool
    master: tuple[str, int] | None


def decode_result(raw: bytes) -> Result:
    """A round's result; a malformed one reads as closed."""
    try:
        value = json.loads(raw)
        if value.get("version") != RESULT_VERSION:
            raise ValueError(f"version {value.get('version')!r}")
        members = tuple(validate_name("node id", m) for m in value["members"])
        master = value.get("master")
        if master is not None:
            addr, port = str(master[0]), int(master[1])
            if not addr or not 0 < port < 65536:
                raise ValueError(f"master {master!r}")
            master = (addr, port)
        return Result(members, bool(value["closed"]), master)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, ConfigError) as exc:
        logger.warning("a round's result is unreadable (%s): taken as closed", exc)
        return Result((), True, None)


def _offer(raw: bytes) -> tuple[str, int] | None:
    """A joiner's offered address and port; None if its key does not hold one."""
    try:
        value = json.loads(raw)
        addr, port = str(value["addr"]), int(value["port"])
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("a joiner's key is unreadable (%s)", exc)
        return None
    return (addr, port) if addr and 0 < port < 65536 else None


class _Round:
    """What one joiner sees of one round while it waits: its result, and (as the closer)
    every joiner. Fed by watches; read under the condition."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.result: bytes | None = None
        self.broken = False  # the result's watch broke: read it again
        self.joined: dict[str, Joiner] = {}  # closer only: node -> its key
        self.running: set[str] = set()  # closer only: the previous round's members left in it
        self.cancels: list[Callable[[], None]] = []

    def on_result(self, events: list[WatchEvent] | None) -> None:
        with self.changed:
            if events is None:
                self.broken = True
            for event in events or ():
                if not event.deleted:
                    self.result = event.value
            self.changed.notify_all()

    def close(self) -> None:
        for cancel in self.cancels:
            cancel()
        self.cancels.clear()


class EtcdJoinHandler(RendezvousHandler):
    """Rounds of a job formed through :mod:`this module <elastictrain.rendezvous.join>`.
    ``node_id`` names this joiner (default: host, process, a random suffix). Its keys live
    under ``lease`` (the id of a lease its owner keeps, ``lease_ttl`` long), else under one
    of its own. With ``close_on_shutdown`` (torchrun's use) :meth:`shutdown` closes the job;
    with ``owns_client`` it closes the client too."""

    def __init__(self, client: EtcdClient, keys: JobKeys, policy: JoinPolicy,
                 node_id: str | None = None, local_addr: str | None = None,
                 lease_ttl: int = 10, store_timeout: timedelta = timedelta(seconds=300),
                 clock: Callable[[], float] = time.monotonic,
                 lease: Callable[[], int] | None = None, close_on_shutdown: bool = False,
                 owns_client: bool = False) -> None:  # fmt: skip
        self._client = client
        self._keys = keys
        self.policy = policy
        default = f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.node_id = validate_name("node id", node_id or default.replace(":", "_"))
        self._local_addr = local_addr
        self._lease_ttl = lease_ttl
        self._store_timeout = store_timeout
        self._clock = clock
        self._keeper: LeaseKeeper | None = None
        self._owned_lease = lease
        self._close_on_shutdown = close_on_shutdown
        self._owns_client = owns_client
        self._shut_down = False
        self.round_number: int | None = None  # the round this handler last formed
        self.round_size = 0  # how many nodes it formed with

    # -- torch's RendezvousHandler ---------------------------------------------------------------

    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        return False

    def get_run_id(self) -> str:
        return self._keys.job_id

    def is_closed(self) -> bool:
        return self._read_state()[0]

    def set_closed(self) -> None:
        """No more rounds: the closed key, and the open round's result (closed)."""
        self._client.put(self._keys.join_closed, b"1")
        number = self._read_state()[1]
        self._client.create_with(self._keys.join_result(number), encode_result(number, (), True),
                                 {self._keys.join_last: str(number)})  # fmt: skip

    def num_nodes_waiting(self) -> int:
        """Nodes that have joined the round after the newest formed one; none while this
        node's round has ``max_nodes`` (they could not be taken in)."""
        if self.round_size >= self.policy.max_nodes:
            return 0
        return self._client.count_prefix(self._keys.join_nodes(self._read_state()[1]))

    def shutdown(self) -> bool:
        """Stop (idempotent); see the class for what else it does."""
        if self._shut_down:
            return True
        self._shut_down = True
        closed = True
        if self._close_on_shutdown:
            try:
                self.set_closed()
            except CoordinationUnavailableError as exc:
                logger.warning("closing the job's rounds failed: %s", exc)
                closed = False
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        if self._owns_client:
            self._client.close()
        return closed

    def next_rendezvous(self) -> RendezvousInfo:
        """Join the open round and wait until it forms with this node (a round that forms
        without it: the next one). Raises ``RendezvousClosedError`` once the job is closed,
        ``RendezvousTimeoutError`` after the policy's join timeout."""
        deadline = self._clock() + self.policy.join_timeout_s
        lease = self._lease()
        while True:
            closed, number, read_at = self._read_state()
            if closed:
                raise RendezvousClosedError()
            result = self._join(number, lease, deadline, read_at)
            if result is None:
                continue  # formed without this node: the next round
            self.round_number, self.round_size = number, len(result.members)
            rank = result.members.index(self.node_id)
            store = EtcdStore(self._client, self._keys.join_store(number), self._store_timeout)
            addr, port = result.master or (self._local_addr or socket.getfqdn(), 0)
            logger.info("joined round %d as rank %d of %d", number, rank, len(result.members))
            return RendezvousInfo(store, rank, len(result.members),
                                  RendezvousStoreInfo(addr, port))  # fmt: skip

    # -- the protocol --------------------------------------------------------------------------

    def _lease(self) -> int:
        if self._owned_lease is not None:
            return self._owned_lease()
        if self._keeper is None or self._keeper.lost:
            self._keeper = LeaseKeeper(self._client, self._lease_ttl)
        return self._keeper.lease_id

    def _read_state(self) -> tuple[bool, int, int]:
        """Whether the job is closed, the open round, and the revision they were read at:
        one read (``join/closed`` and ``join/last`` are neighbours)."""
        keys = self._keys
        kvs, revision = self._client.get_range(keys.join_closed, keys.join_last + "\0")
        found = {kv.key: kv.value for kv in kvs}
        last = found.get(keys.join_last)
        return keys.join_closed in found, int(last) + 1 if last is not None else 0, revision

    def _join(self, number: int, lease: int, deadline: float, read_at: int) -> Result | None:
        """Join round ``number`` (the open one as of revision ``read_at``): its result if this
        node is a member, None if it formed without it."""
        keys = self._keys
        mine = keys.join_node(number, self.node_id)
        state = _Round()
        try:
            # from the read on: a result written before our key is seen too
            state.cancels.append(self._client.watch_keys([keys.join_result(number)],
                                                         state.on_result, read_at + 1))
            offer = {"addr": self._local_addr or socket.getfqdn(), "port": get_free_port()}
            revision = self._client.put(mine, json.dumps(offer), lease=lease)
            check_s = max(self._lease_ttl / 2, 0.5)  # a dead closer's key goes after its TTL
            while True:
                if state.broken:  # read again what a broken watch may have missed
                    self._read_again(number, state)
                if state.result is None and self._oldest(number, revision):
                    self._close_when_due(number, state, deadline)
                with state.changed:
                    look_again = self._clock() + check_s
                    while state.result is None and not state.broken:
                        now = self._clock()
                        if now >= deadline:
                            raise RendezvousTimeoutError(
                                f"round {number} did not form in "
                                f"{self.policy.join_timeout_s:.0f} s")  # fmt: skip
                        if now >= look_again:
                            break
                        state.changed.wait(min(deadline, look_again) - now)
                    if state.result is not None:
                        break
        except BaseException:
            self._client.delete(mine)
            raise
        finally:
            state.close()
        result = decode_result(state.result)
        if result.closed:
            raise RendezvousClosedError()
        if self.node_id not in result.members:
            self._client.delete(mine)
            return None
        return result

    def _read_again(self, number: int, state: _Round) -> None:
        state.close()
        at = self._client.revision()
        kv = self._client.get(self._keys.join_result(number))
        with state.changed:
            state.broken = False
            if kv is not None:
                state.result = kv.value
        state.cancels.append(self._client.watch_keys([self._keys.join_result(number)],
                                                     state.on_result, at + 1))

    def _oldest(self, number: int, revision: int) -> bool:
        """Whether this node's key (created at ``revision``) is the round's oldest left."""
        before, _ = self._client.created_before(self._keys.join_nodes(number), revision)
        return before is None

    def _follow_running(self, previous: int, state: _Round) -> None:
        """Keep ``state.running``: the members of round ``previous`` whose keys are left in
        it (a member's key goes when its lease ends)."""
        kv = self._client.get(self._keys.join_result(previous))
        members = set(decode_result(kv.value).members) if kv is not None else set()
        if not members:
            return
        prefix = self._keys.join_nodes(previous)

        def read() -> int:
            kvs, at = self._client.get_prefix(prefix)
            with state.changed:
                state.running = {kv.key[len(prefix):] for kv in kvs} & members
                state.changed.notify_all()
            return at

        def on_running(events: list[WatchEvent]) -> None:
            if not events:  # compacted away: read again
                read()
                return
            with state.changed:
                for event in events:
                    if event.deleted:
                        state.running.discard(event.key[len(prefix):])
                state.changed.notify_all()

        at = read()
        state.cancels.append(self._client.watch_prefix(prefix, on_running, at + 1).cancel)

    def _close_when_due(self, number: int, state: _Round, deadline: float) -> None:
        """As the closer: follow every joiner and write the result when the verdict says."""
        prefix = self._keys.join_nodes(number)

        def joiner(key: str, revision: int, value: bytes) -> Joiner:
            return Joiner(key[len(prefix):], revision, _offer(value))

        def on_nodes(events: list[WatchEvent]) -> None:
            with state.changed:
                if not events:  # compacted away: read again
                    state.joined.clear()
                    kvs, _ = self._client.get_prefix(prefix)
                    state.joined.update({j.node: j for j in (
                        joiner(kv.key, kv.create_revision, kv.value) for kv in kvs)})
                for event in events:
                    node = event.key[len(prefix):]
                    if event.deleted:
                        state.joined.pop(node, None)
                    elif node not in state.joined:
                        state.joined[node] = joiner(event.key, event.mod_revision, event.value)
                state.changed.notify_all()

        kvs, read_at = self._client.get_prefix(prefix)
        with state.changed:
            state.joined.update({j.node: j for j in (
                joiner(kv.key, kv.create_revision, kv.value) for kv in kvs)})
        state.cancels.append(self._client.watch_prefix(prefix, on_nodes, read_at + 1).cancel)
        if number > 0:
            self._follow_running(number - 1, state)
        quorum_since: float | None = None
        while True:
            with state.changed:
                if state.result is not None:
                    return
                joined = list(state.joined.values())
                verdict = decide_close(joined, self.policy, self._clock(), quorum_since,
                                       state.running)  # fmt: skip
                offers = {j.node: j.offer for j in joined}
                quorum_since = verdict.quorum_since
                if not verdict.close:
                    left = deadline - self._clock()
                    if left <= 0:
                        return  # the caller raises the timeout
                    wait = left if verdict.wait_s is None else min(verdict.wait_s, left)
                    state.changed.wait(min(wait, 1.0))
                    continue
            logger.info("closing round %d: %s", number, verdict.reason)
            # the workers' store will be on rank 0's host, at the port it offered
            value = encode_result(number, verdict.members, master=offers.get(verdict.members[0]))
            created, current = self._client.create_with(self._keys.join_result(number), value,
                                                        {self._keys.join_last: str(number)})
            with state.changed:
                if state.result is None:
                    if created:
                        state.result = value
                    elif current is not None:
                        state.result = current.value
            return

