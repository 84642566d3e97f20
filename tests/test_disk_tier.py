"""Disk tier of the snapshot system: round trips, shuffle, atomicity, corruption, retention and
the background writer's pending policy. Everything runs against a real directory."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.snapshot.disk import (
    LATEST_NAME,
    MANIFEST_NAME,
    DiskTierConfig,
    DiskTierWriter,
    PendingPolicy,
    Snapshot,
    SnapshotCorruptError,
    SnapshotFormatError,
    SnapshotNotFoundError,
    SnapshotRecord,
    SnapshotTruncatedError,
    SnapshotWriteError,
    WriteStage,
    list_snapshots,
    plan_retention,
    read_snapshot,
    shuffle_bytes,
    step_dir_name,
    unshuffle_bytes,
    verify_snapshot,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)
SMALL_FRAMES = DiskTierConfig(frame_bytes=64 << 10, pack_bytes=100_000, level=1)


def weights(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)


def mixed_records() -> list[SnapshotRecord]:
    int64 = torch.tensor([0, -1, 2**63 - 1, -(2**63), 12345], dtype=torch.int64)
    nan_bits = np.array([0x7FC00001, 0xFF800001, 1], dtype=np.uint32)  # NaN payloads, denormal
    nan_payload = torch.from_numpy(nan_bits.view(np.float32))
    return [
        SnapshotRecord.from_tensor("rank0/model/w.fp32", weights(300, 257), {"tp": [0, 2]}),
        SnapshotRecord.from_tensor("rank0/model/w.bf16", weights(1001, 33, dtype=torch.bfloat16)),
        SnapshotRecord.from_tensor("rank0/model/w.fp16", weights(7777, dtype=torch.float16)),
        SnapshotRecord.from_tensor("rank0/model/nan", nan_payload),
        SnapshotRecord.from_tensor("rank0/optim/step", int64),
        SnapshotRecord.from_tensor("rank0/scalar", torch.tensor(3.5)),
        SnapshotRecord.from_tensor("rank0/mask", torch.arange(99_999, dtype=torch.uint8)),
        SnapshotRecord.from_tensor("rank0/empty", torch.empty(0, 16)),
        SnapshotRecord("rank0/extras", "bytes", (), pickle.dumps({"lr": 3e-4, "epoch": 7})),
        SnapshotRecord("rank0/odd", "bytes", (12_345,), os.urandom(12_345)),
        SnapshotRecord("rank0/none", "bytes", (0,), b""),
        SnapshotRecord("rank1/numpy", "float64", (513,), np.linspace(0, 1, 513)),
    ]


def write(root: Path, step: int, records: list[SnapshotRecord], **config) -> Path:
    with DiskTierWriter(root, DiskTierConfig(**config)) as writer:
        return writer.submit(Snapshot(step, "job", records)).result(timeout=30).path


def raw_bytes(record: SnapshotRecord) -> bytes:
    return record.byte_view().tobytes()


@pytest.mark.parametrize(
    "config",
    [DiskTierConfig(), SMALL_FRAMES, DiskTierConfig(shuffle=False, threads=2)],
    ids=["default", "small-frames-and-packs", "no-shuffle-mt"],
)
def test_round_trip_is_bit_exact(tmp_path, config):
    records = mixed_records()
    with DiskTierWriter(tmp_path, config) as writer:
        result = writer.submit(Snapshot(42, "job-a", records)).result(timeout=30)
    assert result.path == tmp_path / "step-000000000042"

    manifest, restored = read_snapshot(tmp_path)
    assert (manifest.step, manifest.job_id) == (42, "job-a")
    assert [entry.name for entry in manifest.records] == [r.name for r in records]
    for record in records:
        got = restored[record.name]
        assert got.data.dtype == torch.uint8
        assert bytes(got) == raw_bytes(record), record.name
        assert (got.entry.dtype, got.entry.shape, got.entry.meta) == (
            record.dtype,
            record.shape,
            dict(record.meta),
        )
    assert torch.equal(restored["rank0/model/w.bf16"].as_tensor(), records[1].data)
    assert restored["rank0/scalar"].as_tensor().item() == 3.5
    assert pickle.loads(bytes(restored["rank0/extras"])) == {"lr": 3e-4, "epoch": 7}
    assert verify_snapshot(tmp_path).ok
    if config is SMALL_FRAMES:
        assert len(manifest.files) > 1
        assert max(len(entry.frames) for entry in manifest.records) > 1


def test_record_larger_than_a_frame_crosses_frame_boundaries(tmp_path):
    elements = (64 << 20) // 2 + 4099  # bf16: 64 MiB + 8198 bytes, two default-size frames
    tensor = torch.empty(elements, dtype=torch.bfloat16).normal_(0, 0.02)
    write(tmp_path, 1, [SnapshotRecord.from_tensor("big", tensor)], level=1)

    manifest, restored = read_snapshot(tmp_path, step=1)
    assert [raw for _, raw in manifest.record("big").frames] == [64 << 20, 8198]
    assert torch.equal(restored["big"].as_tensor(), tensor)


def reference_shuffle(data: bytes, size: int) -> bytes:
    full = len(data) - len(data) % size
    planes = np.frombuffer(data[:full], dtype=np.uint8).reshape(-1, size).T
    return planes.tobytes() + data[full:]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), size=st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_shuffle_matches_definition_and_unshuffle_inverts_it(data, size):
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.full(len(data) + 7, 0xAA, dtype=np.uint8)  # reused, larger than needed
    shuffled = shuffle_bytes(src, size, out)
    assert shuffled.tobytes() == reference_shuffle(data, size)
    assert unshuffle_bytes(shuffled.copy(), size).tobytes() == data
    assert (out[len(data) :] == 0xAA).all()


def test_shuffle_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="uint8"):
        shuffle_bytes(np.zeros(4, dtype=np.float32), 4)
    with pytest.raises(ValueError, match="at least 8 bytes"):
        shuffle_bytes(np.zeros(8, dtype=np.uint8), 2, np.zeros(4, dtype=np.uint8))


CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from elastictrain.snapshot.disk import *

    root, crash_stage = sys.argv[1], WriteStage(sys.argv[2])
    records = [SnapshotRecord.from_tensor(f"w{i}", torch.randn(50_000)) for i in range(4)]

    def crash(stage, step):
        if step == 2 and stage is crash_stage:
            os.kill(os.getpid(), signal.SIGKILL)

    writer = DiskTierWriter(root, DiskTierConfig(pack_bytes=100_000), on_stage=crash)
    writer.submit(Snapshot(1, "job", records)).result(timeout=30)
    writer.submit(Snapshot(2, "job", records)).result(timeout=30)
    print("not reached")
    """
)


