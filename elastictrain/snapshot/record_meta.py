"""What a replicated rank record holds besides its slice of the state stream.

:class:`RecordMeta` (a replicated rank's slice of the stream) and :class:`ShardedRecordMeta`
(a sharded rank's DCP items) are the descriptions a worker sends its agent with a record; the
agent stores them beside it, peers and the disk tier keep them, and restoring workers read
them. They cross processes, the network and disks, so they are versioned JSON, read only by
:func:`decode_record_meta`, which checks every field. :func:`capture_rng`/:func:`restore_rng`
are the RNG part of the per-rank blob. Kept apart from the worker so that the disk tier and
the restoring side can import them without the taking side.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch

from elastictrain.errors import SnapshotFormatError
from elastictrain.json_records import open_record
from elastictrain.snapshot.layout import StateLayout

RECORD_META_VERSION = 2
METADATA_RANK = 1 << 30  # the pseudo-rank of the record that holds DCP's Metadata
MAX_RECORD_META_BYTES = 64 << 20  # a description longer than this is refused unread
_DTYPES = frozenset(str(d).removeprefix("torch.") for d in vars(torch).values()
                    if isinstance(d, torch.dtype))  # fmt: skip


@dataclass(frozen=True)
class RecordMeta:
    """What a replicated rank's record holds: bytes ``[start, end)`` of the state stream laid
    out by ``layout`` (a :class:`StateLayout`'s encoding), then ``rank_bytes`` of its blob."""

    rank: int
    world: int
    step: int
    start: int
    end: int
    rank_bytes: int
    layout: bytes

    def encode(self) -> bytes:
        layout = self.layout.decode() if isinstance(self.layout, bytes) else str(self.layout)
        return (f'{{"version":{RECORD_META_VERSION},"kind":"replicated","rank":{self.rank},'
                f'"world":{self.world},"step":{self.step},"start":{self.start},'
                f'"end":{self.end},"rank_bytes":{self.rank_bytes},"layout":{layout}}}'
                ).encode()  # fmt: skip

    @staticmethod
    def decode(raw: bytes | bytearray | memoryview) -> RecordMeta:
        meta = decode_record_meta(raw)
        if not isinstance(meta, RecordMeta):
            raise SnapshotFormatError("a sharded record where a replicated one was expected")
        return meta

    @property
    def state_layout(self) -> StateLayout:
        return StateLayout.decode(self.layout)


@dataclass(frozen=True)
class ShardedRecordMeta:
    """What a sharded rank's record holds: DCP's write items, then ``blob_bytes`` of its blob
    at ``blob_offset``; ``items`` are ``(offset, nbytes, dtype)`` of its tensor items (the disk
    tier shuffles their bytes by dtype)."""

    rank: int
    world: int
    step: int
    blob_offset: int
    blob_bytes: int
    items: tuple[tuple[int, int, str], ...] = ()

    def encode(self) -> bytes:
        record = {"version": RECORD_META_VERSION, "kind": "sharded", "rank": self.rank,
                  "world": self.world, "step": self.step, "blob_offset": self.blob_offset,
                  "blob_bytes": self.blob_bytes,
                  "items": [list(i) for i in self.items]}  # fmt: skip
        return json.dumps(record, separators=(",", ":")).encode()


def _count(record: dict, name: str) -> int:
    value = record.get(name)
    if type(value) is not int or value < 0:
        raise SnapshotFormatError(f"a record description's {name} is {value!r}, not a count")
    return value


def decode_record_meta(raw: bytes | bytearray | memoryview) -> RecordMeta | ShardedRecordMeta:
    """A record description, every field checked; anything else is a
    :class:`SnapshotFormatError` (never an exception of another kind)."""
    if len(raw) > MAX_RECORD_META_BYTES:
        raise SnapshotFormatError(f"a record description of {len(raw)} bytes is over "
                                  f"{MAX_RECORD_META_BYTES}")  # fmt: skip
    record = open_record(raw, RECORD_META_VERSION, "a record description", SnapshotFormatError)
    rank, world, step = _count(record, "rank"), _count(record, "world"), _count(record, "step")
    kind = record.get("kind")
    if kind == "replicated":
        start, end = _count(record, "start"), _count(record, "end")
        layout = StateLayout.from_record(record.get("layout"))
        if not (start <= end <= layout.total_bytes) or world < 1 or rank >= world:
            raise SnapshotFormatError(f"rank {rank} of {world}: slice [{start}, {end}) is not "
                                      f"in a {layout.total_bytes}-byte stream")  # fmt: skip
        return RecordMeta(rank, world, step, start, end, _count(record, "rank_bytes"),
                          json.dumps(record["layout"], separators=(",", ":")).encode())  # fmt: skip
    if kind == "sharded":
        items = record.get("items")
        if not isinstance(items, list) or not all(
            isinstance(i, list) and len(i) == 3 and type(i[0]) is int and i[0] >= 0
            and type(i[1]) is int and i[1] >= 0 and i[2] in _DTYPES for i in items
        ):  # fmt: skip
            raise SnapshotFormatError("a sharded record's items are not (offset, nbytes, dtype)")
        return ShardedRecordMeta(rank, world, step, _count(record, "blob_offset"),
                                 _count(record, "blob_bytes"),
                                 tuple((i[0], i[1], i[2]) for i in items))  # fmt: skip
    raise SnapshotFormatError(f"unknown record kind {kind!r}")


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
