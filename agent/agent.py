"""The per-node agent: observe, step the machine, apply its effects.

The main thread runs the loop. It owns the workers (they are forked from it: their
parent-death signal is tied to the thread that forks them) and polls them every
``--monitor-interval``; everything else reaches it as an observation on one queue: the etcd
watches, the coordination lanes' results (:mod:`elastictrain.agent.coordination`), the lease
keeper, signals. Each observation goes through :func:`machine.step`, which returns the next
machine and the effects this module applies: worker effects here, etcd effects on the
coordinator's lanes. gRPC threads only read the status or signal a worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from elastictrain import constants
from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.nodes import list_nodes
from elastictrain.credentials import JobCredentials
from elastictrain.errors import AgentUnavailableError, CoordinationUnavailableError
from elastictrain.events import Event
from elastictrain.leftovers import owned_name, sweep
from elastictrain.node_status import NodeStatus, SnapshotStatus
from elastictrain.rpc.agent_client import AgentClient
from elastictrain.session import protocol as P
from elastictrain.snapshot.memory_store import SnapshotError, SnapshotStore
from elastictrain.snapshot.shm import shm_dir

from . import machine as M
from .chaos import BALLAST_NAME, ChaosExecutor
from .config import AgentConfig
from .coordination import JobCoordinator
from .metrics import AgentCounters, render_metrics
from .metrics_server import MetricsServer
from .mirrors import MirrorBoard
from .plan import RoundPlan, WorkerAssignment, assign_worker_ranks, worker_env
from .server import start_server
from .sessions import SessionServer, WorkerKey
from .snapshots import RoundView, SnapshotCoordinator, record_request_problem
from .status_record import StatusPublisher, build_node_status
from .workers import WorkerGroup, WorkerInfo
from .world import World

if TYPE_CHECKING:
    from elastictrain.coord.embedded import EmbeddedEtcd

logger = logging.getLogger(__name__)

EXIT_OK = M.EXIT_OK
EXIT_FAILED = M.EXIT_FAILED

# How long an exiting agent waits for its last etcd writes (the outcome, a done mark).
_FLUSH_TIMEOUT_S = 15.0
_BEGUN_KEPT = 256  # records begun (step, rank) -> by which worker, newest last


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
    disk_error: str = ""
    etcd_silent_ms: int = 0
    beats: dict[int, M.Beat] = field(default_factory=dict)  # slot -> its last heartbeat


class Agent:
    """``embedded_etcd``: the job's etcd when this agent's process runs it (a chaos
    ``etcd-restart`` restarts it)."""

    def __init__(self, config: AgentConfig, embedded_etcd: EmbeddedEtcd | None = None) -> None:
        self.config = config
        self.chaos = ChaosExecutor(self, embedded_etcd)
        self.hostname = socket.gethostname()
        self.endpoint = ""
        self.incarnation = uuid.uuid4().hex[:12]  # this agent process, in the worlds it joins
        self.started = time.time()
        self._status_out: StatusPublisher | None = None
        self._client: EtcdClient | None = None
        self._coordinator: JobCoordinator | None = None
        self._server = None
        self._observations: queue.SimpleQueue[M.Observation] = queue.SimpleQueue()
        self._machine: M.AgentMachine | None = None
        self._stopping = False
        self._rounds = 0
        self._plan: RoundPlan | None = None
        self._assignments: list[WorkerAssignment] = []
        self._workers = WorkerGroup(
            name=os.path.basename(config.args[1]) if len(config.args) > 1 else config.entrypoint,
            entrypoint=config.entrypoint,
            args=config.args,
            log_dir=config.log_dir,
            redirects=config.redirects,
            tee=config.tee,
        )
        self._world: World | None = None
        self._endpoints: dict[str, str] = {}  # node -> gRPC endpoint, of the world's nodes
        self._generation = 0
        self._exiting_reported: set[int] = set()
        self._sessions: SessionServer | None = None
        self._mirrors = MirrorBoard()
        self._lock = threading.Lock()
        self._begun: dict[tuple[int, int], WorkerKey] = {}  # who may end each record
        self._next_tick = 0.0
        self._exit_code: int | None = None
        self.snapshots: SnapshotCoordinator | None = None
        self.failure_report = ""
        self.counters = AgentCounters()  # verdicts by kind, recovery durations (metrics)
        self.metrics: MetricsServer | None = None

    # -- views for gRPC ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self._stopping:
            return "STOPPING"
        return self._machine.phase.value if self._machine is not None else "INIT"

    def status(self) -> StatusView:
        plan = self._plan
        return StatusView(
            job_id=self.config.job_id,
            node_id=self.config.node_id,
            hostname=self.hostname,
            endpoint=self.endpoint,
            state=self.state,
            restart_count=plan.restart_count if plan else 0,
            max_restarts=self.config.max_restarts,
            round=self._rounds,
            group_rank=plan.group_rank if plan else -1,
            group_world_size=len(plan.slots) if plan else 0,
            world_size=self._world.size if self._world is not None else 0,
            gpus=self.config.gpus,
            pid=os.getpid(),
            workers=self._workers.snapshot(),
            disk_error=self.snapshots.disk_error if self.snapshots is not None else "",
            etcd_silent_ms=self._etcd_silent_ms(),
            beats=dict(self._machine.beats) if self._machine is not None else {},
        )

    def _etcd_silent_ms(self) -> int:
        """How long no keepalive of ours has got through (what peers ask during an outage)."""
        lease = self._coordinator.lease if self._coordinator is not None else None
        return int(lease.unconfirmed_s * 1000) if lease is not None else 0

    def kill_worker(self, rank: int, sig: int) -> WorkerInfo | None:
        return self._workers.kill(rank, sig)

    def slow_worker(self, rank: int, factor: float, seconds: float) -> int | None:
        """Slow the compute of the local in-place worker that holds ``rank`` in the current
        world by ``factor`` for ``seconds`` (0: until ended; factor 1 ends it). Its pid, or
        None when no such worker is here. The worker reports the slowdown as a fault event
        at its next step."""
        machine = self._machine
        if machine is None or self._sessions is None:
            return None
        slot = next((s for s, r in machine.members_here().items() if r == rank
                     and machine.modes.get(s) == P.MODE_INPLACE), None)  # fmt: skip
        if slot is None:
            return None
        key = WorkerKey(self._generation, slot)
        message = {"type": P.SLOW, "factor": factor, "seconds": seconds}
        if not self._sessions.push(key, message):
            return None
        return self._sessions.pid_of(key)

    def write_event(self, event: Event) -> None:
        """Store one of the job's events (in order, from the write lane)."""
        assert self._coordinator is not None
        self._coordinator.write_event(event)

    def flush_writes(self, timeout: float) -> bool:
        """Wait until the etcd writes queued so far have been made."""
        return self._coordinator.flush(timeout) if self._coordinator is not None else True

    def agent_endpoints(self) -> list[str]:
        assert self._coordinator is not None
        return [n.endpoint for n in list_nodes(self._client, self._coordinator.keys)]

    def post(self, observation: M.Observation) -> None:
        """Hand the loop an observation (from any thread, or a signal handler)."""
        self._observations.put(observation)

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until the job ends; returns the process exit code (torchrun's)."""
        previous = (
            {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            if threading.current_thread() is threading.main_thread()
            else {}
        )
        code = 1
        try:
            self._setup()
            code = self._loop()
        finally:
            self._teardown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        disk_error = self.snapshots.disk_error if self.snapshots is not None else ""
        if code == 0 and disk_error:  # trained, but the snapshot asked for is not on disk
            print(f"etrain launch: the job finished but its disk snapshot failed: {disk_error}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return code

    def _on_signal(self, signum: int, frame) -> None:
        """SIGTERM (a preemption notice, Slurm's --signal, a preStop hook) drains this node:
        the job goes on without it. SIGINT stops it now."""
        name = signal.Signals(signum).name
        self.post(M.DrainRequested(name) if signum == signal.SIGTERM else M.Stopped(name))

    def _on_snapshot_committed(self, value: bytes) -> None:
        assert self.snapshots is not None
        self.snapshots.on_committed(value)
        self.post(M.SnapshotCommitted(int(json.loads(value)["step"])))

    def _setup(self) -> None:
        cfg = self.config
        self._client = EtcdClient.from_spec(cfg.etcd)
        self._client.revision()  # fails fast, with a clear error, if etcd is unreachable
        self._coordinator = JobCoordinator(cfg, self._client, self.post, self.incarnation)
        self._coordinator.prepare_job()
        self._sessions = SessionServer(
            f"{cfg.job_id}/{cfg.node_id}/{os.getpid()}",
            self.post,
            {
                "begin_snapshot": self._begin_snapshot,
                "end_snapshot": self._end_snapshot,
                "world": self._current_world,
                "truncate_snapshots": self._truncate_snapshots,
                "snapshot_segments": self._snapshot_segments,
                "offer_mirror": self._offer_mirror,
                "claim_mirror": self._claim_mirror,
                "withdraw_mirror": self._withdraw_mirror,
            },
        )
        sweep(shm_dir())  # segments of agents of this user that were killed
        if cfg.snapshot_dir:  # a chaos disk-full ballast of an agent that was killed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cfg.snapshot_dir, BALLAST_NAME))
        credentials = JobCredentials.load(cfg.credentials_dir) if cfg.credentials_dir else None
        if cfg.credentials_dir:  # this agent's own calls to peers, and its workers', use them
            os.environ[constants.ENV_CREDENTIALS] = cfg.credentials_dir
        else:
            os.environ.pop(constants.ENV_CREDENTIALS, None)
        self._coordinator.check_job_ca(credentials.fingerprint if credentials else "")
        self._server, port = start_server(self, cfg.grpc_host, cfg.grpc_port, credentials)
        self.endpoint = f"{cfg.grpc_host}:{port}"
        self.snapshots = SnapshotCoordinator(
            self._client,
            self._coordinator.keys,
            cfg.node_id,
            SnapshotStore(prefix=owned_name(f"{cfg.job_id}-{cfg.node_id}"),
                          max_bytes=cfg.snapshot_memory_limit),  # fmt: skip
            self._round_view,
            scheme=cfg.snapshot_scheme,
            agent_endpoints=self.agent_endpoints,
            disk_dir=cfg.snapshot_dir,
            disk_every=cfg.snapshot_disk_every,
        )
        self._coordinator.on_snapshot_committed = self._on_snapshot_committed
        self._coordinator.register(self.endpoint, self.hostname)
        self._status_out = StatusPublisher(self._coordinator.put_status,
                                           constants.STATUS_INTERVAL_S)  # fmt: skip
        self._coordinator.start()
        if cfg.metrics_port is not None:
            self.metrics = MetricsServer(cfg.local_addr, cfg.metrics_port, self._metrics_text)
            logger.info("metrics at http://%s:%d/metrics", cfg.local_addr, self.metrics.port)
        logger.info(
            "agent %s of job %s registered (gRPC %s, etcd %s)",
            cfg.node_id,
            cfg.job_id,
            self.endpoint,
            cfg.etcd,
        )

    def _loop(self) -> int:
        cfg = self.config
        self._machine, effects = M.start(
            cfg.node_id,
            max_restarts=cfg.max_restarts,
            membership_poll_interval=cfg.membership_poll_interval,
            coordination_timeout=cfg.coordination_timeout,
            hang_timeout=cfg.hang_timeout,
            hot_spares=cfg.hot_spares,
            faults=tuple(cfg.faults),
            incarnation=self.incarnation,
            node_ttl=cfg.node_ttl,
            drain_timeout=cfg.drain_timeout,
        )
        self._apply(effects)
        while self._exit_code is None:
            observation = self._next_observation()
            self._machine, effects = M.step(self._machine, observation, time.monotonic())
            self._apply(effects)
            if self._status_out is not None:
                self._status_out.offer(self._node_status, time.monotonic())
        return self._exit_code

    def _node_status(self) -> NodeStatus:
        held = self.snapshots
        snapshot = SnapshotStatus() if held is None else SnapshotStatus(
            memory_bytes=held.memory_bytes(),
            records=sum(1 for r in held.store.list() if r.complete),
            chunks=len(held.chunks.list()),
            committed_step=-1 if held.store.committed is None else held.store.committed,
            disk_error=held.disk_error,
        )  # fmt: skip
        shape = self._sessions.job_shape(self._generation) if self._sessions else (0, 0)
        return build_node_status(self.status(), self._machine, snapshot, self.started,
                                 time.time(), shape)  # fmt: skip

    def _next_observation(self) -> M.Observation:
        """The next queued observation; every monitor interval, the workers' state and a tick."""
        while True:
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + self.config.monitor_interval
                for observation in self._poll_workers():
                    self.post(observation)
                return M.Tick()
            try:
                return self._observations.get(timeout=self._next_tick - now)
            except queue.Empty:
                continue

    def _poll_workers(self) -> list[M.Observation]:
        """Reap exited workers without blocking (``WorkerExited``, each once). Workers whose
        process has begun to die are reported at once (``WorkerLost``): a process with much
        device memory takes seconds before it can be reaped."""
        assert self._sessions is not None
        found: list[M.Observation] = []
        for slot in self._workers.exiting():
            key = WorkerKey(self._generation, slot)
            if slot not in self._exiting_reported:
                self._exiting_reported.add(slot)
                finished = self._sessions.finished(key)
                found.append(M.WorkerLost(key.generation, slot, "process exiting", finished))
        for done in self._workers.poll():
            report = ""
            if done.exit_code != 0:
                report = self._workers.failure_report([done.slot])
                if report.strip():
                    logger.warning("agent %s: worker failure:\n%s", self.config.node_id, report)
            found.append(M.WorkerExited(self._generation, done.slot, done.exit_code, report))
        return found

    # -- effects --------------------------------------------------------------------------------

    def _apply(self, effects: list[M.Effect]) -> None:
        assert self._coordinator is not None
        for effect in effects:
            if isinstance(effect, M.Record):
                self._record(effect.verdict)
            elif isinstance(effect, M.StartWorkers):
                self._start_workers(effect.plan, effect.generation, effect.world)
            elif isinstance(effect, M.JoinWorld):
                self._join_world(effect.plan, effect.generation, effect.world)
            elif isinstance(effect, M.StartSpares):
                self._start_spares(effect.generation, effect.slots)
            elif isinstance(effect, M.KillWorker):
                self._workers.kill_slot(effect.slot, signal.SIGKILL)
            elif isinstance(effect, M.CheckPeers):
                threading.Thread(target=self._check_peers, args=(effect.nodes,),
                                 name="agent-check-peers", daemon=True).start()  # fmt: skip
            elif isinstance(effect, M.StopWorkers):
                grace = self.config.stop_grace if effect.grace is None else effect.grace
                self._workers.stop(0.0 if effect.fence else grace)
            elif isinstance(effect, M.PushWorld):
                self._push_world(effect.world, effect.leaving)
            elif isinstance(effect, M.PushFault):
                fault = effect.fault
                message = {"type": P.FAULT, "kind": fault.kind, "step": fault.step,
                           "at": fault.at, "factor": fault.factor,
                           "until": fault.until}  # fmt: skip
                assert self._sessions is not None
                self._sessions.push(WorkerKey(self._generation, effect.slot), message)
            elif isinstance(effect, M.Exit):
                if effect.flush and not self._coordinator.flush(_FLUSH_TIMEOUT_S):
                    logger.warning("agent %s: etcd writes still pending at exit",
                                   self.config.node_id)  # fmt: skip
                self.failure_report = effect.report
                self._exit_code = effect.code
            else:
                self._coordinator.apply(effect)

    def _record(self, verdict: M.Verdict) -> None:
        """Log a verdict, count it and store it as the job's event."""
        self.counters.count(verdict.action.value, verdict.details)
        level = (logging.WARNING if verdict.action is M.Action.RETRY
                 else logging.DEBUG if verdict.action is M.Action.ATTENTION  # every step
                 else logging.INFO)  # fmt: skip
        logger.log(level, "agent %s: %s (%s)", self.config.node_id, verdict.action.value,
                   verdict.reason)  # fmt: skip
        self.write_event(
            Event(
                verdict.action.value,
                self.config.node_id,
                time.time(),
                verdict.reason,
                verdict.details,
            )  # fmt: skip
        )

    def _new_start(self, plan: RoundPlan, generation: int, world: World) -> None:
        """Forget the previous start's workers: a round begins, or a running world is joined."""
        assert self._sessions is not None
        self._rounds += 1
        self._plan = plan
        self._world = world
        self._endpoints = {s.node_id: s.endpoint for s in plan.slots}
        self._generation = generation
        self._workers.reset()
        self._exiting_reported = set()
        self._sessions.forget(generation)
        self._mirrors.forget(generation)
        self._assignments = []
        if self.snapshots is not None:
            self.snapshots.new_round()

    def _join_world(self, plan: RoundPlan, generation: int, world: World) -> None:
        self._new_start(plan, generation, world)
        self._refresh_endpoints(world)

    def _check_peers(self, nodes: tuple[str, ...]) -> None:
        """Ask ``nodes``' agents (in parallel, each within a sixth of the TTL) how long etcd
        has been silent for them."""
        assert self._coordinator is not None
        endpoints = dict(self._endpoints)
        if self._plan is not None:
            endpoints = {s.node_id: s.endpoint for s in self._plan.slots} | endpoints
        ttl = self.config.node_ttl
        lease = self._coordinator.lease
        silent = lease.unconfirmed_s if lease is not None else 0.0
        answers: dict[str, float] = {}

        def ask(node: str) -> None:
            try:
                with AgentClient(endpoints[node], timeout=max(ttl / 6, 0.2)) as peer:
                    answers[node] = peer.get_status().etcd_silent_ms / 1000
            except (KeyError, AgentUnavailableError) as exc:
                logger.info("agent %s: %s did not say whether it reaches etcd: %s",
                            self.config.node_id, node, exc)  # fmt: skip

        askers = [threading.Thread(target=ask, args=(n,), daemon=True) for n in nodes]
        for thread in askers:
            thread.start()
        for thread in askers:
            thread.join(ttl / 6 + 0.5)
        fresher = any(s < silent - ttl / 3 for s in list(answers.values()))
        # another node reaches etcd: so may we, now that it is back (a refresh of ours can lag
        # one of theirs by a retry); only if this one fails too are we cut off
        if fresher and lease is not None and lease.refresh():
            silent = lease.unconfirmed_s
        self.post(M.PeersOnEtcd(nodes, silent, dict(answers)))

    def _refresh_endpoints(self, world: World) -> None:
        """The gRPC endpoints of the world's nodes (a node that joined in place, or came back
        with a new agent, is not in the round's slots): from the node registry."""
        assert self._coordinator is not None
        try:
            registered = {n.node_id: n.endpoint
                          for n in list_nodes(self._client, self._coordinator.keys)}  # fmt: skip
        except CoordinationUnavailableError as exc:
            logger.warning("agent %s: node endpoints not read: %s", self.config.node_id, exc)
            return
        self._endpoints = {**self._endpoints, **registered}

    def _start_workers(self, plan: RoundPlan, generation: int, world: World) -> None:
        cfg = self.config
        self._new_start(plan, generation, world)
        self._assignments = assign_worker_ranks(plan.slots, plan.group_rank)
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
            | self._agent_env(generation, a.local_rank)
            for a in self._assignments
        ]
        self._workers.start(
            [(a.local_rank, a, env) for a, env in zip(self._assignments, envs, strict=True)]
        )

    def _agent_env(self, generation: int, slot: int) -> dict[str, str]:
        """What every worker of this agent is told: how to reach it, and its session."""
        cfg = self.config
        assert self._sessions is not None
        return (
            {
                "ETRAIN_AGENT_ENDPOINT": self.endpoint,
                "ETRAIN_JOB_ID": cfg.job_id,
                "ETRAIN_NODE_ID": cfg.node_id,
            }
            | ({"ETRAIN_SNAPSHOT_DIR": cfg.snapshot_dir} if cfg.snapshot_dir else {})
            | {
                constants.ENV_SESSION_ADDRESS: self._sessions.env_address,
                constants.ENV_SESSION_TOKEN: self._sessions.expect(WorkerKey(generation, slot)),
                constants.ENV_ETCD: cfg.etcd,
            }
            | ({constants.ENV_DEVICE_MIRROR: "1"} if cfg.device_mirror else {})
        )

    def _start_spares(self, generation: int, slots: tuple[int, ...]) -> None:
        """Hot spares: torchrun's variables that do not depend on a rank (a spare's device
        is that of local rank ``slot mod nproc``); no RANK, WORLD_SIZE or MASTER_*: the
        ``Job`` is told its rank by the world that names it."""
        plan = self._plan
        if plan is None or generation != self._generation:
            return
        nproc = plan.slots[plan.group_rank].local_world_size
        envs = []
        for slot in slots:
            env = {
                "LOCAL_RANK": str(slot % nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "TORCHELASTIC_RESTART_COUNT": str(plan.restart_count),
                "TORCHELASTIC_MAX_RESTARTS": str(self.config.max_restarts),
                "TORCHELASTIC_RUN_ID": self.config.job_id,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                constants.ENV_SPARE: "1",
            } | self._agent_env(generation, slot)
            envs.append((slot, None, env))
        self._workers.start(envs)

    def _push_world(self, world: World, leaving: tuple[int, ...] = ()) -> None:
        """Every local worker of ``world`` hears its rank (survivors abort and re-form), and
        each ``leaving`` one that it holds none."""
        assert self._sessions is not None
        self._world = world
        self._refresh_endpoints(world)
        for slot in leaving:
            self._sessions.push(WorkerKey(self._generation, slot),
                                self._world_message(world, slot))  # fmt: skip
        for slot, rank in world.slots_on(self.config.node_id, self.incarnation).items():
            self._workers.set_assignment(slot, self._assignment_in(world, slot))
            if not self._sessions.push(WorkerKey(self._generation, slot),
                                       self._world_message(world, slot)):  # fmt: skip
                logger.warning("agent %s: rank %d (slot %d) did not take world epoch %d",
                               self.config.node_id, rank, slot, world.epoch)  # fmt: skip

    def _assignment_in(self, world: World, slot: int) -> WorkerAssignment | None:
        rank = world.rank_of(self.config.node_id, slot, self.incarnation)
        if rank is None:
            return None
        mine = world.slots_on(self.config.node_id, self.incarnation)
        nodes = world.nodes
        return WorkerAssignment(
            local_rank=sorted(mine).index(slot), global_rank=rank, role_rank=rank,
            world_size=world.size, role_world_size=world.size, local_world_size=len(mine),
            group_rank=nodes.index(self.config.node_id), group_world_size=len(nodes),
        )  # fmt: skip

    def _world_message(self, world: World, slot: int) -> dict:
        rank = world.rank_of(self.config.node_id, slot, self.incarnation)
        return {"type": P.WORLD, "round_id": world.round_id, "epoch": world.epoch,
                "rank": -1 if rank is None else rank, "world_size": world.size,
                "store": world.store_prefix, "etcd": self.config.etcd,
                "job_id": self.config.job_id, "after_step": world.after_step}  # fmt: skip

    # -- session requests (from the session server's pool) ---------------------------------------

    def _current_world(self, key: WorkerKey, request: dict) -> dict:
        """The caller's place in the current world (rank -1: not a member, e.g. a spare)."""
        world = self._world
        if world is None or key.generation != self._generation:
            raise SnapshotError("no world for this worker")
        return {"world": self._world_message(world, key.slot)}

    def _truncate_snapshots(self, key: WorkerKey, request: dict) -> dict:
        assert self.snapshots is not None
        dropped = self.snapshots.truncate(int(request["after_step"]), int(request["epoch"]))
        return {"dropped": dropped}

    def _snapshot_segments(self, key: WorkerKey, request: dict) -> dict:
        """The segments that hold (or will hold) this node's records: a hot spare maps and
        page-locks them ahead of a restore."""
        assert self.snapshots is not None
        return {"segments": self.snapshots.store.segment_names()}

    def _offer_mirror(self, key: WorkerKey, request: dict) -> dict:
        """A warm spare offers its device mirror slots to the worker on its GPU."""
        offer = request.get("offer")
        if not isinstance(offer, dict) or not isinstance(offer.get("device"), str):
            raise SnapshotError("a mirror offer needs its device")
        self._mirrors.offer(key, offer["device"], offer)
        return {}

    def _claim_mirror(self, key: WorkerKey, request: dict) -> dict:
        """The mirror a worker writes into (None: none, or stop)."""
        return {"offer": self._mirrors.claim(key, str(request.get("device")), self._alive)}

    def _withdraw_mirror(self, key: WorkerKey, request: dict) -> dict:
        """A spare that takes a rank ends its offer; is a live worker still writing into it?"""
        return {"feeder_alive": self._mirrors.withdraw(key, self._alive)}

    def _alive(self, key: WorkerKey) -> bool:
        assert self._sessions is not None
        return key.generation == self._generation and self._sessions.pid_of(key) is not None

    def _begin_snapshot(self, key: WorkerKey, request: dict) -> dict:
        rank, step, nbytes = int(request["rank"]), int(request["step"]), int(request["nbytes"])
        if self.snapshots is None:
            raise SnapshotError("the agent is not set up yet")
        problem = record_request_problem(
            rank, step, nbytes,
            worker_rank=self._workers.rank_of(key.slot) if key.generation == self._generation
            else None,
            newest=self.snapshots.newest_step(), max_bytes=self.snapshots.record_budget(),
        )  # fmt: skip
        if problem:
            raise SnapshotError(f"slot {key.slot}: {problem}")
        record = self.snapshots.begin(rank, step, nbytes)
        with self._lock:
            self._begun[(step, rank)] = key
            while len(self._begun) > _BEGUN_KEPT:
                self._begun.pop(next(iter(self._begun)))
        return {"segment": record.segment.name, "shm_dir": shm_dir()}

    def _end_snapshot(self, key: WorkerKey, request: dict) -> dict:
        rank, step = int(request["rank"]), int(request["step"])
        with self._lock:
            began = self._begun.get((step, rank))
        if began != key:
            raise SnapshotError(f"slot {key.slot} did not begin the record of rank {rank} "
                                f"step {step}")  # fmt: skip
        meta = P.unb64(str(request["meta"]))
        committed = self._snapshot_call(self.snapshots.end, rank, step, meta)
        return {"committed": bool(committed)}

    def _snapshot_call(self, fn, *args):
        if self.snapshots is None:
            raise SnapshotError("the agent is not set up yet")
        return fn(*args)

    def _round_view(self) -> RoundView:
        """The current world as the snapshot coordinator needs it: the nodes that hold ranks
        and the ranks this node holds."""
        plan, world = self._plan, self._world
        if plan is None or world is None:
            return RoundView()
        return RoundView(
            members=world.nodes,
            endpoints=dict(self._endpoints),
            local_ranks=frozenset(world.slots_on(self.config.node_id, self.incarnation).values()),
        )

    def _teardown(self) -> None:
        self._stopping = True
        self.chaos.close()
        try:
            self._workers.stop(self.config.stop_grace)
        except Exception:
            logger.exception("stopping workers failed")
        if self._sessions is not None:
            self._sessions.close()
        if self.snapshots is not None:
            self.snapshots.close(save=True)
        if self._coordinator is not None:
            self._coordinator.close()
        if self._server is not None:
            self._server.stop(grace=0.5)
        if self.metrics is not None:
            self.metrics.close()
        if self._client is not None:
            self._client.close()

    def _metrics_text(self) -> str:
        latest = self._status_out.latest if self._status_out is not None else None
        return render_metrics(self.config.job_id, latest, self.counters.copy())


def print_failure_report(report: str) -> None:
    if report:
        print(report, file=sys.stderr, flush=True)
