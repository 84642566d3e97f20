"""Stragglers: throughput with one slow rank against the ideal and the static split, side by
side in one run; a noisy healthy rank; and what the timing costs on a GPU.

    python benchmarks/straggler_bench.py --rows cpu,noise,verdict   # any machine
    python benchmarks/straggler_bench.py --rows gpu                 # one GPU

- ``cpu``: ``--nnodes`` agents x ``--nproc`` workers on gloo (real etcd; default 2 x 2), the
  MLP of ``straggler_train.py`` with 64 logical workers; the last rank slowed ``F`` times
  (``--fault slow:...``) from step ``--slow-from`` to ``--slow-until``, for each factor, once
  with straggler re-plans and once with the static split (``StragglerPolicy(replan=False)``:
  measured, never moved), beside a fault-free reference run. Throughput is measured from
  ``--settle`` steps after the slowdown starts to its end, in every run over the same steps.
  The ideal is the reference's throughput times the ranks' summed measured speeds while slow
  over their sum in the reference (the sum of the speeds is what the ranks could do
  together). Detection: steps from the slowdown's start to the plan that gives the slow rank
  less work; back: steps from its end to the even split.
- ``noise``: the same job for ``--noise-steps`` steps, the last rank's compute varying by
  +-20 % from step to step around the others' (``--noise``): re-plans counted.
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
import shutil
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


def _launch(args, etcd: str, out: Path, fault: str | None, steps: int,
            *extra: str) -> list[dict]:  # fmt: skip
    """One job; rank 0's step lines."""
    job = f"straggle-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in "abcdefgh"[: args.nnodes]:
        cmd = [*ETRAIN, "--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc),
               "--etcd", etcd,
               "--job-id", job, "--node-id", node, "--max-restarts", "0",
               *(["--fault", fault] if fault else []), str(TRAIN), "--out", str(out),
               "--steps", str(steps), *extra]  # fmt: skip
        log = open(out / f"log-{node}.txt", "wb")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for proc, log in procs:
        code = proc.wait(timeout=900)
        log.close()
        if code != 0:
            tail = (out / f"log-{'abcdefgh'[procs.index((proc, log))]}.txt").read_text()[-4000:]
            raise RuntimeError(f"a launch exited {code}; its log ends:\n{tail}")
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def _throughput(lines: list[dict], first: int, last: int, batch: int) -> float:
    """Samples per second over steps ``(first, last]`` (wall times of rank 0's steps)."""
    at = {line["step"]: line["t"] for line in lines}
    return batch * (last - first) / (at[last] - at[first])


def _speeds(lines: list[dict], first: int, last: int) -> list[float]:
    """Each rank's median speed over steps ``(first, last]`` (as the reductions carried)."""
    rows = [line["speeds"] for line in lines if first < line["step"] <= last and line["speeds"]]
    return [statistics.median(row[r] for row in rows) for r in range(len(rows[0]))]


def _keep(args, out: Path, name: str) -> None:
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "steps.jsonl", Path(args.keep) / f"{name}.jsonl")


