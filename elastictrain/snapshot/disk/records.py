"""What the disk tier is handed (:class:`SnapshotRecord`, :class:`Snapshot`, both checked
when built) and the errors it raises.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elastictrain import errors
from elastictrain.errors import ElasticTrainError
from elastictrain.snapshot.disk.codec import OPAQUE_DTYPE, _byte_view, dtype_element_size

# --------------------------------------------------------------------------------------------
# Errors (one line each; the CLI adds the hint)


class SnapshotError(ElasticTrainError):
    """Base of the disk tier's errors."""


class SnapshotNotFoundError(SnapshotError):
    """The directory, or a complete snapshot in it, does not exist."""

    hint = "check the snapshot directory; `list_snapshots(dir)` shows the complete ones"


class SnapshotFormatError(SnapshotError, errors.SnapshotFormatError):
    """The manifest is unreadable, malformed or of a format version this code does not read
    (a disk-tier error and a format error both)."""


class SnapshotCorruptError(SnapshotError):
    """Stored bytes do not match their checksum; ``record`` names the record when one is known."""

    hint = "restore an older step (`read_snapshot(dir, step=...)`) or another tier"

    def __init__(self, message: str, *, record: str | None = None, file: str | None = None):
        super().__init__(message)
        self.record = record
        self.file = file


class SnapshotTruncatedError(SnapshotCorruptError):
    """A data file is shorter than its manifest says."""


class SnapshotWriteError(SnapshotError):
    """Writing a snapshot failed; the message says whether the step was published."""


# --------------------------------------------------------------------------------------------
# What is written


@dataclass(frozen=True, eq=False)
class SnapshotRecord:
    """One named contiguous buffer of a snapshot.

    ``data`` is a CPU tensor or any C-contiguous buffer; it is read in place, never copied, so
    its owner must not change it until the write says so (see :class:`SnapshotWriteFuture`).
    For torch dtypes the buffer holds exactly ``prod(shape)`` elements; ``"bytes"`` records
    (pickled extras) are opaque and their shape is free.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Any = field(repr=False)
    meta: Mapping[str, Any] = field(default_factory=dict)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        element_size = dtype_element_size(self.dtype)
        shape = tuple(self.shape)
        if not all(isinstance(dim, int) and dim >= 0 for dim in shape):
            raise ValueError(f"shape of {self.name!r} must be non-negative ints, got {shape}")
        object.__setattr__(self, "shape", shape)
        try:
            json.dumps(dict(self.meta))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta of {self.name!r} must be JSON-serialisable: {exc}") from exc
        nbytes = _byte_view(self.data).shape[0]
        if self.dtype != OPAQUE_DTYPE and nbytes != math.prod(shape) * element_size:
            raise ValueError(
                f"record {self.name!r}: {nbytes} bytes do not hold shape {shape} of {self.dtype}"
            )
        object.__setattr__(self, "nbytes", nbytes)

    @classmethod
    def from_tensor(
        cls, name: str, tensor: torch.Tensor, meta: Mapping[str, Any] | None = None
    ) -> SnapshotRecord:
        dtype = str(tensor.dtype).removeprefix("torch.")
        return cls(name, dtype, tuple(tensor.shape), tensor, dict(meta or {}))

    def byte_view(self) -> np.ndarray:
        return _byte_view(self.data)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A step's records, as handed to the disk tier (names unique)."""

    step: int
    job_id: str
    records: Sequence[SnapshotRecord]

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or self.step < 0 or self.step >= 10**12:
            raise ValueError(f"step must be an int in [0, 10**12), got {self.step!r}")
        if not self.job_id:
            raise ValueError("job_id must be non-empty")
        names = [record.name for record in self.records]
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"record names must be unique, repeated: {duplicates[:5]}")

    @property
    def nbytes(self) -> int:
        return sum(record.nbytes for record in self.records)
