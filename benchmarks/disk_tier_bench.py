"""Disk tier benchmarks, printed as markdown tables.

1. Codec: zstd ratio and single-thread compress / decompress MB/s on weight-like data of
   ``--mib`` MiB per dtype, with and without the byte shuffle, at levels 1 and 3, through the
   writer's own ``FrameCodec`` (64 MiB frames; shuffle and CRC-free). Rates are raw MB per CPU
   second of the calling thread (``time.thread_time``), so other load on a shared machine does
   not distort them; wall-clock rates are in the end-to-end table.
2. Building blocks: CRC-32, shuffle and unshuffle GB/s.
3. End to end: ``DiskTierWriter`` writing one snapshot (fp32 + bf16 records, one per param) to
   local disk, fsyncs included (write MB/s), the part of it that reads the sources (MB/s until
   ``sources_released``), and ``read_snapshot`` reading it back with every check (read MB/s).

Data: ``randn*0.02`` (i.i.d. normal), ``row-scaled`` (normal with a log-normal scale per row of
4096), ``trained MLP`` (a 4096-wide MLP, PyTorch's default init, a few Adam steps on random data;
its fp32 params are cast to bf16 for the bf16 rows).

    python benchmarks/disk_tier_bench.py [--mib 256] [--dir /tmp] [--adam-steps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from datetime import date

import numpy as np
import torch
import zstandard

from elastictrain.snapshot.disk import (
    DiskTierConfig,
    DiskTierWriter,
    FrameCodec,
    Snapshot,
    SnapshotRecord,
    read_snapshot,
    shuffle_bytes,
    unshuffle_bytes,
)

WIDTH = 4096
MB = 1e6


def randn_weights(nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(nbytes // dtype.itemsize, generator=generator) * 0.02).to(dtype)


def row_scaled_weights(nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = nbytes // dtype.itemsize // WIDTH
    scales = torch.exp(torch.randn(rows, 1, generator=generator)) * 0.02
    return (torch.randn(rows, WIDTH, generator=generator) * scales).to(dtype).reshape(-1)


def trained_mlp_params(nbytes: int, adam_steps: int, seed: int) -> list[torch.Tensor]:
    """fp32 params (weights and biases) of a trained-ish MLP holding about ``nbytes``."""
    torch.manual_seed(seed)
    layers = max(1, round(nbytes / 4 / (WIDTH * WIDTH)))
    model = torch.nn.Sequential(
        *[m for _ in range(layers) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(adam_steps):
        x = torch.randn(16, WIDTH)
        loss = (model(x) - x.roll(1, dims=1)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    del optimizer
    return [p.detach() for p in model.parameters()]


def flat_bytes(tensors: list[torch.Tensor], nbytes: int) -> np.ndarray:
    """The first ``nbytes`` of the tensors laid end to end, as one uint8 array."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat.view(torch.uint8).numpy()[:nbytes]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def thread_timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this thread: other processes on the machine do not inflate it."""
    started = time.thread_time()
    fn()
    return time.thread_time() - started


