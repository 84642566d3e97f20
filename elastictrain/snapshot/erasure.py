"""Systematic Reed-Solomon erasure coding of snapshot chunks, on ISA-L through ctypes.

A snapshot of ``nbytes`` is cut into ``k`` equal data chunks (zero-padded to ``chunk_size``);
``m`` parity chunks are computed over GF(2^8) with ISA-L's Cauchy matrix
(``gf_gen_cauchy1_matrix``: identity on top, ``1 / (i ^ j)`` below). Every k x k submatrix of
it is invertible, so any ``k`` of the ``k + m`` chunks rebuild the others. ISA-L's Vandermonde
generator (``gf_gen_rs_matrix``) is not used: it is not MDS for every (k, m).

Hot path: ``ErasureCodec.encode`` and ``decode`` take buffers the caller allocated once and
reuses (numpy arrays, CPU torch tensors, anything with the buffer protocol), hand their raw
addresses to ``ec_encode_data`` and never copy or allocate chunk data; a call allocates only
small bookkeeping (the two pointer arrays ISA-L takes, ``k + m`` words). ctypes releases the
GIL during the foreign call, so with ``threads > 1`` a call is split into 64-byte-aligned
stripes of the chunk length that run in parallel.

ISA-L is found, in this order: ``$ETRAIN_ISAL_LIB`` (an explicit path, used alone), the copy
that the ``pyeclib`` wheel bundles (``pyeclib.libs/libisal*.so*``), the system's ``libisal``
(Debian's ``libisal2``). It is loaded on first use, not at import.

Checksums are CRC32C (``crc32_iscsi``, the same polynomial as iSCSI, ext4 and gRPC, with the
standard initial value and final xor), hardware-accelerated in ISA-L.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from elastictrain.errors import ConfigError, ElasticTrainError

logger = logging.getLogger(__name__)

# Path of the ISA-L shared library; when set it is the only one tried.
ENV_ISAL_LIB = "ETRAIN_ISAL_LIB"

# Chunk lengths are multiples of this (bytes): one cache line, ISA-L's widest vector.
DEFAULT_ALIGN = 64
# GF(2^8) Cauchy rows are 1 / (i ^ j) with i < k + m: at most 255 chunks per snapshot.
MAX_TOTAL_CHUNKS = 255
# Threads split the chunk length into stripes of at least this many bytes (a smaller stripe
# costs more in hand-off than it saves) and at this alignment.
MIN_STRIPE_BYTES = 256 * 1024
STRIPE_ALIGN = 64
# ISA-L takes lengths as C int: longer chunks are coded in pieces of this many bytes.
MAX_CALL_BYTES = 1 << 30
# Erasure patterns whose decode tables are kept (each is 32 * k * rows bytes).
DECODE_TABLE_CACHE_SIZE = 64

_CRC32C_INIT = 0xFFFFFFFF
_REQUIRED_SYMBOLS = (
    "gf_gen_cauchy1_matrix",
    "ec_init_tables",
    "ec_encode_data",
    "gf_invert_matrix",
    "gf_mul",
)

# A chunk buffer: a numpy array, a CPU torch tensor, or any object with the buffer protocol
# (bytearray, memoryview, mmap; bytes for read-only inputs). C-contiguous; measured in bytes.
ChunkBuffer = Any


class ErasureCodingError(ElasticTrainError):
    """Base of the erasure-coding errors."""


class ErasureCodingUnavailableError(ErasureCodingError):
    """No usable ISA-L shared library was found."""

    hint = (
        "pip install pyeclib (its wheel bundles ISA-L), apt-get install libisal2, "
        f"or set {ENV_ISAL_LIB}=/path/to/libisal.so.2"
    )


class ChunkLayoutError(ErasureCodingError, ValueError):
    """Chunk buffers or indices do not fit the codec: wrong count, unequal lengths, an index
    out of range, a read-only or non-contiguous output."""


class NotEnoughChunksError(ErasureCodingError):
    """Fewer than k intact chunks are left: the snapshot cannot be rebuilt from this set."""

    hint = "more chunks were lost than the code tolerates; restore from the disk tier"

    def __init__(
        self,
        needed: int,
        intact: Sequence[int],
        lost: Sequence[int] = (),
        corrupt: Sequence[int] = (),
    ) -> None:
        self.needed = needed
        self.intact = tuple(intact)
        self.lost = tuple(lost)
        self.corrupt = tuple(corrupt)
        super().__init__(
            f"need {needed} intact chunks, have {len(self.intact)} {list(self.intact)}"
            f" (lost {list(self.lost)}, corrupt {list(self.corrupt)})"
        )


class ChunkCorruptError(ErasureCodingError):
    """A chunk's CRC32C differs from the one recorded when it was encoded."""

    def __init__(self, index: int, expected: int, actual: int) -> None:
        self.index = index
        self.expected = expected
        self.actual = actual
        super().__init__(f"chunk {index}: crc32c {actual:#010x}, expected {expected:#010x}")


