"""A copy of a worker's state in its GPU's memory, held by a hot spare on the same GPU.

A snapshot in the agent's host memory crosses the PCIe link: at world 1 the whole state of a
1B model (11 GB) takes two 0.1 s steps, so a crash redoes up to two steps. A *device mirror*
needs no link. The hot spare allocates two *slots* in device memory, outside torch's caching
allocator (CUDA driver API), and offers their IPC handles through its agent; the worker on
that GPU claims them and, after every optimizer step, copies its state into one slot, the
other one the next time, on a side stream, device to device (about 7 ms of memory traffic
for 11 GB on an H200, beside the next forward). The memory is the spare's: a killed worker
loses nothing. When the spare takes the lost rank it loads the newest whole slot, so only
the step in flight is redone.

A slot is whole when its header names a step: the header is set to -1 before anything else of
the slot is written and to the step after everything else, in stream order; a worker killed
halfway leaves the other slot whole. A reader checks the header again after loading (a
seqlock): a writer that started meanwhile shows.

Slot format, version 1 (bytes)::

    [0, 64)                  header: 8 little-endian int64: MAGIC, VERSION, step (-1: being
                             written), layout bytes, blob bytes, host-tensor bytes, stream
                             bytes, 0
    [64, DATA_OFFSET)        the layout (StateLayout.encode()), the rank blob, then the bytes
                             of the state's CPU tensors in stream order
    [DATA_OFFSET, ...)       the stream: device tensors at their layout offsets

The slot I/O (:class:`SlotWriter`, :func:`read_newest`) works on any ``uint8`` tensors (CPU
ones in unit tests); :class:`DeviceMemory` is the thin CUDA layer.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from elastictrain.errors import ElasticTrainError
from elastictrain.snapshot.device_copy import CopyPlan, plan_copies
from elastictrain.snapshot.layout import StateLayout, stream_pieces

logger = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"ETMIRROR", "little")
VERSION = 1
HEADER_BYTES = 64
HOST_AREA_BYTES = 8 << 20  # layout, rank blob and CPU tensors of one step, at the most
DATA_OFFSET = HEADER_BYTES + HOST_AREA_BYTES
SLOTS = 2
OFFER_VERSION = 1


class MirrorError(ElasticTrainError):
    """A device mirror could not be allocated, opened or read."""


def slot_bytes_for(stream_bytes: int) -> int:
    """The size of a slot that holds a state of ``stream_bytes``."""
    return DATA_OFFSET + stream_bytes


# -- the offer that travels through the agent (JSON, no pickle) ---------------------------------


@dataclass(frozen=True)
class MirrorOffer:
    """A spare's slots: what a worker needs to open them."""

    device: str  # the GPU's UUID: a worker opens only slots on its own GPU
    slot_bytes: int
    handles: tuple[bytes, ...]  # one CUDA IPC handle per slot

    def __post_init__(self) -> None:
        if self.slot_bytes <= DATA_OFFSET or len(self.handles) != SLOTS:
            raise MirrorError(f"a mirror offer needs {SLOTS} slots of more than {DATA_OFFSET} "
                              f"bytes, got {len(self.handles)} of {self.slot_bytes}")  # fmt: skip
        if any(len(h) != _IPC_HANDLE_BYTES for h in self.handles):
            raise MirrorError("a mirror offer's handles must be CUDA IPC handles (64 bytes)")

    def to_json(self) -> dict[str, Any]:
        return {"version": OFFER_VERSION, "device": self.device, "slot_bytes": self.slot_bytes,
                "handles": [h.hex() for h in self.handles]}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> MirrorOffer:
        try:
            if data["version"] != OFFER_VERSION:
                raise MirrorError(f"mirror offer version {data['version']!r} is not "
                                  f"{OFFER_VERSION}")  # fmt: skip
            return cls(str(data["device"]), int(data["slot_bytes"]),
                       tuple(bytes.fromhex(str(h)) for h in data["handles"]))  # fmt: skip
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MirrorError(f"malformed mirror offer: {exc}") from exc


# -- CUDA memory outside torch's allocator --------------------------------------------------------

_IPC_HANDLE_BYTES = 64


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _IPC_HANDLE_BYTES)]


_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_driver: ctypes.CDLL | None = None


def _cuda() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        try:
            _driver = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise MirrorError(f"the CUDA driver library is not available: {exc}") from exc
    return _driver


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _cuda().cuGetErrorString(result, ctypes.byref(name))
        raise MirrorError(f"{what} failed: CUDA error {result} "
                          f"({(name.value or b'?').decode()})")  # fmt: skip