class CompressedBuffer:
    """Stands in for the page cache: frames are copied into one preallocated buffer."""

    def __init__(self, capacity: int) -> None:
        self.data = np.zeros(capacity, dtype=np.uint8)
        self.data.fill(0)  # touch every page before anything is timed
        self.size = 0

    def write(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        self.data[self.size : end] = np.frombuffer(chunk, dtype=np.uint8)
        self.size = end


def codec_row(
    data: np.ndarray, element_size: int, level: int, compressed: CompressedBuffer, out: np.ndarray
) -> tuple[float, float, float]:
    """Ratio, compress MB/s and decompress MB/s (per thread CPU second) of ``data`` through the
    writer's :class:`FrameCodec`."""
    codec = FrameCodec(level=level)
    compressed.size = 0
    frames: list[tuple[int, int]] = []

    def compress() -> None:
        frames.extend(codec.encode(data, element_size, compressed.write)[0])

    def decompress() -> None:
        raw_position, position = 0, 0
        for compressed_size, raw_size in frames:
            frame = compressed.data[position : position + compressed_size]
            codec.decode_frame(frame, element_size, out[raw_position : raw_position + raw_size])
            position, raw_position = position + compressed_size, raw_position + raw_size

    compress_s = thread_timed(compress)
    decompress_s = thread_timed(decompress)
    assert np.array_equal(out, data)
    ratio = data.shape[0] / compressed.size
    return ratio, data.shape[0] / compress_s / MB, data.shape[0] / decompress_s / MB


def building_blocks(data: np.ndarray) -> list[tuple[str, float]]:
    out = np.empty_like(data)
    rows = [("zlib.crc32", thread_timed(lambda: zlib.crc32(data)))]
    for size in (2, 4):
        shuffle_s = thread_timed(lambda s=size: shuffle_bytes(data, s, out))
        unshuffle_s = thread_timed(lambda s=size: unshuffle_bytes(data, s, out))
        rows += [(f"shuffle, {size}-byte elements", shuffle_s)]
        rows += [(f"unshuffle, {size}-byte elements", unshuffle_s)]
    return [(name, data.shape[0] / seconds / 1e9) for name, seconds in rows]


def end_to_end(
    records: list[SnapshotRecord], directory: str, level: int, threads: int
) -> tuple[float, float, float, float]:
    """Write MB/s, MB/s until the sources were released, read MB/s, ratio."""
    root = os.path.join(directory, f"level{level}-threads{threads}")
    config = DiskTierConfig(level=level, threads=threads, keep_last=1)
    with DiskTierWriter(root, config) as writer:
        written = writer.submit(Snapshot(1, "bench", records)).result()
    read_s = timed(lambda: read_snapshot(root))
    shutil.rmtree(root)
    raw = written.raw_bytes
    return (
        raw / written.seconds / MB,
        raw / written.read_seconds / MB,
        raw / read_s / MB,
        (raw / written.compressed_bytes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of data per kind and dtype")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write snapshots")
    parser.add_argument("--adam-steps", type=int, default=3)
    args = parser.parse_args()
    nbytes = args.mib << 20
    started = time.perf_counter()

    mlp = trained_mlp_params(2 * nbytes, args.adam_steps, seed=0)
    datasets: dict[tuple[str, str], np.ndarray] = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        datasets["randn*0.02", name] = flat_bytes([randn_weights(nbytes, dtype, 1)], nbytes)
        datasets["row-scaled", name] = flat_bytes([row_scaled_weights(nbytes, dtype, 2)], nbytes)
        datasets["trained MLP", name] = flat_bytes([p.to(dtype) for p in mlp], nbytes)
    setup_s = time.perf_counter() - started

    print(
        f"`python benchmarks/disk_tier_bench.py --mib {args.mib}` on {platform.node()} "
        f"({os.cpu_count()} cores, torch {torch.__version__}, zstandard {zstandard.__version__}, "
        f"zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}), {date.today().isoformat()}; "
        f"data setup {setup_s:.0f} s; load average {os.getloadavg()[0]:.1f} at the start.\n"
    )
    print(
        f"### Codec, one thread, {args.mib} MiB per row, 64 MiB frames "
        "(raw MB per CPU second of the thread)\n"
    )
    print("| data        | dtype | shuffle | level | ratio | compress MB/s | decompress MB/s |")
    print("|-------------|-------|---------|------:|------:|--------------:|----------------:|")
    compressed, out = CompressedBuffer(nbytes + (nbytes >> 4)), np.ones(nbytes, dtype=np.uint8)
    for (kind, dtype), data in datasets.items():
        element_size = 4 if dtype == "fp32" else 2
        for shuffle in (False, True):
            for level in (1, 3):
                size = element_size if shuffle else 1
                ratio, comp, decomp = codec_row(data, size, level, compressed, out)
                print(
                    f"| {kind:<11} | {dtype:<5} | {'yes' if shuffle else 'no':<7} | {level:>5} "
                    f"| {ratio:>5.2f} | {comp:>13.0f} | {decomp:>15.0f} |"
                )

    print(f"\n### Building blocks on {args.mib} MiB (GB per CPU second)\n")
    print("| operation                   |  GB/s |")
    print("|-----------------------------|------:|")
    for name, rate in building_blocks(datasets["randn*0.02", "fp32"]):
        print(f"| {name:<27} | {rate:>5.2f} |")

    records = [
        SnapshotRecord.from_tensor(f"rank0/mlp/{i}.fp32", p)
        for i, p in enumerate(mlp[: len(mlp) // 2])
    ] + [
        SnapshotRecord.from_tensor(f"rank0/mlp/{i}.bf16", p.to(torch.bfloat16))
        for i, p in enumerate(mlp)
    ]
    total = sum(r.nbytes for r in records)
    print(
        f"\n### End to end: DiskTierWriter to {args.dir} ({total / MB:.0f} MB in {len(records)} "
        "records: trained MLP fp32 + bf16, shuffle on, fsync included)\n"
    )
    print("| level | zstd threads | ratio | write MB/s | to sources released MB/s | read MB/s |")
    print("|------:|-------------:|------:|-----------:|-------------------------:|----------:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for level, threads in ((1, 0), (3, 0), (3, 2)):
            write, held, read, ratio = end_to_end(records, directory, level, threads)
            print(
                f"| {level:>5} | {threads:>12} | {ratio:>5.2f} | {write:>10.0f} | {held:>24.0f} "
                f"| {read:>9.0f} |"
            )
    print(
        f"\nTotal {time.perf_counter() - started:.0f} s; "
        f"load average {os.getloadavg()[0]:.1f} at the end."
    )


if __name__ == "__main__":
    main()
