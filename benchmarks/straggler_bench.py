"""Stragglers: throughput with one slow rank against the ideal and the static split, side by
side in one run; a noisy healthy rank; and what the timing costs on a GPU.

    python benchmarks/straggler_bench.py --rows cpu,noise,verdict   # any machine
    python benchmarks/straggler_bench.py --rows gpu                 # one GPU

- ``cpu``: 2 agents x 2 workers on gloo (real etcd), the MLP of ``straggler_train.py`` with 64
  logical workers; rank 3 slowed ``F`` times (``--fault slow:...``) from step ``--slow-from``
  to ``--slow-until``, for each factor, once with straggler re-plans and once with the static
  split (``stragglers=None``). Throughput while slow is measured from ``--settle`` steps after
  the slowdown starts to its end; healthy throughput over the steps before it. The ideal is
  the healthy throughput times the ranks' summed relative speeds (``(3 + 1/F') / 4``, with
  ``F'`` the slowdown the ranks measured). Detection: steps from the slowdown's start to the
  plan that gives rank 3 less work; back: steps from its end to the even split.
- ``noise``: the same job for ``--noise-steps`` steps, rank 3's compute varying by +-20 % from
  step to step around the others' (``--noise``): re-plans counted.
- ``verdict``: the pure verdict's own cost per step for worlds of 4 to 1024 ranks.
- ``gpu``: the ~1B GPT of ``recovery_gpu_train.py`` on one GPU, the ``Job`` with its timing
  (CUDA events read a step late) against ``stragglers=None`` (nothing timed), alternating runs;
  median step times.

``ETRAIN_COMPUTE_CLOCK=thread`` times CPU ranks by their thread's CPU time (for a machine with
fewer cores than ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recovery_gpu_bench import _steady  # noqa: E402

TRAIN = HERE / "straggler_train.py"
GPU_TRAIN = HERE / "recovery_gpu_train.py"
ETRAIN = [sys.executable, "-m", "elastictrain.cli.main", "launch"]


def _launch(etcd: str, out: Path, fault: str | None, steps: int, *extra: str) -> list[dict]:
    """One 2 x 2 job; rank 0's step lines."""
    job = f"straggle-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in "ab":
        cmd = [*ETRAIN, "--nnodes", "2", "--nproc-per-node", "2", "--etcd", etcd,
               "--job-id", job, "--node-id", node, "--max-restarts", "0",
               *(["--fault", fault] if fault else []), str(TRAIN), "--out", str(out),
               "--steps", str(steps), *extra]  # fmt: skip
        log = open(out / f"log-{node}.txt", "wb")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for proc, log in procs:
        code = proc.wait(timeout=900)
        log.close()
        if code != 0:
            tail = (out / f"log-{'ab'[procs.index((proc, log))]}.txt").read_text()[-4000:]
            raise RuntimeError(f"a launch exited {code}; its log ends:\n{tail}")
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _throughput(lines: list[dict], first: int, last: int, batch: int) -> float:
    """Samples per second over steps ``(first, last]`` (wall times of rank 0's steps)."""
    at = {line["step"]: line["t"] for line in lines}
    return batch * (last - first) / (at[last] - at[first])


def _cpu_rows(args, etcd: str, root: Path) -> list[str]:
    rows = []
    batch = 256
    for factor in [float(f) for f in args.factors.split(",")]:
        fault = f"slow:rank=3:step={args.slow_from}:factor={factor:g}:until={args.slow_until}"
        result = {}
        for mode in ("re-plan", "static"):
            out = root / f"cpu-{factor:g}-{mode}"
            out.mkdir()
            lines = _launch(etcd, out, fault, args.steps,
                            *(["--static"] if mode == "static" else []))  # fmt: skip
            healthy = _throughput(lines, 3, args.slow_from - 1, batch)
            slow = _throughput(lines, args.slow_from + args.settle, args.slow_until - 1, batch)
            result[mode] = (healthy, slow, lines)
            print(f"# x{factor:g} {mode}: healthy {healthy:.0f}/s, slow {slow:.0f}/s",
                  file=sys.stderr)  # fmt: skip
        healthy, slow, lines = result["re-plan"]
        s_healthy, s_slow, _ = result["static"]
        measured = [line["speeds"] for line in lines
                    if args.slow_from + 2 <= line["step"] < args.slow_until and line["speeds"]]
        ratio = statistics.median(s[3] / statistics.median(s[:3]) for s in measured)
        ideal = healthy * (3 + ratio) / 4
        s_ideal = s_healthy * (3 + ratio) / 4
        even = lines[0]["workers"]
        detect = next((ln["step"] - args.slow_from for ln in lines
                       if ln["step"] >= args.slow_from and ln["workers"][3] < even[3]), None)
        back = next((ln["step"] - args.slow_until for ln in lines
                     if ln["step"] >= args.slow_until and ln["workers"] == even), None)
        workers = lines[args.slow_until - 2]["workers"]
        rows.append(f"| {factor:g}x | {1 / ratio:.2f}x | {slow / ideal:.1%} | "
                    f"{s_slow / s_ideal:.1%} | {(slow / s_slow):.2f}x | {detect} | {back} | "
                    f"{workers} |")  # fmt: skip
    return rows


