"""The pieces chaos faults are made of, against their real backends: the etcd gate of a
partition, a full file system, a corrupted chunk caught by the rebuild's checksums."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from elastictrain.agent.chaos import DISK_FULL_MAX_FREE, chaos_problem, fill_file_system

from elastictrain.coord.etcd import REACH
from elastictrain.errors import CoordinationUnavailableError
from elastictrain.snapshot.erasure import (
    ChunkCorruptError,
    ErasureCodec,
    NotEnoughChunksError,
    decode_snapshot,
    encode_snapshot,
)
from elastictrain.snapshot.memory_store import ChunkInfo, ChunkStore

pytestmark = pytest.mark.timeout(60)


@pytest.mark.unit
def test_what_each_fault_needs_is_checked_before_it_is_made():
    assert chaos_problem("hang", seconds=0) == "hang needs a duration (> 0 s)"
    assert chaos_problem("hang", seconds=2) == ""
    assert "does not run the job's etcd" in chaos_problem("etcd_restart", has_etcd=False)
    assert "ends the job" in chaos_problem("kill_agent", has_etcd=True)
    assert chaos_problem("kill_agent") == ""
    assert "no disk tier" in chaos_problem("disk_full", seconds=1)
    big = DISK_FULL_MAX_FREE + 1
    assert "more than" in chaos_problem("disk_full", seconds=1, has_disk=True, free_bytes=big)
    assert chaos_problem("disk_full", seconds=1, has_disk=True, free_bytes=big,
                         max_free=2 * big) == ""  # fmt: skip
    assert "must be in" in chaos_problem("partition", seconds=-1)


_PUT = ("import sys; from elastictrain.coord.etcd import EtcdClient; "
        "c = EtcdClient.from_spec(sys.argv[1]); c.put(sys.argv[2], sys.argv[3]); c.close()")


def _put_from_another_process(spec: str, key: str, value: str) -> None:
    """A write by a node that still reaches etcd (this process's calls are all gated)."""
    subprocess.run([sys.executable, "-c", _PUT, spec, key, value], check=True, timeout=30)


@pytest.mark.contract
def test_a_closed_gate_cuts_calls_and_watches_and_nothing_is_lost_after(etcd_client, job_id):
    prefix = f"/t/{job_id}/"
    seen: list[str] = []
    got = threading.Event()

    def on_events(events):
        seen.extend(e.key for e in events)
        got.set()

    watch = etcd_client.watch_prefix(prefix, on_events, etcd_client.revision() + 1)
    try:
        etcd_client.put(prefix + "before", "1")
        assert got.wait(5)
        REACH.close_for(3.0)
        with pytest.raises(CoordinationUnavailableError, match="cut off from etcd"):
            etcd_client.put(prefix + "lost", "0", timeout=0.5)
        time.sleep(0.4)  # the watch sees the gate closed and lets go of its stream
        _put_from_another_process(etcd_client.endpoint_spec, prefix + "during", "2")
        time.sleep(0.3)
        assert prefix + "during" not in seen  # nothing arrives while cut off
        time.sleep(REACH.closed_s())
        deadline = time.monotonic() + 10
        while prefix + "during" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [prefix + "before", prefix + "during"]  # resumed from its revision
        assert etcd_client.get(prefix + "during").value == b"2"
    finally:
        REACH.open()
        watch.cancel()


@pytest.mark.contract
def test_a_file_system_is_filled_to_the_last_block_and_freed(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        path, written = fill_file_system(str(mount))
        assert written >= 3 * (1 << 20)
        with pytest.raises(OSError) as full:
            (mount / "more").write_bytes(b"x" * 8192)
        assert full.value.errno == 28  # ENOSPC
        os.unlink(path)
        (mount / "more").write_bytes(b"x" * 8192)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.unit
def test_a_corrupted_chunk_is_found_by_its_checksum_and_the_rest_rebuild_it():
    payload = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    with ErasureCodec(2, 1) as codec:
        encoded = encode_snapshot(codec, payload)
    store = ChunkStore()
    rows = encoded.chunks
    for index in range(rows.shape[0]):
        info = ChunkInfo("n1", 7, index, 2, 1, "erasure", len(payload), rows.shape[1],
                         encoded.checksums)  # fmt: skip
        store.put(info, bytearray(rows[index].tobytes()))
    store.put(ChunkInfo("n0", 7, 0, 2, 1, "erasure", 4, 4, (0,)), bytearray(4))
    store.put(ChunkInfo("n1", 6, 0, 2, 1, "erasure", 4, 4, (0,)), bytearray(4))
    flipped = store.corrupt("n0")  # another owner's newest step
    assert [(c.owner, c.step, c.index) for c in flipped] == [("n1", 7, 0), ("n1", 7, 1),
                                                             ("n1", 7, 2)]  # fmt: skip
    held = {i: np.frombuffer(store.get("n1", 7, i)[1], dtype=np.uint8) for i in range(3)}
    with ErasureCodec(2, 1) as codec, pytest.raises(NotEnoughChunksError) as caught:
        decode_snapshot(codec, held, list(encoded.checksums), len(payload))
    assert isinstance(caught.value.__cause__, ChunkCorruptError)
    held[1] = rows[1]  # with k = 2 intact chunks the payload comes back
    held[2] = rows[2]
    with ErasureCodec(2, 1) as codec:
        rebuilt = decode_snapshot(codec, held, list(encoded.checksums), len(payload))
    assert np.array_equal(np.asarray(rebuilt)[: len(payload)], payload)
