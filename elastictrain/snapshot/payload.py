"""A node's snapshot of one step as one byte string: what gets erasure-coded across nodes.

Layout: an 8-byte little-endian header length, the pickled header (one entry per local rank:
rank, length, the worker's record description, its CRC32), then the records, each at an
offset aligned to 64 bytes. Pure: no I/O.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass

_ALIGN = 64
_HEADER_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class PayloadEntry:
    rank: int
    nbytes: int
    meta: bytes
    checksum: int
    offset: int = 0  # of the record's bytes inside the payload


def _align(value: int) -> int:
    return (value + _ALIGN - 1) // _ALIGN * _ALIGN


def payload_layout(entries: Sequence[PayloadEntry]) -> tuple[bytes, list[PayloadEntry], int]:
    """(header bytes, entries with offsets, total payload length)."""
    placed: list[PayloadEntry] = []
    header = pickle.dumps([(e.rank, e.nbytes, e.meta, e.checksum) for e in entries], 5)
    offset = _align(_HEADER_LEN.size + len(header))
    for e in entries:
        placed.append(PayloadEntry(e.rank, e.nbytes, e.meta, e.checksum, offset))
        offset = _align(offset + e.nbytes)
    return header, placed, offset


def pack_payload_into(
    entries: Sequence[PayloadEntry], records: Sequence[memoryview], out: memoryview
) -> int:
    """Write the payload into ``out`` (a writable buffer at least as long; a reused one: the
    bytes between and after the records are zeroed, so equal payloads give equal bytes).
    Returns the payload's length."""
    header, placed, total = payload_layout(entries)
    out = memoryview(out).cast("B")
    if len(out) < total:
        raise ValueError(f"payload of {total} bytes does not fit {len(out)}")
    position = 0

    def fill_to(offset: int) -> None:
        out[position:offset] = bytes(offset - position)

    _HEADER_LEN.pack_into(out, 0, len(header))
    out[_HEADER_LEN.size : _HEADER_LEN.size + len(header)] = header
    position = _HEADER_LEN.size + len(header)
    for entry, data in zip(placed, records, strict=True):
        fill_to(entry.offset)
        out[entry.offset : entry.offset + entry.nbytes] = data[: entry.nbytes]
        position = entry.offset + entry.nbytes
    fill_to(len(out))
    return total


def unpack_payload(
    payload: bytes | bytearray | memoryview,
) -> list[tuple[PayloadEntry, memoryview]]:
    """Every record of a payload, as (entry, a view of its bytes)."""
    view = memoryview(payload)
    (header_len,) = _HEADER_LEN.unpack_from(view, 0)
    raw = pickle.loads(view[_HEADER_LEN.size : _HEADER_LEN.size + header_len])
    entries = [PayloadEntry(rank, nbytes, meta, checksum) for rank, nbytes, meta, checksum in raw]
    _, placed, total = payload_layout(entries)
    if total > len(view):
        raise ValueError(f"payload is {len(view)} bytes, its header describes {total}")
    return [(e, view[e.offset : e.offset + e.nbytes]) for e in placed]