@dataclass(frozen=True)
class ErasureScheme:
    """k data chunks plus m parity chunks; any m of the k + m may be lost."""

    k: int
    m: int

    def __post_init__(self) -> None:
        for name in ("k", "m"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.m < 0:
            raise ConfigError(f"m must be >= 0, got {self.m}")
        if self.k + self.m > MAX_TOTAL_CHUNKS:
            raise ConfigError(f"k + m must be <= {MAX_TOTAL_CHUNKS}, got {self.k + self.m}")

    @property
    def total(self) -> int:
        """Chunks per snapshot, k + m."""
        return self.k + self.m

    @property
    def memory_overhead(self) -> float:
        """Bytes held cluster-wide per snapshot byte, (k + m) / k."""
        return self.total / self.k


@dataclass(frozen=True)
class IsalLibrary:
    """The loaded ISA-L and where it came from."""

    path: str
    source: str
    handle: ctypes.CDLL
    has_crc32c: bool


def _isal_candidates() -> list[tuple[str, str]]:
    """``(source, path)`` pairs to try, best first."""
    override = os.environ.get(ENV_ISAL_LIB)
    if override:
        return [(f"${ENV_ISAL_LIB}", override)]
    candidates: list[tuple[str, str]] = []
    spec = importlib.util.find_spec("pyeclib")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location).parent / "pyeclib.libs"
        candidates += [("pyeclib wheel", str(p)) for p in sorted(bundled.glob("libisal*.so*"))]
    system = ctypes.util.find_library("isal")
    if system:
        candidates.append(("system libisal", system))
    return candidates


def _declare_signatures(handle: ctypes.CDLL) -> None:
    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    pointers = ctypes.POINTER(ctypes.c_void_p)
    handle.gf_gen_cauchy1_matrix.argtypes = [c_void_p, c_int, c_int]
    handle.gf_gen_cauchy1_matrix.restype = None
    handle.ec_init_tables.argtypes = [c_int, c_int, c_void_p, c_void_p]
    handle.ec_init_tables.restype = None
    handle.ec_encode_data.argtypes = [c_int, c_int, c_int, c_void_p, pointers, pointers]
    handle.ec_encode_data.restype = None
    handle.gf_invert_matrix.argtypes = [c_void_p, c_void_p, c_int]
    handle.gf_invert_matrix.restype = c_int
    handle.gf_mul.argtypes = [ctypes.c_ubyte, ctypes.c_ubyte]
    handle.gf_mul.restype = ctypes.c_ubyte
    if hasattr(handle, "crc32_iscsi"):
        handle.crc32_iscsi.argtypes = [c_void_p, c_int, ctypes.c_uint32]
        handle.crc32_iscsi.restype = ctypes.c_uint32