@pytest.mark.parametrize("stage", [WriteStage.RECORD_WRITTEN, WriteStage.MANIFEST_WRITTEN])
def test_killed_writer_leaves_previous_snapshot_current(tmp_path, stage):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path), stage.value],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("step-000000000002.tmp-")

    assert [info.step for info in list_snapshots(tmp_path)] == [1]
    assert (tmp_path / LATEST_NAME).read_text() == "step-000000000001\n"
    manifest, _ = read_snapshot(tmp_path)
    assert manifest.step == 1

    DiskTierWriter(tmp_path).close()  # a new writer removes what the crashed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_NAME, "step-000000000001"]


class InjectedFault(RuntimeError):
    pass


@pytest.mark.parametrize(
    "stage", [WriteStage.RECORD_WRITTEN, WriteStage.SOURCES_RELEASED, WriteStage.MANIFEST_WRITTEN]
)
def test_failed_write_publishes_nothing(tmp_path, stage):
    def fail(at: WriteStage, step: int) -> None:
        if step == 2 and at is stage:
            raise InjectedFault(at.value)

    records = mixed_records()
    with DiskTierWriter(tmp_path, on_stage=fail) as writer:
        writer.submit(Snapshot(1, "job", records)).result(timeout=30)
        future = writer.submit(Snapshot(2, "job", records))
        error = future.exception(timeout=30)
    assert isinstance(error, SnapshotWriteError)
    assert isinstance(error.__cause__, InjectedFault)
    assert future.sources_released.is_set()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_NAME, "step-000000000001"]
    assert read_snapshot(tmp_path)[0].step == 1


def test_failure_after_rename_keeps_latest_on_previous_step(tmp_path):
    def fail(at: WriteStage, step: int) -> None:
        if step == 2 and at is WriteStage.PUBLISHED:
            raise InjectedFault("before LATEST")

    with DiskTierWriter(tmp_path, on_stage=fail) as writer:
        writer.submit(Snapshot(1, "job", mixed_records())).result(timeout=30)
        assert isinstance(writer.submit(Snapshot(2, "job", [])).exception(30), SnapshotWriteError)
    assert [info.step for info in list_snapshots(tmp_path)] == [1, 2]
    assert read_snapshot(tmp_path)[0].step == 1  # LATEST wins
    assert read_snapshot(tmp_path, step=2)[0].step == 2


