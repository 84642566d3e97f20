"""Starts, watches and stops one node's worker processes (a thin executor).

Processes are started by torch's ``start_processes`` (per-rank log files, ``@record`` error
files). Each worker is started through a tiny exec shim that asks the kernel to SIGKILL it if
the agent dies (so a SIGKILLed agent never leaves workers hung in a collective), then
connects the worker's session with the agent and says hello, before the real program
starts: the session's descriptor is one of the lowest, so the kernel closes it first when the
process dies, long before the process can be reaped.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std, start_processes
from torch.distributed.elastic.multiprocessing.api import PContext, RunProcsResult
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from elastictrain.constants import ENV_SESSION_ADDRESS, ENV_SESSION_FD, ENV_SESSION_TOKEN
from elastictrain.session.protocol import VERSION as PROTOCOL_VERSION

from .plan import LocalState, WorkerAssignment

logger = logging.getLogger(__name__)

# PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL to this process when its parent thread exits.
# It survives execve, so the real program inherits it. If the parent is already gone, exit.
# Then, given a session address, connect it, say hello and hand the descriptor down.
_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,9)\n"
    "os.getppid()==int(sys.argv[1]) or os._exit(137)\n"
    f"a=os.environ.pop('{ENV_SESSION_ADDRESS}','')\n"
    "if a:\n"
    " import json,socket,struct\n"
    " s=socket.socket(socket.AF_UNIX)\n"
    " try:\n"
    "  s.connect(chr(0)+a[1:] if a[0]=='@' else a)\n"
    f"  b=json.dumps({{'type':'hello','version':{PROTOCOL_VERSION},'pid':os.getpid(),"
    f"'token':os.environ.pop('{ENV_SESSION_TOKEN}','')}}).encode()\n"
    "  s.sendall(struct.pack('>I',len(b))+b)\n"
    "  s.set_inheritable(True)\n"
    f"  os.environ['{ENV_SESSION_FD}']=str(s.fileno())\n"
    " except OSError as e:\n"
    "  print('etrain: no session with the agent:',e,file=sys.stderr)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)

# /proc/<pid>/stat flags: the kernel sets PF_EXITING as soon as a process starts to die.
_PF_EXITING = 0x4


def with_parent_death_signal(command: list[str]) -> list[str]:
    """``command`` wrapped so it is killed when the calling process dies, and connects its
    session when ``$ETRAIN_SESSION_ADDRESS`` is set (Linux only)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _SHIM, str(os.getpid()), *command]


