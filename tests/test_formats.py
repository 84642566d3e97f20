"""Every format that crosses a process, the network or a disk: round trips, refusals, fuzzing.

Parsers of bytes that come from a peer, a worker, etcd or disk raise only their typed error
(:class:`SnapshotFormatError`, :class:`WorldFormatError`, ...) on any input, and never run code
or allocate past what the bytes hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from elastictrain.agent.world import World, WorldFormatError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastictrain import safe_pickle
from elastictrain.coord.nodes import NodeRecord, NodeRecordFormatError
from elastictrain.errors import SnapshotFormatError
from elastictrain.events import Event, EventFormatError
from elastictrain.node_status import NodeStatus, NodeStatusFormatError, SnapshotStatus, WorkerStatus
from elastictrain.snapshot.device_mirror import MirrorError, MirrorOffer
from elastictrain.snapshot.layout import StateLayout, flatten_state, unflatten_state
from elastictrain.snapshot.payload import PayloadEntry, pack_payload_into, unpack_payload
from elastictrain.snapshot.record_meta import (
    RecordMeta,
    ShardedRecordMeta,
    capture_rng,
    decode_record_meta,
)

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


class _Payload:
    """Runs a command when unpickled by a plain unpickler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.1), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict()}  # fmt: skip


def test_a_training_state_round_trips_through_the_allow_list():
    state = _state()
    layout, tensors = flatten_state(state)
    stream = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    for entry, tensor in zip(layout.entries, tensors, strict=True):
        stream[entry.offset : entry.offset + entry.nbytes] = tensor.reshape(-1).view(torch.uint8)
    back = StateLayout.decode(layout.encode())
    assert back == layout
    rebuilt = unflatten_state(back, stream)
    assert isinstance(rebuilt["model"], OrderedDict)
    assert rebuilt["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for key, value in state["model"].items():
        assert torch.equal(rebuilt["model"][key], value)


def test_a_rank_blob_keeps_rng_states_and_arrays_inline():
    np.random.seed(3)
    random.seed(4)
    blob = {"step": 7, "data": {"step": 7}, "rng": capture_rng(),
            "extras": {"array": np.arange(6, dtype=np.int32).reshape(2, 3), "lr": 3e-4,
                       "names": ("a", "b"), "empty": torch.empty(0), "set": {1, 2}}}  # fmt: skip
    back = safe_pickle.loads(safe_pickle.dumps_inline(blob))
    assert torch.equal(back["rng"]["torch"], blob["rng"]["torch"])
    assert back["rng"]["python"] == blob["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], blob["rng"]["numpy"][1])
    np.testing.assert_array_equal(back["extras"]["array"], blob["extras"]["array"])
    assert back["extras"]["set"] == {1, 2} and back["extras"]["names"] == ("a", "b")


def test_dcp_metadata_is_read_with_its_profile():
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from elastictrain.snapshot.dcp_storage import ItemLocation

    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 2]))
    props = TensorProperties(dtype=torch.bfloat16, layout=torch.strided,
                             memory_format=torch.contiguous_format)  # fmt: skip
    metadata = Metadata({"model.w": TensorStorageMetadata(props, torch.Size([4, 2]), [chunk])},
                        storage_data={MetadataIndex("model.w", torch.Size([0, 0]), 0):
                                      ItemLocation(0, 64, 16, "bfloat16", (4, 2))})  # fmt: skip
    back = safe_pickle.loads(pickle.dumps(metadata), profile="dcp")
    assert back.state_dict_metadata == metadata.state_dict_metadata
    assert list(back.storage_data.values()) == list(metadata.storage_data.values())


def test_code_in_a_pickle_never_runs(tmp_path):
    marker = tmp_path / "ran"
    crafted = pickle.dumps({"rng": _Payload(str(marker))})
    for read in (lambda: safe_pickle.loads(crafted),
                 lambda: safe_pickle.loads(crafted, profile="dcp"),
                 lambda: safe_pickle.loads(crafted, tensors=[])):  # fmt: skip
        with pytest.raises(SnapshotFormatError, match="may not hold posix.system"):
            read()
    for name in ("eval", "exec", "getattr", "__import__"):
        with pytest.raises(SnapshotFormatError):
            safe_pickle.loads(b"cbuiltins\n" + name.encode() + b"\n.")
    assert not marker.exists()


