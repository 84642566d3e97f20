"""Sharded state (FSDP2 / DTensor) through ``torch.distributed.checkpoint`` over agent memory.

DCP plans what each rank writes and, on load, which saved chunks each rank of a possibly
*different* world needs and where they go: its planners do the resharding. We only provide the
storage. :class:`AgentStorageWriter` puts a rank's write items into that rank's agent-held
record (one shared-memory segment, items at aligned offsets, then the rank's own blob); the
coordinator adds DCP's ``Metadata`` as a record of the pseudo-rank :data:`METADATA_RANK`.
:class:`AgentStorageReader` finds the committed step's records on the live agents (rebuilding
lost ones from erasure-coded chunks) and hands DCP the bytes it asks for.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from elastictrain import safe_pickle
from elastictrain.errors import SnapshotFormatError
from elastictrain.snapshot.record_meta import METADATA_RANK as METADATA_RANK  # re-exported
from elastictrain.snapshot.record_meta import ShardedRecordMeta as ShardedRecordMeta  # re-exported

if TYPE_CHECKING:
    from elastictrain.snapshot.worker import Snapshotter

logger = logging.getLogger(__name__)

_ALIGN = 64


@dataclass(frozen=True)
class ItemLocation:
    """Where DCP's write item lives: in the record of ``rank``, bytes [offset, offset+nbytes)."""

    rank: int
    offset: int
    nbytes: int
    dtype: str | None = None  # None: a BytesIO item
    shape: tuple[int, ...] | None = None


def _align(value: int) -> int:
    return (value + _ALIGN - 1) // _ALIGN * _ALIGN


def _as_bytes(data: torch.Tensor | io.BytesIO) -> tuple[torch.Tensor, str | None, tuple | None]:
    if isinstance(data, io.BytesIO):
        raw = data.getvalue()
        return (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if raw
            else torch.empty(0, dtype=torch.uint8),
            None,
            None,
        )
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    flat = (
        tensor.reshape(-1).view(torch.uint8)
        if tensor.numel()
        else torch.empty(0, dtype=torch.uint8)
    )
    return flat, dtype, tuple(tensor.shape)


class AgentStorageWriter(StorageWriter):
    """DCP storage writer into the rank's agent-held record of ``step``."""

    def __init__(self, snapshotter: Snapshotter, step: int, rank_blob: bytes) -> None:
        super().__init__()
        self._snap = snapshotter
        self._step = step
        self._blob = rank_blob
        self._coordinator = False
        self._deferred: bytes | None = None

    def reset(self, checkpoint_id=None) -> None:
        self._deferred = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank = self._snap.rank
        pieces = [(item, *_as_bytes(planner.resolve_data(item))) for item in plan.items]
        offset = 0
        placed = []
        for item, raw, dtype, shape in pieces:
            placed.append((item, raw, ItemLocation(rank, offset, raw.numel(), dtype, shape)))
            offset = _align(offset + raw.numel())
        blob_offset = offset
        nbytes = blob_offset + len(self._blob)
        segment = self._snap._begin_record(rank, self._step, nbytes)
        if segment is None:
            raise RuntimeError(f"the agent refused the snapshot of step {self._step}")
        buffer = segment.tensor()
        for _item, raw, where in placed:
            if where.nbytes:
                buffer[where.offset : where.offset + where.nbytes].copy_(raw)
        if self._blob:
            buffer[blob_offset:nbytes].copy_(
                torch.frombuffer(bytearray(self._blob), dtype=torch.uint8)
            )
        typed = tuple((w.offset, w.nbytes, w.dtype) for _, _, w in placed if w.dtype is not None)
        meta = ShardedRecordMeta(rank, self._snap.world, self._step, blob_offset,
                                 len(self._blob), typed).encode()  # fmt: skip
        if self._coordinator:
            self._deferred = meta  # ended after the metadata, in finish()
        else:
            self._snap._end_record(rank, self._step, meta)
        future: Future[list[WriteResult]] = Future()  # torch's, as DCP waits on it
        future.set_result([
            WriteResult(index=item.index, size_in_bytes=where.nbytes, storage_data=where)
            for item, _raw, where in placed
        ])  # fmt: skip
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        raw = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        safe_pickle.check(raw, profile="dcp")  # read back only through the allow-list
        segment = self._snap._begin_record(METADATA_RANK, self._step, len(raw))
        if segment is None:
            raise RuntimeError(f"the agent refused the metadata of step {self._step}")
        if raw:
            segment.tensor()[: len(raw)].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        meta = ShardedRecordMeta(METADATA_RANK, self._snap.world, self._step, 0, 0)
        self._snap._end_record(METADATA_RANK, self._step, meta.encode())
        if self._deferred is not None:
            self._snap._end_record(self._snap.rank, self._step, self._deferred)
            self._deferred = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self):
        return None


class AgentStorageReader(StorageReader):
    """DCP storage reader over the records of one committed step on the live agents."""

    def __init__(self, step: int, records: dict[int, bytes | bytearray]) -> None:
        super().__init__()
        self._step = step
        self._records = records  # rank (or METADATA_RANK) -> record bytes
        self._storage: dict = {}

    def reset(self, checkpoint_id=None) -> None:
        self._storage = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        raw = self._records.get(METADATA_RANK)
        if raw is None:
            raise RuntimeError(f"step {self._step} has no DCP metadata record")
        metadata = safe_pickle.loads(bytes(raw), profile="dcp")
        if not isinstance(metadata, Metadata):
            raise SnapshotFormatError(f"step {self._step}'s DCP metadata record holds a "
                                      f"{type(metadata).__name__}")  # fmt: skip
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs):
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            where: ItemLocation = self._storage[item.storage_index]
            record = self._records.get(where.rank)
            if record is None:
                raise RuntimeError(f"step {self._step}: no record of rank {where.rank}")
            view = memoryview(record)[where.offset : where.offset + where.nbytes]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(bytes(view)))
                continue
            dtype = getattr(torch, where.dtype)
            if where.nbytes:
                saved = torch.frombuffer(bytearray(view), dtype=torch.uint8).view(dtype)
            else:
                saved = torch.empty(0, dtype=dtype)
            saved = narrow_tensor_by_index(saved.reshape(where.shape), item.storage_offsets,
                                           item.lengths)  # fmt: skip
            target = planner.resolve_tensor(item).detach()
            if target.size() != saved.size():
                raise RuntimeError(
                    f"{item.storage_index}: saved piece {tuple(saved.size())} does not fit "
                    f"{tuple(target.size())}"
                )
            target.copy_(saved)
            planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True