class _Exposed:
    """Device memory as ``__cuda_array_interface__`` (torch wraps it without a copy)."""

    def __init__(self, pointer: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (pointer, False), "version": 3,
                                         "strides": None, "stream": None}  # fmt: skip


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID (stable across processes, unlike indices under CUDA_VISIBLE_DEVICES)."""
    return str(torch.cuda.get_device_properties(device).uuid)


class DeviceMemory:
    """One allocation of device memory: allocated here (and exportable) or opened from
    another process's IPC handle. ``tensor`` is a ``uint8`` view of all of it."""

    def __init__(self, pointer: int, nbytes: int, device: torch.device, owned: bool) -> None:
        self.pointer = pointer
        self.nbytes = nbytes
        self.device = device
        self._owned = owned
        self.tensor = torch.as_tensor(_Exposed(pointer, nbytes), device=device)

    @classmethod
    def allocate(cls, nbytes: int, device: torch.device) -> DeviceMemory:
        _current_context(device)
        pointer = ctypes.c_uint64()
        _check(_cuda().cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(nbytes)),
               f"allocating {nbytes} bytes of device memory")  # fmt: skip
        return cls(pointer.value, nbytes, device, owned=True)

    @classmethod
    def open(cls, handle: bytes, nbytes: int, device: torch.device) -> DeviceMemory:
        _current_context(device)
        raw = _IpcHandle()
        ctypes.memmove(raw.reserved, handle, _IPC_HANDLE_BYTES)
        pointer = ctypes.c_uint64()
        _check(_cuda().cuIpcOpenMemHandle_v2(ctypes.byref(pointer), raw,
                                            ctypes.c_uint(_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)),
               "opening a device mirror slot")  # fmt: skip
        return cls(pointer.value, nbytes, device, owned=False)

    def handle(self) -> bytes:
        raw = _IpcHandle()
        _check(_cuda().cuIpcGetMemHandle(ctypes.byref(raw), ctypes.c_uint64(self.pointer)),
               "exporting a device mirror slot")  # fmt: skip
        return bytes(raw.reserved)

    def close(self) -> None:
        """Free (or unmap) the memory; the caller has no more work queued on it."""
        if not self.pointer:
            return
        pointer, self.pointer = self.pointer, 0
        self.tensor = torch.empty(0, dtype=torch.uint8)
        if self._owned:
            _check(_cuda().cuMemFree_v2(ctypes.c_uint64(pointer)), "freeing a mirror slot")
        else:
            _check(_cuda().cuIpcCloseMemHandle(ctypes.c_uint64(pointer)),
                   "closing a mirror slot")  # fmt: skip


def _current_context(device: torch.device) -> None:
    """Make torch's context of ``device`` current on this thread (the driver calls need it)."""
    torch.cuda.set_device(device)
    torch.cuda.current_stream(device).synchronize()  # initialises the primary context


# -- writing ------------------------------------------------------------------------------------

_WIDE = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def widened_pairs(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]
                  ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:  # fmt: skip
    """``uint8`` copy pairs viewed as the widest integer type that both ends' sizes and
    addresses allow, grouped by that type: a foreach copy moves a few bytes per element, so
    int64 views copy 8 times the bytes of uint8 ones per element."""
    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for dst, src in zip(dsts, srcs, strict=True):
        dtype = torch.uint8
        for width, wide in _WIDE:
            if (src.numel() % width == 0 and src.data_ptr() % width == 0
                    and dst.data_ptr() % width == 0):  # fmt: skip
                dtype = wide
                break
        pair = groups.setdefault(dtype, ([], []))
        pair[0].append(dst.view(dtype) if dtype != torch.uint8 else dst)
        pair[1].append(src.view(dtype) if dtype != torch.uint8 else src)
    return list(groups.values())


def _header(step: int, layout_bytes: int, blob_bytes: int, host_bytes: int,
            stream_bytes: int) -> torch.Tensor:  # fmt: skip
    return torch.tensor([MAGIC, VERSION, step, layout_bytes, blob_bytes, host_bytes,
                         stream_bytes, 0], dtype=torch.int64)  # fmt: skip


