"""Erasure coding (ISA-L Cauchy Reed-Solomon, CRC32C) and chunk placement.

Property tests: every loss of up to m of k + m chunks decodes, exhaustively over the loss
combinations for small codes; corrupt chunks are found by checksum and decoded around; more
than m losses raise; encoding writes into the caller's buffers without allocating.
"""

from __future__ import annotations

import itertools
import math
import random
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastictrain.errors import ConfigError
from elastictrain.snapshot import erasure
from elastictrain.snapshot.erasure import (
    ChunkCorruptError,
    ChunkLayoutError,
    ErasureCodec,
    ErasureCodingUnavailableError,
    ErasureScheme,
    NotEnoughChunksError,
    allocate_chunks,
    chunk_checksum,
    chunk_size,
    decode_snapshot,
    encode_snapshot,
    join_chunks,
    scatter_data,
    verify_chunk,
)
from elastictrain.snapshot.placement import (
    Redundancy,
    choose_scheme,
    plan_placement,
)

pytestmark = pytest.mark.timeout(60)

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=100, deadline=None)
SIZES = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, 4095, 4097]), st.integers(0, 50_000))
SCHEMES = st.tuples(st.integers(1, 8), st.integers(0, 4))

_codecs: dict[tuple[int, int], ErasureCodec] = {}


def _codec(k: int, m: int) -> ErasureCodec:
    """One codec per (k, m) for the module, so decode tables are reused across examples."""
    if (k, m) not in _codecs:
        _codecs[(k, m)] = ErasureCodec(k, m)
    return _codecs[(k, m)]


def _random_bytes(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _loss_patterns(total: int, most: int, seed: int, limit: int | None):
    """Every set of at most ``most`` chunk indices; a random ``limit`` of them when more."""
    patterns = [
        lost for count in range(most + 1) for lost in itertools.combinations(range(total), count)
    ]
    if limit is None or len(patterns) <= limit:
        return patterns
    return random.Random(seed).sample(patterns, limit)


def _assert_every_loss_decodes(
    codec: ErasureCodec, data: np.ndarray, seed: int, limit: int | None = 200
) -> int:
    """Encode ``data``, then rebuild each loss pattern (data and parity chunks, and the
    original bytes); returns how many patterns were checked."""
    encoded = encode_snapshot(codec, data)
    total, length = codec.scheme.total, encoded.chunks.shape[1]
    patterns = _loss_patterns(total, codec.m, seed, limit)
    for lost in patterns:
        survivors = {i: encoded.chunks[i] for i in range(total) if i not in lost}
        rebuilt = {i: np.full(length, 0xAA, dtype=np.uint8) for i in lost}
        codec.decode(survivors, list(lost), rebuilt)
        for index in lost:
            assert np.array_equal(rebuilt[index], encoded.chunks[index]), (lost, index)
        restored = decode_snapshot(codec, survivors, encoded.checksums, data.nbytes)
        assert np.array_equal(restored, data), lost
    return len(patterns)


# --- decode from any k of k + m -------------------------------------------------------------


@PROPERTY
@given(scheme=SCHEMES, nbytes=SIZES, seed=st.integers(0, 2**32 - 1))
def test_every_loss_of_up_to_m_chunks_decodes(scheme, nbytes, seed):
    k, m = scheme
    _assert_every_loss_decodes(_codec(k, m), _random_bytes(nbytes, seed), seed)


@pytest.mark.parametrize(
    ("k", "m"), [(k, m) for k in range(1, 7) for m in range(0, 5) if k + m <= 8]
)
def test_every_loss_pattern_exhaustively_for_small_codes(k, m):
    checked = _assert_every_loss_decodes(
        _codec(k, m), _random_bytes(1001, k * 10 + m), seed=0, limit=None
    )
    assert checked == sum(math.comb(k + m, lost) for lost in range(m + 1))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("k", "m"), [(4, 2), (8, 2), (3, 4)])
