"""How a training state becomes bytes, and back (pure: no I/O, no processes).

A state is a nested structure (dicts, lists, tuples, scalars, tensors). :func:`flatten_state`
lays its tensors end to end in one *stream* (each at a 64-byte aligned offset) and keeps the
rest as a small pickled *skeleton* with numbered placeholders. Tensor data are never pickled:
they are copied as raw bytes through ``uint8`` views.

Replicated state (the same on every data-parallel rank, e.g. DDP's model and optimizer) is
snapshotted in slices: rank ``r`` of ``n`` copies only bytes ``slice_range(total, n, r)`` of the
stream, so the per-rank copy shrinks as the world grows and the slices of all ranks together
are one full copy, which any world size can reassemble.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64


class _TensorSlot:
    """Placeholder for the i-th tensor of the stream inside the pickled skeleton."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self):
        return (_TensorSlot, (self.index,))


@dataclass(frozen=True)
class TensorEntry:
    path: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: tuple[int, ...]
    offset: int  # in the stream, ALIGN-aligned
    nbytes: int


@dataclass(frozen=True)
class StateLayout:
    entries: tuple[TensorEntry, ...]
    total_bytes: int
    skeleton: bytes

    @property
    def fingerprint(self) -> str:
        """Identifies the layout (paths, dtypes, shapes): a restore must match it."""
        digest = hashlib.blake2b(digest_size=12)
        for e in self.entries:
            digest.update(f"{e.path}|{e.dtype}|{e.shape}|{e.offset}|{e.nbytes};".encode())
        return digest.hexdigest()

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def decode(raw: bytes) -> StateLayout:
        layout = pickle.loads(raw)
        if not isinstance(layout, StateLayout):
            raise TypeError("not a StateLayout")
        return layout


def _align(value: int) -> int:
    return (value + ALIGN - 1) // ALIGN * ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _same_dict(original: dict, items: dict) -> dict:
    """``items`` in the original's dict type, keeping a state dict's ``_metadata``."""
    if type(original) is dict:
        return items
    rebuilt = OrderedDict(items)
    metadata = getattr(original, "_metadata", None)
    if metadata is not None:
        rebuilt._metadata = metadata  # type: ignore[attr-defined]
    return rebuilt


def flatten_state(state: Mapping[str, Any]) -> tuple[StateLayout, list[torch.Tensor]]:
    """Split ``state`` into a layout (skeleton + tensor entries) and its tensors, in stream order.

    Tensors are returned as they are (no copy); the caller copies their bytes.
    """
    tensors: list[torch.Tensor] = []
    entries: list[TensorEntry] = []
    offset = 0

    def walk(obj: Any, path: str) -> Any:
        nonlocal offset
        if isinstance(obj, torch.Tensor):
            if obj.is_sparse or obj.layout != torch.strided:
                raise TypeError(f"{path}: only dense tensors can be snapshotted")
            index = len(tensors)
            nbytes = obj.numel() * obj.element_size()
            entries.append(
                TensorEntry(path, _dtype_name(obj.dtype), tuple(obj.shape), offset, nbytes)
            )
            tensors.append(obj.detach())
            offset = _align(offset + nbytes)
            return _TensorSlot(index)
        if isinstance(obj, dict):
            return _same_dict(obj, {k: walk(v, f"{path}/{k}") for k, v in obj.items()})
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(walk(v, f"{path}/{i}") for i, v in enumerate(obj))
        return obj

    skeleton = walk(dict(state), "")
    layout = StateLayout(tuple(entries), offset, pickle.dumps(skeleton, pickle.HIGHEST_PROTOCOL))
    return layout, tensors


def unflatten_state(layout: StateLayout, stream: torch.Tensor) -> dict[str, Any]:
    """Rebuild the state from a full stream (``uint8``, ``layout.total_bytes`` long).

    Every tensor is a new CPU tensor (a copy), so the stream buffer may be reused afterwards.
    """
    if stream.dtype != torch.uint8 or stream.numel() < layout.total_bytes:
        raise ValueError(
            f"stream must be uint8 with at least {layout.total_bytes} bytes, "
            f"got {stream.dtype} x {stream.numel()}"
        )
    rebuilt: list[torch.Tensor] = []
    for e in layout.entries:
        dtype = getattr(torch, e.dtype)
        raw = stream[e.offset : e.offset + e.nbytes].clone()
        rebuilt.append(
            raw.view(dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=dtype)
        )

    def walk(obj: Any) -> Any:
        if isinstance(obj, _TensorSlot):
            return rebuilt[obj.index]
        if isinstance(obj, dict):
            return _same_dict(obj, {k: walk(v) for k, v in obj.items()})
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(walk(v) for v in obj)
        return obj

    return walk(pickle.load(io.BytesIO(layout.skeleton)))


def slice_range(total: int, world: int, rank: int) -> tuple[int, int]:
    """Bytes ``[start, end)`` of a ``total``-byte stream that ``rank`` of ``world`` snapshots.

    Boundaries are ALIGN-aligned (except the end of the stream); slices cover the stream
    exactly once, in rank order.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    per = _align(-(-total // world)) if total else 0
    start = min(rank * per, total)
    return start, min(start + per, total)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's data (a contiguous copy if it is not contiguous)."""
    flat = tensor if tensor.is_contiguous() else tensor.contiguous()
    return flat.reshape(-1).view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def stream_pieces(
    layout: StateLayout, tensors: list[torch.Tensor], start: int, end: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """The parts of stream bytes ``[start, end)`` as ``(position in the slice, uint8 view)``.

    Gaps (alignment padding) are skipped; a destination should be zeroed once if its padding
    bytes matter (they are never read back).
    """
    for entry, tensor in zip(layout.entries, tensors, strict=True):
        lo, hi = max(entry.offset, start), min(entry.offset + entry.nbytes, end)
        if lo >= hi:
            continue
        raw = _as_bytes(tensor)
        yield lo - start, raw[lo - entry.offset : hi - entry.offset]


def copy_slice(
    layout: StateLayout, tensors: list[torch.Tensor], start: int, end: int, dest: torch.Tensor
) -> None:
    """Copy stream bytes ``[start, end)`` into ``dest`` (uint8, at least ``end - start`` long)."""
    for position, piece in stream_pieces(layout, tensors, start, end):
        dest[position : position + piece.numel()].copy_(piece, non_blocking=True)
