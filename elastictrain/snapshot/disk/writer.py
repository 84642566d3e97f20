"""Writes snapshots on one background thread, atomically: a temporary directory, fsynced,
renamed to ``step-<n>``, then LATEST and retention; a crash never leaves a step that looks
complete but is not.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from elastictrain.snapshot.disk.codec import (
    DEFAULT_FRAME_BYTES,
    DEFAULT_LEVEL,
    FrameCodec,
    dtype_element_size,
)
from elastictrain.snapshot.disk.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    FileEntry,
    RecordEntry,
    SnapshotManifest,
    _complete_steps,
    plan_retention,
    step_dir_name,
)
from elastictrain.snapshot.disk.records import Snapshot, SnapshotWriteError

logger = logging.getLogger(__name__)

DEFAULT_PACK_BYTES = 256 << 20
DEFAULT_KEEP_LAST = 3
MIN_FRAME_BYTES = 64 << 10
# Frames are cut at multiples of this, so that every element size (1, 2, 4, 8, 16) divides them.
FRAME_ALIGN = 16

_LEFTOVER = re.compile(r"^(step-\d{12}|LATEST)\.(tmp|trash)-[0-9a-f]+$")


# --------------------------------------------------------------------------------------------
# Writing


class WriteStage(enum.Enum):
    """Points of a write where ``on_stage`` is called (fault injection and progress)."""

    RECORD_WRITTEN = "record_written"  # one record's frames handed to the OS, not yet fsynced
    SOURCES_RELEASED = "sources_released"  # every source byte read; data files not yet fsynced
    MANIFEST_WRITTEN = "manifest_written"  # whole temp dir fsynced, not yet renamed
    PUBLISHED = "published"  # renamed to step-<n>; LATEST not yet updated


StageHook = Callable[[WriteStage, int], None]


class PendingPolicy(enum.Enum):
    """What ``submit`` does while a write runs and another one already waits.

    At most one snapshot waits behind the running write. ``REPLACE_PENDING`` (default): the
    newer snapshot takes the waiting one's place and the older one's future is cancelled, so the
    disk gets the freshest state without a queue. ``DROP_NEW``: the new snapshot is cancelled at
    once and the waiting one kept. ``BLOCK``: ``submit`` blocks until the slot frees up.
    """

    REPLACE_PENDING = "replace_pending"
    DROP_NEW = "drop_new"
    BLOCK = "block"


@dataclass(frozen=True)
class DiskTierConfig:
    """How snapshots are written; see the package docstring for the layout.

    ``threads``: zstd worker threads per frame (0: compress on the writer thread; -1: one per
    core). ``pending_policy``: see :class:`PendingPolicy`.
    """

    level: int = DEFAULT_LEVEL
    threads: int = 0
    frame_bytes: int = DEFAULT_FRAME_BYTES
    pack_bytes: int = DEFAULT_PACK_BYTES
    shuffle: bool = True
    keep_last: int = DEFAULT_KEEP_LAST
    pending_policy: PendingPolicy = PendingPolicy.REPLACE_PENDING

    def __post_init__(self) -> None:
        if not 1 <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(
                f"level must be in [1, {zstandard.MAX_COMPRESSION_LEVEL}], got {self.level}"
            )
        if self.threads < -1:
            raise ValueError(f"threads must be >= -1 (-1: one per core), got {self.threads}")
        if self.frame_bytes < MIN_FRAME_BYTES or self.frame_bytes % FRAME_ALIGN:
            raise ValueError(
                f"frame_bytes must be >= {MIN_FRAME_BYTES} and a multiple of {FRAME_ALIGN}, "
                f"got {self.frame_bytes}"
            )
        if self.pack_bytes < 1:
            raise ValueError(f"pack_bytes must be >= 1, got {self.pack_bytes}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if not isinstance(self.pending_policy, PendingPolicy):
            raise ValueError(f"pending_policy must be a PendingPolicy, got {self.pending_policy!r}")


@dataclass(frozen=True)
class WrittenSnapshot:
    step: int
    path: Path
    raw_bytes: int
    compressed_bytes: int
    files: int
    seconds: float
    read_seconds: float  # from start until the sources were released
    deleted_steps: tuple[int, ...]


class SnapshotWriteFuture(Future["WrittenSnapshot"]):
    """Result of :meth:`DiskTierWriter.submit`: resolves to a :class:`WrittenSnapshot` once the
    snapshot is durable and published; cancelled if it was dropped by the pending policy.

    Buffer rule: the writer reads the source buffers in place. The caller may reuse or free them
    once ``sources_released`` is set, which happens as soon as the last byte was compressed
    (before the fsyncs) and at the latest when the future is done, whatever its outcome.
    """

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.sources_released = threading.Event()
        self.add_done_callback(lambda _: self.sources_released.set())


class _DataFileSink:
    """Appends frames to ``data-NNNNN.zst`` files, starting the next one past ``pack_bytes``.

    Files stay open until :meth:`finish`, which fsyncs them all at once, so that compressing the
    next record never waits for the disk.
    """

    def __init__(self, directory: Path, pack_bytes: int) -> None:
        self._directory = directory
        self._pack_bytes = pack_bytes
        self._open_files: list[Any] = []
        self._crc = 0
        self.name = ""
        self.position = 0
        self.files: list[FileEntry] = []

    def begin_record(self) -> None:
        if not self._open_files or self.position >= self._pack_bytes:
            self._end_file()
            self.name = f"data-{len(self.files):05d}.zst"
            self._open_files.append(open(self._directory / self.name, "wb"))  # noqa: SIM115
            self._crc = 0
            self.position = 0

    def write(self, frame: bytes) -> None:
        self._open_files[-1].write(frame)
        self._crc = zlib.crc32(frame, self._crc)
        self.position += len(frame)

    def _end_file(self) -> None:
        if self._open_files:
            self._open_files[-1].flush()
            self.files.append(FileEntry(self.name, self.position, self._crc))

    def finish(self) -> list[FileEntry]:
        self._end_file()
        for f in self._open_files:
            os.fsync(f.fileno())
        return self.files

    def close(self) -> None:
        for f in self._open_files:
            f.close()


class _SnapshotEncoder:
    """Writes a snapshot's records into a directory through one reused :class:`FrameCodec`."""

    def __init__(self, config: DiskTierConfig) -> None:
        self._config = config
        self._codec = FrameCodec(config.level, config.threads, config.frame_bytes)

    def shuffle_size(self, dtype: str) -> int:
        return dtype_element_size(dtype) if self._config.shuffle else 1

    def write_records(
        self,
        snapshot: Snapshot,
        directory: Path,
        on_stage: StageHook,
        release_sources: Callable[[], None],
    ) -> tuple[list[RecordEntry], list[FileEntry]]:
        """Write every record; call ``release_sources`` once the last source byte was read,
        then fsync the data files."""
        sink = _DataFileSink(directory, self._config.pack_bytes)
        entries = []
        try:
            for record in snapshot.records:
                sink.begin_record()
                shuffle = self.shuffle_size(record.dtype)
                offset = sink.position
                frames, crc = self._codec.encode(record.byte_view(), shuffle, sink.write)
                entries.append(
                    RecordEntry(
                        name=record.name,
                        dtype=record.dtype,
                        shape=record.shape,
                        meta=dict(record.meta),
                        file=sink.name,
                        offset=offset,
                        compressed_size=sink.position - offset,
                        raw_size=record.nbytes,
                        shuffle=shuffle,
                        crc32=crc,
                        frames=tuple(frames),
                    )
                )
                on_stage(WriteStage.RECORD_WRITTEN, snapshot.step)
            release_sources()
            on_stage(WriteStage.SOURCES_RELEASED, snapshot.step)
            return entries, sink.finish()
        finally:
            sink.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _delete_step(root: Path, step: int) -> None:
    """Rename first, so that a crash halfway through the deletion never leaves a step-<n> dir
    with missing files."""
    trash = root / f"{step_dir_name(step)}.trash-{secrets.token_hex(4)}"
    os.rename(root / step_dir_name(step), trash)
    shutil.rmtree(trash, ignore_errors=True)