def test_a_few_megabytes_decode_after_every_loss_of_up_to_m(k, m):
    data = _random_bytes(3 * 1024 * 1024 + 7, k)
    _assert_every_loss_decodes(_codec(k, m), data, seed=k, limit=None)


def test_parity_is_isal_cauchy_as_liberasurecode_writes_it():
    """Same parity bytes as pyeclib's ``isa_l_rs_cauchy`` (gf_gen_cauchy1_matrix) driver."""
    ec_iface = pytest.importorskip("pyeclib.ec_iface")
    driver = ec_iface.ECDriver(k=4, m=2, ec_type="isa_l_rs_cauchy")
    header = 80  # liberasurecode's fragment_header_t
    fragments = driver.encode(bytes(_random_bytes(100_000, 9)))
    payloads = [np.frombuffer(f[header:], dtype=np.uint8) for f in fragments]
    parity = [np.empty_like(payloads[0]) for _ in range(2)]
    _codec(4, 2).encode(payloads[:4], parity)
    assert all(
        np.array_equal(ours, theirs) for ours, theirs in zip(parity, payloads[4:], strict=True)
    )


def test_more_than_m_losses_raise_not_enough_chunks():
    codec = _codec(4, 2)
    encoded = encode_snapshot(codec, _random_bytes(5000, 1))
    survivors = {i: encoded.chunks[i] for i in (1, 3, 5)}
    with pytest.raises(NotEnoughChunksError) as caught:
        codec.decode(
            survivors, [0, 2, 4], {i: np.empty(encoded.chunks.shape[1]) for i in (0, 2, 4)}
        )
    assert caught.value.needed == 4 and caught.value.intact == (1, 3, 5)
    with pytest.raises(NotEnoughChunksError, match=r"lost \[0, 2, 4\]"):
        decode_snapshot(codec, survivors, encoded.checksums, 5000)


def test_m_zero_is_plain_splitting():
    codec = _codec(3, 0)
    data = _random_bytes(1000, 2)
    encoded = encode_snapshot(codec, data)
    assert encoded.chunks.shape == (3, chunk_size(1000, 3))
    assert np.array_equal(encoded.chunks.reshape(-1)[:1000], data)
    with pytest.raises(NotEnoughChunksError):
        decode_snapshot(
            codec, {0: encoded.chunks[0], 1: encoded.chunks[1]}, encoded.checksums, 1000
        )


# --- checksums --------------------------------------------------------------------------------


def test_checksum_is_standard_crc32c():
    assert chunk_checksum(b"123456789") == 0xE3069283
    assert chunk_checksum(b"") == 0
    assert chunk_checksum(bytearray(32)) == 0x8A9136AA


def test_checksum_chains_across_pieces(monkeypatch):
    data = _random_bytes(10_000, 4)
    whole = chunk_checksum(data)
    monkeypatch.setattr(erasure, "MAX_CALL_BYTES", 999)
    assert chunk_checksum(data) == whole


@PROPERTY
@given(
    scheme=st.tuples(st.integers(1, 6), st.integers(1, 4)),
    nbytes=st.integers(1, 20_000),
    data=st.data(),
)
def test_flipped_byte_is_detected_and_decoded_around(scheme, nbytes, data):
    k, m = scheme
    codec = _codec(k, m)
    original = _random_bytes(nbytes, nbytes)
    encoded = encode_snapshot(codec, original)
    chunks = {i: encoded.chunks[i].copy() for i in range(codec.scheme.total)}
    victim = data.draw(st.integers(0, codec.scheme.total - 1), label="victim")
    offset = data.draw(st.integers(0, encoded.chunks.shape[1] - 1), label="offset")
    chunks[victim][offset] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(ChunkCorruptError) as caught:
        verify_chunk(victim, chunks[victim], encoded.checksums[victim])
    assert caught.value.index == victim
    assert np.array_equal(decode_snapshot(codec, chunks, encoded.checksums, nbytes), original)


