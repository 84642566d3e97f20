"""The agent's executor for everything it does through etcd (a thin layer, no verdicts).

Two lanes run the machine's coordination effects off the thread that watches the workers:

- the **rendezvous lane**: the join (:class:`~elastictrain.rendezvous.join.EtcdJoinHandler`:
  the next round and its round data, membership polls, closing the job, its outcome);
- the **write lane**: short writes (the restart compare-and-set, round-done marks,
  registering again).

Each lane runs its effects in order on one thread; what comes of them, and what the watches
on ``ctl/`` and ``nodes/`` see, is posted as an observation. An etcd error is an observation
too (``CoordinationFailed`` / ``RendezvousFailed``), never an exception that ends the agent.

Per round (one rendezvous): the join forms the group (each agent's key in it lives under the
agent's registration lease, so a lost node leaves it with its lease); each agent publishes a
:class:`NodeSlot` in the round's store; group rank 0 starts a **fresh** TCPStore for the
workers of this round and publishes its address together with the job's restart counter.
Nothing of a previous attempt is ever read by the next one.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousTimeoutError,
)

from elastictrain.coord.etcd import EtcdClient, LeaseKeeper, PrefixWatch, WatchEvent
from elastictrain.coord.keys import JobKeys
from elastictrain.coord.nodes import NodeRecord, list_nodes
from elastictrain.errors import ConfigError, CoordinationUnavailableError
from elastictrain.events import Event
from elastictrain.rendezvous.join import EtcdJoinHandler, JoinPolicy

from . import machine as M
from .config import AgentConfig
from .plan import NodeSlot, RoundPlan
from .world import World, WorldFormatError, joinable, plan_next_world

logger = logging.getLogger(__name__)

_ROUND_DATA_TIMEOUT = timedelta(seconds=60)
EVENT_BACKLOG = 10_000  # events kept while etcd is away
_EVENT_PUT_TIMEOUT_S = 2.0


Post = Callable[[M.Observation], None]


class Lane:
    """Runs callables in order on one thread, each after its own delay."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None], delay: float = 0.0, *, flushable: bool = True):
        def run() -> None:
            if delay > 0:
                time.sleep(delay)
            fn()

        future = self._pool.submit(run)
        if flushable:
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def flush(self, timeout: float) -> bool:
        """Wait until every flushable callable submitted so far has run."""
        with self._lock:
            pending = set(self._pending)
        done, not_done = wait_futures(pending, timeout=timeout)
        return not not_done

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class JobCoordinator:
    """This agent's registration, watches and rendezvous in etcd."""

    def __init__(self, config: AgentConfig, client: EtcdClient, post: Post,
                 incarnation: str = "") -> None:  # fmt: skip
        self.config = config
        self.incarnation = incarnation  # this agent process's id, published in its round slots
        self.keys = JobKeys(config.job_id)
        self.client = client
        self._post = post
        self._lease: LeaseKeeper | None = None
        self._watches: list[PrefixWatch] = []
        self._handler: EtcdJoinHandler | None = None
        self._tcp_store: dist.TCPStore | None = None  # this round's, when we host it
        self._rendezvous = Lane("agent-rdzv")
        self._writes = Lane("agent-etcd")
        self._status = Lane("agent-status")
        self._status_lock = threading.Lock()
        self._status_value: bytes | None = None  # the newest record not yet written
        self._write_failed = False
        self._event_writer = uuid.uuid4().hex[:8]
        self._event_seq = itertools.count()
        self._event_backlog: deque[tuple[str, bytes]] = deque()  # unstored events, in order
        self.on_snapshot_committed: Callable[[bytes], None] | None = None
        self.endpoint = ""
        self.hostname = ""

    # -- setup ------------------------------------------------------------------------------

    def prepare_job(self) -> None:
        """A job id whose previous run ended (closed or failed) and has no live agent starts
        afresh; one that ended with live agents is refused."""
        outcome = self.client.get(self.keys.outcome)
        closed = self.client.get(self.keys.join_closed)
        if outcome is None and closed is None:
            return
        live = list_nodes(self.client, self.keys)
        if live:
            raise ConfigError(
                f"job {self.config.job_id!r} has ended but agents "
                f"{', '.join(n.node_id for n in live)} are still registered; "
                "wait for them to exit or use another --job-id"
            )
        guard_key, guard = ((self.keys.join_closed, closed.mod_revision) if closed is not None
                            else (self.keys.outcome, outcome.mod_revision))  # fmt: skip
        if self.client.delete_prefix_if_unchanged(self.keys.root, guard_key, guard):
            logger.info("job id %s was used by a finished run; starting afresh", self.config.job_id)

    def check_job_ca(self, fingerprint: str) -> None:
        """The first agent of a job records which CA it serves with ("" : none); an agent with
        other credentials (or none, or some where the job has none) is refused before it
        registers, so a job never mixes agents that cannot talk to each other."""
        mine = fingerprint or "insecure"
        if self.client.create(self.keys.job_ca, mine):
            return
        kv = self.client.get(self.keys.job_ca)
        theirs = kv.value.decode(errors="replace") if kv is not None else mine
        if theirs == mine:
            return
        if theirs == "insecure":
            raise ConfigError(f"job {self.config.job_id!r} runs with --insecure: start this "
                              "agent with --insecure too")  # fmt: skip
        raise ConfigError(f"job {self.config.job_id!r} uses the credentials of CA {theirs[:12]}, "
                          f"this agent {'none' if mine == 'insecure' else mine[:12]}: give it "
                          "the job's --credentials DIR")  # fmt: skip

    def register(self, endpoint: str, hostname: str) -> None:
        """Take a lease and create this node's key under it (refused if the id is taken)."""
        self.endpoint, self.hostname = endpoint, hostname
        self._register(first=True)

    def _register(self, first: bool) -> None:
        cfg = self.config
        if first:  # a drain asked of an earlier agent of this node id is not for this one
            self.client.delete(self.keys.drain(cfg.node_id))
        lease = self._new_lease()
        record = NodeRecord(
            node_id=cfg.node_id,
            endpoint=self.endpoint,
            hostname=self.hostname,
            gpus=cfg.gpus,
            nproc_per_node=cfg.nproc_per_node,
            pid=os.getpid(),
        )
        if not self.client.create(self.keys.node(cfg.node_id), record.encode(), lease.lease_id):
            lease.close(revoke=True)
            if first:
                raise ConfigError(
                    f"node id {cfg.node_id!r} is already registered in job {cfg.job_id!r}; "
                    "give each agent its own --node-id"
                )
            # our old key outlived its lease in a restarted etcd: replace it
            lease = self._new_lease()
            self.client.put(self.keys.node(cfg.node_id), record.encode(), lease.lease_id)
        old, self._lease = self._lease, lease
        if old is not None:
            old.close(revoke=False)

    def _new_lease(self) -> LeaseKeeper:
        return LeaseKeeper(
            self.client, self.config.node_ttl, on_lost=lambda: self._post(M.LeaseLost()),
            on_unconfirmed=lambda waited: self._post(M.LeaseUnconfirmed(waited)),
            on_confirmed=lambda: self._post(M.LeaseConfirmed()),
        )

    @property
    def lease(self) -> LeaseKeeper | None:
        return self._lease

    def _lease_id(self) -> int:
        """The lease this node's keys live under (the join's too): the current one."""
        if self._lease is None:
            raise CoordinationUnavailableError("this agent is not registered")
        return self._lease.lease_id

    def start(self) -> None:
        """Watch ``ctl/`` and ``nodes/`` and build the rendezvous handler. What the keys hold
        now is posted first; the watches replay from just after."""
        cfg = self.config
        revision = self.client.revision()
        self._load(post=True)
        self._watches = [
            self.client.watch_prefix(self.keys.control_prefix, self._on_control, revision + 1),
            self.client.watch_prefix(self.keys.nodes_prefix, self._on_nodes, revision + 1),
        ]
        rdzv = cfg.rendezvous
        policy = JoinPolicy(min_nodes=cfg.min_nodes, max_nodes=cfg.max_nodes,
                            last_call_s=rdzv.last_call_timeout,
                            join_timeout_s=rdzv.join_timeout)  # fmt: skip
        self._handler = EtcdJoinHandler(
            self.client, self.keys, policy, node_id=cfg.node_id, local_addr=cfg.local_addr,
            lease_ttl=cfg.node_ttl, lease=self._lease_id,
        )  # fmt: skip

    # -- effects ----------------------------------------------------------------------------

    def apply(self, effect: M.Effect) -> None:
        """Queue one coordination effect on its lane."""
        if isinstance(effect, M.Rendezvous):
            self._rendezvous.submit(self._next_round, effect.delay, flushable=False)
        elif isinstance(effect, M.PollMembership):
            self._rendezvous.submit(self._poll_membership)
        elif isinstance(effect, M.CloseRendezvous):
            self._rendezvous.submit(self._write(effect, self._close), effect.delay)
        elif isinstance(effect, M.FailJob):
            self._rendezvous.submit(self._write(effect, self._fail_job), effect.delay)
        elif isinstance(effect, M.PublishWorld):
            self._writes.submit(self._write(effect, self._publish_world))
        elif isinstance(effect, M.ProposeWorld):
            self._writes.submit(self._write(effect, self._propose_world), effect.delay)
        elif isinstance(effect, M.RequestRestart):
            self._writes.submit(self._write(effect, self._request_restart), effect.delay)
        elif isinstance(effect, M.MarkRoundDone):
            self._writes.submit(self._write(effect, self._mark_done), effect.delay)
        elif isinstance(effect, M.LeaveRound):
            self._writes.submit(self._write(effect, self._leave_round))
        elif isinstance(effect, M.Register):
            self._writes.submit(self._write(effect, self._register_again), effect.delay)
        else:
            raise TypeError(f"not a coordination effect: {effect!r}")

    def write_event(self, event: Event) -> None:
        """Store an event. While etcd is away events wait, in order, and are stored with the
        next one that gets through (at most ``EVENT_BACKLOG``; a lost event never holds the
        job up)."""
        key = self.keys.event(self.config.node_id, self._event_writer, next(self._event_seq))
        value = event.encode()

        def put() -> None:
            self._event_backlog.append((key, value))
            try:
                while self._event_backlog:
                    waiting_key, waiting = self._event_backlog[0]
                    self.client.put(waiting_key, waiting, timeout=_EVENT_PUT_TIMEOUT_S)
                    self._event_backlog.popleft()
            except CoordinationUnavailableError as exc:
                logger.warning("%d event(s) not stored yet (%s): %s", len(self._event_backlog),
                               event.kind, exc)  # fmt: skip
                while len(self._event_backlog) > EVENT_BACKLOG:
                    self._event_backlog.popleft()

        self._writes.submit(put)

    def put_status(self, value: bytes) -> None:
        """Store this node's status record under its lease, on a lane of its own (a slow
        etcd never holds up the job's writes behind it). Best effort and coalesced: only the
        newest record waits, so an outage leaves no backlog."""
        with self._status_lock:
            queued = self._status_value is not None
            self._status_value = value
        if not queued:
            self._status.submit(self._put_status, flushable=False)

    def _put_status(self) -> None:
        with self._status_lock:
            value, self._status_value = self._status_value, None
        lease = self._lease
        if value is None or lease is None:
            return
        try:
            self.client.put(self.keys.node_status(self.config.node_id), value, lease.lease_id,
                            timeout=_EVENT_PUT_TIMEOUT_S)  # fmt: skip
        except CoordinationUnavailableError as exc:
            logger.debug("status record not stored: %s", exc)

    def flush(self, timeout: float) -> bool:
        """Wait for the queued writes (not a rendezvous in progress)."""
        deadline = time.monotonic() + timeout
        ok = self._writes.flush(timeout)
        return self._rendezvous.flush(max(deadline - time.monotonic(), 0.0)) and ok

    def _write(self, effect: M.Effect, fn: Callable[[M.Effect], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(effect)
            except (CoordinationUnavailableError, RendezvousError) as exc:
                self._write_failed = True
                self._post(M.CoordinationFailed(effect, str(exc)))
                return
            except Exception as exc:  # a bug: reported, and the machine decides
                logger.exception("%s failed", type(effect).__name__)
                self._post(M.CoordinationFailed(effect, f"{type(exc).__name__}: {exc}"))
                return
            if self._write_failed:
                self._write_failed = False
                self._post(M.CoordinationSucceeded())

        return run

    def _next_round(self) -> None:
        try:
            found = self._joinable_world()
        except CoordinationUnavailableError as exc:
            self._post(M.RendezvousFailed(f"{type(exc).__name__}: {exc}", retryable=True))
            return
        if found is not None:
            self._post(found)
            return
        try:
            info = self._handler.next_rendezvous()
            plan = self._exchange_round_data(info)
        except RendezvousClosedError:
            self._post(self._closed())
            return
        except RendezvousTimeoutError as exc:
            self._post(M.RendezvousFailed(str(exc) or "timed out", retryable=False))
            return
        except (RendezvousError, CoordinationUnavailableError, dist.DistStoreError) as exc:
            self._post(M.RendezvousFailed(f"{type(exc).__name__}: {exc}", retryable=True))
            return
        except Exception as exc:  # a bug: reported, and the machine decides
            logger.exception("rendezvous failed")
            self._post(M.RendezvousFailed(f"{type(exc).__name__}: {exc}", retryable=False))
            return
        self._post(M.RoundFormed(plan))

    def _joinable_world(self) -> M.WorldFound | None:
        """A live round that runs in place, which this node joins instead of a rendezvous."""
        kv = self.client.get(self.keys.world)
        if kv is None:
            return None
        try:
            world = World.decode(kv.value)
        except WorldFormatError:
            return None
        restart = self.client.get(self.keys.restart_signal)
        done_kvs, _ = self.client.get_prefix(f"{self.keys.rounds_prefix}{world.round_id}/done/")
        ended = (self.client.get(self.keys.outcome) is not None
                 or self.client.get(self.keys.join_closed) is not None)
        ok, reason = joinable(
            world, me=self.config.node_id,
            restart_revision=restart.mod_revision if restart else 0,
            live=[n.node_id for n in list_nodes(self.client, self.keys)],
            done=[kv.key.rsplit("/", 1)[-1] for kv in done_kvs], ended=ended,
            left=self.client.get(self.keys.round_left(world.round_id)) is not None,
        )  # fmt: skip
        logger.info("agent %s: world record of round %s: %s", self.config.node_id,
                    world.round_id, reason if ok else f"not joined ({reason})")  # fmt: skip
        if not ok:
            return None
        cfg = self.config
        slot = NodeSlot(0, cfg.node_id, cfg.nproc_per_node, cfg.local_addr, self.endpoint,
                        self.incarnation)  # fmt: skip
        plan = RoundPlan(world.round_id, 0, (slot,), "", 0, world.restart_revision,
                         json.loads(restart.value)["count"] if restart else 0)  # fmt: skip
        return M.WorldFound(plan, world)

    def _publish_world(self, effect: M.PublishWorld) -> None:
        kv = self.client.get(self.keys.world)
        if kv is not None:
            try:
                if World.decode(kv.value).round_id == effect.world.round_id:
                    return  # this round's world is there (maybe moved on already)
            except WorldFormatError:
                pass
        self.client.compare_and_swap(self.keys.world, effect.world.encode(),
                                     kv.mod_revision if kv is not None else 0)  # fmt: skip

    def _closed(self) -> M.RendezvousClosed:
        try:
            kv = self.client.get(self.keys.outcome)
        except CoordinationUnavailableError:
            kv = None
        if kv is None:
            return M.RendezvousClosed()
        outcome = json.loads(kv.value)
        return M.RendezvousClosed(outcome.get("by", "?"), outcome.get("report", ""))

    def _exchange_round_data(self, info) -> RoundPlan:
        """Publish our slot, let group rank 0 start this round's TCPStore, read everyone's."""
        cfg = self.config
        store = info.store
        group_rank, group_world_size = info.rank, info.world_size
        slot = NodeSlot(group_rank, cfg.node_id, cfg.nproc_per_node, cfg.local_addr,
                        self.endpoint, self.incarnation)  # fmt: skip
        store.set(f"etrain/slot/{group_rank}", json.dumps(slot.__dict__))
        self._tcp_store = None  # the previous round's server, if we hosted it, goes away
        if group_rank == 0:
            self._tcp_store = dist.TCPStore(
                cfg.local_addr, 0, is_master=True, wait_for_workers=False, use_libuv=True
            )
            restart = self.client.get(self.keys.restart_signal)
            master = {
                "round_id": uuid.uuid4().hex[:12],
                "addr": cfg.local_addr,
                "port": self._tcp_store.port,
                "restart_revision": restart.mod_revision if restart else 0,
                "restart_count": json.loads(restart.value)["count"] if restart else 0,
            }
            store.set("etrain/master", json.dumps(master))
        keys = [f"etrain/slot/{i}" for i in range(group_world_size)] + ["etrain/master"]
        store.wait(keys, _ROUND_DATA_TIMEOUT)
        values = store.multi_get(keys)
        master = json.loads(values[-1])
        return RoundPlan(
            round_id=master["round_id"],
            group_rank=group_rank,
            slots=tuple(NodeSlot(**json.loads(v)) for v in values[:-1]),
            master_addr=master["addr"],
            master_port=int(master["port"]),
            restart_revision=int(master["restart_revision"]),
            restart_count=int(master["restart_count"]),
        )

    def _poll_membership(self) -> None:
        try:
            waiting = self._handler.num_nodes_waiting()
        except (RendezvousError, CoordinationUnavailableError) as exc:
            logger.debug("membership poll failed: %s", exc)
            return
        self._post(M.NodesWaiting(waiting))

    def _request_restart(self, effect: M.RequestRestart) -> None:
        value = json.dumps(
            {"count": effect.count, "by": self.config.node_id, "reason": effect.reason}
        )
        won, _ = self.client.compare_and_swap(
            self.keys.restart_signal, value, effect.expected_revision
        )
        if not won:
            logger.info("agent %s: a restart was already requested; following",
                        self.config.node_id)  # fmt: skip

    def _propose_world(self, effect: M.ProposeWorld) -> None:
        """Compare-and-set the next world; on a lost race, plan again on top of the winner
        (nothing to do if the lost members are gone from it already)."""
        proposal = effect.world
        for _attempt in range(100):
            kv = self.client.get(self.keys.world)
            current = effect.base
            revision = 0
            if kv is not None:
                revision = kv.mod_revision
                try:
                    stored = World.decode(kv.value)
                except WorldFormatError:
                    stored = None
                if stored is not None and stored.round_id != effect.base.round_id:
                    logger.info("agent %s: the world record belongs to round %s now: the "
                                "proposal for round %s is dropped", self.config.node_id,
                                stored.round_id, effect.base.round_id)  # fmt: skip
                    return
                if stored is not None:
                    current = stored
            if current.epoch >= proposal.epoch:
                proposal = plan_next_world(current, effect.lost, effect.spares, effect.joining,
                                           effect.world.after_step).world  # fmt: skip
                if proposal is None:
                    return  # another agent already took them out
            written, _ = self.client.compare_and_swap(self.keys.world, proposal.encode(), revision)
            if written:
                logger.info("agent %s: world epoch %d proposed (%d ranks)",
                            self.config.node_id, proposal.epoch, proposal.size)  # fmt: skip
                return
        raise CoordinationUnavailableError("the world record kept moving: gave up proposing")

    def _fail_job(self, effect: M.FailJob) -> None:
        outcome = {"by": self.config.node_id, "reason": effect.reason, "report": effect.report}
        self.client.create(self.keys.outcome, json.dumps(outcome))
        self._close(effect)

    def _close(self, effect: M.Effect) -> None:
        self._handler.set_closed()

    def _mark_done(self, effect: M.MarkRoundDone) -> None:
        self.client.put(self.keys.round_done(effect.round_id, self.config.node_id), b"1")

    def _leave_round(self, effect: M.LeaveRound) -> None:
        self.client.put(self.keys.round_left(effect.round_id), b"1")

    def _register_again(self, effect: M.Register) -> None:
        logger.warning("agent %s: registering again with a new lease", self.config.node_id)
        self._register(first=False)
        self._post(M.Registered())

    # -- watches ----------------------------------------------------------------------------

    def _load(self, post: bool) -> frozenset[str]:
        kvs, _ = self.client.get_prefix(self.keys.control_prefix)
        for kv in kvs:
            self._control_event(WatchEvent(kv.key, kv.value, False, kv.mod_revision))
        live = frozenset(n.node_id for n in list_nodes(self.client, self.keys))
        if post:
            self._post(M.NodesListed(live))
        return live

    def _on_control(self, events: list[WatchEvent]) -> None:
        if not events:  # compacted: re-read
            self._load(post=True)
        for event in events:
            self._control_event(event)

    def _control_event(self, event: WatchEvent) -> None:
        keys = self.keys
        if event.key == keys.restart_signal and not event.deleted:
            by = json.loads(event.value).get("by", "?")
            self._post(M.RestartRequested(event.mod_revision, by))
        elif event.key == keys.outcome and not event.deleted:
            outcome = json.loads(event.value)
            self._post(M.JobFailed(outcome.get("by", "?"), outcome.get("report", "")))
        elif event.key == keys.world and not event.deleted:
            try:
                self._post(M.WorldChanged(World.decode(event.value)))
            except WorldFormatError as exc:
                logger.warning("ignoring the world record: %s", exc)
        elif event.key == keys.drain(self.config.node_id) and not event.deleted:
            try:
                by = str(json.loads(event.value).get("by", "etrain drain"))
            except (ValueError, AttributeError):
                by = "etrain drain"
            self._post(M.DrainRequested(by))
        elif event.key == keys.snapshot_committed and not event.deleted:
            if self.on_snapshot_committed is not None:
                self.on_snapshot_committed(event.value)
        elif event.key.startswith(keys.rounds_prefix) and "/done/" in event.key:
            round_id, _, node = event.key[len(keys.rounds_prefix) :].partition("/done/")
            self._post(M.PeerDone(round_id, node, done=not event.deleted))

    def _on_nodes(self, events: list[WatchEvent]) -> None:
        if not events:  # compacted: re-read
            self._load(post=True)
            return
        lost, joined = set(), set()
        for event in events:
            node = event.key[len(self.keys.nodes_prefix) :]
            if event.deleted:
                lost.add(node)
                joined.discard(node)
            else:
                joined.add(node)
                lost.discard(node)
        if lost:
            self._post(M.NodesLost(frozenset(lost)))
        if joined:
            self._post(M.NodesJoined(frozenset(joined)))

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        for watch in self._watches:
            watch.cancel()
        self._rendezvous.close()
        self._writes.close()
        self._status.close()
        self._tcp_store = None
        if self._handler is not None:
            self._handler.shutdown()
        if self._lease is not None:
            self._lease.close(revoke=True)
