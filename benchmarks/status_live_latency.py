"""``etrain status`` live, as a person runs it: in tmux, beside a running job.

Starts a 2 agents x 2 workers job (``examples/train_job.py``, one hot spare per node) in one
tmux session and ``etrain status`` in another, first 160 x 48 then resized to 80 x 24; checks
that every section is filled with live values; then makes ``etrain chaos kill --rank R`` and
reads the pane every 50 ms until the timeline shows the recovery with its split. Prints, per
kill, how long after the recovery ended (the last ``recovered`` event's time in etcd) the
pane showed it (goal: within 1 s), and keeps the captured frames.

    python benchmarks/status_live_latency.py [--kills 3] [--out /tmp/status-frames]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

from elastictrain.cli.chaos_run import spares_ready
from elastictrain.cli.job_state import read_job_state

from elastictrain.coord import local_jobs
from elastictrain.coord.etcd import EtcdClient
from elastictrain.events import read_events

REPO = Path(__file__).resolve().parents[1]
ETRAIN = f"{shlex.quote(sys.executable)} -m elastictrain.cli.main"
SECTIONS = ("job ", "workers", "snapshots", "events")
FRESH = re.compile(r"-[01]s\W+[\w-]+\W+recovered\W+r\d+ \w+ [.\d]+")  # a recovery, 0-1 s old


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def capture(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="/tmp/status-frames")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = f"tmux-{uuid.uuid4().hex[:8]}"
    job_s, status_s = f"{job}-job", f"{job}-status"
    launch = (f"{ETRAIN} launch --nnodes 2 --nproc-per-node 2 --job-id {job} --hot-spares 1 "
              f"--node-ttl 3 --max-restarts 0")
    script = f"{REPO / 'examples' / 'train_job.py'} --steps {args.steps} --step-sleep 0.2"
    cmd = (f"cd {shlex.quote(str(out))} && ({launch} --node-id n0 {script} > n0.log 2>&1 &) && "
           f"sleep 3 && {launch} --node-id n1 {script} > n1.log 2>&1; sleep 600")
    tmux("new-session", "-d", "-s", job_s, "-x", "120", "-y", "30", cmd)
    rows = []
    try:
        etcd = wait_for(lambda: local_jobs.find(job), 60, "the job's etcd").etcd
        client = EtcdClient.from_spec(etcd, timeout=5.0)
        tmux("new-session", "-d", "-s", status_s, "-x", "160", "-y", "48",
             f"{ETRAIN} status --job-id {job}")  # fmt: skip
        ready = lambda: spares_ready(read_job_state(client, job, etcd), 1)  # noqa: E731
        wait_for(ready, 120, "the hot spares", poll=0.5)
        wide = wait_for(lambda: (f := capture(status_s)) and " 4 rank(s)" in f
                        and " 2 spare(s)" in f and f, 30, "a live wide frame")  # fmt: skip
        (out / "wide.txt").write_text(wide)
        tmux("resize-window", "-t", status_s, "-x", "80", "-y", "24")
        time.sleep(1.5)
        narrow = capture(status_s)
        (out / "narrow.txt").write_text(narrow)
        missing = [s for s in SECTIONS if s not in narrow]
        too_wide = max(len(line) for line in narrow.splitlines())
        print(f"80 x 24 frame: sections missing {missing or 'none'}, widest line {too_wide}")
        for kill in range(args.kills):
            before = len(read_events(client, job, "recovered"))
            rank = 3 - kill % 2 * 2  # ranks 3 and 1: each node's spare in turn
            subprocess.run([*shlex.split(ETRAIN), "chaos", "kill", "--rank", str(rank),
                            "--job-id", job], check=True, capture_output=True)  # fmt: skip
            wait_for(lambda n=before: len(read_events(client, job, "recovered")) >= n + 4, 60,
                     "the recovery's events (a spare takes the rank: 4 ranks re-form)")
            last = [""]

            def fresh(last=last):
                last[0] = capture(status_s)
                return FRESH.search(last[0]) and (time.time(), last[0])

            try:
                seen = wait_for(fresh, 10, "the pane")
            finally:
                (out / f"kill{kill + 1}-last.txt").write_text(last[0])
            ended = max(e.time for e in read_events(client, job, "recovered")[before:])
            (out / f"kill{kill + 1}.txt").write_text(seen[1])
            rows.append((kill + 1, rank, seen[0] - ended))
            wait_for(ready, 60, "a hot spare again", poll=0.5)
            time.sleep(2)
        client.close()
    finally:
        for session in (status_s, job_s):
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        subprocess.run(["pkill", "-f", f"--job-id {job}"], capture_output=True)
    print("| kill | rank | shown after the recovery ended (s) |")
    print("|---|---|---|")
    for kill, rank, lag in rows:
        print(f"| {kill} | {rank} | {lag:.2f} |")
    print(f"frames in {out}")
    return 0 if rows and all(lag <= 1.0 for _, _, lag in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
