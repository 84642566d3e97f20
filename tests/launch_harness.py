"""Starts real `etrain launch` agents (and torchrun) as subprocesses for the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent / "scripts"
DDP_SCRIPT = SCRIPTS / "ddp_train.py"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)


@dataclass
class Cluster:
    """Processes started by one test; all of them are killed (with their groups) at the end."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=full_env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def agent(
        self,
        name: str,
        *,
        etcd: str | None,
        job_id: str,
        nnodes: str = "2",
        nproc: int = 2,
        max_restarts: int = 1,
        extra: list[str] | None = None,
        script_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        script: Path = DDP_SCRIPT,
        host=None,
    ) -> Proc:
        """An agent of ``job_id``; with ``host`` (a :class:`netns_hosts.Host`), run inside that
        host on its address."""
        if host is not None:
            extra = ["--local-addr", host.address, *(extra or [])]
            env = {**host.env, **(env or {})}
        argv = [sys.executable, "-m", "elastictrain.cli.main", "launch",
                "--nnodes", nnodes, "--nproc-per-node", str(nproc),
                "--max-restarts", str(max_restarts), "--job-id", job_id, "--node-id", name,
                "--node-ttl", "3", "--rdzv-conf", "last_call_timeout=1",
                *(["--etcd", etcd] if etcd else []), *(extra or []),
                str(script), *(script_args or [])]  # fmt: skip
        return self.start(name, host.wrap(argv) if host is not None else argv, env)

    def close(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)


def ddp_args(workdir: Path, epochs: int, sleep: float = 0.0) -> list[str]:
    return ["--epochs", str(epochs), "--ckpt", str(workdir / "ckpt.pt"),
            "--out", str(workdir / "final.pt"), "--sleep", str(sleep)]  # fmt: skip


def checkpoint_epoch(workdir: Path) -> int:
    path = workdir / "ckpt.pt"
    try:
        return int(torch.load(path, map_location="cpu")["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def wait_until(predicate, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def committed_step(client, job_id: str) -> int:
    """The job's newest committed snapshot step in etcd (-1: none yet)."""
    import json

    from elastictrain.coord.keys import JobKeys

    kv = client.get(JobKeys(job_id).snapshot_committed)
    return int(json.loads(kv.value)["step"]) if kv is not None else -1


def process_alive(pid: int) -> bool:
    """The process runs (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def torchrun_reference(workdir: Path, script: Path, steps: int, nproc: int = 4):
    """The final parameters of ``script`` under plain torchrun (one node, ``nproc``
    workers, ``--steps``/``--out`` arguments): the fault-free run to compare against."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(script), "--steps", str(steps), "--out", str(workdir / "final.pt")]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return load_params(workdir / "final.pt")


def job_credentials(job_id: str):
    """The credentials the job's agents made on this machine (in ETRAIN_RUNTIME_DIR)."""
    from elastictrain import constants
    from elastictrain.credentials import JobCredentials

    return JobCredentials.load(Path(constants.runtime_dir()) / job_id / "credentials")


def load_params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"parameter {key} differs"