def _no_stage_hook(stage: WriteStage, step: int) -> None:
    del stage, step


@dataclass
class _WriteJob:
    snapshot: Snapshot
    future: SnapshotWriteFuture


class DiskTierWriter:
    """Writes snapshots under ``root`` on one background thread, one write at a time.

    Thread-safe: ``submit``, ``wait`` and ``close`` may be called from any thread. ``on_stage``
    runs on the writer thread at each :class:`WriteStage` (an exception there fails the write,
    as a crash would). Use as a context manager or call ``close()``: the thread is a daemon, so
    a write still running at interpreter exit is abandoned (and never looks complete).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: DiskTierConfig | None = None,
        *,
        on_stage: StageHook | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config or DiskTierConfig()
        self._on_stage = on_stage or _no_stage_hook
        self._encoder = _SnapshotEncoder(self.config)
        self._cond = threading.Condition()
        self._pending: _WriteJob | None = None
        self._running: _WriteJob | None = None
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._delete_leftovers()
        self._thread = threading.Thread(target=self._run, name="snapshot-disk-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> DiskTierWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, snapshot: Snapshot) -> SnapshotWriteFuture:
        """Queue ``snapshot`` for writing; see :class:`PendingPolicy` and the buffer rule in
        :class:`SnapshotWriteFuture`."""
        job = _WriteJob(snapshot, SnapshotWriteFuture(snapshot.step))
        dropped: _WriteJob | None = None
        with self._cond:
            self._raise_if_closed()
            if self._pending is not None:
                if self.config.pending_policy is PendingPolicy.BLOCK:
                    self._cond.wait_for(lambda: self._pending is None or self._closed)
                    self._raise_if_closed()
                elif self.config.pending_policy is PendingPolicy.DROP_NEW:
                    dropped = job
                else:
                    dropped = self._pending
            if dropped is not job:
                self._pending = job
                self._cond.notify_all()
        if dropped is not None:
            logger.info("snapshot step %d dropped by the pending policy", dropped.snapshot.step)
            dropped.future.cancel()
        return job.future

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise SnapshotWriteError(f"disk tier writer for {self.root} is closed")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no write runs or waits; False if ``timeout`` (s) passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and self._running is None, timeout
            )

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Finish (or cancel) the waiting write, finish the running one, stop the thread."""
        with self._cond:
            self._closed = True
            pending = self._pending if cancel_pending else None
            if pending is not None:
                self._pending = None
            self._cond.notify_all()
        if pending is not None:
            pending.future.cancel()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                job, self._pending = self._pending, None
                if job is None:
                    return
                self._running = job
                self._cond.notify_all()
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        result = self._write(job)
                    except BaseException as exc:
                        job.future.set_exception(exc)
                    else:
                        job.future.set_result(result)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _write(self, job: _WriteJob) -> WrittenSnapshot:
        snapshot, started = job.snapshot, time.perf_counter()
        read_seconds = 0.0

        def release_sources() -> None:
            nonlocal read_seconds
            read_seconds = time.perf_counter() - started
            job.future.sources_released.set()

        final = self.root / step_dir_name(snapshot.step)
        tmp = final.with_name(f"{final.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            records, files = self._encoder.write_records(
                snapshot, tmp, self._on_stage, release_sources
            )
            manifest = SnapshotManifest(
                job_id=snapshot.job_id,
                step=snapshot.step,
                created_unix=time.time(),
                level=self.config.level,
                frame_bytes=self.config.frame_bytes,
                files=tuple(files),
                records=tuple(records),
            )
            _write_atomically(tmp / MANIFEST_NAME, json.dumps(manifest.to_json()).encode())
            self._on_stage(WriteStage.MANIFEST_WRITTEN, snapshot.step)
            if final.exists():
                _delete_step(self.root, snapshot.step)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SnapshotWriteError(
                f"writing snapshot step {snapshot.step} to {self.root} failed: {exc}"
            ) from exc
        try:
            self._on_stage(WriteStage.PUBLISHED, snapshot.step)
            _write_atomically(self.root / LATEST_NAME, f"{final.name}\n".encode())
            deleted = plan_retention(
                _complete_steps(self.root), self.config.keep_last, snapshot.step
            )
            for step in deleted:
                _delete_step(self.root, step)
        except Exception as exc:
            raise SnapshotWriteError(
                f"snapshot step {snapshot.step} is complete in {final} but updating "
                f"{LATEST_NAME} or deleting old steps failed: {exc}"
            ) from exc
        seconds = time.perf_counter() - started
        logger.info(
            "snapshot step %d written to %s: %.1f MB -> %.1f MB in %.2f s",
            snapshot.step,
            final,
            manifest.raw_bytes / 1e6,
            manifest.compressed_bytes / 1e6,
            seconds,
        )
        return WrittenSnapshot(
            step=snapshot.step,
            path=final,
            raw_bytes=manifest.raw_bytes,
            compressed_bytes=manifest.compressed_bytes,
            files=len(files),
            seconds=seconds,
            read_seconds=read_seconds,
            deleted_steps=tuple(deleted),
        )

    def _delete_leftovers(self) -> None:
        for entry in os.scandir(self.root):
            if _LEFTOVER.match(entry.name):
                logger.info("deleting %s, left by an interrupted writer", entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
