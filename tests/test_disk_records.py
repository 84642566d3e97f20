"""Agent records <-> disk-tier records: tensors keep their dtype (so the disk tier can shuffle
them), every byte comes back, for replicated slices and for sharded (DCP) records."""

from __future__ import annotations

import pickle

import pytest
import torch

from elastictrain.snapshot.dcp_storage import ShardedRecordMeta
from elastictrain.snapshot.disk import OPAQUE_DTYPE, DiskTierWriter, Snapshot, read_snapshot
from elastictrain.snapshot.disk_records import from_disk_records, to_disk_records
from elastictrain.snapshot.erasure import chunk_checksum
from elastictrain.snapshot.layout import flatten_state, slice_range, stream_pieces
from elastictrain.snapshot.worker import RecordMeta


def _replicated_record(world: int, rank: int) -> tuple[bytes, torch.Tensor]:
    state = {
        "w": torch.randn(33, 7),
        "h": torch.randn(19).to(torch.bfloat16),
        "n": torch.arange(5, dtype=torch.int64),
        "lr": 0.1,
    }
    layout, tensors = flatten_state(state)
    start, end = slice_range(layout.total_bytes, world, rank)
    blob = pickle.dumps({"rank": rank})
    data = torch.zeros(end - start + len(blob), dtype=torch.uint8)
    for position, piece in stream_pieces(layout, tensors, start, end):
        data[position : position + piece.numel()] = piece
    data[end - start :] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    meta = RecordMeta(rank, world, 3, start, end, len(blob), layout.encode())
    return meta.encode(), data


def _sharded_record() -> tuple[bytes, torch.Tensor]:
    a = torch.randn(10).view(torch.uint8)  # float32 item at 0
    b = torch.randn(6).to(torch.bfloat16).view(torch.uint8)  # bfloat16 item at 64
    blob = b"rank-state"
    data = torch.zeros(128 + len(blob), dtype=torch.uint8)
    data[: a.numel()] = a
    data[64 : 64 + b.numel()] = b
    data[128:] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    items = ((0, a.numel(), "float32"), (64, b.numel(), "bfloat16"))
    return ShardedRecordMeta(0, 2, 3, 128, len(blob), items).encode(), data


def _round_trip(tmp_path, rank: int, meta: bytes, data: torch.Tensor):
    pieces = to_disk_records(rank, data, meta, chunk_checksum(data))
    with DiskTierWriter(tmp_path) as writer:
        writer.submit(Snapshot(3, "job", pieces)).result(timeout=30)
    _, restored = read_snapshot(tmp_path, 3)
    return pieces, from_disk_records(restored.values())


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 1), (3, 2)])
def test_replicated_slices_keep_dtypes_and_every_byte(tmp_path, world, rank):
    meta, data = _replicated_record(world, rank)
    pieces, back = _round_trip(tmp_path, rank, meta, data)
    typed = sum(p.nbytes for p in pieces[1:] if p.dtype != OPAQUE_DTYPE)
    opaque = sum(p.nbytes for p in pieces[1:] if p.dtype == OPAQUE_DTYPE)
    assert typed + opaque == data.numel()
    assert opaque < 64 * 3 + 64  # alignment gaps and the blob only
    assert back[rank] == (meta, chunk_checksum(data), bytearray(data.numpy().tobytes()))


def test_sharded_records_are_cut_by_their_items(tmp_path):
    meta, data = _sharded_record()
    pieces, back = _round_trip(tmp_path, 0, meta, data)
    cuts = [(p.meta["at"], p.dtype, p.nbytes) for p in pieces[1:]]
    assert cuts == [(0, "float32", 40), (40, OPAQUE_DTYPE, 24), (64, "bfloat16", 12),
                    (76, OPAQUE_DTYPE, 62)]  # fmt: skip
    assert back[0] == (meta, chunk_checksum(data), bytearray(data.numpy().tobytes()))


def test_unknown_descriptions_are_kept_opaque(tmp_path):
    data = torch.arange(100, dtype=torch.uint8)
    pieces, back = _round_trip(tmp_path, 5, b"not a pickle", data)
    assert [p.dtype for p in pieces[1:]] == [OPAQUE_DTYPE]
    assert back[5][2] == bytearray(range(100))
