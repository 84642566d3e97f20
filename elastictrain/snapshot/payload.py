"""A node's snapshot of one step as one byte string: what gets erasure-coded across nodes.

Layout: an 8-byte little-endian header length, the header (versioned JSON: one entry per local
rank: rank, length, the worker's record description in base64, its CRC32), then the records,
each at an offset aligned to 64 bytes. Pure: no I/O. A payload comes back from peers' chunks,
so :func:`unpack_payload` checks everything it reads (:class:`SnapshotFormatError`).

The payload need not be assembled: :func:`chunk_pieces` says where each byte of each of the k
data chunks comes from (the small header prefix, a record, or zeros), so the records are coded
and sent from where they lie, and :func:`pack_payload_into` assembles it when a contiguous
copy is wanted.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from elastictrain.errors import SnapshotFormatError

PAYLOAD_VERSION = 2
_ALIGN = 64
_HEADER_LEN = struct.Struct("<Q")
MAX_HEADER_BYTES = 256 << 20


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
    header = json.dumps({"version": PAYLOAD_VERSION, "records": [
        [e.rank, e.nbytes, base64.b64encode(e.meta).decode(), e.checksum] for e in entries
    ]}, separators=(",", ":")).encode()  # fmt: skip
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
    view = memoryview(payload).cast("B")
    if len(view) < _HEADER_LEN.size:
        raise SnapshotFormatError(f"a payload of {len(view)} bytes has no header")
    (header_len,) = _HEADER_LEN.unpack_from(view, 0)
    if header_len > min(MAX_HEADER_BYTES, len(view) - _HEADER_LEN.size):
        raise SnapshotFormatError(f"a payload header of {header_len} bytes does not fit")
    entries = _header_entries(view[_HEADER_LEN.size : _HEADER_LEN.size + header_len])
    _, placed, total = payload_layout(entries)
    if total > len(view):
        raise SnapshotFormatError(f"payload is {len(view)} bytes, its header describes {total}")
    return [(e, view[e.offset : e.offset + e.nbytes]) for e in placed]


def _header_entries(raw: memoryview) -> list[PayloadEntry]:
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SnapshotFormatError(f"a payload header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("version") != PAYLOAD_VERSION:
        raise SnapshotFormatError(f"a payload header is not version {PAYLOAD_VERSION}")
    records = header.get("records")
    if not isinstance(records, list):
        raise SnapshotFormatError("a payload header has no record list")
    entries = []
    for record in records:
        if not (isinstance(record, list) and len(record) == 4
                and all(type(v) is int and v >= 0 for v in (record[0], record[1], record[3]))
                and isinstance(record[2], str)):  # fmt: skip
            raise SnapshotFormatError(f"not a payload record: {str(record)[:80]}")
        try:
            meta = base64.b64decode(record[2], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SnapshotFormatError(f"a payload record's description: {exc}") from exc
        entries.append(PayloadEntry(record[0], record[1], meta, record[3]))
    return entries


PREFIX = 0  # source index of the header prefix in :func:`payload_sources`
ZEROS = -1  # source index of padding


@dataclass(frozen=True)
class Piece:
    """Bytes ``[column, column + length)`` of a chunk are bytes ``[offset, offset + length)``
    of source ``source`` (:data:`PREFIX`, record ``i`` as ``i + 1``, or :data:`ZEROS`)."""

    column: int
    length: int
    source: int
    offset: int


def payload_prefix(entries: Sequence[PayloadEntry]) -> tuple[bytes, list[PayloadEntry], int]:
    """(the header prefix: length + header, entries with offsets, total payload length)."""
    header, placed, total = payload_layout(entries)
    return _HEADER_LEN.pack(len(header)) + header, placed, total


def chunk_pieces(
    prefix_len: int, placed: Sequence[PayloadEntry], k: int, length: int
) -> list[list[Piece]]:
    """Where the bytes of each of the ``k`` data chunks of ``length`` bytes come from: the
    payload (prefix, records at their offsets, zeros between and after) cut into chunks."""
    regions: list[tuple[int, int, int]] = [(0, prefix_len, PREFIX)]  # (start, end, source)
    position = prefix_len
    for index, entry in enumerate(placed):
        if entry.offset > position:
            regions.append((position, entry.offset, ZEROS))
        if entry.nbytes:
            regions.append((entry.offset, entry.offset + entry.nbytes, index + 1))
        position = max(position, entry.offset + entry.nbytes)
    if k * length > position:
        regions.append((position, k * length, ZEROS))
    chunks: list[list[Piece]] = []
    for chunk in range(k):
        lo, hi = chunk * length, (chunk + 1) * length
        pieces = []
        for start, end, source in regions:
            a, b = max(start, lo), min(end, hi)
            if a < b:
                offset = 0 if source == ZEROS else a - start
                pieces.append(Piece(a - lo, b - a, source, offset))
        chunks.append(pieces)
    return chunks


def column_cuts(chunks: Sequence[Sequence[Piece]], length: int) -> list[tuple[int, int]]:
    """``(column, length)`` ranges in which every chunk reads one contiguous source: the unit
    of a coding call that takes one pointer per chunk."""
    cuts = sorted({0, length} | {p.column for pieces in chunks for p in pieces})
    return [(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
