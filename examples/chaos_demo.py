"""The main demo: 2 local nodes x 2 workers, one worker killed mid-run, the job recovers.

Starts two `etrain launch` agents of one job on this machine (the first starts a private
etcd; the second finds it by job id), trains ``train_ddp.py`` with DDP on CPU/gloo, kills
global rank 3 with `etrain chaos kill` once training is under way, and prints how the job
recovered: from the agents' logs and the training output.

    python examples/chaos_demo.py [--steps 80] [--kill-at 30]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]
STEP = re.compile(r"^step (\d+) loss ([0-9.]+) world (\d+)", re.M)
STAMP = re.compile(r"^\[etrain (\d\d:\d\d:\d\d(?:\.\d+)?)\] (.*)$", re.M)


def _launch(workdir: Path, job: str, node: str, args) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{node}.log"
    cmd = [
        *ETRAIN, "launch", "--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "3",
        "--job-id", job, "--node-id", node,
        str(HERE / "train_ddp.py"), "--steps", str(args.steps), "--ckpt",
        str(workdir / "checkpoint.pt"), "--ckpt-every", "10", "--step-sleep", str(args.step_sleep),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    return proc, log


def _steps(text: str) -> list[tuple[int, float, int]]:
    return [(int(s), float(loss), int(w)) for s, loss, w in STEP.findall(text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--kill-at", type=int, default=25, help="kill rank 3 after this step")
    parser.add_argument("--step-sleep", type=float, default=0.05)
    args = parser.parse_args()

    job = f"demo-{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="etrain-demo-"))
    print(f"== job {job}: 2 nodes x 2 workers, logs in {workdir}")
    a, a_log = _launch(workdir, job, "node-a", args)
    time.sleep(1.5)  # node-a starts the private etcd; node-b joins it
    b, b_log = _launch(workdir, job, "node-b", args)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = _steps(a_log.read_text(errors="replace"))
            if done and done[-1][0] >= args.kill_at:
                break
            if a.poll() is not None or b.poll() is not None:
                print(a_log.read_text(), b_log.read_text())
                print("an agent exited before the fault was injected", file=sys.stderr)
                return 1
            time.sleep(0.1)
        else:
            print("training did not reach the kill step in time", file=sys.stderr)
            return 1
        print("== etrain status --once")
        subprocess.run([*ETRAIN, "status", "--once", "--job-id", job], check=True)
        print("== etrain chaos kill --rank 3")
        killed_at = time.time()
        subprocess.run([*ETRAIN, "chaos", "kill", "--rank", "3", "--job-id", job], check=True)
        code_a, code_b = a.wait(timeout=300), b.wait(timeout=60)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    text_a, text_b = a_log.read_text(errors="replace"), b_log.read_text(errors="replace")
    print("== agent events")
    for stamp, message in sorted(STAMP.findall(text_a + text_b)):
        if any(k in message for k in ("round", "restart", "injected", "finish", "failed")):
            print(f"  {stamp}  {message}")
    resumed = re.search(r"resumed from checkpoint at step (\d+)", text_a)
    print("== recovery")
    print(f"  killed rank 3 at {time.strftime('%H:%M:%S', time.localtime(killed_at))}")
    steps = _steps(text_a)
    if resumed:
        before = _steps(text_a[: resumed.start()])
        last = before[-1][0] if before else -1
        ckpt = int(resumed.group(1))
        print(
            f"  last step done before the kill: {last}; resumed after checkpoint step {ckpt}"
            f" ({last - ckpt} step(s) re-run)"
        )
    if steps:
        print(
            f"  loss {steps[0][1]:.4f} at step {steps[0][0]} -> {steps[-1][1]:.4f} at step "
            f"{steps[-1][0]}"
        )
    print(f"  exit codes: node-a {code_a}, node-b {code_b}")
    ok = code_a == 0 and code_b == 0 and resumed is not None
    print("== OK: the job survived the fault" if ok else "== FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