def test_a_declared_length_allocates_nothing_past_the_input():
    import struct
    import tracemalloc

    claims = [b"\x80\x05" + opcode + struct.pack("<Q", 1 << 34) + b"abc."
              for opcode in (b"\x8e", b"\x96", b"\x8d")]  # BINBYTES8, BYTEARRAY8, BINUNICODE8
    claims.append(b"\x80\x05N" + b"r" + struct.pack("<I", 1 << 31) + b".")  # LONG_BINPUT
    for raw in claims:
        tracemalloc.start()
        with pytest.raises(SnapshotFormatError):
            safe_pickle.loads(raw)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20


def test_a_state_the_reader_refuses_is_refused_when_taken():
    with pytest.raises(SnapshotFormatError, match="cannot be snapshotted.*posix.system"):
        safe_pickle.dumps_inline({"extras": _Payload("/nonexistent")})
    with pytest.raises(SnapshotFormatError):
        flatten_state({"extras": _Payload("/nonexistent")})


def test_record_descriptions_round_trip_and_are_checked():
    layout, _ = flatten_state(_state())
    meta = RecordMeta(1, 2, 9, 0, 64, 10, layout.encode())
    back = decode_record_meta(meta.encode())
    assert back == meta and back.state_layout == layout
    sharded = ShardedRecordMeta(0, 2, 9, 128, 5, ((0, 64, "float32"), (64, 64, "bfloat16")))
    assert decode_record_meta(sharded.encode()) == sharded
    bad = [b"", b"\x80\x04K\x01.", b"[]", b'{"version": 1}',
           meta.encode().replace(b'"end":64', b'"end":-1'),
           meta.encode().replace(b'"world":2', b'"world":0'),
           sharded.encode().replace(b"float32", b"object")]  # fmt: skip
    for raw in bad:
        with pytest.raises(SnapshotFormatError):
            decode_record_meta(raw)


def test_payload_headers_are_json_and_checked():
    records = [bytes(range(10)), b"xyz"]
    entries = [PayloadEntry(r, len(d), b"meta%d" % r, r) for r, d in enumerate(records)]
    out = bytearray(4096)
    total = pack_payload_into(entries, [memoryview(d) for d in records], memoryview(out))
    back = unpack_payload(out[:total])
    assert [(e.rank, e.meta, bytes(v)) for e, v in back] == [(0, b"meta0", records[0]),
                                                             (1, b"meta1", records[1])]
    with pytest.raises(SnapshotFormatError):
        unpack_payload(out[: total - 1])  # the header describes more than is there
    huge = bytearray(out)
    huge[:8] = (1 << 62).to_bytes(8, "little")
    with pytest.raises(SnapshotFormatError):
        unpack_payload(huge)


# -- fuzzing: arbitrary bytes, and valid encodings with bytes flipped --------------------------


def _mutations(valid: bytes):
    return st.one_of(
        st.binary(max_size=512),
        st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255)).map(
            lambda m: valid[: m[0]] + bytes([m[1]]) + valid[m[0] + 1 :]),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
    )  # fmt: skip


_PICKLED_STATE = pickle.dumps(_state(), protocol=pickle.HIGHEST_PROTOCOL)
_INLINE = safe_pickle.dumps_inline({"rng": capture_rng(), "data": {"step": 1}, "extras": None})


@FUZZ
@given(_mutations(_PICKLED_STATE) | _mutations(_INLINE))
def test_fuzz_the_allow_list_unpickler(raw):
    for profile in safe_pickle.PROFILES:
        with contextlib.suppress(SnapshotFormatError):
            safe_pickle.loads(raw, profile=profile)


