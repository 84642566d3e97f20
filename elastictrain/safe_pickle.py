"""Pickled structures read back through an allow-list: no code runs from their bytes.

A training state's *shape* (nested dicts, lists, tuples, numbers, strings; an optimizer's
``param_groups``, a scheduler's counters, RNG states) is free-form, so it is pickled, but it is
only ever read by :func:`loads`, whose unpickler resolves no global outside a fixed allow-list
(containers, ``OrderedDict``, torch's dtypes, layouts, memory formats, ``torch.Size`` and
``torch.device``, and the classes of one named profile). Tensors and numpy arrays are never
pickled: they are persistent references, either to a stream entry (the skeleton of a layout) or
to raw bytes kept inline with their dtype and shape (the small per-rank blob). Writers check
their bytes with the same reader, so a state that could not be read back is refused when it is
taken, not when it is needed.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from elastictrain.errors import SnapshotFormatError

# Resolvable in every profile: harmless constructors of plain values.
_BASE = frozenset({
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "slice"), ("builtins", "range"),
    ("torch", "Size"), ("torch", "device"),
    ("torch.serialization", "_get_layout"),  # a layout by its name (torch.strided)
})  # fmt: skip

# DCP's description of a sharded checkpoint (torch's own classes) and where our storage put
# each item.
_DCP = frozenset({
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                 "_MEM_FORMAT_ENCODING")
}) | {("elastictrain.snapshot.dcp_storage", "ItemLocation")}  # fmt: skip

PROFILES: dict[str, frozenset[tuple[str, str]]] = {"state": _BASE, "dcp": _BASE | _DCP}

_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
_INLINE_TENSOR = "tensor"
_INLINE_ARRAY = "ndarray"
_ARRAY_KINDS = "biufc"  # numpy dtype kinds an inline array may have (no objects, no voids)


class _Unpickler(pickle.Unpickler):
    def __init__(self, raw: bytes | bytearray | memoryview, allowed: frozenset[tuple[str, str]],
                 persistent: Callable[[Any], Any] | None) -> None:  # fmt: skip
        super().__init__(io.BytesIO(raw))
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise SnapshotFormatError(f"these bytes may not hold {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise SnapshotFormatError("a persistent reference where none is allowed")
        return self._persistent(pid)


def loads(raw: bytes | bytearray | memoryview, *, profile: str = "state",
          tensors: Sequence[Any] | None = None, _own: bool = False) -> Any:  # fmt: skip
    """Read a structure written by :func:`dumps_inline` (``tensors`` None) or a skeleton whose
    persistent ids index ``tensors``. Anything else is a :class:`SnapshotFormatError`. No
    allocation exceeds the input: every length the bytes declare is checked against what
    follows before the unpickler (which allocates a declared length up front) sees them."""
    allowed = PROFILES[profile]
    persistent = _inline_loader if tensors is None else _indexer(tensors)
    try:
        if not _own:
            _scan(raw)
        return _Unpickler(raw, allowed, persistent).load()
    except SnapshotFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, RecursionError, MemoryError, ImportError,
            UnicodeDecodeError, struct.error) as exc:  # fmt: skip
        raise SnapshotFormatError(f"malformed snapshot structure: {type(exc).__name__}: "
                                  f"{exc}") from exc  # fmt: skip


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _scan(raw: bytes | bytearray | memoryview) -> None:
    """What the C unpickler would allocate up front, checked first: every declared length
    against the bytes that follow (``genops`` reads them, allocating none), and every memo
    index against the opcodes so far (the unpickler grows its memo to the largest index)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickletools warns on odd escapes in text opcodes
        for count, (opcode, arg, _position) in enumerate(pickletools.genops(raw)):
            if opcode.name in _MEMO_PUTS and int(arg) > count:
                raise SnapshotFormatError(f"memo index {arg} after {count} opcodes")


