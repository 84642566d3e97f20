"""How fast a rank computes: samples per second of its own compute, collectives left out.

A ``Job`` brackets the micro-batches it hosts in a step (forward, backward, local
accumulation) with :meth:`ComputeClock.start` and :meth:`ComputeClock.stop`; the time it then
waits for the other ranks in the reduction is outside, so a fast rank that waits for a slow
one still measures fast. On a GPU the clock is a pair of CUDA events, read one step late
(:meth:`ComputeClock.speed`): by then the step's reduction has made the host wait for the
stream anyway, so the timing adds no synchronisation. On CPU it is ``perf_counter`` (``wall``,
the default: a rank whose cores are shared is slow), or the training thread's CPU time
(``thread``, ``$ETRAIN_COMPUTE_CLOCK``: for a host that runs more ranks than it has cores,
where wall time mostly measures the scheduler).

:class:`Slowdown` is the fault a chaos command injects: each micro-batch takes ``factor`` times
as long, so the slowdown scales with the compute it slows (a hot GPU or a throttled core, not
a fixed delay). On CPU the rank does ``factor - 1`` times its measured compute again as extra
work (a busy loop on the same clock); on a GPU the device idles that long (the host waits
with the stream drained, which the CUDA events see).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from elastictrain.constants import COMPUTE_CLOCKS, ENV_COMPUTE_CLOCK
from elastictrain.errors import ConfigError

T = TypeVar("T")


def cpu_clock(name: str | None = None) -> Callable[[], float]:
    """The CPU compute clock named ``name`` (default: ``$ETRAIN_COMPUTE_CLOCK`` or wall)."""
    name = name or os.environ.get(ENV_COMPUTE_CLOCK) or "wall"
    if name not in COMPUTE_CLOCKS:
        raise ConfigError(f"{ENV_COMPUTE_CLOCK}={name!r}: expected one of "
                          f"{', '.join(COMPUTE_CLOCKS)}")  # fmt: skip
    return time.perf_counter if name == "wall" else time.thread_time


class ComputeClock:
    """Times the compute of one rank's steps; see the module docstring."""

    def __init__(self, device: torch.device, clock: Callable[[], float] | None = None) -> None:
        self._cuda = device.type == "cuda"
        self.clock = clock or cpu_clock()
        self._started = 0.0
        # GPU: two pairs of events, used in turn (one may still be pending from the step
        # before), made once
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._turn = 0
        self._pending: tuple[torch.cuda.Event, torch.cuda.Event, int] | None = None
        self._speed = 0.0

    def start(self) -> None:
        if self._cuda:
            if not self._events:
                self._events = [(torch.cuda.Event(enable_timing=True),
                                 torch.cuda.Event(enable_timing=True)) for _ in range(2)]
            self._turn ^= 1
            self._events[self._turn][0].record()
        else:
            self._started = self.clock()

    def stop(self, samples: int) -> None:
        """The step's compute ended; it covered ``samples`` samples."""
        if self._cuda:
            start, end = self._events[self._turn]
            self.speed()  # the pending pair's reading, before it is reused
            end.record()
            self._pending = (start, end, samples)
            return
        elapsed = self.clock() - self._started
        self._speed = samples / elapsed if samples and elapsed > 0 else 0.0

    def speed(self) -> float:
        """Samples per compute-second of the last measured step; 0.0 when none is known (on a
        GPU: the step before the last, if its events have completed)."""
        if self._pending is not None:
            start, end, samples = self._pending
            if end.query():
                self._pending = None
                elapsed = start.elapsed_time(end) / 1e3
                self._speed = samples / elapsed if samples and elapsed > 0 else 0.0
        return self._speed

    def leave_out(self, wait: Callable[[], T]) -> T:
        """Run ``wait`` (a collective inside the compute: attention's exchanges) outside the
        measured time. On CPU its time is taken off; a GPU's events cannot leave it out."""
        if self._cuda:
            return wait()
        began = self.clock()
        try:
            return wait()
        finally:
            self._started += self.clock() - began

    def forget(self) -> None:
        """The last measurement belongs to an abandoned step or an earlier world."""
        self._pending, self._speed = None, 0.0


@dataclass(frozen=True)
class Slowdown:
    """An injected slowdown: until step ``until_step`` (exclusive; -1: no step bound) or until
    ``time.monotonic()`` passes ``until_time`` (``inf``: no time bound)."""

    factor: float
    until_step: int = -1
    until_time: float = float("inf")

    def active(self, step: int, now: float) -> bool:
        return self.factor > 1 and now < self.until_time and (
            self.until_step < 0 or step < self.until_step)  # fmt: skip


def slowed(run, factor: float, device: torch.device, clock: Callable[[], float]):
    """Run ``run()``, then take ``factor - 1`` times as long again (see the module
    docstring); its result. ``clock``: the CPU compute clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a chaos run pays for its own measurement
        began = time.perf_counter()
        result = run()
        torch.cuda.synchronize(device)
        time.sleep((factor - 1) * (time.perf_counter() - began))
        return result
    began = clock()
    result = run()
    until = clock() + (factor - 1) * (clock() - began)
    while clock() < until:  # extra work, on the clock the rank is measured by
        pass
    return result