_LAYOUT, _ = flatten_state(_state())
_META = RecordMeta(0, 1, 3, 0, _LAYOUT.total_bytes, 4, _LAYOUT.encode()).encode()
_SHARDED = ShardedRecordMeta(0, 2, 3, 64, 8, ((0, 64, "float32"),)).encode()


@FUZZ
@given(_mutations(_META) | _mutations(_SHARDED))
def test_fuzz_record_descriptions(raw):
    try:
        meta = decode_record_meta(raw)
    except SnapshotFormatError:
        return
    if isinstance(meta, RecordMeta):
        assert meta.start <= meta.end <= meta.state_layout.total_bytes


def _payload() -> bytes:
    entries = [PayloadEntry(0, 5, _META[:40], 1), PayloadEntry(1, 3, b"m", 2)]
    out = bytearray(1024)
    total = pack_payload_into(entries, [memoryview(b"hello"), memoryview(b"abc")], memoryview(out))
    return bytes(out[:total])


@FUZZ
@given(_mutations(_payload()))
def test_fuzz_payload_headers(raw):
    try:
        records = unpack_payload(raw)
    except SnapshotFormatError:
        return
    for entry, view in records:
        assert len(view) == entry.nbytes and entry.offset + entry.nbytes <= len(raw)


_WORLD = World("r1", 3, ()).encode()


@FUZZ
@given(_mutations(World.decode(b'{"version":2,"round_id":"r","epoch":1,"members":[["a",0,"x"]]}').encode())
       | _mutations(_WORLD))
def test_fuzz_world_records(raw):
    with contextlib.suppress(WorldFormatError):
        World.decode(raw)


# -- the other parsers of bytes from workers, etcd and disk -------------------------------------


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def _session_frames() -> bytes:
    from elastictrain.session import protocol as P

    return P.encode({"type": "heartbeat", "step": 3, "active": True}) + P.encode(
        {"type": "request", "id": 1, "method": "end_snapshot", "rank": 0, "step": 3,
         "meta": P.b64(b"x" * 40)})  # fmt: skip


@FUZZ
@given(_mutations(_session_frames()))
def test_fuzz_session_frames(raw):
    from elastictrain.session import protocol as P

    reader = P.FrameReader()
    with contextlib.suppress(P.SessionError):
        for message in reader.feed(raw):
            assert isinstance(message, dict) and isinstance(message["type"], str)


_EVENT = Event("ride_out", "a", 1.5, "etcd away", {"answers": {"b": 2.0}}).encode()
_NODE = NodeRecord("a", "127.0.0.1:1", "h", 0, 2, 7).encode()
_STATUS = NodeStatus("a", "h", "127.0.0.1:1", 7, "RUNNING", world_size=4, workers=(
    WorkerStatus(0, 2, 9, "RUNNING", step=3, step_s=0.1, speed=5.5, share=0.25),
    WorkerStatus(2, -1, 10, "FAILED", exit_code=-9, spare=True)),
    snapshot=SnapshotStatus(memory_bytes=1 << 20, records=2)).encode()  # fmt: skip


@FUZZ
@given(_mutations(_EVENT) | _mutations(_NODE) | _mutations(_STATUS))
def test_fuzz_events_node_records_and_node_status(raw):
    with contextlib.suppress(EventFormatError):
        Event.decode(raw)
    with contextlib.suppress(NodeRecordFormatError):
        NodeRecord.decode(raw)
    with contextlib.suppress(NodeStatusFormatError):
        status = NodeStatus.decode(raw)
        assert NodeStatus.decode(status.encode()) == status


def test_node_status_records_round_trip_and_are_checked():
    status = NodeStatus.decode(_STATUS)
    assert status.workers[1].exit_code == -9 and status.snapshot.records == 2
    assert status.same_as(replace(status, updated=99.0))
    assert not status.same_as(replace(status, state="FAILED"))
    for old, new in ((b'"pid":7', b'"pid":"7"'), (b'"spare":true', b'"spare":1'),
                     (b'"step_s":0.1', b'"step_s":1e999'), (b'"version":1', b'"version":2'),
                     (b'"records":2', b'"records":2,"extra":1')):  # fmt: skip
        assert old in _STATUS
        with pytest.raises(NodeStatusFormatError):
            NodeStatus.decode(_STATUS.replace(old, new, 1))


