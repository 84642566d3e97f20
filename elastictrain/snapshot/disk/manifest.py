"""The on-disk description of a snapshot and where it lives.

The manifest's JSON form and its layout checks, step directory names, finding, choosing
(LATEST) and loading complete snapshots, and which old steps retention deletes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastictrain.snapshot.disk.records import SnapshotFormatError, SnapshotNotFoundError

logger = logging.getLogger(__name__)

FORMAT_NAME = "elastictrain.snapshot.disk"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"

_STEP_DIR = re.compile(r"^step-(\d{12})$")


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    crc32: int


@dataclass(frozen=True)
class RecordEntry:
    """Where a record lives and how to check it. ``frames``: (compressed, raw) size of each."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    meta: dict[str, Any]
    file: str
    offset: int
    compressed_size: int
    raw_size: int
    shuffle: int
    crc32: int
    frames: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SnapshotManifest:
    job_id: str
    step: int
    created_unix: float
    level: int
    frame_bytes: int
    files: tuple[FileEntry, ...]
    records: tuple[RecordEntry, ...]
    format_version: int = FORMAT_VERSION
    checksum: str = "crc32"
    codec: str = "zstd"

    @property
    def raw_bytes(self) -> int:
        return sum(record.raw_size for record in self.records)

    @property
    def compressed_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def record(self, name: str) -> RecordEntry:
        for entry in self.records:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "job_id": self.job_id,
            "step": self.step,
            "created_unix": self.created_unix,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_unix)),
            "checksum": self.checksum,
            "compression": {
                "codec": self.codec,
                "level": self.level,
                "frame_bytes": self.frame_bytes,
            },
            "files": [vars(entry) for entry in self.files],
            "records": [
                {
                    **vars(entry),
                    "shape": list(entry.shape),
                    "frames": [list(f) for f in entry.frames],
                }
                for entry in self.records
            ],
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> SnapshotManifest:
        """Parse and check a manifest; ``where`` names it in errors."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise SnapshotFormatError(f"{where} is not an elastictrain disk snapshot manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise SnapshotFormatError(
                f"{where} has format version {version!r}; this reader supports {FORMAT_VERSION}"
            )
        try:
            compression = data["compression"]
            if data["checksum"] != "crc32" or compression["codec"] != "zstd":
                raise ValueError(f"checksum {data['checksum']!r} / codec {compression['codec']!r}")
            manifest = cls(
                job_id=str(data["job_id"]),
                step=int(data["step"]),
                created_unix=float(data["created_unix"]),
                level=int(compression["level"]),
                frame_bytes=int(compression["frame_bytes"]),
                files=tuple(
                    FileEntry(str(f["name"]), int(f["size"]), int(f["crc32"]))
                    for f in data["files"]
                ),
                records=tuple(
                    RecordEntry(
                        name=str(r["name"]),
                        dtype=str(r["dtype"]),
                        shape=tuple(int(dim) for dim in r["shape"]),
                        meta=dict(r["meta"]),
                        file=str(r["file"]),
                        offset=int(r["offset"]),
                        compressed_size=int(r["compressed_size"]),
                        raw_size=int(r["raw_size"]),
                        shuffle=int(r["shuffle"]),
                        crc32=int(r["crc32"]),
                        frames=tuple((int(c), int(n)) for c, n in r["frames"]),
                    )
                    for r in data["records"]
                ),
            )
            manifest._check_layout()
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise SnapshotFormatError(f"{where} is malformed: {type(exc).__name__}: {exc}") from exc
        return manifest

    def _check_layout(self) -> None:
        """Records tile their files exactly: the file checksum then covers what was read."""
        if len({entry.name for entry in self.records}) != len(self.records):
            raise ValueError("record names repeat")
        for entry in self.files:  # joined to the step's directory: plain names only
            if not _DATA_FILE.match(entry.name):
                raise ValueError(f"data file name {entry.name[:80]!r} is not a plain file name")
        ends = {entry.name: 0 for entry in self.files}
        for entry in sorted(self.records, key=lambda r: (r.file, r.offset)):
            if entry.file not in ends or entry.offset != ends[entry.file]:
                raise ValueError(f"record {entry.name!r} is not where the layout says")
            if sum(c for c, _ in entry.frames) != entry.compressed_size:
                raise ValueError(f"record {entry.name!r}: frame sizes do not add up")
            if sum(n for _, n in entry.frames) != entry.raw_size or entry.shuffle < 1:
                raise ValueError(f"record {entry.name!r}: raw sizes or shuffle are wrong")
            ends[entry.file] += entry.compressed_size
        for entry in self.files:
            if ends[entry.name] != entry.size:
                raise ValueError(f"file {entry.name!r}: records do not fill it")


# --------------------------------------------------------------------------------------------
# Directory layout


_DATA_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def step_dir_name(step: int) -> str:
    return f"step-{step:012d}"


@dataclass(frozen=True)
class SnapshotInfo:
    step: int
    path: Path
    is_latest: bool


def _complete_steps(root: Path) -> list[int]:
    steps = []
    for entry in os.scandir(root):
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def _read_latest(root: Path) -> int | None:
    try:
        text = (root / LATEST_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    match = _STEP_DIR.match(text)
    if match is None:
        logger.warning("ignoring malformed %s in %s: %r", LATEST_NAME, root, text[:40])
        return None
    return int(match.group(1))


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise SnapshotNotFoundError(f"snapshot directory {root} does not exist")


def list_snapshots(root: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Complete snapshots under ``root``, oldest step first."""
    root = Path(root)
    _require_root(root)
    latest = _read_latest(root)
    return [
        SnapshotInfo(step, root / step_dir_name(step), step == latest)
        for step in _complete_steps(root)
    ]


def resolve_step(root: Path, step: int | None) -> int:
    """The step to read: ``step`` if given, else LATEST, else the highest complete step.

    LATEST wins over a higher step on disk: after a job rolled back and wrote again, a higher
    step may be left from the abandoned run.
    """
    _require_root(root)
    steps = _complete_steps(root)
    if step is not None:
        if step not in steps:
            known = ", ".join(map(str, steps[-5:])) or "none"
            raise SnapshotNotFoundError(
                f"no complete snapshot of step {step} in {root} (complete: {known})"
            )
        return step
    if not steps:
        raise SnapshotNotFoundError(f"no complete snapshot in {root}")
    latest = _read_latest(root)
    if latest in steps:
        return latest
    if latest is not None:
        logger.warning("%s names step %d, which is gone; using step %d", root, latest, steps[-1])
    return steps[-1]


def load_manifest(root: str | os.PathLike[str], step: int | None = None) -> SnapshotManifest:
    root = Path(root)
    step = resolve_step(root, step)
    path = root / step_dir_name(step) / MANIFEST_NAME
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SnapshotFormatError(f"cannot read {path}: {exc}") from exc
    manifest = SnapshotManifest.from_json(data, str(path))
    if manifest.step != step:
        raise SnapshotFormatError(f"{path} describes step {manifest.step}, not {step}")
    return manifest


def plan_retention(steps: Iterable[int], keep_last: int, written: int) -> list[int]:
    """Steps to delete so that ``keep_last`` remain: the one just ``written`` and the highest
    others (after a rollback, ``written`` may be below steps left from the abandoned run)."""
    others = sorted(set(steps) - {written}, reverse=True)
    return sorted(others[keep_last - 1 :])
