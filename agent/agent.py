"""The per-node agent: register, rendezvous, run workers, watch, decide, apply.

One main thread runs the loop (workers are forked from it); etcd watch threads only update
the agent's view of the job (restart requests, the outcome, finished nodes, live nodes), and
gRPC threads only read the view or signal a worker.

Per round (one rendezvous): torch's ``DynamicRendezvousHandler`` on etcd forms the group; each
agent publishes a :class:`NodeSlot` in the round's store; group rank 0 starts a **fresh**
TCPStore for the workers of this round and publishes its address together with the job's
restart counter. Nothing of a previous attempt is ever read by the next one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousParameters,
)

from elastictrain.coord.etcd import EtcdClient, LeaseKeeper, PrefixWatch, WatchEvent
from elastictrain.coord.keys import JobKeys
from elastictrain.coord.nodes import NodeRecord, list_nodes
from elastictrain.errors import ConfigError, CoordinationUnavailableError
from elastictrain.rendezvous.backend import EtcdV3RendezvousBackend
from elastictrain.rendezvous.eviction import evict_nodes
from elastictrain.rendezvous.registration import create_handler
from elastictrain.snapshot.memory_store import SnapshotStore

from .config import AgentConfig
from .plan import (
    Action,
    Decision,
    LocalState,
    NodeSlot,
    Observation,
    WorkerAssignment,
    assign_worker_ranks,
    decide,
    worker_env,
)
from .server import start_server
from .snapshots import RoundView, SnapshotCoordinator
from .workers import WorkerGroup, WorkerInfo

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # torchrun exits 1 when the workers failed (ChildFailedError)

_ROUND_DATA_TIMEOUT = timedelta(seconds=60)


class AgentStopped(Exception):
    """Raised in the main thread by SIGINT/SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


@dataclass(frozen=True)
class RoundPlan:
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


@dataclass
class StatusView:
    job_id: str
    node_id: str
    hostname: str
    endpoint: str
    state: str
    restart_count: int
    max_restarts: int
    round: int
    group_rank: int
    group_world_size: int
    world_size: int
    gpus: int
    pid: int
    workers: list[WorkerInfo] = field(default_factory=list)


