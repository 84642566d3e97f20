"""Device mirrors: the slot format and its writer/reader (on CPU tensors: the same bytes a
GPU slot holds), the offer's wire form, the agent's board of who writes where, and, with a
GPU, slots shared between real processes through CUDA IPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from elastictrain.agent.mirrors import MirrorBoard
from elastictrain.agent.sessions import WorkerKey

from elastictrain.snapshot.device_copy import optimizer_storages
from elastictrain.snapshot.device_mirror import (
    DATA_OFFSET,
    HEADER_BYTES,
    MirrorError,
    MirrorOffer,
    SlotWriter,
    read_newest,
    slot_bytes_for,
    slot_step,
)
from elastictrain.snapshot.layout import flatten_state
from elastictrain.snapshot.restore import load_replicated
from elastictrain.snapshot.worker import Snapshotter

pytestmark = pytest.mark.timeout(60)


def _job(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 2))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps: int, writer: SlotWriter | None = None, snap=None):
    for step in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if writer is not None:
            layout, tensors = flatten_state(snap._replicated_state())
            writer.write(step + 1, layout, tensors, b"", lambda: optimizer_storages(opt))


def _state(model, opt, sched):
    return ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(),
            sched.state_dict())  # fmt: skip


def _slots(nbytes: int = 1 << 16) -> list[torch.Tensor]:
    return [torch.zeros(slot_bytes_for(nbytes), dtype=torch.uint8) for _ in range(2)]


@pytest.mark.unit
def test_the_newest_whole_slot_loads_bit_identical_into_fresh_objects():
    model, opt, sched = _job(0)
    snap = Snapshotter(model=model, optimizer=opt, scheduler=sched)
    slots = _slots()
    writer = SlotWriter(slots)
    _train(model, opt, sched, 5, writer, snap)
    assert sorted(slot_step(s) for s in slots) == [4, 5]
    want = _state(model, opt, sched)

    fresh = _job(1)
    _train(*fresh, 1)  # its optimizer state exists, its values differ
    target = Snapshotter(model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    state = read_newest(slots)
    assert state is not None and state.step == 5
    load_replicated(target, state.layout, state.pieces)
    got = _state(*fresh)
    for name, tensor in want[0].items():
        assert torch.equal(got[0][name], tensor), name
    for index, per_param in want[1]["state"].items():
        for key, value in per_param.items():
            assert torch.equal(got[1]["state"][index][key], value), (index, key)
    assert got[1]["param_groups"][0]["lr"] == want[1]["param_groups"][0]["lr"]
    assert got[2] == want[2]


@pytest.mark.unit
def test_a_slot_being_written_is_never_read():
    model, opt, sched = _job(0)
    snap = Snapshotter(model=model, optimizer=opt, scheduler=sched)
    slots = _slots()
    _train(model, opt, sched, 3, SlotWriter(slots), snap)  # slot 0 holds 3, slot 1 holds 2
    newest = max(range(2), key=lambda i: slot_step(slots[i]))
    # a writer killed halfway through the newest slot: its header was cleared first
    slots[newest][:HEADER_BYTES].view(torch.int64)[2] = -1
    state = read_newest(slots)
    assert state is not None and state.step == 2
    slots[1 - newest][:HEADER_BYTES].zero_()  # never written
    assert read_newest(slots) is None


@pytest.mark.unit
def test_a_state_too_big_for_the_slots_is_skipped():
    model, opt, sched = _job(0)
    snap = Snapshotter(model=model, optimizer=opt, scheduler=sched)
    layout, tensors = flatten_state(snap._replicated_state())
    tiny = [torch.zeros(DATA_OFFSET + 8, dtype=torch.uint8) for _ in range(2)]
    writer = SlotWriter(tiny)
    assert tiny[0].numel() < DATA_OFFSET + layout.total_bytes
    assert not writer.write(1, layout, tensors, b"", lambda: frozenset())
    assert read_newest(tiny) is None


@pytest.mark.unit
def test_a_malformed_header_is_an_error_not_a_state():
    slots = _slots()
    header = slots[0][:HEADER_BYTES].view(torch.int64)
    header[:] = torch.tensor([int.from_bytes(b"ETMIRROR", "little"), 1, 7, 1 << 40, 0, 0, 0, 0])
    with pytest.raises(MirrorError, match="malformed header"):
        read_newest(slots)


@pytest.mark.unit
def test_offers_travel_as_versioned_json():
    offer = MirrorOffer("GPU-1234", slot_bytes_for(100), (b"\x01" * 64, b"\x02" * 64))
    assert MirrorOffer.from_json(offer.to_json()) == offer
    with pytest.raises(MirrorError, match="version"):
        MirrorOffer.from_json(offer.to_json() | {"version": 99})
    with pytest.raises(MirrorError, match="malformed"):
        MirrorOffer.from_json({"version": 1, "device": "x"})
    with pytest.raises(MirrorError, match="IPC handles"):
        MirrorOffer.from_json(offer.to_json() | {"handles": ["00", "00"]})


# -- the agent's board ---------------------------------------------------------------------------


@pytest.mark.unit
def test_one_worker_per_offer_on_its_own_gpu():
    board = MirrorBoard()
    live = {WorkerKey(1, 0), WorkerKey(1, 1), WorkerKey(1, 2), WorkerKey(1, 8)}
    alive = live.__contains__
    spare, w0, w1, w2 = WorkerKey(1, 8), WorkerKey(1, 0), WorkerKey(1, 1), WorkerKey(1, 2)
    board.offer(spare, "GPU-a", {"device": "GPU-a", "n": 1})
    assert board.claim(w2, "GPU-b", alive) is None  # another GPU
    assert board.claim(w0, "GPU-a", alive) == {"device": "GPU-a", "n": 1}
    assert board.claim(w1, "GPU-a", alive) is None  # taken
    assert board.claim(w0, "GPU-a", alive) is not None  # kept
    live.discard(w0)  # its writer died: the offer is free again
    assert board.claim(w1, "GPU-a", alive) is not None
    assert board.withdraw(spare, alive) is True  # w1 still writes into it
    assert board.claim(w1, "GPU-a", alive) is None  # so it stops


@pytest.mark.unit
def test_a_dead_spare_takes_its_offer_along():
    board = MirrorBoard()
    spare, worker = WorkerKey(1, 8), WorkerKey(1, 0)
    live = {spare, worker}
    board.offer(spare, "GPU-a", {"device": "GPU-a"})
    assert board.claim(worker, "GPU-a", live.__contains__) is not None
    live.discard(spare)
    assert board.claim(worker, "GPU-a", live.__contains__) is None
    assert board.withdraw(spare, live.__contains__) is False
    board.offer(WorkerKey(1, 9), "GPU-a", {"device": "GPU-a"})
    board.forget(2)
    assert board.claim(WorkerKey(2, 0), "GPU-a", lambda k: True) is None


# -- CUDA: slots shared between processes ----------------------------------------------------------

_WRITER = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from elastictrain.snapshot.device_mirror import MirrorOffer, MirrorSlots, SlotWriter
    from elastictrain.snapshot.layout import flatten_state
    from elastictrain.snapshot.device_copy import optimizer_storages
    device = torch.device("cuda", 0)
    offer = MirrorOffer.from_json(json.loads(sys.argv[1]))
    slots = MirrorSlots.open(offer, device)
    writer = SlotWriter(slots.tensors)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(1, 6):
        writer.fence()
        model(torch.ones(4, 256, device=device)).square().mean().backward()
        opt.step(); opt.zero_grad()
        layout, tensors = flatten_state({"model": model.state_dict(),
                                         "optimizer": opt.state_dict()})
        writer.write(step, layout, tensors, b"", lambda: optimizer_storages(opt))
    writer.synchronize()
    torch.save(model.state_dict(), sys.argv[2])
    os.kill(os.getpid(), signal.SIGKILL)  # the writer dies; the slots are not its own
""")


@pytest.mark.contract
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(120)
def test_a_killed_writer_leaves_its_last_step_in_the_holders_slots(tmp_path):
    import json

    from elastictrain.snapshot.device_mirror import MirrorSlots

    device = torch.device("cuda", 0)
    held = MirrorSlots.allocate(1 << 20, device)
    saved = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-c", _WRITER, json.dumps(held.offer.to_json()),
                           str(saved)], env=os.environ.copy(), timeout=100)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    state = read_newest(held.tensors)
    assert state is not None and state.step == 5
    model = torch.nn.Linear(256, 256).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(1, 256, device=device)).sum().backward()
    opt.step()
    load_replicated(Snapshotter(model=model, optimizer=opt), state.layout, state.pieces)
    want = torch.load(saved)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[name].to(device)), name
    held.close()
