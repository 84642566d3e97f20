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