def is_exiting(pid: int) -> bool:
    """The process is dying or dead but not reaped (or gone): its end has begun."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return True
    state, flags = fields[0], int(fields[6])
    return state in (b"Z", b"X") or bool(flags & _PF_EXITING)


@dataclass
class WorkerInfo:
    assignment: WorkerAssignment
    pid: int
    state: str = "RUNNING"
    exit_code: int | None = None


class WorkerGroup:
    """One attempt's workers on this node.

    Thread-safety: :meth:`start`, :meth:`poll` and :meth:`stop` are called from the agent's main
    thread (the workers' parent-death signal is tied to the thread that forks them);
    :meth:`snapshot` and :meth:`kill` may be called from gRPC threads.
    """

    def __init__(
        self,
        name: str,
        entrypoint: str,
        args: list[str],
        log_dir: str | None,
        redirects: str = "0",
        tee: str = "0",
    ) -> None:
        self.name = name
        self.entrypoint = entrypoint
        self.args = list(args)
        self._logs_specs = DefaultLogsSpecs(
            log_dir=log_dir, redirects=Std.from_str(redirects), tee=Std.from_str(tee)
        )
        self._pcontext: PContext | None = None
        self._workers: list[WorkerInfo] = []
        self._lock = threading.Lock()
        self.result: RunProcsResult | None = None

    def start(self, assignments: list[WorkerAssignment], envs: list[dict[str, str]]) -> None:
        if self._pcontext is not None:
            raise RuntimeError("workers already running; stop them first")
        command = with_parent_death_signal([self.entrypoint, *self.args])
        args = {a.local_rank: tuple(command[1:]) for a in assignments}
        env_map = {a.local_rank: env for a, env in zip(assignments, envs, strict=True)}
        self.result = None
        self._pcontext = start_processes(
            name=self.name,
            entrypoint=command[0],
            args=args,
            envs=env_map,
            logs_specs=self._logs_specs,
        )
        pids = self._pcontext.pids()
        with self._lock:
            self._workers = [WorkerInfo(a, pids[a.local_rank]) for a in assignments]
        logger.info("started workers %s", {w.assignment.global_rank: w.pid for w in self._workers})

    @property
    def running(self) -> bool:
        return self._pcontext is not None

    def poll(self) -> LocalState:
        """Reap exited workers without blocking; the local verdict for this attempt."""
        if self._pcontext is None:
            if self.result is not None and self.result.is_failed():
                return LocalState.FAILED
            return LocalState.SUCCEEDED if self.result is not None else LocalState.RUNNING
        result = self._pcontext.wait(timeout=0)
        self._refresh_exit_codes()
        if result is None:
            return LocalState.RUNNING
        self.result = result
        self._pcontext.close()  # close log tails; processes are done or being killed
        self._pcontext = None
        self._record_result(result)
        return LocalState.FAILED if result.is_failed() else LocalState.SUCCEEDED

    def exiting(self) -> list[int]:
        """Local ranks of workers whose process has begun to die (not yet reaped)."""
        with self._lock:
            running = [w for w in self._workers if w.exit_code is None]
        return [w.assignment.local_rank for w in running if is_exiting(w.pid)]

    def _refresh_exit_codes(self) -> None:
        pcontext = self._pcontext
        handlers = getattr(pcontext, "subprocess_handlers", {}) if pcontext else {}
        with self._lock:
            for worker in self._workers:
                handler = handlers.get(worker.assignment.local_rank)
                code = handler.proc.poll() if handler is not None else None
                if code is not None and worker.exit_code is None:
                    worker.exit_code = code
                    worker.state = "SUCCEEDED" if code == 0 else "FAILED"

    def _record_result(self, result: RunProcsResult) -> None:
        with self._lock:
            for worker in self._workers:
                failure = result.failures.get(worker.assignment.local_rank)
                if failure is not None:
                    worker.exit_code, worker.state = failure.exitcode, "FAILED"
                elif worker.exit_code is None:
                    worker.exit_code, worker.state = 0, "SUCCEEDED"

    def stop(self, grace: float) -> None:
        """SIGTERM every worker, SIGKILL after ``grace`` seconds; returns when all are reaped."""
        pcontext, self._pcontext = self._pcontext, None
        if pcontext is None:
            return
        started = time.monotonic()
        pcontext.close(death_sig=signal.SIGTERM, timeout=max(int(round(grace)), 0))
        with self._lock:
            for worker in self._workers:
                if worker.exit_code is None:
                    worker.state = "STOPPED"
        logger.info("stopped workers in %.2f s", time.monotonic() - started)

    def failure_report(self) -> str:
        """torchrun's failure report (root cause first, with the worker's traceback)."""
        if self.result is None or not self.result.failures:
            return ""
        by_rank: dict[int, ProcessFailure] = {}
        with self._lock:
            ranks = {w.assignment.local_rank: w.assignment.global_rank for w in self._workers}
        for local_rank, failure in self.result.failures.items():
            by_rank[ranks.get(local_rank, local_rank)] = failure
        return ChildFailedError(name=self.name, failures=by_rank).format_msg()

    def snapshot(self) -> list[WorkerInfo]:
        with self._lock:
            return [WorkerInfo(w.assignment, w.pid, w.state, w.exit_code) for w in self._workers]

    def kill(self, global_rank: int, sig: int = signal.SIGKILL) -> WorkerInfo | None:
        """Send ``sig`` to the local worker with this global rank; None if it is not ours."""
        with self._lock:
            target = next(
                (w for w in self._workers if w.assignment.global_rank == global_rank), None
            )
        if target is None or target.exit_code is not None:
            return None
        try:
            os.kill(target.pid, sig)
        except ProcessLookupError:
            return None
        logger.warning(
            "injected fault: signal %d to rank %d (pid %d)", sig, global_rank, target.pid
        )
        return target
