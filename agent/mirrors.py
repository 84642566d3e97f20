"""Which hot spare's device mirror each worker writes into (the agent's side).

A warm spare on a GPU offers its mirror slots (:mod:`elastictrain.snapshot.device_mirror`); a
worker on the same GPU claims them and writes its state there every step. One spare serves
one worker. The board decides (pure, under a lock: no I/O); the agent's session handlers ask
it and pass in which sessions are alive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .sessions import WorkerKey

Alive = Callable[[WorkerKey], bool]


@dataclass
class _Offer:
    device: str  # the GPU's UUID
    offer: dict[str, Any]  # as the spare sent it (the worker validates it)
    feeder: WorkerKey | None = None


class MirrorBoard:
    """The node's mirror offers and who writes into each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offers: dict[WorkerKey, _Offer] = {}  # by the spare that holds it

    def offer(self, spare: WorkerKey, device: str, offer: dict[str, Any]) -> None:
        with self._lock:
            self._offers[spare] = _Offer(device, offer)

    def claim(self, worker: WorkerKey, device: str, alive: Alive) -> dict[str, Any] | None:
        """The offer ``worker`` writes into from now on: the one it holds while its spare
        lives, else a free one on its GPU, else None (it stops writing)."""
        with self._lock:
            self._drop_dead(alive)
            for held in self._offers.values():
                if held.feeder == worker:
                    return held.offer
            for held in self._offers.values():
                if held.device == device and (held.feeder is None or not alive(held.feeder)):
                    held.feeder = worker
                    return held.offer
        return None

    def withdraw(self, spare: WorkerKey, alive: Alive) -> bool:
        """The spare takes a rank: its offer ends. True when a live worker was writing into
        it (its slots must stay allocated until that worker lets go)."""
        with self._lock:
            held = self._offers.pop(spare, None)
        return held is not None and held.feeder is not None and alive(held.feeder)

    def forget(self, generation: int) -> None:
        """Drop the offers of older generations of workers."""
        with self._lock:
            self._offers = {k: o for k, o in self._offers.items() if k.generation >= generation}

    def _drop_dead(self, alive: Alive) -> None:
        for spare in [k for k in self._offers if not alive(k)]:
            del self._offers[spare]
