"""Reads snapshots back and checks them: every byte is checked against the manifest's
CRC-32s before it is handed out, and a fault names the record it hit.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from elastictrain.snapshot.disk.codec import _TORCH_DTYPES, OPAQUE_DTYPE, FrameCodec
from elastictrain.snapshot.disk.manifest import (
    FileEntry,
    RecordEntry,
    SnapshotManifest,
    load_manifest,
    step_dir_name,
)
from elastictrain.snapshot.disk.records import SnapshotCorruptError, SnapshotTruncatedError

# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class RestoredRecord:
    """A record read back: ``data`` is a 1-D uint8 tensor of its raw bytes (owned by caller)."""

    entry: RecordEntry
    data: torch.Tensor

    @property
    def name(self) -> str:
        return self.entry.name

    def as_tensor(self) -> torch.Tensor:
        """The bytes viewed as the stored dtype and shape (no copy); not for ``"bytes"``."""
        if self.entry.dtype == OPAQUE_DTYPE:
            raise TypeError(f"record {self.name!r} holds opaque bytes; use .data or bytes(...)")
        return self.data.view(_TORCH_DTYPES[self.entry.dtype]).reshape(self.entry.shape)

    def __bytes__(self) -> bytes:
        return self.data.numpy().tobytes()


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_snapshot` found; ``problems`` holds one line per fault."""

    step: int
    path: Path
    records: int
    raw_bytes: int
    compressed_bytes: int
    seconds: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


class _SnapshotDecoder:
    """Reads and checks every record of one snapshot directory, file by file, a frame at a time.

    ``destination(entry)`` gives the uint8 array (``raw_size`` bytes) a record is restored into,
    or None to check it through a frame-sized scratch buffer and drop it. Errors go to
    ``on_error``, which raises to stop or returns to go on with the next file.
    """

    def __init__(
        self,
        directory: Path,
        manifest: SnapshotManifest,
        destination: Callable[[RecordEntry], np.ndarray | None],
        on_error: Callable[[SnapshotCorruptError], None],
    ) -> None:
        self._directory = directory
        self._manifest = manifest
        self._destination = destination
        self._on_error = on_error
        self._codec = FrameCodec(frame_bytes=manifest.frame_bytes)
        self._frame_buffer = bytearray()
        self._drop_buffer = np.empty(0, dtype=np.uint8)

    def run(self) -> None:
        by_file: dict[str, list[RecordEntry]] = {entry.name: [] for entry in self._manifest.files}
        for record in self._manifest.records:
            by_file[record.file].append(record)
        for file_entry in self._manifest.files:
            try:
                self._decode_file(file_entry, sorted(by_file[file_entry.name], key=_offset))
            except SnapshotCorruptError as exc:
                self._on_error(exc)

    def _decode_file(self, file_entry: FileEntry, records: list[RecordEntry]) -> None:
        path = self._directory / file_entry.name
        where = f"{self._directory.name}/{file_entry.name}"
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise SnapshotCorruptError(
                f"{where} is missing", record=records[0].name, file=file_entry.name
            ) from exc
        if size < file_entry.size:
            cut = next(r.name for r in records if r.offset + r.compressed_size > size)
            raise SnapshotTruncatedError(
                f"{where} is truncated: {size} of {file_entry.size} bytes "
                f"(record {cut!r} and those after it are incomplete)",
                record=cut,
                file=file_entry.name,
            )
        if size > file_entry.size:
            raise SnapshotCorruptError(
                f"{where} has {size - file_entry.size} bytes more than its manifest says",
                file=file_entry.name,
            )
        file_crc = 0
        with open(path, "rb") as f:
            for record in records:
                file_crc = self._decode_record(f, record, file_crc, file_entry.name)
        if file_crc != file_entry.crc32:
            raise SnapshotCorruptError(
                f"{where} checksum mismatch although its records decode correctly",
                file=file_entry.name,
            )

    def _decode_record(self, f: Any, record: RecordEntry, file_crc: int, file: str) -> int:
        def corrupt(what: str, cls: type[SnapshotCorruptError] = SnapshotCorruptError):
            where = f"{self._directory.name}/{file}"
            return cls(f"{where}: record {record.name!r} {what}", record=record.name, file=file)

        out = self._destination(record)
        position, crc = 0, 0
        for compressed_size, raw_size in record.frames:
            if len(self._frame_buffer) < compressed_size:
                self._frame_buffer = bytearray(compressed_size)
            frame = memoryview(self._frame_buffer)[:compressed_size]
            if f.readinto(frame) != compressed_size:
                raise corrupt("is truncated", SnapshotTruncatedError)
            file_crc = zlib.crc32(frame, file_crc)
            if out is not None:
                chunk = out[position : position + raw_size]
            else:
                if self._drop_buffer.shape[0] < raw_size:
                    self._drop_buffer = np.empty(raw_size, dtype=np.uint8)
                chunk = self._drop_buffer[:raw_size]
            try:
                got = self._codec.decode_frame(frame, record.shuffle, chunk)
            except zstandard.ZstdError as exc:
                raise corrupt(f"does not decompress ({exc})") from exc
            if got != raw_size:
                raise corrupt(f"has a frame of {got}+ bytes where {raw_size} were written")
            crc = zlib.crc32(chunk, crc)
            position += raw_size
        if crc != record.crc32:
            raise corrupt(f"checksum mismatch (crc32 {crc:08x}, manifest {record.crc32:08x})")
        return file_crc


def _offset(record: RecordEntry) -> int:
    return record.offset


def _raise(exc: SnapshotCorruptError) -> None:
    raise exc


def read_snapshot(
    root: str | os.PathLike[str], step: int | None = None
) -> tuple[SnapshotManifest, dict[str, RestoredRecord]]:
    """Read and check a complete snapshot (LATEST when ``step`` is None).

    Returns the manifest and each record's raw bytes; raises :class:`SnapshotCorruptError`
    (naming the record) at the first mismatch, :class:`SnapshotNotFoundError` or
    :class:`SnapshotFormatError` when there is nothing readable.
    """
    root = Path(root)
    manifest = load_manifest(root, step)
    buffers = {
        entry.name: torch.empty(entry.raw_size, dtype=torch.uint8) for entry in manifest.records
    }
    directory = root / step_dir_name(manifest.step)
    _SnapshotDecoder(directory, manifest, lambda entry: buffers[entry.name].numpy(), _raise).run()
    return manifest, {
        entry.name: RestoredRecord(entry, buffers[entry.name]) for entry in manifest.records
    }


def verify_snapshot(root: str | os.PathLike[str], step: int | None = None) -> VerifyReport:
    """Check every file and record of a snapshot, holding one frame at a time.

    Corruption is reported, not raised, and checking goes on with the next data file; a missing
    directory or snapshot, or an unreadable manifest, still raises.
    """
    root = Path(root)
    started = time.perf_counter()
    manifest = load_manifest(root, step)
    directory = root / step_dir_name(manifest.step)
    problems: list[str] = []
    _SnapshotDecoder(
        directory, manifest, lambda entry: None, lambda e: problems.append(str(e))
    ).run()
    return VerifyReport(
        step=manifest.step,
        path=directory,
        records=len(manifest.records),
        raw_bytes=manifest.raw_bytes,
        compressed_bytes=manifest.compressed_bytes,
        seconds=time.perf_counter() - started,
        problems=tuple(problems),
    )
