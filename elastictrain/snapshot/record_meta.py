"""What a replicated rank record holds besides its slice of the state stream.

:class:`RecordMeta` is the description the agent stores beside a rank's record (pickled, so
its module path is part of the stored bytes: the old ``elastictrain.snapshot.worker`` path
still resolves through a re-export). :func:`capture_rng`/:func:`restore_rng` are the RNG part
of the per-rank blob. Kept apart from the worker so that the disk tier and the restoring side
can import them without the taking side.
"""

from __future__ import annotations

import pickle
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch

_FORMAT = 1


@dataclass(frozen=True)
class RecordMeta:
    """What a rank's record holds, stored beside it by the agent."""

    format: int
    rank: int
    world: int
    step: int
    start: int  # slice of the replicated stream
    end: int
    rank_bytes: int  # the per-rank blob that follows the slice
    layout: bytes  # StateLayout.encode()

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def decode(raw: bytes) -> RecordMeta:
        meta = pickle.loads(raw)
        if not isinstance(meta, RecordMeta) or meta.format != _FORMAT:
            raise ValueError("unknown snapshot record format")
        return meta


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and "numpy" in sys.modules:
        sys.modules["numpy"].random.set_state(state["numpy"])
