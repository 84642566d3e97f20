"""Starts, watches and stops one node's worker processes (a thin executor).

Processes are started by torch's ``start_processes`` (per-rank log files, ``@record`` error
files). Each worker is started through a tiny exec shim that asks the kernel to SIGKILL it if
the agent dies (so a SIGKILLed agent never leaves workers hung in a collective), then
connects the worker's session with the agent and says hello, before the real program
starts: the session's descriptor is one of the lowest, so the kernel closes it first when the
process dies, long before the process can be reaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing import Std, start_processes
from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, PContext, to_map
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from elastictrain.constants import ENV_SESSION_ADDRESS, ENV_SESSION_FD, ENV_SESSION_TOKEN
from elastictrain.leftovers import die_with_parent
from elastictrain.session.protocol import VERSION as PROTOCOL_VERSION

from .plan import WorkerAssignment

logger = logging.getLogger(__name__)

# Run in the wrapper that dies with the agent (leftovers.die_with_parent): given a session
# address, connect it, say hello and hand the descriptor down.
_CONNECT_SESSION = (
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
)

# /proc/<pid>/stat flags: the kernel sets PF_EXITING as soon as a process starts to die.
_PF_EXITING = 0x4


def with_parent_death_signal(command: list[str]) -> list[str]:
    """``command`` wrapped so it is killed when the calling process dies, and connects its
    session when ``$ETRAIN_SESSION_ADDRESS`` is set (Linux only)."""
    return die_with_parent(command, _CONNECT_SESSION)


def is_exiting(pid: int) -> bool:
    """The process is dying or dead but not reaped (or gone): its end has begun."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return True
    state, flags = fields[0], int(fields[6])
    return state in (b"Z", b"X") or bool(flags & _PF_EXITING)


