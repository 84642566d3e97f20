"""Environment variable names and defaults, each next to its default."""

from __future__ import annotations

import os
import tempfile

# Path of the etcd server binary for the embedded default (else `etcd` on PATH).
ENV_ETCD_BIN = "ETRAIN_ETCD_BIN"

# Where local jobs publish their embedded etcd endpoint so that a second local agent,
# `etrain status` and `etrain chaos` find it by job id.
ENV_RUNTIME_DIR = "ETRAIN_RUNTIME_DIR"
# Default: private to the user ($XDG_RUNTIME_DIR/etrain, else <tmp>/etrain-<uid>), mode 0700.
DEFAULT_RUNTIME_DIR = (
    os.path.join(os.environ["XDG_RUNTIME_DIR"], "etrain") if os.environ.get("XDG_RUNTIME_DIR")
    else os.path.join(tempfile.gettempdir(), f"etrain-{os.getuid()}")
)  # fmt: skip

# The job id when none is given (torchrun's --rdzv-id default is "none").
DEFAULT_JOB_ID = "default"

# Root of every key this project writes in etcd.
KEY_ROOT = "/etrain"

# Seconds a node's registration outlives its agent (lease TTL): how fast a lost node is seen.
DEFAULT_NODE_TTL_S = 5

# The longest one etcd request may take before it is tried again (on another member, if the
# cluster has several): a request that reached a leader as it died is never answered. A
# shorter one would retry more requests whose first attempt may have taken effect.
ETCD_REQUEST_TIMEOUT_S = 5.0

# Rendezvous defaults (seconds).
DEFAULT_JOIN_TIMEOUT_S = 600
DEFAULT_LAST_CALL_TIMEOUT_S = 2
# No heartbeats: a node's join key lives under its lease and goes with it.

# How often the agent checks its workers and the rendezvous (seconds).
DEFAULT_MONITOR_INTERVAL_S = 0.1

# A worker's session with its agent (set by the agent and the worker's exec shim).
ENV_SESSION_ADDRESS = "ETRAIN_SESSION_ADDRESS"  # the agent's socket ("@name": abstract)
ENV_SESSION_TOKEN = "ETRAIN_SESSION_TOKEN"  # this worker's one-time token
ENV_SESSION_FD = "ETRAIN_SESSION_FD"  # the connected session, handed to the program
ENV_ETCD = "ETRAIN_ETCD"  # the job's etcd (in-place worlds meet in its store)
ENV_SPARE = "ETRAIN_SPARE"  # "1": a hot spare (no rank until a world names it)
# "1": a hot spare on a worker's GPU holds a copy of its state there, updated every step
ENV_DEVICE_MIRROR = "ETRAIN_DEVICE_MIRROR"
# How often a worker asks its agent for a spare's device mirror to write into (seconds).
MIRROR_POLL_S = 2.0

# Seconds without a progress report after which a reporting worker counts as hung (0: never).
DEFAULT_HANG_TIMEOUT_S = 300.0

# How long the agent rides out an unreachable etcd before it gives up (seconds).
DEFAULT_COORDINATION_TIMEOUT_S = 60.0

# Grace between SIGTERM and SIGKILL when workers are stopped for a restart (seconds).
DEFAULT_STOP_GRACE_S = 3.0
# How long a drained node (SIGTERM, ``etrain drain``) may take to leave; torchrun SIGKILLs its
# workers 30 s after a SIGTERM, hard-coded.
DEFAULT_DRAIN_TIMEOUT_S = 30.0


def runtime_dir() -> str:
    return os.environ.get(ENV_RUNTIME_DIR, DEFAULT_RUNTIME_DIR)


# Uncommitted snapshot steps an agent keeps per rank, and so the steps a worker may have in
# flight (one being copied, one being checksummed by the agent, one just begun).
MAX_PENDING_SNAPSHOTS = 3

# Threads that checksum snapshot records: in the agent (every record a worker ends) and in a
# worker that restores (what it reads). Default: the CPUs, at most 8.
ENV_SNAPSHOT_THREADS = "ETRAIN_SNAPSHOT_THREADS"
MAX_DEFAULT_SNAPSHOT_THREADS = 8


def snapshot_threads() -> int:
    raw = os.environ.get(ENV_SNAPSHOT_THREADS)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{ENV_SNAPSHOT_THREADS} must be an int >= 1, got {raw!r}")
        return value
    return max(1, min(MAX_DEFAULT_SNAPSHOT_THREADS, os.cpu_count() or 1))

# The agent's gRPC server: threads, calls at once (more are refused), streams at once (a
# stream holds a thread: fewer than the threads, so unary calls always find one), how long a
# stream may move no message, and the largest message either way.
RPC_THREADS = 64
RPC_MAX_CONCURRENT = 56
RPC_MAX_STREAMS = 32
RPC_STREAM_IDLE_S = 10.0
RPC_MAX_MESSAGE_BYTES = 8 << 20
# Bytes of peers' chunks an agent holds and receives at once when --snapshot-memory-limit is
# not given: this fraction of the machine's memory.
DEFAULT_CHUNK_MEMORY_FRACTION = 0.5
# A worker's record may be at most this many steps past the newest step its agent knows of.
RECORD_STEP_WINDOW = 10_000
# The job's credentials directory (CA, agent certificate and key, token), handed to workers.
ENV_CREDENTIALS = "ETRAIN_CREDENTIALS"
# A secured etcd: its CA, a client certificate and key, a user and a file with the password
# (set by `etrain launch --etcd-*`, inherited by every process of the job).
ENV_ETCD_CACERT = "ETRAIN_ETCD_CACERT"
ENV_ETCD_CERT = "ETRAIN_ETCD_CERT"
ENV_ETCD_KEY = "ETRAIN_ETCD_KEY"
ENV_ETCD_USER = "ETRAIN_ETCD_USER"
ENV_ETCD_PASSWORD_FILE = "ETRAIN_ETCD_PASSWORD_FILE"

# A node's status record in etcd is written at most this often (and only when it changed)
STATUS_INTERVAL_S = 0.5

# Stragglers: how a CPU rank times its compute. "wall" (perf_counter: a rank that shares its
# cores is seen as slow) or "thread" (the training thread's CPU time: only more work per
# sample or a slower clock is seen; for hosts that run more ranks than they have cores)
ENV_COMPUTE_CLOCK = "ETRAIN_COMPUTE_CLOCK"
COMPUTE_CLOCKS = ("wall", "thread")
