"""A worker killed mid-run on one GPU: kill -> next step done, etrain's hot spare against
torchrun in the same run; and the steady step of the ``Job`` API against a plain loop.

    python benchmarks/recovery_gpu_bench.py

The job is the ~1B GPT of ``recovery_gpu_train.py`` (AdamW, bf16 autocast, 4 x 2048 tokens).

- steady step: ``--api plain``, ``--api job`` with each reduction (one process, no agent, no
  snapshots), and ``Job`` under ``etrain launch`` with snapshots every 2 steps (the steps of
  the recovery run before its fault); median of the step-to-step times after a warm-up;
- ``torchrun --max-restarts 1``: DDP, ``torch.save`` every 10 steps, rank 0 SIGKILLed at
  step 17: everything restarts and loads the checkpoint;
- ``etrain launch --hot-spares 1``: the ``Job`` API, one worker and one hot spare on the same
  GPU; the worker is SIGKILLed at step ``--kill-step`` or, if later, once the spare is ready
  (a planned fault waits for the node's spares): the spare restores the snapshot in place;
- the same with ``--device-mirror`` (row ``mirror``): the worker also copies its state into
  the spare's device memory every step, and the spare loads that (``--mirror-snapshot-every``
  lists the host snapshot intervals to run it with).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recovery_cpu_bench import Run, _next_step_done, _run, _times, etrain_events  # noqa: E402

TRAIN = HERE / "recovery_gpu_train.py"


def _steady(out: Path, skip: int, before: float | None = None, last: int = 0) -> float:
    """Median step time of a run's processes (steps after the first ``skip``; with
    ``before``, only the ``last`` steps before that time: once the spare is ready)."""
    gaps = []
    for rows in _times(out).values():
        steps = [at for event, at, _ in rows if event == "step" and (before is None or at < before)]
        run = [b - a for a, b in zip(steps[skip:], steps[skip + 1 :], strict=False)]
        gaps += run[-last:] if last else run
    return statistics.median(gaps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steady-steps", type=int, default=30)
    p.add_argument("--job-steps", type=int, default=260)
    p.add_argument("--kill-step", type=int, default=60)
    p.add_argument("--snapshot-every", default="2",
                   help="host snapshot intervals of the etrain rows (comma-separated)")
    p.add_argument("--etcd", default=None, help="an etcd to use (default: one of our own)")
    p.add_argument("--mirror-snapshot-every", default="2,10",
                   help="host snapshot intervals of the device-mirror rows (comma-separated)")
    p.add_argument("--rows", default="steady,torchrun,etrain,mirror")
    args = p.parse_args()
    rows = set(args.rows.split(","))
    root = Path(tempfile.mkdtemp(prefix="etrain-gpu-recovery-"))
    steady: dict[str, float] = {}
    runs: list[Run] = []

    if "steady" in rows:
        for name, extra in (("plain loop", ["--api", "plain"]),
                            ("Job, fast reduction", ["--api", "job", "--reduction", "fast"]),
                            ("Job, deterministic reduction", ["--api", "job"])):  # fmt: skip
            out = root / name.replace(" ", "_").replace(",", "")
            out.mkdir()
            _run([sys.executable, str(TRAIN), "--out", str(out), "--steps",
                  str(args.steady_steps), *extra], out)  # fmt: skip
            steady[name] = _steady(out, skip=5)
            print(f"# {name}: {steady[name]:.4f} s/step", file=sys.stderr)

    if "torchrun" in rows:
        out = root / "torchrun"
        out.mkdir()
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node", "1", "--max-restarts", "1", str(TRAIN), "--api", "ddp",
              "--out", str(out), "--steps", "25", "--kill-step", "17"], out)  # fmt: skip
        times = _times(out)
        (kill_at,) = [at for r in times.values() for e, at, _ in r if e == "kill"]
        loaded = [s for r in times.values() for e, _, s in r if e == "loaded"]
        resume = min(loaded, default=0)
        runs.append(Run("torchrun --max-restarts 1 (torch.save every 10)",
                        _next_step_done(times, kill_at, resume, new_only=True), 17 - resume))
        print(f"# {runs[-1].system}: {runs[-1].recovery_s:.2f} s", file=sys.stderr)

    etrain_rows = []
    if "etrain" in rows:
        etrain_rows += [(int(n), False) for n in args.snapshot_every.split(",") if n]
    if "mirror" in rows:
        etrain_rows += [(int(n), True) for n in args.mirror_snapshot_every.split(",") if n]
    for index, (every, mirror) in enumerate(etrain_rows):
        from elastictrain.coord.embedded import EmbeddedEtcd

        name = (f"etrain, 1 hot spare, device mirror, snapshot every {every}" if mirror
                else f"etrain, 1 hot spare, snapshot every {every}")  # fmt: skip
        out = root / f"etrain-{index}"
        out.mkdir()
        with EmbeddedEtcd(name=f"gpu-recovery-bench-{index}") as etcd:
            job = f"gpu-bench-{index}"
            _run([sys.executable, "-m", "elastictrain.cli.main", "launch", "--nproc-per-node",
                  "1", "--etcd", etcd.endpoint, "--job-id", job, "--hot-spares", "1",
                  *(["--device-mirror"] if mirror else []), "--snapshot-memory-limit", "80",
                  "--fault", f"kill:rank=0:step={args.kill_step}", str(TRAIN), "--api", "job",
                  "--out", str(out), "--steps", str(args.job_steps),
                  "--snapshot-every", str(every)], out)  # fmt: skip
            run, fault_at = etrain_events(etcd.endpoint, job, out, name)
        runs.append(run)
        steady[f"Job under etrain launch: {name.removeprefix('etrain, ')}"] = (
            _steady(out, skip=5, before=fault_at, last=15))
        print(f"# {run.system}: {run.recovery_s:.2f} s", file=sys.stderr)

    print("\n~1B GPT (AdamW, bf16 autocast, 4 x 2048 tokens) on one GPU\n")
    if steady:
        base = steady.get("plain loop")
        print("| steady step | s/step | vs plain loop |\n|---|--:|--:|")
        for name, value in steady.items():
            ratio = f"{value / base:.3f}x" if base else "-"
            print(f"| {name} | {value:.4f} | {ratio} |")
        print()
    if runs:
        print("| worker SIGKILLed | kill -> next step done (s) | steps redone |\n|---|--:|--:|")
        for run in runs:
            print(f"| {run.system} | {run.recovery_s:.2f} | {run.redone} |")
        for run in runs:
            if run.split:
                print("\netrain's split (s): " + ", ".join(
                    f"{k} {v:.3f}" for k, v in run.split.items()))  # fmt: skip
    subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