def corrupt_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999], ids=["first", "middle", "last"])
@pytest.mark.parametrize("kind", ["bf16", "incompressible"])
def test_flipped_byte_names_the_record(tmp_path, where, kind):
    # Incompressible bytes are stored as raw zstd blocks: a flip there still decompresses, and
    # only the record's checksum can catch it.
    middle = (
        SnapshotRecord.from_tensor("rank0/b", weights(10_000, dtype=torch.bfloat16, seed=1))
        if kind == "bf16"
        else SnapshotRecord("rank0/b", "bytes", (20_000,), os.urandom(20_000))
    )
    records = [
        SnapshotRecord.from_tensor("rank0/a", weights(10_000)),
        middle,
        SnapshotRecord.from_tensor("rank0/c", weights(10_000, seed=2)),
    ]
    step_dir = write(tmp_path, 5, records)
    manifest, _ = read_snapshot(tmp_path)
    entry = manifest.record("rank0/b")
    corrupt_byte(step_dir / entry.file, entry.offset + int(where * entry.compressed_size))

    with pytest.raises(SnapshotCorruptError, match="rank0/b") as caught:
        read_snapshot(tmp_path)
    assert caught.value.record == "rank0/b"
    assert "\n" not in str(caught.value)
    report = verify_snapshot(tmp_path)
    assert not report.ok and len(report.problems) == 1 and "rank0/b" in report.problems[0]


def test_file_checksum_is_checked(tmp_path):
    step_dir = write(tmp_path, 1, [SnapshotRecord.from_tensor("w", weights(1000))])
    manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
    manifest["files"][0]["crc32"] ^= 1
    (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match=r"data-00000\.zst checksum mismatch"):
        read_snapshot(tmp_path)


def test_truncated_file_is_named(tmp_path):
    records = [SnapshotRecord.from_tensor(f"r{i}", weights(5000, seed=i)) for i in range(3)]
    step_dir = write(tmp_path, 3, records)
    manifest, _ = read_snapshot(tmp_path)
    data_file = step_dir / manifest.files[0].name
    os.truncate(data_file, manifest.record("r1").offset + 10)

    with pytest.raises(SnapshotTruncatedError, match=r"data-00000\.zst is truncated.*'r1'") as exc:
        read_snapshot(tmp_path)
    assert exc.value.record == "r1"
    assert "truncated" in verify_snapshot(tmp_path).problems[0]


def test_a_manifest_naming_files_outside_its_directory_is_refused(tmp_path):
    step_dir = write(tmp_path, 1, mixed_records())
    original = json.loads((step_dir / MANIFEST_NAME).read_text())
    for name in ("../../etc/passwd", "/etc/passwd", "a/b.zst", "", ".hidden", "x" * 200):
        manifest = json.loads(json.dumps(original))
        old = manifest["files"][0]["name"]
        manifest["files"][0]["name"] = name
        for record in manifest["records"]:
            if record["file"] == old:
                record["file"] = name
        (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(SnapshotFormatError, match="not a plain file name"):
            read_snapshot(tmp_path)


def test_missing_and_unreadable_snapshots_give_one_line_errors(tmp_path):
    with pytest.raises(SnapshotNotFoundError, match="does not exist"):
        read_snapshot(tmp_path / "nope")
    with pytest.raises(SnapshotNotFoundError, match="does not exist"):
        list_snapshots(tmp_path / "nope")
    (tmp_path / "step-000000000009.tmp-abcd").mkdir()  # incomplete: never counts
    with pytest.raises(SnapshotNotFoundError, match="no complete snapshot in"):
        verify_snapshot(tmp_path)

    step_dir = write(tmp_path, 1, mixed_records())
    with pytest.raises(
        SnapshotNotFoundError, match=r"no complete snapshot of step 7 .*complete: 1"
    ):
        read_snapshot(tmp_path, step=7)
    manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotFormatError, match="format version 99; this reader supports 1"):
        read_snapshot(tmp_path)
    (step_dir / MANIFEST_NAME).write_text("{")
    with pytest.raises(SnapshotFormatError, match="cannot read"):
        read_snapshot(tmp_path)


def test_retention_keeps_last_n(tmp_path):
    records = [SnapshotRecord.from_tensor("w", weights(100))]
    with DiskTierWriter(tmp_path, DiskTierConfig(keep_last=2)) as writer:
        results = [writer.submit(Snapshot(s, "job", records)).result(30) for s in range(1, 6)]
    assert [r.deleted_steps for r in results] == [(), (), (1,), (2,), (3,)]
    assert [(i.step, i.is_latest) for i in list_snapshots(tmp_path)] == [(4, False), (5, True)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        LATEST_NAME,
        step_dir_name(4),
        step_dir_name(5),
    ]


def test_plan_retention_never_deletes_the_step_just_written():
    assert plan_retention([1, 2, 3, 4], keep_last=2, written=4) == [1, 2]
    assert plan_retention([10, 20, 30], keep_last=1, written=10) == [20, 30]  # rolled back
    assert plan_retention([5], keep_last=3, written=5) == []