def _noise_row(args, etcd: str, root: Path) -> str:
    out = root / "noise"
    out.mkdir()
    lines = _launch(etcd, out, None, args.noise_steps, "--noise", str(args.noise))
    plans = [tuple(line["workers"]) for line in lines]
    changes = sum(1 for a, b in zip(plans, plans[1:], strict=False) if a != b)
    return (f"| rank 3 noisy +-{args.noise:.0%} per step | {args.noise_steps} steps | "
            f"{changes} re-plans |")  # fmt: skip


def _verdict_rows() -> list[str]:
    import random

    from elastictrain.train.stragglers import StragglerPolicy, StragglerState, straggler_verdict

    rows, rng, policy = [], random.Random(3), StragglerPolicy()
    for ranks in (4, 64, 256, 1024):
        state = StragglerState.even(ranks)
        speeds = [[100 * rng.uniform(0.9, 1.1) for _ in range(ranks)] for _ in range(50)]
        began = time.perf_counter()
        for row in speeds:
            state, _ = straggler_verdict(state, row, policy)
        rows.append(f"| {ranks} | {(time.perf_counter() - began) / len(speeds) * 1e6:.0f} |")
    return rows


def _gpu_rows(args, root: Path) -> list[str]:
    times: dict[str, list[float]] = {"timed (default)": [], "stragglers=None": []}
    for repeat in range(args.gpu_repeats):
        for name, extra in (("timed (default)", []), ("stragglers=None", ["--no-stragglers"])):
            out = root / f"gpu-{repeat}-{name.split()[0].replace('=', '')}"
            out.mkdir()
            cmd = [sys.executable, str(GPU_TRAIN), "--api", "job", "--out", str(out),
                   "--steps", str(args.gpu_steps), *extra]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=900)
            times[name].append(_steady(out, skip=5))
            print(f"# gpu {name}: {times[name][-1]:.4f} s/step", file=sys.stderr)
    base = statistics.median(times["stragglers=None"])
    rows = []
    for name, found in times.items():
        median = statistics.median(found)
        rows.append(f"| {name} | {median:.4f} | {median / base:.4f}x |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="cpu,noise,verdict")
    p.add_argument("--factors", default="1.5,2,4")
    p.add_argument("--steps", type=int, default=75)
    p.add_argument("--slow-from", type=int, default=10)
    p.add_argument("--slow-until", type=int, default=60)
    p.add_argument("--settle", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--noise-steps", type=int, default=200)
    p.add_argument("--gpu-steps", type=int, default=40)
    p.add_argument("--gpu-repeats", type=int, default=2)
    args = p.parse_args()
    rows = set(args.rows.split(","))
    root = Path(tempfile.mkdtemp(prefix="etrain-straggler-bench-"))
    clock = os.environ.get("ETRAIN_COMPUTE_CLOCK", "wall")

    if rows & {"cpu", "noise"}:
        from elastictrain.coord.embedded import EmbeddedEtcd

        with EmbeddedEtcd(name="straggler-bench") as etcd:
            if "cpu" in rows:
                table = _cpu_rows(args, etcd.endpoint, root)
                print(f"\n2 agents x 2 workers on gloo ({os.cpu_count()} CPUs, compute clock "
                      f"{clock}), 64 logical workers, rank 3 slowed from step "
                      f"{args.slow_from} to {args.slow_until}; throughput from step "
                      f"{args.slow_from + args.settle}\n")  # fmt: skip
                print("| slowdown | as measured | re-plan: of ideal | static: of ideal | "
                      "re-plan / static | detected after (steps) | even again after (steps) "
                      "| logical workers while slow |")  # fmt: skip
                print("|---|--:|--:|--:|--:|--:|--:|---|")
                print("\n".join(table))
            if "noise" in rows:
                print(f"\nnoise (compute clock {clock}):\n")
                print("| case | steps | plan changes |\n|---|--:|--:|")
                print(_noise_row(args, etcd.endpoint, root))
    if "verdict" in rows:
        print("\nstraggler_verdict per step (this machine, pure Python):\n")
        print("| ranks | us per step |\n|--:|--:|")
        print("\n".join(_verdict_rows()))
    if "gpu" in rows:
        print(f"\n~1B GPT, one GPU, Job API, {args.gpu_repeats} runs each (alternating), "
              "median step\n")  # fmt: skip
        print("| Job | s/step | vs stragglers=None |\n|---|--:|--:|")
        print("\n".join(_gpu_rows(args, root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