_OFFER = json.dumps(MirrorOffer("GPU-1", 1 << 30, (b"\x01" * 64, b"\x02" * 64)).to_json())


@FUZZ
@given(_mutations(_OFFER.encode()))
def test_fuzz_mirror_offers(raw):
    with contextlib.suppress(MirrorError):
        MirrorOffer.from_json(_json_or_none(raw))


def _manifest() -> bytes:
    import tempfile

    from elastictrain.snapshot.disk import DiskTierWriter, SnapshotRecord
    from elastictrain.snapshot.disk import Snapshot as DiskSnapshot
    from elastictrain.snapshot.disk.manifest import MANIFEST_NAME, step_dir_name

    with tempfile.TemporaryDirectory() as root:
        writer = DiskTierWriter(root)
        records = [SnapshotRecord("rank0/w", "float32", (4,), b"\0" * 16),
                   SnapshotRecord("rank0/blob", "bytes", (), b"abc")]  # fmt: skip
        writer.submit(DiskSnapshot(step=1, job_id="j", records=records)).result(30)
        writer.close()
        return (Path(root) / step_dir_name(1) / MANIFEST_NAME).read_bytes()


_MANIFEST = _manifest()


@FUZZ
@given(_mutations(_MANIFEST))
def test_fuzz_disk_manifests(raw):
    from elastictrain.snapshot.disk.manifest import SnapshotManifest

    with contextlib.suppress(SnapshotFormatError):  # the disk tier's is one too
        SnapshotManifest.from_json(_json_or_none(raw), "fuzzed")


def _mirror_slot() -> torch.Tensor:
    from elastictrain.snapshot.device_copy import optimizer_storages
    from elastictrain.snapshot.device_mirror import SlotWriter, slot_bytes_for

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    slots = [torch.zeros(slot_bytes_for(1 << 12), dtype=torch.uint8) for _ in range(2)]
    layout, tensors = flatten_state({"model": model.state_dict(),
                                     "optimizer": optimizer.state_dict()})  # fmt: skip
    SlotWriter(slots).write(1, layout, tensors, b"blob", lambda: optimizer_storages(optimizer))
    return next(s for s in slots if s[:8].any())


_SLOT = _mirror_slot()
_SLOT_HEAD = bytes(_SLOT[:2048].numpy())
_SLOT_ORIGINAL = _SLOT[:2048].clone()


@FUZZ
@given(_mutations(_SLOT_HEAD))
def test_fuzz_device_mirror_slots(raw):
    from elastictrain.snapshot.device_mirror import read_newest

    head = torch.frombuffer(bytearray(raw[:2048].ljust(2048, b"\0")), dtype=torch.uint8)
    _SLOT[:2048] = head  # in place (a copy of the whole slot per case is most of the time)
    try:
        with contextlib.suppress(MirrorError):
            state = read_newest([_SLOT])
            if state is not None:
                assert state.layout.total_bytes <= _SLOT.numel()
    finally:
        _SLOT[:2048] = _SLOT_ORIGINAL


def test_deep_or_huge_json_is_a_typed_error():
    from elastictrain.agent.world import World, WorldFormatError

    from elastictrain.session import protocol as P

    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [(P.decode, P.SessionError), (Event.decode, EventFormatError),
             (World.decode, WorldFormatError), (NodeRecord.decode, NodeRecordFormatError),
             (decode_record_meta, SnapshotFormatError), (StateLayout.decode, SnapshotFormatError)]
    for parse, error in cases:
        for raw in (deep, b'{"version": 2, "round_id": "r", "epoch": 1e999, "members": []}'):
            with pytest.raises(error):
                parse(raw)
