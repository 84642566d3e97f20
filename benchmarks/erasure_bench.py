"""Erasure-coding throughput on this machine, printed as a markdown table.

For each code (4+2, 8+2 by default) over the same ``--size-mib`` of random data, measured in
one run: our ISA-L codec on reused buffers (1 thread and ``--threads`` threads), zfec, and
pyeclib's bytes-in/bytes-out API on the same ISA-L Cauchy code (``isa_l_rs_cauchy``); beside
them a memcpy of the data into a reused buffer, the memory-bandwidth ceiling of the moment.
Encode = compute the m parity chunks; decode = rebuild data chunks 0 and 1 from the others.
GB/s = data bytes (k chunks) / s, 1 GB = 1e9 bytes; best of ``--repeats`` rounds, each round
running every contender in turn. "Per core" is the 1-thread number.

    python benchmarks/erasure_bench.py [--size-mib 256] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's elastictrain
from elastictrain.snapshot.erasure import (  # noqa: E402
    ErasureCodec,
    ErasureScheme,
    allocate_chunks,
    isal_library,
)

LOST = (0, 1)


@dataclass(frozen=True)
class Contender:
    """One implementation's encode and decode calls, on buffers prepared in advance."""

    implementation: str
    threads: int
    encode: Callable[[], object]
    decode: Callable[[], object] | None


@dataclass(frozen=True)
class Row:
    code: str
    implementation: str
    threads: int
    encode_gbps: float
    decode_gbps: float | None


def _memcpy(chunks: np.ndarray, k: int) -> Contender:
    source = chunks[:k].reshape(-1)
    target = np.ones_like(source)
    return Contender(
        "memcpy into a reused buffer (np.copyto)", 1, lambda: np.copyto(target, source), None
    )


def _ours(chunks: np.ndarray, codec: ErasureCodec) -> Contender:
    k, total = codec.k, codec.scheme.total
    rebuilt = {i: np.ones(chunks.shape[1], dtype=np.uint8) for i in LOST}
    available = {i: chunks[i] for i in range(total) if i not in LOST}
    return Contender(
        "ours: ISA-L ctypes, reused buffers",
        codec.threads,
        lambda: codec.encode(chunks[:k], chunks[k:]),
        lambda: codec.decode(available, LOST, rebuilt),
    )


def _agent_step(chunks: np.ndarray, codec: ErasureCodec) -> Contender:
    """The agent's whole per-step path: two records coded where they lie (parity into reused
    rows) and a CRC32C of every chunk, on the codec's threads."""
    from elastictrain.agent.snapshots import encode_payload

    from elastictrain.snapshot.checksum import crc32c_pieces
    from elastictrain.snapshot.payload import PayloadEntry, payload_layout

    source = chunks[: codec.k].reshape(-1).copy()
    half = source.nbytes // 2 // 64 * 64
    records = [memoryview(source[:half]), memoryview(source[half : source.nbytes - 4096])]
    entries = [PayloadEntry(rank, len(r), b"", 0) for rank, r in enumerate(records)]
    assert payload_layout(entries)[2] <= source.nbytes
    parity = np.zeros_like(chunks[codec.k :])
    zeros = np.zeros(chunks.shape[1], dtype=np.uint8)
    pool = codec._stripe_pool() if codec.threads > 1 else None

    def checksum(pieces: list) -> int:
        return crc32c_pieces(pieces, pool, codec.threads)

    return Contender(
        "agent step: code 2 records in place + CRC32C of k+m chunks",
        codec.threads,
        lambda: encode_payload(entries, records, codec, parity, zeros, checksum),
        None,
    )


def _check_decode(chunks: np.ndarray, codec: ErasureCodec) -> None:
    rebuilt = {i: np.zeros(chunks.shape[1], dtype=np.uint8) for i in LOST}
    available = {i: chunks[i] for i in range(codec.scheme.total) if i not in LOST}
    codec.decode(available, LOST, rebuilt)
    if not all(np.array_equal(rebuilt[i], chunks[i]) for i in LOST):
        raise SystemExit(f"{codec}: rebuilt chunks differ from the originals")