def _indexer(tensors: Sequence[Any]) -> Callable[[Any], Any]:
    def load(pid: Any) -> Any:
        if type(pid) is not int or not 0 <= pid < len(tensors):
            raise SnapshotFormatError(f"tensor reference {pid!r} is not one of {len(tensors)}")
        return tensors[pid]

    return load


class _InlinePickler(pickle.Pickler):
    """Pickles a structure with every tensor and numpy array as a persistent id holding its
    dtype, shape, device type and bytes."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:
                raise SnapshotFormatError("only dense tensors can be snapshotted")
            flat = obj.detach().to("cpu").contiguous().reshape(-1)
            data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
            return (_INLINE_TENSOR, str(obj.dtype).removeprefix("torch."), tuple(obj.shape),
                    obj.device.type, data)  # fmt: skip
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, numpy.ndarray):
            if obj.dtype.kind not in _ARRAY_KINDS:
                raise SnapshotFormatError(f"a numpy array of dtype {obj.dtype} cannot be "
                                          "snapshotted")  # fmt: skip
            return (_INLINE_ARRAY, obj.dtype.str, tuple(obj.shape), "cpu",
                    numpy.ascontiguousarray(obj).tobytes())  # fmt: skip
        return None


def _inline_loader(pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in (_INLINE_TENSOR, _INLINE_ARRAY)
            and isinstance(pid[1], str) and isinstance(pid[2], tuple)
            and all(type(n) is int and n >= 0 for n in pid[2])
            and isinstance(pid[3], str) and isinstance(pid[4], bytes)):  # fmt: skip
        raise SnapshotFormatError(f"not an inline tensor: {type(pid).__name__}")
    kind, dtype_name, shape, device, data = pid
    count = 1
    for n in shape:
        count *= n
    if kind == _INLINE_TENSOR:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise SnapshotFormatError(f"unknown tensor dtype {dtype_name!r}")
        size = torch.empty((), dtype=dtype).element_size()
        if count * size != len(data):
            raise SnapshotFormatError(f"a {dtype_name} tensor of shape {shape} is not "
                                      f"{len(data)} bytes")  # fmt: skip
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
            torch.empty(0, dtype=torch.uint8)  # fmt: skip
        tensor = flat.view(dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)
        if device == "cuda" and torch.cuda.is_available():
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return tensor
    import numpy

    try:
        dtype = numpy.dtype(dtype_name)
    except TypeError as exc:
        raise SnapshotFormatError(f"unknown array dtype {dtype_name!r}") from exc
    if dtype.kind not in _ARRAY_KINDS or count * dtype.itemsize != len(data):
        raise SnapshotFormatError(f"an array of {dtype_name} and shape {shape} is not "
                                  f"{len(data)} bytes")  # fmt: skip
    return numpy.frombuffer(data, dtype=dtype).reshape(shape).copy()


def dumps_inline(obj: Any, *, profile: str = "state") -> bytes:
    """``obj`` as bytes, tensors and arrays inline; refused (:class:`SnapshotFormatError`,
    naming the type) if :func:`loads` could not read it back."""
    buffer = io.BytesIO()
    try:
        _InlinePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise SnapshotFormatError(f"this state cannot be snapshotted: {exc}") from exc
    raw = buffer.getvalue()
    try:
        check(raw, profile=profile)
    except SnapshotFormatError as exc:
        raise SnapshotFormatError(f"this state cannot be snapshotted (it may hold dicts, lists, "
                                  f"tuples, numbers, strings, bytes, tensors and numpy arrays): "
                                  f"{exc}") from exc  # fmt: skip
    return raw


def check(raw: bytes, *, profile: str = "state", tensors: int | None = None) -> None:
    """Raise :class:`SnapshotFormatError` unless :func:`loads` reads ``raw`` (a skeleton with
    ``tensors`` references, when given)."""
    loads(raw, profile=profile, tensors=None if tensors is None else [None] * tensors, _own=True)