def _cpu_rows(args, etcd: str, root: Path) -> list[str]:
    """Each factor's row: throughput while slow against the ideal, re-plan and static side
    by side. The ideal is the fault-free run's throughput over the same steps, times the
    ranks' summed speeds while slow over their sum in the fault-free run."""
    rows = []
    last = args.nnodes * args.nproc - 1
    first, end = args.slow_from + args.settle, args.slow_until - 1
    out = root / "cpu-reference"
    out.mkdir()
    reference = _launch(args, etcd, out, None, args.steps, *args.shape)
    _keep(args, out, "reference")
    ref_rate, ref_speeds = _throughput(reference, first, end, args.batch), _speeds(
        reference, first, end)
    print(f"# reference: {ref_rate:.0f}/s, speeds {ref_speeds}", file=sys.stderr)
    for factor in [float(f) for f in args.factors.split(",")]:
        fault = (f"slow:rank={last}:step={args.slow_from}:factor={factor:g}:"
                 f"until={args.slow_until}")  # fmt: skip
        result = {}
        for mode in ("re-plan", "static"):
            out = root / f"cpu-{factor:g}-{mode}"
            out.mkdir()
            lines = _launch(args, etcd, out, fault, args.steps, *args.shape,
                            *(["--static"] if mode == "static" else []))  # fmt: skip
            _keep(args, out, f"x{factor:g}-{mode}")
            rate, speeds = _throughput(lines, first, end, args.batch), _speeds(lines, first, end)
            ideal = ref_rate * sum(speeds) / sum(ref_speeds)
            result[mode] = (rate, ideal, speeds, lines)
            print(f"# x{factor:g} {mode}: {rate:.0f}/s, ideal {ideal:.0f}/s, speeds {speeds}",
                  file=sys.stderr)  # fmt: skip
        rate, ideal, speeds, lines = result["re-plan"]
        s_rate, s_ideal, _, _ = result["static"]
        measured = statistics.median(speeds[:last]) / speeds[last]
        even = lines[0]["workers"]
        detect = next((ln["step"] - args.slow_from for ln in lines if ln["step"] >=
                       args.slow_from and ln["workers"][last] < even[last]), None)  # fmt: skip
        back = next((ln["step"] - args.slow_until for ln in lines
                     if ln["step"] >= args.slow_until and ln["workers"] == even), None)
        workers = lines[end]["workers"]
        rows.append(f"| {factor:g}x | {measured:.2f}x | {rate / ideal:.1%} | "
                    f"{s_rate / s_ideal:.1%} | {rate / s_rate:.2f}x | {detect} | {back} | "
                    f"{workers} |")  # fmt: skip
    return rows


def _noise_row(args, etcd: str, root: Path) -> str:
    out = root / "noise"
    out.mkdir()
    last = args.nnodes * args.nproc - 1
    lines = _launch(args, etcd, out, None, args.noise_steps, *args.shape, "--noise",
                    str(args.noise), "--noise-rank", str(last))  # fmt: skip
    _keep(args, out, "noise")
    plans = [tuple(line["workers"]) for line in lines]
    changes = sum(1 for a, b in zip(plans, plans[1:], strict=False) if a != b)
    return (f"| rank {last} noisy +-{args.noise:.0%} per step | {args.noise_steps} | "
            f"{changes} |")  # fmt: skip


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
    p.add_argument("--nnodes", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=75)
    p.add_argument("--slow-from", type=int, default=10)
    p.add_argument("--slow-until", type=int, default=60)
    p.add_argument("--settle", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--noise-steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--gpu-steps", type=int, default=50)
    p.add_argument("--gpu-repeats", type=int, default=3)
    p.add_argument("--reduction", default="deterministic", choices=["deterministic", "fast"])
    p.add_argument("--keep", default=None, metavar="DIR", help="keep each run's step lines here")
    args = p.parse_args()
    args.batch = args.global_batch
    args.shape = ["--global-batch", str(args.global_batch), "--micro-batch",
                  str(args.micro_batch), "--dim", str(args.dim), "--reduction", args.reduction]
    rows = set(args.rows.split(","))
    root = Path(tempfile.mkdtemp(prefix="etrain-straggler-bench-"))
    clock = os.environ.get("ETRAIN_COMPUTE_CLOCK", "wall")

    if rows & {"cpu", "noise"}:
        from elastictrain.coord.embedded import EmbeddedEtcd

        with EmbeddedEtcd(name="straggler-bench") as etcd:
            if "cpu" in rows:
                table = _cpu_rows(args, etcd.endpoint, root)
                print(f"\n{args.nnodes} agents x {args.nproc} workers on gloo "
                      f"({os.cpu_count()} CPUs, compute clock {clock}, {args.reduction} "
                      "reduction), 64 logical workers, "
                      f"rank {args.nnodes * args.nproc - 1} slowed from step "
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
