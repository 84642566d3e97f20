"""A worker killed mid-run on CPU (gloo): kill -> next step done on every rank, side by side.

    python benchmarks/recovery_cpu_bench.py --repeats 3

One node, ``--nproc`` workers, the job of ``benchmarks/recovery_train.py`` (an MLP with
dropout, AdamW), rank ``--kill-rank`` SIGKILLed at the start of step ``--kill-step``:

- ``torchrun --max-restarts 1``, a DDP script with a disk checkpoint every ``--ckpt-every``
  steps: every process restarts and resumes from the checkpoint;
- ``etrain launch``, the ``Job`` API: in place, the world shrinks (no spare);
- ``etrain launch --hot-spares 1``: in place, a hot spare takes the lost rank.

The kill time is the worker's own (torchrun: its times file; etrain: the ``fault`` event);
"next step done on every rank" is the latest, over the processes of the world after the
fault, of the first step each finishes after the kill (from the times files). etrain's split
comes from its events: detect (fault -> reconfigure), agree (reconfigure -> world changed),
then the slowest rank's wait, re-form, agree, restore and first step (``recovered``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "recovery_train.py"


@dataclass
class Run:
    system: str
    recovery_s: float
    redone: int
    split: dict[str, float] = field(default_factory=dict)


def _times(out: Path) -> dict[int, list[tuple[str, float, int]]]:
    found = {}
    for path in out.glob("times-*.txt"):
        rows = []
        for line in path.read_text().splitlines():
            event, at, step = line.split()
            rows.append((event, float(at), int(step)))
        found[int(path.stem.split("-")[1])] = rows
    return found


def _next_step_done(times, kill_at: float, resume: int, new_only: bool = False) -> float:
    """When the last process that goes on finished its first step after the kill: the step
    the job resumes at, or a later one (``new_only``: only processes started after the kill
    count, as after a restart of the world)."""
    firsts = []
    for rows in times.values():
        if new_only and not any(e == "start" and at > kill_at for e, at, _ in rows):
            continue
        after = [at for event, at, step in rows
                 if event == "step" and at > kill_at and step >= resume]  # fmt: skip
        if after:
            firsts.append(after[0])
    if not firsts:
        raise RuntimeError("no step finished after the kill")
    return max(firsts) - kill_at


def _train_args(args, out: Path, api: str) -> list[str]:
    return [str(TRAIN), "--api", api, "--out", str(out), "--steps", str(args.steps),
            "--dim", str(args.dim), "--layers", str(args.layers),
            "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch),
            "--ckpt-every", str(args.ckpt_every), "--kill-rank", str(args.kill_rank),
            "--kill-step", str(args.kill_step)]  # fmt: skip


def run_torchrun(args, out: Path) -> Run:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(args.nproc), "--max-restarts", "1",
           *_train_args(args, out, "ddp")]  # fmt: skip
    _run(cmd, out)
    times = _times(out)
    kills = [at for rows in times.values() for event, at, _ in rows if event == "kill"]
    loaded = [step for rows in times.values() for event, _, step in rows if event == "loaded"]
    (kill_at,) = kills
    resume = min(loaded) if loaded else 0
    return Run("torchrun --max-restarts 1 (disk ckpt)",
               _next_step_done(times, kill_at, resume, new_only=True), args.kill_step - resume)


def run_etrain(args, out: Path, etcd: str, spares: int) -> Run:
    job = f"bench-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "elastictrain.cli.main", "launch", "--nproc-per-node",
           str(args.nproc), "--etcd", etcd, "--job-id", job, "--max-restarts", "0",
           "--fault", f"kill:rank={args.kill_rank}:step={args.kill_step}",
           "--hot-spares", str(spares), *_train_args(args, out, "job")]  # fmt: skip
    _run(cmd, out)
    name = "etrain, in place, " + ("1 hot spare" if spares else "world shrinks")
    return etrain_events(etcd, job, out, name)[0]


def etrain_events(etcd: str, job: str, out: Path, name: str) -> tuple[Run, float]:
    """An etrain run's recovery from its events and times files (and the kill's time)."""
    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.events import read_events

    client = EtcdClient.from_spec(etcd)
    try:
        (fault,) = read_events(client, job, "fault")
        reconfigures = read_events(client, job, "reconfigure")
        if len(reconfigures) > 1:  # reported: the first one answers the fault
            for event in read_events(client, job):
                print(f"#   {event.kind} {event.node} {event.time - fault.time:+.3f} s: "
                      f"{event.reason}", file=sys.stderr)  # fmt: skip
        reconfigure = min(reconfigures, key=lambda e: e.time)
        world = read_events(client, job, "world_changed")[0]
        recovered = [e.details for e in read_events(client, job, "recovered")
                     if e.details["epoch"] == world.details["epoch"]]  # fmt: skip
    finally:
        client.close()
    split = {"detect": reconfigure.time - fault.time, "world": world.time - reconfigure.time}
    for key in ("wait_s", "reform_s", "agree_s", "restore_s", "first_step_s"):
        split[key.removesuffix("_s")] = max(r.get(key, 0.0) for r in recovered)
    resume = min(r["resume_step"] for r in recovered)
    run = Run(name, _next_step_done(_times(out), fault.time, resume),
              int(fault.details["step"]) - resume, split)
    return run, fault.time


def _run(cmd: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(out / "log.txt", "wb") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600,
                              check=False)  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join((out / "log.txt").read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {done.returncode}; its log ends:\n{tail}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--kill-rank", type=int, default=3)
    p.add_argument("--kill-step", type=int, default=17)
    p.add_argument("--keep", action="store_true", help="keep the runs' directories")
    args = p.parse_args()

    from elastictrain.coord.embedded import EmbeddedEtcd

    root = Path(tempfile.mkdtemp(prefix="etrain-recovery-bench-"))
    runs: list[Run] = []
    with EmbeddedEtcd(name="recovery-bench") as etcd:
        for repeat in range(args.repeats):
            for system in ("torchrun", "shrink", "spare"):
                out = root / f"{system}-{repeat}"
                out.mkdir()
                if system == "torchrun":
                    runs.append(run_torchrun(args, out))
                else:
                    runs.append(run_etrain(args, out, etcd.endpoint, 1 if system == "spare" else 0))
                print(f"# {runs[-1].system}: {runs[-1].recovery_s:.2f} s", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.nproc} workers on gloo, MLP {args.layers}x{args.dim}, global batch "
          f"{args.global_batch}, rank {args.kill_rank} SIGKILLed at step {args.kill_step}; "
          f"{args.repeats} runs each\n")  # fmt: skip
    print("| system | kill -> next step on every rank (s), median | min | max | steps redone |")
    print("|---|--:|--:|--:|--:|")
    by_system: dict[str, list[Run]] = {}
    for run in runs:
        by_system.setdefault(run.system, []).append(run)
    medians = {}
    for name, group in by_system.items():
        times = [r.recovery_s for r in group]
        medians[name] = statistics.median(times)
        print(f"| {name} | {medians[name]:.2f} | {min(times):.2f} | {max(times):.2f} | "
              f"{max(r.redone for r in group)} |")  # fmt: skip
    base = next(v for k, v in medians.items() if k.startswith("torchrun"))
    print()
    for name, median in medians.items():
        if not name.startswith("torchrun"):
            print(f"{name}: {base / median:.1f}x faster than torchrun")
    print("\netrain's split (s, median over runs; a worker's parts are the slowest rank's):\n")
    keys = ["detect", "world", "wait", "reform", "agree", "restore", "first_step"]
    print("| system | detect | new world (CAS + watch) | wait | re-form group | agree on step "
          "| restore | first step |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, group in by_system.items():
        if group[0].split:
            cells = [f"{statistics.median(r.split[k] for r in group):.3f}" for k in keys]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