@dataclass
class _JobView:
    """What the watches have seen; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    restart_revision: int = 0
    restart_by: str | None = None
    outcome: dict | None = None
    done: dict[str, set[str]] = field(default_factory=dict)  # round id -> nodes
    live_nodes: set[str] = field(default_factory=set)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.keys = JobKeys(config.job_id)
        self.hostname = socket.gethostname()
        self._client: EtcdClient | None = None
        self._lease: LeaseKeeper | None = None
        self._watches: list[PrefixWatch] = []
        self._server = None
        self.endpoint = ""
        self._view = _JobView()
        self._state = "INIT"
        self._rounds = 0
        self._plan: RoundPlan | None = None
        self._assignments: list[WorkerAssignment] = []
        self._tcp_store: dist.TCPStore | None = None
        self._workers = WorkerGroup(
            name=os.path.basename(config.args[1]) if len(config.args) > 1 else config.entrypoint,
            entrypoint=config.entrypoint,
            args=config.args,
            log_dir=config.log_dir,
            redirects=config.redirects,
            tee=config.tee,
        )
        self._handler = None
        self._backend: EtcdV3RendezvousBackend | None = None
        self.snapshots: SnapshotCoordinator | None = None
        self.failure_report = ""

    # -- views for gRPC ------------------------------------------------------------------------

    def status(self) -> StatusView:
        plan = self._plan
        return StatusView(
            job_id=self.config.job_id,
            node_id=self.config.node_id,
            hostname=self.hostname,
            endpoint=self.endpoint,
            state=self._state,
            restart_count=plan.restart_count if plan else 0,
            max_restarts=self.config.max_restarts,
            round=self._rounds,
            group_rank=plan.group_rank if plan else -1,
            group_world_size=len(plan.slots) if plan else 0,
            world_size=self._assignments[0].world_size if self._assignments else 0,
            gpus=self.config.gpus,
            pid=os.getpid(),
            workers=self._workers.snapshot(),
        )

    def kill_worker(self, rank: int, sig: int) -> WorkerInfo | None:
        return self._workers.kill(rank, sig)

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until the job ends; returns the process exit code (torchrun's)."""
        previous = (
            {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            if threading.current_thread() is threading.main_thread()
            else {}
        )
        try:
            self._setup()
            return self._supervise()
        except AgentStopped as exc:
            logger.warning("agent %s: %s; stopping workers", self.config.node_id, exc)
            return EXIT_FAILED
        finally:
            self._teardown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        raise AgentStopped(signum)

    def _setup(self) -> None:
        cfg = self.config
        self._client = EtcdClient.from_spec(cfg.etcd)
        self._client.revision()  # fails fast, with a clear error, if etcd is unreachable
        self._prepare_job()
        self._server, port = start_server(self, cfg.grpc_host, cfg.grpc_port)
        self.endpoint = f"{cfg.grpc_host}:{port}"
        self.snapshots = SnapshotCoordinator(
            self._client,
            self.keys,
            cfg.node_id,
            SnapshotStore(
                prefix=f"etrain-{cfg.job_id}-{cfg.node_id}", max_bytes=cfg.snapshot_memory_limit
            ),
            self._round_view,
            scheme=cfg.snapshot_scheme,
            agent_endpoints=self.agent_endpoints,
            disk_dir=cfg.snapshot_dir,
            disk_every=cfg.snapshot_disk_every,
        )
        self._register_node()
        revision = self._client.revision()
        self._load_view()  # at or after `revision`; the watches replay from just after it
        self._watches = [
            self._client.watch_prefix(self.keys.control_prefix, self._on_control, revision + 1),
            self._client.watch_prefix(self.keys.nodes_prefix, self._on_nodes, revision + 1),
        ]
        rdzv = cfg.rendezvous
        params = RendezvousParameters(
            backend="etcd-v3",
            endpoint=cfg.etcd,
            run_id=cfg.job_id,
            min_nodes=cfg.min_nodes,
            max_nodes=cfg.max_nodes,
            local_addr=f"{cfg.local_addr}/{cfg.node_id}",
            join_timeout=rdzv.join_timeout,
            last_call_timeout=rdzv.last_call_timeout,
            close_timeout=rdzv.close_timeout,
            keep_alive_interval=rdzv.keep_alive_interval,
            keep_alive_max_attempt=rdzv.keep_alive_max_attempt,
        )
        # Never share torch's per-agent TCPStore across attempts: we host a fresh one per round.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        self._handler = create_handler(params, client=self._client)
        self._backend = EtcdV3RendezvousBackend(self._client, self.keys.rendezvous_state)
        logger.info(
            "agent %s of job %s registered (gRPC %s, etcd %s)",
            cfg.node_id,
            cfg.job_id,
            self.endpoint,
            cfg.etcd,
        )

    def _register_node(self) -> None:
        """Take a lease and create this node's key under it (refused if the id is taken)."""
        cfg = self.config
        self._lease = LeaseKeeper(self._client, cfg.node_ttl, on_lost=self._on_lease_lost)
        record = NodeRecord(
            node_id=cfg.node_id,
            endpoint=self.endpoint,
            hostname=self.hostname,
            gpus=cfg.gpus,
            nproc_per_node=cfg.nproc_per_node,
            pid=os.getpid(),
        )
        node_key = self.keys.node(cfg.node_id)
        if not self._client.create(node_key, record.encode(), self._lease.lease_id):
            self._lease.close(revoke=True)
            raise ConfigError(
                f"node id {cfg.node_id!r} is already registered in job {cfg.job_id!r}; "
                "give each agent its own --node-id"
            )

    def _prepare_job(self) -> None:
        """A job id whose previous run ended (closed or failed) and has no live agent starts
        afresh; one that ended with live agents is refused."""
        assert self._client is not None
        outcome = self._client.get(self.keys.outcome)
        state_kv = self._client.get(self.keys.rendezvous_state)
        closed = False
        if state_kv is not None:
            try:
                closed = bool(pickle.loads(state_kv.value).closed)
            except Exception:  # an unreadable state is as good as finished
                closed = True
        if outcome is None and not closed:
            return
        live = list_nodes(self._client, self.keys)
        if live:
            raise ConfigError(
                f"job {self.config.job_id!r} has ended but agents "
                f"{', '.join(n.node_id for n in live)} are still registered; "
                "wait for them to exit or use another --job-id"
            )
        guard = state_kv.mod_revision if state_kv is not None else 0
        if self._client.delete_prefix_if_unchanged(
            self.keys.root, self.keys.rendezvous_state, guard
        ):
            logger.info("job id %s was used by a finished run; starting afresh", self.config.job_id)

    def _teardown(self) -> None:
        self._state = "STOPPING"
        try:
            self._workers.stop(self.config.stop_grace)
        except Exception:
            logger.exception("stopping workers failed")
        for watch in self._watches:
            watch.cancel()
        if self.snapshots is not None:
            self.snapshots.close(save=True)
        self._tcp_store = None
        if self._handler is not None:
            try:
                self._handler._stop_heartbeats()  # no further writes to the state
            except Exception:
                logger.debug("stopping rendezvous heartbeats failed", exc_info=True)
        if self._lease is not None:
            self._lease.close(revoke=True)
        if self._server is not None:
            self._server.stop(grace=0.5)
        if self._client is not None:
            self._client.close()

    def _round_view(self) -> RoundView:
        """The current round as the snapshot coordinator needs it."""
        plan, assignments = self._plan, self._assignments
        if plan is None:
            return RoundView()
        return RoundView(
            members=tuple(s.node_id for s in plan.slots),
            endpoints={s.node_id: s.endpoint for s in plan.slots},
            local_ranks=frozenset(a.global_rank for a in assignments),
        )

    def agent_endpoints(self) -> list[str]:
        return [n.endpoint for n in list_nodes(self._client, self.keys)]

    def _on_lease_lost(self) -> None:
        logger.error(
            "agent %s lost its etcd lease: other nodes consider it dead", self.config.node_id
        )

    # -- the job view, fed by watches -------------------------------------------------------------

    def _load_view(self) -> None:
        assert self._client is not None
        kvs, _ = self._client.get_prefix(self.keys.control_prefix)
        for kv in kvs:
            self._apply_control(WatchEvent(kv.key, kv.value, False, kv.mod_revision))
        with self._view.lock:
            self._view.live_nodes = {n.node_id for n in list_nodes(self._client, self.keys)}

    def _on_control(self, events: list[WatchEvent]) -> None:
        if not events:  # compacted: re-read
            self._load_view()
        for event in events:
            self._apply_control(event)

    def _apply_control(self, event: WatchEvent) -> None:
        view = self._view
        with view.lock:
            if event.key == self.keys.restart_signal and not event.deleted:
                view.restart_revision = event.mod_revision
                view.restart_by = json.loads(event.value).get("by", "?")
            elif event.key == self.keys.outcome and not event.deleted:
                view.outcome = json.loads(event.value)
            elif event.key == self.keys.snapshot_committed and not event.deleted:
                if self.snapshots is not None:
                    self.snapshots.on_committed(event.value)
            elif event.key.startswith(self.keys.rounds_prefix) and "/done/" in event.key:
                round_id, _, node = event.key[len(self.keys.rounds_prefix) :].partition("/done/")
                if event.deleted:
                    view.done.get(round_id, set()).discard(node)
                else:
                    view.done.setdefault(round_id, set()).add(node)

    def _on_nodes(self, events: list[WatchEvent]) -> None:
        if not events:
            self._load_view()
            return
        lost: set[str] = set()
        with self._view.lock:
            for event in events:
                node = event.key[len(self.keys.nodes_prefix) :]
                if event.deleted:
                    self._view.live_nodes.discard(node)
                    lost.add(node)
                else:
                    self._view.live_nodes.add(node)
                    lost.discard(node)
        lost.discard(self.config.node_id)
        if lost and self._backend is not None:
            # The lease is the liveness signal: drop the node now, not after stale heartbeats.
            try:
                evict_nodes(self._backend, lost, self.config.min_nodes)
            except Exception:
                logger.warning("evicting %s from the rendezvous failed", lost, exc_info=True)

    # -- the loop -------------------------------------------------------------------------------

    def _supervise(self) -> int:
        while True:
            self._state = "RENDEZVOUS"
            try:
                info = self._handler.next_rendezvous()
            except RendezvousClosedError:
                return self._closed_exit_code()
            except RendezvousError as exc:
                raise CoordinationUnavailableError(f"rendezvous failed: {exc}") from exc
            self._rounds += 1
            self._plan = self._exchange_round_data(info)
            self._start_workers(self._plan)
            decision = self._monitor(self._plan)
            if decision.action is Action.FINISH:
                self._state = "SUCCEEDED"
                self._close_rendezvous()
                return EXIT_OK
            if decision.action.is_terminal:
                self._state = "FAILED"
                return EXIT_FAILED

    def _closed_exit_code(self) -> int:
        with self._view.lock:
            outcome = self._view.outcome
        if outcome is not None:
            self.failure_report = outcome.get("report", "")
            self._state = "FAILED"
            return EXIT_FAILED
        self._state = "SUCCEEDED"
        return EXIT_OK

    def _exchange_round_data(self, info) -> RoundPlan:
        """Publish our slot, let group rank 0 start this round's TCPStore, read everyone's."""
        cfg = self.config
        store = info.store
        group_rank, group_world_size = info.rank, info.world_size
        slot = NodeSlot(group_rank, cfg.node_id, cfg.nproc_per_node, cfg.local_addr, self.endpoint)
        store.set(f"etrain/slot/{group_rank}", json.dumps(slot.__dict__))
        self._tcp_store = None  # the previous round's server, if we hosted it, goes away
        if group_rank == 0:
            self._tcp_store = dist.TCPStore(
                cfg.local_addr, 0, is_master=True, wait_for_workers=False, use_libuv=True
            )
            restart = self._client.get(self.keys.restart_signal)
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
        slots = tuple(NodeSlot(**json.loads(v)) for v in values[:-1])
        master = json.loads(values[-1])
        plan = RoundPlan(
            round_id=master["round_id"],
            group_rank=group_rank,
            slots=slots,
            master_addr=master["addr"],
            master_port=int(master["port"]),
            restart_revision=int(master["restart_revision"]),
            restart_count=int(master["restart_count"]),
        )
        logger.info(
            "agent %s: round %d formed: group rank %d of %d (nodes %s), restart count %d",
            cfg.node_id,
            self._rounds,
            group_rank,
            group_world_size,
            ",".join(s.node_id for s in slots),
            plan.restart_count,
        )
        return plan

    def _start_workers(self, plan: RoundPlan) -> None:
        cfg = self.config
        self._assignments = assign_worker_ranks(plan.slots, plan.group_rank)
        if self.snapshots is not None:
            self.snapshots.new_round()
        envs = [
            worker_env(
                a,
                master_addr=plan.master_addr,
                master_port=plan.master_port,
                restart_count=plan.restart_count,
                max_restarts=cfg.max_restarts,
                run_id=cfg.job_id,
                parent_env=os.environ,
            )
            | {
                "ETRAIN_AGENT_ENDPOINT": self.endpoint,
                "ETRAIN_JOB_ID": cfg.job_id,
                "ETRAIN_NODE_ID": cfg.node_id,
            }
            | ({"ETRAIN_SNAPSHOT_DIR": cfg.snapshot_dir} if cfg.snapshot_dir else {})
            for a in self._assignments
        ]
        self._workers.start(self._assignments, envs)
        self._state = "RUNNING"

    def _observe(self, plan: RoundPlan, local: LocalState, nodes_waiting: int) -> Observation:
        view = self._view
        with view.lock:
            restart_by = view.restart_by if view.restart_revision > plan.restart_revision else None
            outcome = view.outcome
            lost = tuple(sorted(plan.participants - view.live_nodes))
            done = len(view.done.get(plan.round_id, set()) & plan.participants)
        return Observation(
            local=local,
            restart_requested_by=restart_by,
            job_failed_by=outcome.get("by", "?") if outcome else None,
            lost_peers=lost,
            nodes_waiting=nodes_waiting,
            peers_succeeded=done,
            group_world_size=len(plan.slots),
            restarts_used=plan.restart_count,
            max_restarts=self.config.max_restarts,
            self_lost=self._lease is not None and self._lease.lost,
        )

    def _monitor(self, plan: RoundPlan) -> Decision:
        cfg = self.config
        marked_done = False
        next_membership_check = time.monotonic() + cfg.membership_poll_interval
        nodes_waiting = 0
        while True:
            time.sleep(cfg.monitor_interval)
            local = self._workers.poll()
            if local is LocalState.SUCCEEDED and not marked_done:
                self._client.put(self.keys.round_done(plan.round_id, cfg.node_id), b"1")
                marked_done = True
                self._state = "DONE_WAITING"
            if local is LocalState.RUNNING and time.monotonic() >= next_membership_check:
                nodes_waiting = self._handler.num_nodes_waiting()
                next_membership_check = time.monotonic() + cfg.membership_poll_interval
            decision = decide(self._observe(plan, local, nodes_waiting))
            if decision.action in (Action.CONTINUE, Action.WAIT_FOR_PEERS):
                continue
            logger.info("agent %s: %s (%s)", cfg.node_id, decision.action.value, decision.reason)
            self._apply(decision, plan)
            return decision

    def _apply(self, decision: Decision, plan: RoundPlan) -> None:
        cfg = self.config
        action = decision.action
        if action is Action.REQUEST_RESTART:
            self.failure_report = self._workers.failure_report()
            value = json.dumps(
                {"count": plan.restart_count + 1, "by": cfg.node_id, "reason": decision.reason}
            )
            won, _ = self._client.compare_and_swap(
                self.keys.restart_signal, value, plan.restart_revision
            )
            if not won:
                logger.info("agent %s: a restart was already requested; following", cfg.node_id)
            self._log_failure_summary()
        elif action is Action.FAIL_JOB:
            self.failure_report = self._workers.failure_report()
            outcome = {"by": cfg.node_id, "reason": decision.reason, "report": self.failure_report}
            self._client.create(self.keys.outcome, json.dumps(outcome))
            self._close_rendezvous()
        elif action is Action.EXIT_FAILED:
            with self._view.lock:
                self.failure_report = (self._view.outcome or {}).get("report", "")
        if action is not Action.FINISH:
            self._state = "STOPPING"
            self._workers.stop(cfg.stop_grace)
        if action is Action.REJOIN and self._lease is not None and self._lease.lost:
            logger.warning("agent %s: registering again with a new lease", cfg.node_id)
            self._register_node()

    def _log_failure_summary(self) -> None:
        if self.failure_report.strip():
            logger.warning(
                "agent %s: worker failure:\n%s", self.config.node_id, self.failure_report
            )

    def _close_rendezvous(self) -> None:
        try:
            self._handler.set_closed()
        except RendezvousError as exc:
            logger.warning("closing the rendezvous failed: %s", exc)


def print_failure_report(report: str) -> None:
    if report:
        print(report, file=sys.stderr, flush=True)