def _zfec(chunks: np.ndarray, scheme: ErasureScheme) -> Contender:
    import zfec

    k, total = scheme.k, scheme.total
    blocks = tuple(memoryview(row) for row in chunks[:k])
    encoder, decoder = zfec.Encoder(k, total), zfec.Decoder(k, total)
    parity_numbers = tuple(range(k, total))
    parity = encoder.encode(blocks, parity_numbers)
    survivors = tuple(i for i in range(total) if i not in LOST)[:k]
    pieces = {**dict(enumerate(blocks)), **dict(zip(parity_numbers, parity, strict=True))}
    shares = tuple(pieces[i] for i in survivors)
    return Contender(
        "zfec",
        1,
        lambda: encoder.encode(blocks, parity_numbers),
        lambda: decoder.decode(shares, survivors),
    )


def _pyeclib(data: bytes, scheme: ErasureScheme) -> Contender:
    from pyeclib.ec_iface import ECDriver

    driver = ECDriver(k=scheme.k, m=scheme.m, ec_type="isa_l_rs_cauchy")
    available = [f for i, f in enumerate(driver.encode(data)) if i not in LOST]
    return Contender(
        "pyeclib bytes API (isa_l_rs_cauchy)",
        1,
        lambda: driver.encode(data),
        lambda: driver.reconstruct(available, list(LOST)),
    )


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def measure(code: str, contenders: list[Contender], nbytes: int, repeats: int) -> list[Row]:
    """Best time of each call over ``repeats`` rounds; every round runs every contender, so a
    burst of load on this shared machine hits them all alike rather than one of them."""
    calls = [(c, op) for c in contenders for op in (c.encode, c.decode) if op is not None]
    for _, call in calls:
        call()  # warm: page faults, decode tables, thread start
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for index, (_, call) in enumerate(calls):
            best[index] = min(best[index], _seconds(call))
    gbps = iter(nbytes / seconds / 1e9 for seconds in best)
    return [
        Row(code, c.implementation, c.threads, next(gbps), next(gbps) if c.decode else None)
        for c in contenders
    ]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    wanted = ("avx2", "avx512f", "avx512bw", "gfni", "vpclmulqdq", "sse4_2")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/gfni"


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(rows: list[Row]) -> str:
    lines = [
        "| code | implementation | threads | encode GB/s | decode GB/s |",
        "|------|----------------|--------:|------------:|------------:|",
    ]
    lines += [
        f"| {r.code} | {r.implementation} | {r.threads} | {_format(r.encode_gbps)} "
        f"| {_format(r.decode_gbps)} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="data bytes per code (MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many rounds")
    parser.add_argument("--threads", type=int, default=2, help="threads for the striped run")
    parser.add_argument("--codes", default="4+2,8+2", help="comma-separated k+m codes")
    args = parser.parse_args(argv)
    nbytes = args.size_mib * 1024 * 1024
    library = isal_library()
    started = time.perf_counter()
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores, {_cpu_features()}")
    print(f"ISA-L: {library.path} ({library.source})")
    print(
        f"data: {args.size_mib} MiB per code, best of {args.repeats}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print()
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    for code in args.codes.split(","):
        k, m = (int(part) for part in code.split("+"))
        scheme = ErasureScheme(k, m)
        chunks = allocate_chunks(nbytes, scheme)
        chunks[:k] = rng.integers(0, 256, chunks[:k].shape, dtype=np.uint8)
        data = chunks[:k].tobytes()
        thread_counts = sorted({1, args.threads})
        with contextlib.ExitStack() as stack:
            codecs = [stack.enter_context(ErasureCodec(k, m, threads=t)) for t in thread_counts]
            contenders = [_memcpy(chunks, k)]
            contenders += [_ours(chunks, codec) for codec in codecs]
            contenders += [_agent_step(chunks, codec) for codec in codecs]
            contenders += [_zfec(chunks, scheme), _pyeclib(data, scheme)]
            rows += measure(code, contenders, chunks[:k].nbytes, args.repeats)
            for codec in codecs:
                _check_decode(chunks, codec)
        del chunks, data, contenders
        gc.collect()
    print(render(rows))
    print()
    print(
        f"load average at end {os.getloadavg()[0]:.2f}; took {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