@functools.cache
def isal_library() -> IsalLibrary:
    """Load ISA-L once per process; raises ErasureCodingUnavailableError naming what was tried."""
    tried: list[str] = []
    for source, path in _isal_candidates():
        try:
            handle = ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path} ({source}): {exc}")
            continue
        absent = [name for name in _REQUIRED_SYMBOLS if not hasattr(handle, name)]
        if absent:
            tried.append(f"{path} ({source}): lacks {', '.join(absent)}")
            continue
        _declare_signatures(handle)
        library = IsalLibrary(path, source, handle, has_crc32c=hasattr(handle, "crc32_iscsi"))
        logger.debug("ISA-L loaded from %s (%s)", path, source)
        return library
    raise ErasureCodingUnavailableError(
        "ISA-L shared library not found; tried: " + ("; ".join(tried) or "nothing to try")
    )


class _Span(NamedTuple):
    address: int
    nbytes: int
    owner: object  # keeps the memory alive while its address is in use


def _is_tensor(buffer: object) -> bool:
    return hasattr(buffer, "data_ptr") and hasattr(buffer, "is_contiguous")


def _span(buffer: ChunkBuffer, *, writable: bool, name: str) -> _Span:
    """Address and length of a C-contiguous CPU buffer, without copying it."""
    if _is_tensor(buffer):
        if buffer.device.type != "cpu":
            raise ChunkLayoutError(f"{name} is on {buffer.device}; chunks must be in CPU memory")
        if not buffer.is_contiguous():
            raise ChunkLayoutError(f"{name} is not contiguous")
        return _Span(buffer.data_ptr(), buffer.numel() * buffer.element_size(), buffer)
    if isinstance(buffer, np.ndarray):
        array = buffer
    else:
        try:
            array = np.frombuffer(buffer, dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise ChunkLayoutError(f"{name} is not a contiguous byte buffer: {exc}") from exc
    if not array.flags.c_contiguous:
        raise ChunkLayoutError(f"{name} is not C-contiguous")
    if writable and not array.flags.writeable:
        raise ChunkLayoutError(f"{name} is read-only")
    return _Span(array.__array_interface__["data"][0], array.nbytes, array)


def _byte_array(buffer: ChunkBuffer, *, writable: bool, name: str) -> np.ndarray:
    """A 1-D uint8 numpy view of the buffer's bytes (no copy)."""
    span = _span(buffer, writable=writable, name=name)
    if isinstance(span.owner, np.ndarray):
        return span.owner.reshape(-1).view(np.uint8)
    if span.nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    raw = (ctypes.c_ubyte * span.nbytes).from_address(span.address)
    return np.ctypeslib.as_array(raw)


def _spans(buffers: Sequence[ChunkBuffer], count: int, *, writable: bool, name: str) -> list[_Span]:
    if len(buffers) != count:
        raise ChunkLayoutError(f"{name} has {len(buffers)} buffers, expected {count}")
    return [_span(b, writable=writable, name=f"{name}[{i}]") for i, b in enumerate(buffers)]


def _common_length(spans: Sequence[_Span]) -> int:
    lengths = {span.nbytes for span in spans}
    if len(lengths) > 1:
        raise ChunkLayoutError(f"chunk buffers differ in length: {sorted(lengths)} bytes")
    return lengths.pop() if lengths else 0


def chunk_size(nbytes: int, k: int, align: int = DEFAULT_ALIGN) -> int:
    """Bytes per chunk when ``nbytes`` are cut into ``k`` equal chunks: ceil(nbytes / k),
    rounded up to a multiple of ``align``. Zero bytes give zero-length chunks."""
    if nbytes < 0:
        raise ConfigError(f"nbytes must be >= 0, got {nbytes}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if align < 1:
        raise ConfigError(f"align must be >= 1, got {align}")
    per_chunk = -(-nbytes // k)
    return -(-per_chunk // align) * align


def allocate_chunks(nbytes: int, scheme: ErasureScheme, align: int = DEFAULT_ALIGN) -> np.ndarray:
    """A zeroed ``(k + m, chunk_size)`` uint8 array whose rows start on ``align``-byte
    boundaries: the buffers to allocate once per snapshot size and reuse for every snapshot.
    Rows ``0..k-1`` take the data (serialize straight into ``rows[:k].reshape(-1)`` to skip
    ``scatter_data``'s copy), rows ``k..`` the parity."""
    length = chunk_size(nbytes, scheme.k, align)
    raw = np.zeros(scheme.total * length + align, dtype=np.uint8)
    start = -raw.__array_interface__["data"][0] % align
    return raw[start : start + scheme.total * length].reshape(scheme.total, length)


def scatter_data(data: ChunkBuffer, data_chunks: Sequence[ChunkBuffer]) -> None:
    """Copy ``data`` across the equal-length ``data_chunks`` in order, zero-filling the tail."""
    source = _byte_array(data, writable=False, name="data")
    targets = [
        _byte_array(c, writable=True, name=f"data_chunks[{i}]") for i, c in enumerate(data_chunks)
    ]
    length = _common_length([_Span(0, t.nbytes, t) for t in targets])
    if source.nbytes > length * len(targets):
        raise ChunkLayoutError(
            f"{source.nbytes} bytes do not fit {len(targets)} chunks of {length} bytes"
        )
    for index, target in enumerate(targets):
        piece = source[index * length : (index + 1) * length]
        target[: piece.nbytes] = piece
        target[piece.nbytes :] = 0


def join_chunks(
    data_chunks: Sequence[ChunkBuffer], nbytes: int, out: ChunkBuffer | None = None
) -> np.ndarray:
    """The first ``nbytes`` of the concatenated data chunks, written into ``out`` (a buffer of
    exactly ``nbytes``) or a new array; returns it as a uint8 array."""
    sources = [
        _byte_array(c, writable=False, name=f"data_chunks[{i}]") for i, c in enumerate(data_chunks)
    ]
    length = _common_length([_Span(0, s.nbytes, s) for s in sources])
    if nbytes > length * len(sources):
        raise ChunkLayoutError(f"{len(sources)} chunks of {length} bytes hold < {nbytes} bytes")
    target = (
        np.empty(nbytes, np.uint8) if out is None else _byte_array(out, writable=True, name="out")
    )
    if target.nbytes != nbytes:
        raise ChunkLayoutError(f"out holds {target.nbytes} bytes, expected {nbytes}")
    for index, source in enumerate(sources):
        start = index * length
        if start >= nbytes:
            break
        end = min(start + length, nbytes)
        target[start:end] = source[: end - start]
    return target


def _stripes(length: int, threads: int) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` ranges covering ``length``, one per thread when worth it."""
    count = min(threads, length // MIN_STRIPE_BYTES)
    if count <= 1:
        return [(0, length)]
    stripe = -(-length // count)
    stripe = -(-stripe // STRIPE_ALIGN) * STRIPE_ALIGN
    return [(start, min(stripe, length - start)) for start in range(0, length, stripe)]


class ErasureCodec:
    """Encode and decode one (k, m) Cauchy Reed-Solomon code with cached ISA-L tables.

    Thread-safe: calls may overlap (the decode-table cache is locked) as long as they do not
    write the same output buffers. ``threads > 1`` starts a pool on first use; ``close`` it.
    """

    def __init__(self, k: int, m: int, *, threads: int = 1) -> None:
        self.scheme = ErasureScheme(k, m)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
        self.threads = threads
        self._isal = isal_library().handle
        total = self.scheme.total
        self._matrix = (ctypes.c_ubyte * (total * k))()
        self._isal.gf_gen_cauchy1_matrix(self._matrix, total, k)
        self._encode_tables = (ctypes.c_ubyte * (32 * k * max(m, 1)))()
        if m:
            self._isal.ec_init_tables(k, m, ctypes.byref(self._matrix, k * k), self._encode_tables)
        self._decode_tables: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], ctypes.Array]
        self._decode_tables = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def k(self) -> int:
        return self.scheme.k

    @property
    def m(self) -> int:
        return self.scheme.m

    def __repr__(self) -> str:
        return f"ErasureCodec(k={self.k}, m={self.m}, threads={self.threads})"

    def __enter__(self) -> ErasureCodec:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the stripe threads, if any were started."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def encode(self, data_chunks: Sequence[ChunkBuffer], parity_out: Sequence[ChunkBuffer]) -> None:
        """Write the m parity chunks of the k equal-length ``data_chunks`` into ``parity_out``
        (m writable buffers of the same length, owned and reused by the caller)."""
        sources = _spans(data_chunks, self.k, writable=False, name="data_chunks")
        targets = _spans(parity_out, self.m, writable=True, name="parity_out")
        length = _common_length(sources + targets)
        if self.m and length:
            self._code(self._encode_tables, sources, targets, length)

    def encode_columns(
        self,
        columns: Sequence[tuple[int, int, Sequence[int]]],
        parity_out: Sequence[ChunkBuffer],
    ) -> None:
        """Parity of k data chunks that lie in pieces of other buffers: each ``(column,
        length, addresses)`` says that bytes ``[column, column + length)`` of data chunk ``i``
        start at raw address ``addresses[i]`` (in memory the caller keeps alive and does not
        change meanwhile). Parity goes to ``parity_out`` (m writable buffers of the chunk
        length). Long columns are split across the codec's threads."""
        if not self.m:
            return
        targets = _spans(parity_out, self.m, writable=True, name="parity_out")
        length = _common_length(targets)
        work: list[tuple[int, int, Sequence[int]]] = []
        for column, nbytes, addresses in columns:
            if len(addresses) != self.k:
                raise ChunkLayoutError(f"{len(addresses)} addresses for k={self.k}")
            if column < 0 or nbytes < 0 or column + nbytes > length:
                raise ChunkLayoutError(f"column {column}+{nbytes} outside 0..{length}")
            for offset, piece in _stripes(nbytes, self.threads):
                work.append((column + offset, piece, [a + offset for a in addresses]))

        def code(item: tuple[int, int, Sequence[int]]) -> None:
            column, nbytes, addresses = item
            sources = [_Span(address - column, 0, None) for address in addresses]
            self._code_range(self._encode_tables, sources, targets, column, nbytes)

        if self.threads == 1 or len(work) == 1:
            for item in work:
                code(item)
            return
        for future in [self._stripe_pool().submit(code, item) for item in work]:
            future.result()

    def decode(
        self,
        available: Mapping[int, ChunkBuffer],
        missing: Sequence[int],
        out: Mapping[int, ChunkBuffer],
    ) -> None:
        """Rebuild the chunks at indices ``missing`` (data or parity) into ``out[index]`` from
        any k of the ``available`` chunks (index -> buffer). Raises NotEnoughChunksError when
        fewer than k are available."""
        total = self.scheme.total
        targets = tuple(dict.fromkeys(missing))
        for index in (*available, *targets):
            if not 0 <= index < total:
                raise ChunkLayoutError(f"chunk index {index} is outside 0..{total - 1}")
        if both := sorted(set(targets) & set(available)):
            raise ChunkLayoutError(f"chunks {both} are both available and missing")
        if absent := [index for index in targets if index not in out]:
            raise ChunkLayoutError(f"no output buffer for missing chunks {absent}")
        if not targets:
            return
        if len(available) < self.k:
            raise NotEnoughChunksError(self.k, sorted(available), lost=sorted(targets))
        sources = tuple(sorted(available)[: self.k])
        source_spans = [
            _span(available[i], writable=False, name=f"available[{i}]") for i in sources
        ]
        target_spans = [_span(out[i], writable=True, name=f"out[{i}]") for i in targets]
        length = _common_length(source_spans + target_spans)
        if length:
            tables = self._decode_tables_for(sources, targets)
            self._code(tables, source_spans, target_spans, length)

    def _decode_tables_for(
        self, sources: tuple[int, ...], targets: tuple[int, ...]
    ) -> ctypes.Array:
        key = (sources, targets)
        with self._lock:
            tables = self._decode_tables.get(key)
            if tables is not None:
                self._decode_tables.move_to_end(key)
                return tables
            tables = self._build_decode_tables(sources, targets)
            self._decode_tables[key] = tables
            if len(self._decode_tables) > DECODE_TABLE_CACHE_SIZE:
                self._decode_tables.popitem(last=False)
            return tables

    def _build_decode_tables(
        self, sources: tuple[int, ...], targets: tuple[int, ...]
    ) -> ctypes.Array:
        """Surviving = B @ data, with B the encode rows of ``sources``; so data = inv(B) @
        surviving, and parity row p = (encode row p) @ inv(B) @ surviving."""
        k, matrix, gf_mul = self.k, self._matrix, self._isal.gf_mul
        survivors = (ctypes.c_ubyte * (k * k))()
        for row, index in enumerate(sources):
            ctypes.memmove(ctypes.byref(survivors, row * k), ctypes.byref(matrix, index * k), k)
        inverse = (ctypes.c_ubyte * (k * k))()
        if self._isal.gf_invert_matrix(survivors, inverse, k) != 0:
            raise ErasureCodingError(f"encode rows {list(sources)} are singular")
        rows = (ctypes.c_ubyte * (k * len(targets)))()
        for row, index in enumerate(targets):
            if index < k:
                ctypes.memmove(ctypes.byref(rows, row * k), ctypes.byref(inverse, index * k), k)
                continue
            coefficients = matrix[index * k : (index + 1) * k]
            for column in range(k):
                value = 0
                for i, coefficient in enumerate(coefficients):
                    if coefficient:
                        value ^= gf_mul(coefficient, inverse[i * k + column])
                rows[row * k + column] = value
        tables = (ctypes.c_ubyte * (32 * k * len(targets)))()
        self._isal.ec_init_tables(k, len(targets), rows, tables)
        return tables

    def _code(
        self, tables: ctypes.Array, sources: list[_Span], targets: list[_Span], length: int
    ) -> None:
        stripes = _stripes(length, self.threads)
        if len(stripes) == 1:
            self._code_range(tables, sources, targets, 0, length)
            return
        pool = self._stripe_pool()
        futures: list[Future[None]] = [
            pool.submit(self._code_range, tables, sources, targets, offset, nbytes)
            for offset, nbytes in stripes[1:]
        ]
        try:
            self._code_range(tables, sources, targets, *stripes[0])
        finally:
            for future in futures:
                future.result()

    def _code_range(
        self,
        tables: ctypes.Array,
        sources: list[_Span],
        targets: list[_Span],
        offset: int,
        nbytes: int,
    ) -> None:
        k, rows = len(sources), len(targets)
        end = offset + nbytes
        for start in range(offset, end, MAX_CALL_BYTES):
            piece = min(MAX_CALL_BYTES, end - start)
            source_ptrs = (ctypes.c_void_p * k)(*(s.address + start for s in sources))
            target_ptrs = (ctypes.c_void_p * rows)(*(t.address + start for t in targets))
            self._isal.ec_encode_data(piece, k, rows, tables, source_ptrs, target_ptrs)

    def _stripe_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.threads - 1, thread_name_prefix="erasure-stripe"
                )
            return self._pool


def chunk_checksum(buffer: ChunkBuffer) -> int:
    """CRC32C of the buffer's bytes (``crc32c(b"123456789") == 0xE3069283``)."""
    library = isal_library()
    if not library.has_crc32c:
        raise ErasureCodingUnavailableError(f"{library.path} has no crc32_iscsi (CRC32C)")
    span = _span(buffer, writable=False, name="buffer")
    crc = _CRC32C_INIT
    for start in range(0, span.nbytes, MAX_CALL_BYTES):
        piece = min(MAX_CALL_BYTES, span.nbytes - start)
        crc = library.handle.crc32_iscsi(span.address + start, piece, crc)
    return crc ^ _CRC32C_INIT


def verify_chunk(index: int, buffer: ChunkBuffer, expected: int) -> None:
    """Raise ChunkCorruptError when the chunk's CRC32C is not ``expected``."""
    actual = chunk_checksum(buffer)
    if actual != expected:
        raise ChunkCorruptError(index, expected, actual)


@dataclass(frozen=True)
class EncodedSnapshot:
    """A snapshot's k + m chunks (rows of ``chunks``) and the CRC32C of each."""

    nbytes: int
    chunks: np.ndarray
    checksums: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.chunks.ndim != 2 or len(self.checksums) != self.chunks.shape[0]:
            raise ChunkLayoutError(
                f"{len(self.checksums)} checksums for chunks of shape {self.chunks.shape}"
            )


def encode_snapshot(
    codec: ErasureCodec, data: ChunkBuffer, align: int = DEFAULT_ALIGN
) -> EncodedSnapshot:
    """Split, encode and checksum ``data`` into new buffers (the allocating convenience; the
    hot path keeps ``allocate_chunks`` buffers and calls ``scatter_data`` + ``encode``)."""
    source = _byte_array(data, writable=False, name="data")
    chunks = allocate_chunks(source.nbytes, codec.scheme, align)
    scatter_data(source, chunks[: codec.k])
    codec.encode(chunks[: codec.k], chunks[codec.k :])
    return EncodedSnapshot(source.nbytes, chunks, tuple(chunk_checksum(c) for c in chunks))


def decode_snapshot(
    codec: ErasureCodec,
    chunks: Mapping[int, ChunkBuffer | None],
    checksums: Sequence[int],
    nbytes: int,
    out: ChunkBuffer | None = None,
) -> np.ndarray:
    """The original ``nbytes`` bytes from whichever chunks survived (index -> buffer; absent or
    None = lost). A chunk whose CRC32C differs from ``checksums[index]`` is treated as lost.
    Raises NotEnoughChunksError, chained from the last ChunkCorruptError if any, when fewer
    than k intact chunks remain."""
    total = codec.scheme.total
    if len(checksums) != total:
        raise ChunkLayoutError(f"{len(checksums)} checksums for {total} chunks")
    intact: dict[int, ChunkBuffer] = {}
    lost: list[int] = []
    corrupt: list[int] = []
    last_corruption: ChunkCorruptError | None = None
    for index in range(total):
        buffer = chunks.get(index)
        if buffer is None:
            lost.append(index)
            continue
        try:
            verify_chunk(index, buffer, checksums[index])
        except ChunkCorruptError as exc:
            logger.warning("%s; decoding around it", exc)
            corrupt.append(index)
            last_corruption = exc
            continue
        intact[index] = buffer
    if len(intact) < codec.k:
        raise NotEnoughChunksError(
            codec.k, sorted(intact), lost=lost, corrupt=corrupt
        ) from last_corruption
    missing_data = [index for index in range(codec.k) if index not in intact]
    length = _common_length([_span(b, writable=False, name="chunk") for b in intact.values()])
    rebuilt = np.empty((len(missing_data), length), dtype=np.uint8)
    if missing_data:
        codec.decode(intact, missing_data, dict(zip(missing_data, rebuilt, strict=True)))
    data_chunks = [
        rebuilt[missing_data.index(i)] if i in missing_data else intact[i] for i in range(codec.k)
    ]
    return join_chunks(data_chunks, nbytes, out)