class SlotWriter:
    """Writes a state into mirror slots after each optimizer step, alternating slots.

    On CUDA, device tensors that only ``optimizer.step()`` changes are copied on a side
    stream beside the next forward and backward, and :meth:`fence` (called before the next
    optimizer step) orders the compute stream after that copy; everything else is written
    on the compute stream first. On the CPU every copy is done before :meth:`write` returns.
    """

    def __init__(self, slots: Sequence[torch.Tensor]) -> None:
        if len(slots) != SLOTS:
            raise MirrorError(f"a mirror has {SLOTS} slots, got {len(slots)}")
        self.slots = list(slots)
        self.device = self.slots[0].device
        cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if cuda else None
        self._staging = [torch.empty(DATA_OFFSET, dtype=torch.uint8, pin_memory=cuda)
                         for _ in self.slots]  # fmt: skip
        self._headers = [torch.zeros(8, dtype=torch.int64, pin_memory=cuda) for _ in self.slots]
        self._invalid = _header(-1, 0, 0, 0, 0)
        if cuda:
            self._invalid = self._invalid.pin_memory()
        self._done: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self._inflight: torch.cuda.Event | None = None
        self._next = 0
        self._plan: tuple[tuple, CopyPlan, list[torch.Tensor], list] | None = None
        self.written = -1  # the last step written (its copy may still be in flight)
        self._too_big_warned = False

    def write(self, step: int, layout: StateLayout, tensors: list[torch.Tensor], blob: bytes,
              owned: Callable[[], frozenset[tuple[str, int]]]) -> bool:  # fmt: skip
        """Copy the state after ``step``; False when it does not fit the slots (skipped).
        ``owned``: the storages only ``optimizer.step()`` writes (copied lazily)."""
        index = self._next
        slot = self.slots[index]
        meta = layout.encode()
        plan, device_dst, lazy_wide = self._plan_for(layout, tensors, slot, owned)
        host_bytes = sum(piece.numel() for _, piece in plan.host)
        area = len(meta) + len(blob) + host_bytes
        if HEADER_BYTES + area > DATA_OFFSET or DATA_OFFSET + layout.total_bytes > slot.numel():
            if not self._too_big_warned:
                logger.warning("device mirror skipped: a state of %d bytes (%d of metadata) "
                               "does not fit slots of %d", layout.total_bytes, area,
                               slot.numel())  # fmt: skip
                self._too_big_warned = True
            return False
        self._next = (index + 1) % len(self.slots)
        done = self._done[index]
        if done is not None:
            done.synchronize()  # this slot's staging is free (long done: two steps ago)
        staging = self._staging[index]
        position = HEADER_BYTES
        for raw in (meta, blob):
            if raw:
                staging[position : position + len(raw)].copy_(
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8))  # fmt: skip
                position += len(raw)
        for _, piece in plan.host:
            staging[position : position + piece.numel()].copy_(piece)
            position += piece.numel()
        header = self._headers[index]
        header.copy_(_header(step, len(meta), len(blob), host_bytes, layout.total_bytes))
        staged = [(dst, src) for dst, (_, src) in zip(device_dst[len(plan.lazy):], plan.staged,
                                                      strict=True)]  # fmt: skip
        lazy_dst = device_dst[: len(plan.lazy)]
        head = slot[:HEADER_BYTES]
        if self._side is None:  # the CPU: in order, now
            head.copy_(self._invalid.view(torch.uint8))
            slot[HEADER_BYTES : HEADER_BYTES + area].copy_(staging[HEADER_BYTES : position])
            for dst, src in [*zip(lazy_dst, [p for _, p in plan.lazy], strict=True), *staged]:
                dst.copy_(src)
            head.copy_(header.view(torch.uint8))
            self.written = step
            return True
        compute = torch.cuda.current_stream(self.device)
        head.copy_(self._invalid.view(torch.uint8), non_blocking=True)
        if staged:  # what the next forward may change (buffers): copied before it runs
            torch._foreach_copy_([d for d, _ in staged], [s for _, s in staged])
        side = self._side
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            slot[HEADER_BYTES : HEADER_BYTES + area].copy_(
                staging[HEADER_BYTES:position], non_blocking=True)  # fmt: skip
            for dsts, srcs in lazy_wide:
                torch._foreach_copy_(dsts, srcs)
            head.copy_(header.view(torch.uint8), non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        self._done[index] = event
        self._inflight = event
        self.written = step
        return True

    def _plan_for(self, layout: StateLayout, tensors: list[torch.Tensor], slot: torch.Tensor,
                  owned: Callable[[], frozenset[tuple[str, int]]]):  # fmt: skip
        """The copy plan and destination views: kept while the tensors stay where they are."""
        key = (id(layout.entries), id(slot), tuple(t.data_ptr() for t in tensors))
        if self._plan is None or self._plan[0] != key:
            plan = plan_copies(stream_pieces(layout, tensors, 0, layout.total_bytes), owned())
            stream = slot[DATA_OFFSET:]
            device_dst = [stream[pos : pos + piece.numel()]
                          for pos, piece in plan.lazy + plan.staged]  # fmt: skip
            lazy_wide = widened_pairs(device_dst[: len(plan.lazy)], [p for _, p in plan.lazy])
            self._plan = (key, plan, device_dst, lazy_wide)
        return self._plan[1], self._plan[2], self._plan[3]

    def fence(self) -> None:
        """Order the compute stream after the last write's device copy (the host waits for
        nothing)."""
        event, self._inflight = self._inflight, None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        """Wait until every write has landed (before the slots are closed)."""
        for event in self._done:
            if event is not None:
                event.synchronize()


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorState:
    """The newest whole slot: views of its bytes (valid while the slots are)."""

    step: int
    slot: int
    layout: StateLayout
    blob: bytes
    pieces: list[tuple[int, torch.Tensor]]  # (stream offset, uint8 bytes): every tensor's


def _read_header(slot: torch.Tensor) -> list[int]:
    return slot[:HEADER_BYTES].cpu().view(torch.int64).tolist()


def _bytes(tensor: torch.Tensor) -> bytes:
    host = tensor.cpu().contiguous()
    return ctypes.string_at(host.data_ptr(), host.numel()) if host.numel() else b""


def slot_step(slot: torch.Tensor) -> int:
    """The step a slot holds whole, or -1 (being written, never written, or not a slot)."""
    header = _read_header(slot)
    if header[0] != MAGIC or header[1] != VERSION:
        return -1
    return header[2]


def read_newest(slots: Sequence[torch.Tensor]) -> MirrorState | None:
    """The newest slot that holds a whole step, or None."""
    best: tuple[int, int] | None = None
    for index, slot in enumerate(slots):
        step = slot_step(slot)
        if step >= 0 and (best is None or step > best[0]):
            best = (step, index)
    if best is None:
        return None
    step, index = best
    slot = slots[index]
    _, _, _, layout_bytes, blob_bytes, host_bytes, stream_bytes, _ = _read_header(slot)
    area_end = HEADER_BYTES + layout_bytes + blob_bytes + host_bytes
    if (min(layout_bytes, blob_bytes, host_bytes, stream_bytes) < 0 or area_end > DATA_OFFSET
            or DATA_OFFSET + stream_bytes > slot.numel()):  # fmt: skip
        raise MirrorError(f"mirror slot {index} of step {step} has a malformed header")
    area = _bytes(slot[HEADER_BYTES:area_end])
    try:
        layout = StateLayout.decode(area[:layout_bytes])
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed slot
        raise MirrorError(f"mirror slot {index} of step {step}: bad layout: {exc}") from exc
    if layout.total_bytes != stream_bytes:
        raise MirrorError(f"mirror slot {index}: layout of {layout.total_bytes} bytes, stream "
                          f"of {stream_bytes}")  # fmt: skip
    blob = area[layout_bytes : layout_bytes + blob_bytes]
    host = torch.frombuffer(bytearray(area[layout_bytes + blob_bytes :]) or bytearray(1),
                            dtype=torch.uint8)  # fmt: skip
    stream = slot[DATA_OFFSET : DATA_OFFSET + stream_bytes]
    pieces: list[tuple[int, torch.Tensor]] = []
    used = 0
    for entry in layout.entries:
        if not entry.nbytes:
            continue
        if entry.device == "cpu":
            pieces.append((entry.offset, host[used : used + entry.nbytes]))
            used += entry.nbytes
        else:
            pieces.append((entry.offset, stream[entry.offset : entry.offset + entry.nbytes]))
    if used != host_bytes:
        raise MirrorError(f"mirror slot {index}: {host_bytes} host bytes, the layout needs {used}")
    return MirrorState(step, index, layout, blob, pieces)



class MirrorSlots:
    """A mirror's slots as their holder (the spare) or their writer (the worker) sees them."""

    def __init__(self, memory: list[DeviceMemory], offer: MirrorOffer) -> None:
        self.memory = memory
        self.offer = offer

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [m.tensor for m in self.memory]

    @classmethod
    def allocate(cls, stream_bytes: int, device: torch.device) -> MirrorSlots:
        """Two slots for a state of ``stream_bytes`` on ``device``, headers cleared."""
        nbytes = slot_bytes_for(stream_bytes)
        memory: list[DeviceMemory] = []
        try:
            for _ in range(SLOTS):
                memory.append(DeviceMemory.allocate(nbytes, device))
                memory[-1].tensor[:HEADER_BYTES].zero_()
            offer = MirrorOffer(device_uuid(device), nbytes, tuple(m.handle() for m in memory))
        except BaseException:
            for m in memory:
                m.close()
            raise
        torch.cuda.synchronize(device)
        return cls(memory, offer)

    @classmethod
    def open(cls, offer: MirrorOffer, device: torch.device) -> MirrorSlots:
        if device_uuid(device) != offer.device:
            raise MirrorError(f"the mirror is on GPU {offer.device}, this worker on "
                              f"{device_uuid(device)}")  # fmt: skip
        memory: list[DeviceMemory] = []
        try:
            for handle in offer.handles:
                memory.append(DeviceMemory.open(handle, offer.slot_bytes, device))
        except BaseException:
            for m in memory:
                m.close()
            raise
        return cls(memory, offer)

    def close(self) -> None:
        for m in self.memory:
            m.close()
        self.memory = []