def test_corruption_beyond_m_raises_chained_to_the_corrupt_chunk():
    codec = _codec(4, 2)
    encoded = encode_snapshot(codec, _random_bytes(4096, 5))
    chunks = {i: encoded.chunks[i].copy() for i in range(6)}
    del chunks[0]
    for index in (2, 5):
        chunks[index][17] ^= 0x40
    with pytest.raises(NotEnoughChunksError) as caught:
        decode_snapshot(codec, chunks, encoded.checksums, 4096)
    assert caught.value.lost == (0,) and caught.value.corrupt == (2, 5)
    assert isinstance(caught.value.__cause__, ChunkCorruptError)


# --- buffers: reused, never reallocated -------------------------------------------------------


def test_encode_writes_into_the_callers_buffers_without_allocating():
    codec = _codec(4, 2)
    chunks = allocate_chunks(4 * 1024 * 1024, codec.scheme)
    scatter_data(_random_bytes(4 * 1024 * 1024, 6), chunks[:4])
    parity = [chunks[4], chunks[5]]
    kept = list(parity)
    addresses = [p.__array_interface__["data"][0] for p in parity]
    assert codec.encode(chunks[:4], parity) is None
    first = chunk_checksum(chunks[4])
    chunks[0, :100] ^= 0xFF
    tracemalloc.start()
    try:
        codec.encode(chunks[:4], parity)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"encode allocated {peak} bytes"
    assert all(now is before for now, before in zip(parity, kept, strict=True))
    assert [p.__array_interface__["data"][0] for p in parity] == addresses
    assert chunk_checksum(chunks[4]) != first


def test_rows_are_aligned_and_padding_is_zero():
    chunks = allocate_chunks(1001, ErasureScheme(3, 2), align=64)
    assert chunks.shape == (5, 384)
    assert all(row.__array_interface__["data"][0] % 64 == 0 for row in chunks)
    chunks[:] = 7
    scatter_data(_random_bytes(1001, 1), chunks[:3])
    assert not chunks.reshape(-1)[1001 : 3 * 384].any()


def test_torch_tensors_and_bytearrays_are_chunk_buffers():
    torch = pytest.importorskip("torch")
    codec = _codec(4, 2)
    reference = encode_snapshot(codec, _random_bytes(8192, 8))
    data = [torch.from_numpy(row.copy()) for row in reference.chunks[:4]]
    parity = [torch.zeros(reference.chunks.shape[1], dtype=torch.uint8) for _ in range(2)]
    pointers = [t.data_ptr() for t in parity]
    codec.encode(data, parity)
    assert [t.data_ptr() for t in parity] == pointers
    assert all(np.array_equal(t.numpy(), reference.chunks[4 + i]) for i, t in enumerate(parity))
    out = {0: bytearray(reference.chunks.shape[1]), 5: torch.empty_like(parity[1])}
    codec.decode({1: data[1], 2: bytes(data[2].numpy()), 3: data[3], 4: parity[0]}, [0, 5], out)
    assert bytes(out[0]) == reference.chunks[0].tobytes()
    assert chunk_checksum(out[5]) == reference.checksums[5]


@pytest.mark.parametrize("threads", [2, 3])
def test_striped_threads_give_the_same_bytes(threads):
    length = 3 * erasure.MIN_STRIPE_BYTES + 4160
    reference = encode_snapshot(_codec(4, 2), _random_bytes(4 * length, 11))
    with ErasureCodec(4, 2, threads=threads) as codec:
        parity = np.zeros((2, reference.chunks.shape[1]), dtype=np.uint8)
        codec.encode(reference.chunks[:4], parity)
        assert np.array_equal(parity, reference.chunks[4:])
        rebuilt = {i: np.zeros(reference.chunks.shape[1], dtype=np.uint8) for i in (1, 3)}
        codec.decode({i: reference.chunks[i] for i in (0, 2, 4, 5)}, [1, 3], rebuilt)
        assert np.array_equal(rebuilt[1], reference.chunks[1])
        assert np.array_equal(rebuilt[3], reference.chunks[3])