class WorkerLogs(LogsSpecs):
    """Where one worker's output goes: ``<log dir>/<run>/attempt_<n>/<slot>/`` (stdout.log,
    stderr.log, error.json), as torchrun lays out local ranks, though each worker's process
    context (torch's, which wants local ranks ``0..n-1``) knows it as local rank 0."""

    def __init__(self, run_dir: str, redirects: Std, tee: Std, slot: int) -> None:
        super().__init__(run_dir, redirects, tee)
        self._run_dir = run_dir
        self._slot = slot

    @property
    def root_log_dir(self) -> str:
        return self._run_dir

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        env = envs[0]
        attempt = os.path.join(
            self._run_dir, f"attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        )
        folder = os.path.join(attempt, str(self._slot))
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        redirects, tee = to_map(self._redirects, 1)[0], to_map(self._tee, 1)[0]
        redirects |= tee  # a tee reads the file it is redirected to
        stdout = os.path.join(folder, "stdout.log") if redirects & Std.OUT else ""
        stderr = os.path.join(folder, "stderr.log") if redirects & Std.ERR else ""
        error_file = os.path.join(folder, "error.json")
        env["TORCHELASTIC_ERROR_FILE"] = error_file
        return LogsDest(
            {0: stdout}, {0: stderr},
            {0: stdout} if tee & Std.OUT else {}, {0: stderr} if tee & Std.ERR else {},
            {0: error_file}, "", "",
        )  # fmt: skip


@dataclass
class WorkerInfo:
    """One worker process. ``slot`` is its id on this node: round workers have slots
    ``0 .. nproc-1`` (their local ranks); hot spares come after."""

    slot: int
    assignment: WorkerAssignment | None  # None: a spare (no rank yet)
    pid: int
    state: str = "RUNNING"
    exit_code: int | None = None


@dataclass(frozen=True)
class WorkerExit:
    slot: int
    exit_code: int
    failure: ProcessFailure | None  # with the error file's traceback, when it failed


# torch's process context installs handlers that raise on these (a traceback): the agent's
# own stay (SIGTERM drains, SIGINT stops), the others keep their defaults
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@contextlib.contextmanager
def _own_signal_handlers():
    """Put back the process's signal handlers after torch's ``start_processes`` set its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)


class WorkerGroup:
    """This node's worker processes, each in a process context of its own, so one worker's
    exit never takes the others down (torch's context stops them all on a failure; the
    agent's machine decides that instead).

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
        base = log_dir or tempfile.mkdtemp(prefix="torchelastic_")
        os.makedirs(base, exist_ok=True)
        self._run_dir = tempfile.mkdtemp(prefix=f"{name}_", dir=base)
        self._redirects, self._tee = Std.from_str(redirects), Std.from_str(tee)
        self._contexts: dict[int, PContext] = {}  # slot -> its running process's context
        self._workers: dict[int, WorkerInfo] = {}
        self._failures: dict[int, ProcessFailure] = {}
        self._lock = threading.Lock()

    def start(self, workers: list[tuple[int, WorkerAssignment | None, dict[str, str]]]) -> None:
        """Start processes for ``(slot, assignment or None for a spare, env)``."""
        command = with_parent_death_signal([self.entrypoint, *self.args])
        for slot, assignment, env in workers:
            if slot in self._contexts:
                raise RuntimeError(f"worker slot {slot} is already running")
            with _own_signal_handlers():
                context = start_processes(
                    name=self.name,
                    entrypoint=command[0],
                    args={0: tuple(command[1:])},
                    envs={0: env},
                    logs_specs=WorkerLogs(self._run_dir, self._redirects, self._tee, slot),
                )
            self._contexts[slot] = context
            with self._lock:
                self._workers[slot] = WorkerInfo(slot, assignment, context.pids()[0])
        logger.info("started workers %s", {
            (w.assignment.global_rank if w.assignment else f"spare {w.slot}"): w.pid
            for w in self.snapshot() if w.exit_code is None
        })  # fmt: skip

    def reset(self) -> None:
        """Forget exited workers (a new round's start)."""
        if self._contexts:
            raise RuntimeError("workers still running; stop them first")
        with self._lock:
            self._workers.clear()
        self._failures.clear()

    @property
    def running(self) -> bool:
        return bool(self._contexts)

    def poll(self) -> list[WorkerExit]:
        """Reap exited workers without blocking: each one once."""
        exits = []
        for slot, context in list(self._contexts.items()):
            result = context.wait(timeout=0)
            if result is None:
                continue
            context.close()  # close its log tails
            del self._contexts[slot]
            failure = result.failures.get(0)
            code = failure.exitcode if failure is not None else 0
            if failure is not None:
                failure.local_rank = slot
                self._failures[slot] = failure
            with self._lock:
                worker = self._workers[slot]
                worker.exit_code = code
                worker.state = "SUCCEEDED" if code == 0 else "FAILED"
            exits.append(WorkerExit(slot, code, failure))
        return exits

    def exiting(self) -> list[int]:
        """Slots of workers whose process has begun to die (not yet reaped)."""
        with self._lock:
            running = [w for w in self._workers.values() if w.exit_code is None]
        return [w.slot for w in running if is_exiting(w.pid)]

    def stop(self, grace: float) -> None:
        """SIGTERM every worker, SIGKILL after ``grace`` seconds; returns when all are reaped."""
        contexts, self._contexts = self._contexts, {}
        if not contexts:
            return
        started = time.monotonic()
        for context in contexts.values():
            for handler in context.subprocess_handlers.values():
                if handler.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(handler.proc.pid, signal.SIGTERM)
        for context in contexts.values():
            left = max(grace - (time.monotonic() - started), 0.0)
            context.close(death_sig=signal.SIGTERM, timeout=int(round(left)))
        with self._lock:
            for worker in self._workers.values():
                if worker.exit_code is None:
                    worker.state = "STOPPED"
        logger.info("stopped workers in %.2f s", time.monotonic() - started)

    def failure_report(self, slots: list[int] | None = None) -> str:
        """torchrun's failure report (root cause first, with the worker's traceback) of the
        workers that failed (of ``slots``, if given)."""
        with self._lock:
            ranks = {s: (w.assignment.global_rank if w.assignment else s)
                     for s, w in self._workers.items()}  # fmt: skip
        failures = {ranks.get(slot, slot): failure for slot, failure in self._failures.items()
                    if slots is None or slot in slots}  # fmt: skip
        if not failures:
            return ""
        return ChildFailedError(name=self.name, failures=failures).format_msg()

    def snapshot(self) -> list[WorkerInfo]:
        with self._lock:
            return [WorkerInfo(w.slot, w.assignment, w.pid, w.state, w.exit_code)
                    for w in self._workers.values()]  # fmt: skip

    def rank_of(self, slot: int) -> int | None:
        """The global rank a running worker holds now (None: none, or not running)."""
        with self._lock:
            worker = self._workers.get(slot)
        if worker is None or worker.exit_code is not None or worker.assignment is None:
            return None
        return worker.assignment.global_rank

    def pid_of(self, slot: int) -> int | None:
        with self._lock:
            worker = self._workers.get(slot)
        return worker.pid if worker is not None and worker.exit_code is None else None

    def kill_slot(self, slot: int, sig: int = signal.SIGKILL) -> WorkerInfo | None:
        with self._lock:
            target = self._workers.get(slot)
        return self._signal(target, sig)

    def kill(self, global_rank: int, sig: int = signal.SIGKILL) -> WorkerInfo | None:
        """Send ``sig`` to the local worker with this global rank; None if it is not ours."""
        with self._lock:
            target = next((w for w in self._workers.values() if w.assignment is not None
                           and w.assignment.global_rank == global_rank
                           and w.exit_code is None), None)  # fmt: skip
        return self._signal(target, sig)

    def _signal(self, target: WorkerInfo | None, sig: int) -> WorkerInfo | None:
        if target is None or target.exit_code is not None:
            return None
        try:
            os.kill(target.pid, sig)
        except ProcessLookupError:
            return None
        logger.warning("injected fault: signal %d to slot %d (pid %d)", sig, target.slot,
                       target.pid)  # fmt: skip
        return target

    def set_assignment(self, slot: int, assignment: WorkerAssignment | None) -> None:
        """A worker's rank changed in place (a new world)."""
        with self._lock:
            if slot in self._workers:
                self._workers[slot].assignment = assignment
