"""Lazy GPU snapshots are exact: the copy of step s, overlapped with step s+1's forward and
backward, holds the state after step s's optimizer step, not a later one.

Trains a model with large layers (so a copy takes long enough for a missing fence to show) and
a BatchNorm (its running statistics change in the next forward: they must be staged). Only
step ``--snap-at`` is snapshotted; training goes on for more steps after it. Then the state
comes back twice, compared bit for bit with a synchronous copy taken at ``--snap-at``: into a
freshly built model and optimizer, and in place into the trained ones.
"""

import argparse
import time

import torch
import torch.nn as nn

from elastictrain.snapshot.worker import Snapshotter


def build(width: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width)
    ).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def host_state(model, opt) -> dict[str, torch.Tensor]:
    state = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for index, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            state[f"opt/{index}/{name}"] = value.detach().cpu().clone()
    return state


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())}"]
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--snap-at", type=int, default=4)
    parser.add_argument("--stage", type=float, default=0.0,
                        help="stage this fraction of every copy on the device first")
    args = parser.parse_args()
    if args.stage:
        from elastictrain.snapshot import device_copy

        def staged(device_bytes, seen, spare, margin=0.9):
            lazy = int(device_bytes * (1 - args.stage))
            return device_copy.StagingDecision(lazy, device_bytes - lazy, "forced by the test")

        device_copy.plan_staging = staged
    model, opt = build(args.width)
    snap = Snapshotter(model=model, optimizer=opt)
    assert snap.enabled, "run me under etrain launch"
    expected = None
    for step in range(args.steps):
        x = torch.randn(256, args.width, device="cuda")
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == args.snap_at:
            assert snap.snapshot(step, data_position={"next": step + 1})
            expected = host_state(model, opt)  # the compute stream, right after the step
            if args.stage:
                assert snap.staging.staged_bytes > 0, snap.staging
    torch.cuda.synchronize()
    snap.wait()
    deadline = time.monotonic() + 60
    while snap._client.snapshot_index().committed_step != args.snap_at:
        assert time.monotonic() < deadline, "the snapshot was never committed"
        time.sleep(0.05)
    assert differences(host_state(model, opt), expected), "training did not change the state"

    fresh_model, fresh_opt = build(args.width)
    fresh = Snapshotter(model=fresh_model, optimizer=fresh_opt)
    restored = fresh.restore()
    assert restored is not None and restored.step == args.snap_at, restored
    assert restored.data_position == {"next": args.snap_at + 1}
    bad = differences(host_state(fresh_model, fresh_opt), expected)
    assert not bad, f"fresh restore differs in {bad}"
    assert all(p.is_cuda for p in fresh_model.parameters())
    assert all(v.is_cuda for s in fresh_opt.state.values() for k, v in s.items() if k != "step")

    params_before = [p.data_ptr() for p in model.parameters()]
    assert snap.restore().step == args.snap_at  # in place, into the trained objects
    bad = differences(host_state(model, opt), expected)
    assert not bad, f"in-place restore differs in {bad}"
    assert [p.data_ptr() for p in model.parameters()] == params_before
    fresh.close()
    snap.close()
    print(f"gpu snapshot ok: step {args.snap_at} restored bit-identical, fresh and in place")


if __name__ == "__main__":
    main()
