"""A node's payload: records packed into a reused buffer and unpacked again (pure)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.snapshot.payload import (
    PayloadEntry,
    pack_payload_into,
    payload_layout,
    unpack_payload,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=5), st.integers(0, 200))
def test_records_round_trip_through_a_dirty_reused_buffer(sizes, extra):
    records = [os.urandom(n) for n in sizes]
    entries = [PayloadEntry(rank, len(r), b"meta%d" % rank, rank * 7) for rank, r in
               enumerate(records)]  # fmt: skip
    total = payload_layout(entries)[2]
    clean = bytearray(total + extra)
    dirty = bytearray(b"\xab" * (total + extra))
    views = [memoryview(r) for r in records]
    for out in (clean, dirty):
        assert pack_payload_into(entries, views, memoryview(out)) == total
    assert dirty == clean  # every byte written: equal payloads give equal chunks
    unpacked = unpack_payload(dirty)
    assert [(e.rank, e.meta, e.checksum) for e, _ in unpacked] == [
        (e.rank, e.meta, e.checksum) for e in entries
    ]
    assert [bytes(v) for _, v in unpacked] == records


def test_a_buffer_too_small_is_refused():
    entries = [PayloadEntry(0, 10, b"", 0)]
    total = payload_layout(entries)[2]
    with pytest.raises(ValueError, match="does not fit"):
        pack_payload_into(entries, [memoryview(bytes(10))], memoryview(bytearray(total - 1)))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 5000), max_size=4),
    st.sampled_from([(1, 0), (2, 1), (3, 2), (4, 2)]),
    st.sampled_from([1, 3]),
)
def test_chunks_coded_in_place_equal_those_of_the_packed_payload(sizes, code, threads):
    """The agent codes and checksums the records where they lie: its chunks must be the
    chunks of the assembled payload, byte for byte."""
    import numpy as np
    from elastictrain.agent.snapshots import encode_payload

    from elastictrain.snapshot.checksum import crc32c_pieces
    from elastictrain.snapshot.erasure import ErasureCodec, chunk_checksum, chunk_size

    k, m = code
    records = [os.urandom(n) for n in sizes]
    entries = [PayloadEntry(rank, len(r), b"", 0) for rank, r in enumerate(records)]
    total = payload_layout(entries)[2]
    length = chunk_size(total, k)
    packed = np.zeros((k + m, length), dtype=np.uint8)
    views = [memoryview(bytearray(r)) for r in records]
    pack_payload_into(entries, views, memoryview(packed[:k].reshape(-1)))
    with ErasureCodec(k, m, threads=threads) as codec:
        codec.encode(packed[:k], packed[k:])
        parity = np.full((m, length), 0xAB, dtype=np.uint8)
        data, checksums = encode_payload(
            entries, views, codec, parity, np.zeros(length, dtype=np.uint8),
            lambda pieces: crc32c_pieces(pieces, None, 1),
        )  # fmt: skip
    assert [b"".join(bytes(p) for p in pieces) for pieces in data] == [
        bytes(row) for row in packed[:k]
    ]
    assert np.array_equal(parity, packed[k:])
    assert checksums == tuple(chunk_checksum(row) for row in packed)
