"""The agent's configuration, validated when built."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from elastictrain import constants
from elastictrain.coord.keys import validate_name
from elastictrain.errors import ConfigError
from elastictrain.snapshot.erasure import ErasureScheme

from .effects import FaultPlan


def parse_fault(text: str) -> FaultPlan:
    """``KIND:rank=R:step=S[:at=reform]`` (``--fault``): KIND is kill, stop or kill-agent;
    ``slow:rank=R:step=S:factor=F[:until=E]`` slows rank R's compute F times from step S to
    step E (exclusive; default: to the end)."""
    usage = (f"--fault {text!r}: expected KIND:rank=R:step=S[:at=reform] or "
             "slow:rank=R:step=S:factor=F[:until=E]")  # fmt: skip
    kind, *fields = text.split(":")
    values: dict[str, int] = {}
    at, factor = "step", 0.0
    for item in fields:
        key, sep, raw = item.partition("=")
        if key == "at" and sep and raw in FaultPlan.MOMENTS:
            at = raw
            continue
        if key == "factor" and sep and kind == "slow":
            try:
                factor = float(raw)
            except ValueError:
                raise ConfigError(f"{usage}: factor {raw!r} is not a number") from None
            if not 1 < factor <= 1000:
                raise ConfigError(f"{usage}: factor must be > 1 and <= 1000")
            continue
        allowed = ("rank", "step", "until") if kind == "slow" else ("rank", "step")
        if not sep or key not in allowed or not raw.isdigit():
            raise ConfigError(usage)
        values[key] = int(raw)
    if kind not in FaultPlan.KINDS or not {"rank", "step"} <= set(values):
        raise ConfigError(f"{usage} with KIND one of {', '.join(FaultPlan.KINDS)}")
    until = values.get("until", -1)
    if kind == "slow" and (not factor or at != "step" or 0 <= until <= values["step"]):
        raise ConfigError(f"{usage}: a slowdown needs a factor, and until after step")
    return FaultPlan(kind, values["rank"], values["step"], at, factor, until)


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` (torchrun's ``--nnodes``)."""
    parts = text.split(":")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--nnodes {text!r}: expected N or MIN:MAX with positive integers")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1:
        raise ConfigError(f"--nnodes {text!r}: the minimum must be at least 1")
    if low > high:
        raise ConfigError(f"--nnodes {text!r}: MIN ({low}) is greater than MAX ({high})")
    return low, high


@dataclass
class RendezvousConfig:
    """Timeouts (seconds) of the join (:class:`~elastictrain.rendezvous.join.JoinPolicy`)."""

    join_timeout: int = constants.DEFAULT_JOIN_TIMEOUT_S
    last_call_timeout: int = constants.DEFAULT_LAST_CALL_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.join_timeout < 1:
            raise ConfigError(f"rendezvous join_timeout must be >= 1 s, got {self.join_timeout}")
        if self.last_call_timeout < 0:
            raise ConfigError(
                f"rendezvous last_call_timeout must be >= 0, got {self.last_call_timeout}"
            )


@dataclass
class AgentConfig:
    """What one node's agent runs and how.

    ``entrypoint`` is the program the workers execute and ``args`` its arguments: for a
    Python script torchrun-style, ``entrypoint=sys.executable`` and ``args=["-u", script, ...]``.
    """

    entrypoint: str
    args: list[str]
    etcd: str
    job_id: str = constants.DEFAULT_JOB_ID
    node_id: str = field(default_factory=socket.gethostname)
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    max_restarts: int = 0
    node_ttl: int = constants.DEFAULT_NODE_TTL_S
    monitor_interval: float = constants.DEFAULT_MONITOR_INTERVAL_S
    membership_poll_interval: float = 1.0
    stop_grace: float = constants.DEFAULT_STOP_GRACE_S
    drain_timeout: float = constants.DEFAULT_DRAIN_TIMEOUT_S  # SIGTERM / etrain drain
    metrics_port: int | None = None  # Prometheus endpoint (None: none; 0: any free port)
    coordination_timeout: float = constants.DEFAULT_COORDINATION_TIMEOUT_S
    hang_timeout: float = constants.DEFAULT_HANG_TIMEOUT_S  # 0: never declare a hang
    log_dir: str | None = None
    redirects: str = "0"
    tee: str = "0"
    local_addr: str = "127.0.0.1"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    gpus: int = 0
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    snapshot_scheme: ErasureScheme | None = None  # None: chosen from the node count
    snapshot_dir: str | None = None  # disk tier root (one subdirectory per node)
    snapshot_disk_every: int = 0  # write every N committed snapshots (0: on demand, at exit)
    snapshot_memory_limit: int = 0  # bytes of records this agent may hold (0: unbounded)
    faults: list[FaultPlan] = field(default_factory=list)  # injected by rank and step (chaos)
    hot_spares: int = 0  # idle workers per node that take a lost rank (in place only)
    device_mirror: bool = False  # a spare on a worker's GPU keeps its state there every step
    credentials_dir: str | None = None  # the job's CA, certificate and token (None: insecure)

    def __post_init__(self) -> None:
        validate_name("job id", self.job_id)
        validate_name("node id", self.node_id)
        if self.min_nodes < 1 or self.min_nodes > self.max_nodes:
            raise ConfigError(
                f"nnodes: need 1 <= MIN <= MAX, got {self.min_nodes}:{self.max_nodes}"
            )
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.node_ttl < 1:
            raise ConfigError(f"--node-ttl must be >= 1 s, got {self.node_ttl}")
        if self.monitor_interval <= 0:
            raise ConfigError(f"--monitor-interval must be > 0, got {self.monitor_interval}")
        if not 0 <= self.grpc_port < 65536:
            raise ConfigError(f"--agent-port {self.grpc_port} is out of range 0..65535")
        if self.snapshot_memory_limit < 0:
            raise ConfigError("--snapshot-memory-limit must be >= 0")
        if self.snapshot_disk_every < 0:
            raise ConfigError(f"--snapshot-disk-every must be >= 0, got {self.snapshot_disk_every}")
        if self.hot_spares < 0:
            raise ConfigError(f"--hot-spares must be >= 0, got {self.hot_spares}")
        if self.device_mirror and not self.hot_spares:
            raise ConfigError("--device-mirror needs --hot-spares (the spares hold the mirrors)")
        if self.hang_timeout < 0:
            raise ConfigError(f"--hang-timeout must be >= 0 s, got {self.hang_timeout}")
        if self.coordination_timeout <= 0:
            raise ConfigError(
                f"coordination timeout must be > 0 s, got {self.coordination_timeout}"
            )
        if self.stop_grace < 0:
            raise ConfigError(f"stop grace must be >= 0 s, got {self.stop_grace}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: not a port (0-65535)")
        if not 0 < self.drain_timeout < float("inf"):
            raise ConfigError(f"--drain-timeout must be > 0 s, got {self.drain_timeout}")