def test_long_chunks_are_coded_in_pieces(monkeypatch):
    reference = encode_snapshot(_codec(3, 2), _random_bytes(30_000, 12))
    monkeypatch.setattr(erasure, "MAX_CALL_BYTES", 640)
    parity = np.zeros((2, reference.chunks.shape[1]), dtype=np.uint8)
    ErasureCodec(3, 2).encode(reference.chunks[:3], parity)
    assert np.array_equal(parity, reference.chunks[3:])


# --- sizes, splitting, validation -------------------------------------------------------------


@QUICK
@given(nbytes=st.integers(0, 10**9), k=st.integers(1, 255), align=st.sampled_from([1, 64, 4096]))
def test_chunk_size_is_the_smallest_aligned_fit(nbytes, k, align):
    size = chunk_size(nbytes, k, align)
    assert size % align == 0 and size * k >= nbytes
    assert size == 0 or (size - align) * k < nbytes


def test_chunk_size_edges():
    assert chunk_size(0, 4) == 0
    assert chunk_size(1, 4) == 64
    assert chunk_size(257, 4) == 128


@PROPERTY
@given(nbytes=SIZES, k=st.integers(1, 8))
def test_scatter_then_join_round_trips(nbytes, k):
    data = _random_bytes(nbytes, nbytes)
    chunks = allocate_chunks(nbytes, ErasureScheme(k, 0))
    scatter_data(data, chunks)
    assert np.array_equal(join_chunks(chunks, nbytes), data)
    out = bytearray(nbytes)
    join_chunks(list(chunks), nbytes, out=out)
    assert bytes(out) == data.tobytes()


@pytest.mark.parametrize(
    ("k", "m", "field"), [(0, 1, "k"), (2, -1, "m"), (200, 56, "k \\+ m"), (True, 1, "k")]
)
def test_scheme_is_validated(k, m, field):
    with pytest.raises(ConfigError, match=field):
        ErasureCodec(k, m)


def test_widest_code_builds_and_decodes():
    codec = ErasureCodec(251, 4)
    data = _random_bytes(251 * 64, 13)
    encoded = encode_snapshot(codec, data)
    survivors = {i: encoded.chunks[i] for i in range(255) if i not in (0, 100, 250, 254)}
    assert np.array_equal(decode_snapshot(codec, survivors, encoded.checksums, data.nbytes), data)


def test_bad_buffers_are_refused_with_the_reason():
    codec = _codec(2, 1)
    good = [np.zeros(64, np.uint8), np.zeros(64, np.uint8)]
    with pytest.raises(ChunkLayoutError, match="read-only"):
        codec.encode(good, [bytes(64)])
    with pytest.raises(ChunkLayoutError, match="differ in length"):
        codec.encode(good, [np.zeros(128, np.uint8)])
    with pytest.raises(ChunkLayoutError, match="expected 2"):
        codec.encode(good[:1], [np.zeros(64, np.uint8)])
    with pytest.raises(ChunkLayoutError, match="C-contiguous"):
        codec.encode(good, [np.zeros(128, np.uint8)[::2]])
    with pytest.raises(ChunkLayoutError, match="outside"):
        codec.decode({0: good[0], 1: good[1]}, [3], {3: np.zeros(64, np.uint8)})
    with pytest.raises(ChunkLayoutError, match="both available and missing"):
        codec.decode({0: good[0], 1: good[1]}, [1], {1: np.zeros(64, np.uint8)})


def test_missing_library_is_a_typed_error_with_a_hint(monkeypatch):
    monkeypatch.setenv(erasure.ENV_ISAL_LIB, "/nonexistent/libisal.so.2")
    erasure.isal_library.cache_clear()
    try:
        with pytest.raises(ErasureCodingUnavailableError, match="/nonexistent") as caught:
            ErasureCodec(4, 2)
        assert erasure.ENV_ISAL_LIB in caught.value.hint
    finally:
        monkeypatch.delenv(erasure.ENV_ISAL_LIB)
        erasure.isal_library.cache_clear()
    assert erasure.isal_library().has_crc32c


# --- placement --------------------------------------------------------------------------------


