"""CRC32C of large buffers on several threads equals the plain CRC32C."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.snapshot import checksum
from elastictrain.snapshot.checksum import crc32c_combine, crc32c_parallel, piece_ranges
from elastictrain.snapshot.erasure import chunk_checksum


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_combine_equals_the_crc_of_the_concatenation(a, b):
    assert crc32c_combine(chunk_checksum(a), chunk_checksum(b), len(b)) == chunk_checksum(a + b)


def test_combine_rejects_negative_lengths():
    with pytest.raises(ValueError, match="len_b"):
        crc32c_combine(0, 0, -1)


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 1 << 20, (3 << 20) + 17])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_parallel_crc_is_the_plain_crc(monkeypatch, nbytes, threads):
    monkeypatch.setattr(checksum, "MIN_PIECE_BYTES", 4096)  # many pieces even for small data
    data = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    with ThreadPoolExecutor(threads) as pool:
        assert crc32c_parallel(data, pool, threads) == chunk_checksum(data)
    assert crc32c_parallel(bytearray(data.tobytes()), None, threads) == chunk_checksum(data)


@given(st.integers(0, 1 << 34), st.integers(1, 64))
def test_pieces_cover_the_buffer_in_order(nbytes, pieces):
    ranges = piece_ranges(nbytes, pieces)
    assert ranges[0][0] == 0 and ranges[-1][1] == nbytes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert len(ranges) <= pieces
