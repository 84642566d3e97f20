"""Agent records <-> disk-tier records (pure).

A rank's record is a slice of the replicated stream (or, sharded, DCP's write items) followed
by its per-rank blob. On disk it is cut at tensor boundaries so that every piece carries its
tensor's dtype and the disk tier can byte-shuffle it (bf16/fp32 compress far better
shuffled); gaps and the blob are opaque ``bytes`` pieces. The pieces cover the record
exactly, so the rebuilt bytes (and their CRC) are the original ones.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import torch

from elastictrain.errors import SnapshotFormatError
from elastictrain.snapshot.disk import OPAQUE_DTYPE, SnapshotRecord, dtype_element_size
from elastictrain.snapshot.record_meta import ShardedRecordMeta, decode_record_meta


def _typed_ranges(meta_raw: bytes) -> list[tuple[int, int, str]]:
    """(start, end, dtype) of the tensor bytes of a record, from its description."""
    meta = decode_record_meta(meta_raw)
    if isinstance(meta, ShardedRecordMeta):
        return [(offset, offset + nbytes, dtype) for offset, nbytes, dtype in meta.items]
    ranges = []
    for entry in meta.state_layout.entries:
        lo = max(entry.offset, meta.start) - meta.start
        hi = min(entry.offset + entry.nbytes, meta.end) - meta.start
        if lo < hi:
            ranges.append((lo, hi, entry.dtype))
    return ranges


def _cuts(meta_raw: bytes, nbytes: int) -> list[tuple[int, int, str]]:
    """(start, end, dtype) pieces covering ``[0, nbytes)`` of a record: tensors keep their
    dtype, gaps and anything not element-aligned are opaque."""
    cuts: list[tuple[int, int, str]] = []
    position = 0
    for lo, hi, dtype in sorted(_typed_ranges(meta_raw)):
        size = dtype_element_size(dtype)
        if lo < position or hi > nbytes or lo % size or (hi - lo) % size:
            continue  # cannot happen with aligned slices: those bytes stay opaque
        if lo > position:
            cuts.append((position, lo, OPAQUE_DTYPE))
        cuts.append((lo, hi, dtype))
        position = hi
    if position < nbytes:
        cuts.append((position, nbytes, OPAQUE_DTYPE))
    return cuts


def to_disk_records(
    rank: int, data: torch.Tensor, meta_raw: bytes, checksum: int
) -> list[SnapshotRecord]:
    """One rank's record (``data``: uint8, its exact bytes) as disk-tier records."""
    nbytes = data.numel()
    try:
        cuts = _cuts(meta_raw, nbytes)
    except SnapshotFormatError:
        cuts = [(0, nbytes, OPAQUE_DTYPE)] if nbytes else []  # an unknown description
    pieces = [
        SnapshotRecord(
            name=f"rank{rank:06d}/header",
            dtype=OPAQUE_DTYPE,
            shape=(len(meta_raw),),
            data=bytearray(meta_raw),
            meta={"rank": rank, "nbytes": nbytes, "checksum": checksum},
        )
    ]
    for i, (start, end, dtype) in enumerate(cuts):
        view = data[start:end]
        if dtype == OPAQUE_DTYPE:
            shape: tuple[int, ...] = (end - start,)
        else:
            shape = ((end - start) // dtype_element_size(dtype),)
        pieces.append(SnapshotRecord(f"rank{rank:06d}/p{i:06d}", dtype, shape, view,
                                     {"at": start}))  # fmt: skip
    return pieces


def from_disk_records(records: Iterable) -> dict[int, tuple[bytes, int, bytearray]]:
    """Disk-tier records (``read_snapshot``'s) back to ``rank -> (meta, checksum, bytes)``."""
    headers: dict[int, tuple[bytes, int, int]] = {}
    pieces: dict[int, list[tuple[int, bytes]]] = {}
    for record in records:
        rank = int(record.name.split("/", 1)[0].removeprefix("rank"))
        if record.name.endswith("/header"):
            info = record.entry.meta
            headers[rank] = (bytes(record), int(info["checksum"]), int(info["nbytes"]))
        else:
            pieces.setdefault(rank, []).append((int(record.entry.meta["at"]), bytes(record)))
    out: dict[int, tuple[bytes, int, bytearray]] = {}
    for rank, (meta_raw, checksum, nbytes) in headers.items():
        buffer = bytearray(nbytes)
        for at, raw in pieces.get(rank, []):
            buffer[at : at + len(raw)] = raw
        out[rank] = (meta_raw, checksum, buffer)
    return out


def encode_meta(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