def _members(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


@QUICK
@given(n=st.integers(1, 24), k=st.integers(1, 8), m=st.integers(0, 4))
def test_placement_puts_chunks_on_distinct_nodes_owner_first(n, k, m):
    decision = plan_placement(_members(n), ErasureScheme(k, m))
    assert [p.owner for p in decision.placements] == _members(n)
    for placement in decision.placements:
        assert placement.holders[0] == placement.owner
        assert len(set(placement.holders)) == len(placement.holders)
    if decision.redundancy is Redundancy.ERASURE:
        assert all(len(p.holders) == k + m for p in decision.placements)


@QUICK
@given(n=st.integers(1, 24), k=st.integers(1, 8), m=st.integers(0, 4))
def test_placement_is_balanced(n, k, m):
    decision = plan_placement(_members(n), ErasureScheme(k, m))
    assert len(set(decision.load().values())) == 1
    if decision.redundancy is Redundancy.ERASURE:
        data_held = [sum(a.index < k for a in decision.held_by(node)) for node in _members(n)]
        assert set(data_held) == {k}


@QUICK
@given(n=st.integers(1, 16), k=st.integers(1, 6), m=st.integers(0, 3), data=st.data())
def test_placement_survives_any_tolerated_loss(n, k, m, data):
    decision = plan_placement(_members(n), ErasureScheme(k, m))
    failed = set(
        data.draw(st.sets(st.sampled_from(_members(n)), max_size=min(decision.tolerated_losses, n)))
    )
    needed = k if decision.redundancy is Redundancy.ERASURE else 1
    for placement in decision.placements:
        assert sum(h not in failed for h in placement.holders) >= needed


def test_placement_is_a_function_of_the_membership_only():
    members = _members(7)
    first = plan_placement(members, ErasureScheme(4, 2))
    assert plan_placement(list(members), ErasureScheme(4, 2)) == first
    assert first.holders_of("node-05") == (
        "node-05",
        "node-06",
        "node-00",
        "node-01",
        "node-02",
        "node-03",
    )
    assert first.held_by("node-00")[0].index == 0


def test_too_few_nodes_fall_back_to_replication():
    decision = plan_placement(_members(3), ErasureScheme(4, 2))
    assert decision.redundancy is Redundancy.REPLICATION
    assert decision.reason == "3 nodes < k+m=6: replicating each snapshot to 2 peers"
    assert decision.tolerated_losses == 2
    assert decision.holders_of("node-02") == ("node-02", "node-00", "node-01")
    single = plan_placement(_members(1), ErasureScheme(4, 2))
    assert single.redundancy is Redundancy.LOCAL and "no peer" in single.reason
    pair = plan_placement(_members(2), ErasureScheme(1, 1))
    assert pair.reason == "k=1: a parity chunk is a full copy; replicating each snapshot to 1 peer"


def test_erasure_reason_names_the_code():
    decision = plan_placement(_members(8), ErasureScheme(4, 2))
    assert decision.redundancy is Redundancy.ERASURE
    assert decision.reason.startswith("8 nodes >= k+m=6: 4 data + 2 parity chunks")
    assert decision.tolerated_losses == 2


@pytest.mark.parametrize(
    ("n", "scheme", "redundancy"),
    [
        (1, (1, 0), Redundancy.LOCAL),
        (2, (1, 1), Redundancy.REPLICATION),
        (3, (2, 1), Redundancy.ERASURE),
        (5, (4, 1), Redundancy.ERASURE),
        (6, (4, 2), Redundancy.ERASURE),
        (64, (4, 2), Redundancy.ERASURE),
    ],
)
def test_default_scheme_per_node_count(n, scheme, redundancy):
    chosen = choose_scheme(n)
    assert (chosen.k, chosen.m) == scheme
    decision = plan_placement(_members(n), chosen)
    assert decision.redundancy is redundancy
    assert decision.tolerated_losses == chosen.m


def test_duplicate_members_are_refused():
    with pytest.raises(ConfigError, match="node-01"):
        plan_placement(["node-00", "node-01", "node-01"], ErasureScheme(1, 1))