def test_rewriting_a_step_replaces_it(tmp_path):
    write(tmp_path, 3, [SnapshotRecord("x", "bytes", (3,), b"old")])
    write(tmp_path, 3, [SnapshotRecord("x", "bytes", (3,), b"new")])
    assert bytes(read_snapshot(tmp_path)[1]["x"]) == b"new"
    assert [info.step for info in list_snapshots(tmp_path)] == [3]


class Gate:
    """Holds the writer thread at one stage of one step until released."""

    def __init__(self, stage: WriteStage, step: int) -> None:
        self.stage, self.step = stage, step
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, stage: WriteStage, step: int) -> None:
        if (stage, step) == (self.stage, self.step):
            self.reached.set()
            if not self.release.wait(20):
                raise TimeoutError("gate never released")


def snapshot(step: int) -> Snapshot:
    return Snapshot(step, "job", [SnapshotRecord.from_tensor("w", weights(1000, seed=step))])


@pytest.mark.parametrize(
    ("policy", "written", "cancelled"),
    [(PendingPolicy.REPLACE_PENDING, [1, 3], [2]), (PendingPolicy.DROP_NEW, [1, 2], [3])],
)
def test_pending_policy_keeps_one_waiting_write(tmp_path, policy, written, cancelled):
    gate = Gate(WriteStage.RECORD_WRITTEN, 1)
    config = DiskTierConfig(pending_policy=policy, keep_last=10)
    with DiskTierWriter(tmp_path, config, on_stage=gate) as writer:
        futures = {1: writer.submit(snapshot(1))}
        assert gate.reached.wait(10)
        futures[2] = writer.submit(snapshot(2))
        futures[3] = writer.submit(snapshot(3))
        for step in cancelled:
            assert futures[step].cancelled() and futures[step].sources_released.is_set()
        gate.release.set()
        assert writer.wait(timeout=30)
    for step in written:
        assert futures[step].result(0).step == step
    assert [info.step for info in list_snapshots(tmp_path)] == written


def test_block_policy_blocks_submit_until_the_slot_frees(tmp_path):
    gate = Gate(WriteStage.RECORD_WRITTEN, 1)
    config = DiskTierConfig(pending_policy=PendingPolicy.BLOCK, keep_last=10)
    with DiskTierWriter(tmp_path, config, on_stage=gate) as writer:
        writer.submit(snapshot(1))
        assert gate.reached.wait(10)
        writer.submit(snapshot(2))
        third = threading.Thread(target=lambda: writer.submit(snapshot(3)))
        third.start()
        third.join(0.3)
        assert third.is_alive()  # step 2 still waits, so step 3 cannot be queued
        gate.release.set()
        third.join(10)
        assert not third.is_alive()
        assert writer.wait(timeout=30)
    assert [info.step for info in list_snapshots(tmp_path)] == [1, 2, 3]


def test_sources_are_released_before_the_write_is_durable(tmp_path):
    gate = Gate(WriteStage.MANIFEST_WRITTEN, 1)
    source = weights(50_000)
    with DiskTierWriter(tmp_path, on_stage=gate) as writer:
        future = writer.submit(Snapshot(1, "job", [SnapshotRecord.from_tensor("w", source)]))
        assert future.sources_released.wait(10)
        assert gate.reached.wait(10) and not future.done()
        expected = source.clone()
        source.zero_()  # the caller reuses its buffer: what is on disk must not change
        gate.release.set()
        assert future.result(30).read_seconds <= future.result(0).seconds
    assert torch.equal(read_snapshot(tmp_path)[1]["w"].as_tensor(), expected)
    with pytest.raises(SnapshotWriteError, match="closed"):
        writer.submit(snapshot(2))


def test_invalid_inputs_are_rejected_up_front():
    with pytest.raises(ValueError, match="contiguous"):
        SnapshotRecord.from_tensor("t", torch.zeros(4, 4).T)
    with pytest.raises(ValueError, match="do not hold shape"):
        SnapshotRecord("t", "float32", (3,), b"12345678")
    with pytest.raises(ValueError, match="dtype must be"):
        SnapshotRecord("t", "float33", (1,), b"1234")
    with pytest.raises(ValueError, match="unique"):
        Snapshot(1, "job", [SnapshotRecord("a", "bytes", (0,), b"")] * 2)
    with pytest.raises(ValueError, match="level"):
        DiskTierConfig(level=0)
    with pytest.raises(ValueError, match="frame_bytes"):
        DiskTierConfig(frame_bytes=(1 << 20) + 1)
    with pytest.raises(ValueError, match="keep_last"):
        DiskTierConfig(keep_last=0)
