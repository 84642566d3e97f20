"""Faults made on purpose (``etrain chaos``), carried out by the agent that owns the target.

Each fault is stored as a ``chaos`` event (kind of fault, target, parameters) before it takes
effect, so the job's timeline shows the cause before its consequences; a fault that ends by
itself (a hang, a partition, a full disk) adds a ``chaos_ended`` event. What is checked before
acting (:func:`chaos_problem`) is pure; the rest is a thin executor over signals, the etcd
gate, the embedded etcd, the held chunks and the disk tier's file system.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from elastictrain.coord.etcd import REACH
from elastictrain.events import Event

if TYPE_CHECKING:
    from elastictrain.coord.embedded import EmbeddedEtcd

    from .agent import Agent

logger = logging.getLogger(__name__)

MAX_FAULT_S = 7 * 86400.0
DISK_FULL_MAX_FREE = 1 << 30  # refuse to fill a file system with more free space than this
BALLAST_NAME = ".etrain-chaos-ballast"
_BALLAST_BLOCK = 1 << 20


@dataclass(frozen=True)
class ChaosOutcome:
    ok: bool
    message: str
    pid: int = 0


def chaos_problem(kind: str, *, seconds: float = 0.0, has_etcd: bool = False,
                  has_disk: bool = False, free_bytes: int = 0, max_free: int = 0) -> str:
    """Why fault ``kind`` cannot be made here ('' when it can)."""
    if not 0 <= seconds <= MAX_FAULT_S:
        return f"seconds {seconds:g} must be in [0, {MAX_FAULT_S:g}]"
    if kind in ("hang", "partition", "disk_full") and seconds <= 0:
        return f"{kind.replace('_', '-')} needs a duration (> 0 s)"
    if kind == "etcd_restart" and not has_etcd:
        return "this agent does not run the job's etcd"
    if kind == "kill_agent" and has_etcd:
        return "this agent runs the job's embedded etcd: killing it ends the job"
    if kind == "disk_full":
        if not has_disk:
            return "this agent has no disk tier (--snapshot-dir)"
        limit = max_free or DISK_FULL_MAX_FREE
        if free_bytes > limit:
            return (f"the disk tier's file system has {free_bytes} bytes free, more than "
                    f"{limit}: give it a small file system (a tmpfs) or a larger max_bytes")
    return ""


def fill_file_system(directory: str, name: str = BALLAST_NAME) -> tuple[str, int]:
    """Write a file in ``directory`` until its file system is full; (its path, its bytes)."""
    path = os.path.join(directory, name)
    written = 0
    block = bytes(_BALLAST_BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = len(block)
        while size:
            try:
                written += os.write(fd, block[:size])
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                size //= 2  # fill the last few blocks too
        os.fsync(fd)
    finally:
        os.close(fd)
    return path, written


@dataclass
class ChaosExecutor:
    """Makes the faults on one agent; every method answers a :class:`ChaosOutcome`."""

    agent: Agent
    embedded_etcd: EmbeddedEtcd | None = None
    _timers: list[threading.Timer] = field(default_factory=list)
    _etcd_work: queue.SimpleQueue | None = None

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _node(self) -> str:
        return self.agent.config.node_id

    def _record(self, kind: str, reason: str, **details: Any) -> None:
        self.agent.write_event(Event(kind, self._node, time.time(), reason,
                                     {"fault": details.pop("fault"), **details}))  # fmt: skip

    def _later(self, seconds: float, fn: Callable[[], None], name: str) -> None:
        timer = threading.Timer(seconds, fn)
        timer.name, timer.daemon = f"chaos-{name}", True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _on_etcd_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on a thread that lives as long as the agent: etcd dies with the thread
        that starts it (its parent-death signal is tied to that thread)."""
        if self._etcd_work is None:
            self._etcd_work = queue.SimpleQueue()
            work = self._etcd_work
            threading.Thread(target=lambda: [job() for job in iter(work.get, None)],
                             name="chaos-etcd", daemon=True).start()  # fmt: skip
        self._etcd_work.put(fn)

    def _refused(self, message: str) -> ChaosOutcome:
        return ChaosOutcome(False, message)

    # -- faults -------------------------------------------------------------------------------

    def kill(self, rank: int, sig: int) -> ChaosOutcome:
        worker = self.agent.kill_worker(rank, sig)
        if worker is None:
            return self._refused(f"rank {rank} is not running here")
        try:
            name = signal.Signals(sig).name
        except ValueError:  # a real-time signal has no name
            name = str(sig)
        self._record("chaos", f"sent {name} to rank {rank}", fault="kill", rank=rank,
                     pid=worker.pid, signal=sig)  # fmt: skip
        return ChaosOutcome(True, f"sent signal {sig} to rank {rank} (pid {worker.pid})",
                            worker.pid)  # fmt: skip

    def slow(self, rank: int, factor: float, seconds: float) -> ChaosOutcome:
        pid = self.agent.slow_worker(rank, factor, seconds)
        if pid is None:
            return self._refused(f"no Job API worker holds rank {rank} here")
        what = (f"ended the slowdown of rank {rank}" if factor == 1 else
                f"slowed rank {rank} x{factor:g}" + (f" for {seconds:g} s" if seconds else ""))
        self._record("chaos", what, fault="slow", rank=rank, pid=pid, factor=factor,
                     seconds=seconds)  # fmt: skip
        return ChaosOutcome(True, f"{what} (pid {pid})", pid)

    def hang(self, rank: int, seconds: float) -> ChaosOutcome:
        problem = chaos_problem("hang", seconds=seconds)
        if problem:
            return self._refused(problem)
        worker = self.agent.kill_worker(rank, signal.SIGSTOP)
        if worker is None:
            return self._refused(f"rank {rank} is not running here")
        self._record("chaos", f"stopped rank {rank} (SIGSTOP) for {seconds:g} s", fault="hang",
                     rank=rank, pid=worker.pid, seconds=seconds)  # fmt: skip

        def resume() -> None:
            try:
                os.kill(worker.pid, signal.SIGCONT)
            except ProcessLookupError:
                return  # killed as hung meanwhile
            self._record("chaos_ended", f"rank {rank} continued (SIGCONT)", fault="hang",
                         rank=rank, pid=worker.pid)  # fmt: skip

        self._later(seconds, resume, "hang")
        return ChaosOutcome(True, f"stopped rank {rank} (pid {worker.pid}) for {seconds:g} s",
                            worker.pid)  # fmt: skip

    def kill_agent(self) -> ChaosOutcome:
        problem = chaos_problem("kill_agent", has_etcd=self.embedded_etcd is not None)
        if problem:
            return self._refused(problem)
        pid = os.getpid()
        self._record("chaos", f"killing agent {self._node} (pid {pid}) and its workers",
                     fault="kill_agent", pid=pid)  # fmt: skip
        self.agent.flush_writes(2.0)  # the event is stored before the agent is gone
        # after the reply has left: the kernel kills the workers with the agent (parent death)
        self._later(0.2, lambda: os.kill(pid, signal.SIGKILL), "kill-agent")
        return ChaosOutcome(True, f"killing agent {self._node} (pid {pid})", pid)

    def partition(self, seconds: float) -> ChaosOutcome:
        problem = chaos_problem("partition", seconds=seconds)
        if problem:
            return self._refused(problem)
        self._record("chaos", f"agent {self._node} cut off from etcd for {seconds:g} s",
                     fault="partition", seconds=seconds)  # fmt: skip
        self.agent.flush_writes(2.0)
        REACH.close_for(seconds)

        def ended() -> None:
            self._record("chaos_ended", f"agent {self._node} reaches etcd again",
                         fault="partition")  # fmt: skip

        self._later(seconds, ended, "partition")
        return ChaosOutcome(True, f"agent {self._node} cut off from etcd for {seconds:g} s",
                            os.getpid())  # fmt: skip

    def etcd_restart(self) -> ChaosOutcome:
        etcd = self.embedded_etcd
        problem = chaos_problem("etcd_restart", has_etcd=etcd is not None)
        if problem or etcd is None:
            return self._refused(problem)
        self._record("chaos", f"restarting the job's etcd (pid {etcd.pid})",
                     fault="etcd_restart", pid=etcd.pid or 0)  # fmt: skip
        self.agent.flush_writes(2.0)

        def restart() -> None:
            started = time.monotonic()
            try:
                etcd.restart()
            except Exception as exc:  # reported as an event; the agent's outage path goes on
                logger.error("restarting the embedded etcd failed: %s", exc)
                return
            self._record("chaos_ended", f"the job's etcd is back (pid {etcd.pid})",
                         fault="etcd_restart", pid=etcd.pid or 0,
                         down_s=round(time.monotonic() - started, 3))  # fmt: skip

        self._on_etcd_thread(restart)
        return ChaosOutcome(True, f"restarting the job's etcd at {etcd.endpoint}", etcd.pid or 0)

    def corrupt_chunk(self, seconds: float) -> ChaosOutcome:
        """Flip one byte of each chunk of the newest step this agent holds for another node
        (or for itself when it holds none of another's), and of each chunk it receives from
        another node for ``seconds`` more (memory that corrupts what it holds)."""
        held = self.agent.snapshots
        if held is None:
            return self._refused("this agent holds no snapshot yet")
        problem = chaos_problem("corrupt_chunk", seconds=seconds)
        if problem:
            return self._refused(problem)
        flipped = held.corrupt_chunks(seconds)
        if not flipped:
            return self._refused("this agent holds no snapshot chunk")
        owner, step = flipped[0].owner, flipped[0].step
        indexes = [c.index for c in flipped]
        more = f", and those it receives for {seconds:g} s" if seconds else ""
        self._record("chaos", f"flipped a byte of {len(flipped)} chunk(s) of node {owner}'s "
                     f"step {step}{more}", fault="corrupt_chunk", owner=owner, step=step,
                     indexes=indexes, seconds=seconds)  # fmt: skip
        return ChaosOutcome(True, f"flipped a byte of chunk(s) {indexes} of node {owner}'s step "
                            f"{step}{more}", os.getpid())  # fmt: skip

    def disk_full(self, seconds: float, max_free: int) -> ChaosOutcome:
        directory = self.agent.config.snapshot_dir
        free = 0
        if directory:
            stats = os.statvfs(directory)
            free = stats.f_bavail * stats.f_frsize
        problem = chaos_problem("disk_full", seconds=seconds, has_disk=bool(directory),
                                free_bytes=free, max_free=max_free)  # fmt: skip
        if problem:
            return self._refused(problem)
        try:
            path, written = fill_file_system(directory)
        except OSError as exc:
            return self._refused(f"the disk tier's file system was not filled: {exc}")
        self._record("chaos", f"filled the disk tier's file system ({written} bytes) for "
                     f"{seconds:g} s", fault="disk_full", bytes=written,
                     seconds=seconds)  # fmt: skip

        def free_again() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._record("chaos_ended", "the disk tier has room again", fault="disk_full")

        self._later(seconds, free_again, "disk-full")
        return ChaosOutcome(True, f"filled {directory} ({written} bytes) for {seconds:g} s",
                            os.getpid())  # fmt: skip

    def close(self) -> None:
        """Run what is still scheduled now (a stopped worker continues, a ballast goes)."""
        for timer in self._timers:
            if timer.is_alive():
                timer.cancel()
                if timer.name in ("chaos-hang", "chaos-disk-full"):
                    timer.function()
        self._timers = []
        REACH.open()
