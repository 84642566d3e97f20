"""``etrain status``: a running job's nodes and workers, from the status records in etcd.

Every agent publishes its node's record (:mod:`elastictrain.node_status`); this command reads
them through :func:`~elastictrain.cli.job_state.read_job_state`. On a terminal it is a live
view (:mod:`elastictrain.cli.status_view` in a rich ``Live``), read again whenever the one
etcd watch on the job's keys sees a change and redrawn every second; it ends when the job
does, or on Ctrl-C. ``--once`` (or when the output is not a terminal) prints the view once,
without colour; ``--json`` prints the versioned JSON of :meth:`JobState.to_json`.
"""

from __future__ import annotations

import json
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show a running job's nodes and workers")
    p.add_argument("--etcd", default=None, help="etcd address(es); default: the local job's")
    p.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
    p.add_argument("--credentials", default=None, metavar="DIR",
                   help="the job's credentials (default: the local job's)")
    p.add_argument("--once", action="store_true", help="print one plain table and exit")
    p.add_argument("--json", action="store_true", help="print JSON and exit")
    p.set_defaults(run=run)


def collect(etcd: str, job_id: str):
    """The job's state read once; :class:`JobNotFoundError` when nothing of it is running."""
    from elastictrain.cli.job_state import read_job_state

    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.coord.keys import JobKeys
    from elastictrain.errors import JobNotFoundError

    JobKeys(job_id)  # a malformed id is one line before any connection
    client = EtcdClient.from_spec(etcd, timeout=5.0)
    try:
        state = read_job_state(client, job_id, etcd)
    finally:
        client.close()
    if not state.running:
        raise JobNotFoundError(f"no agent of job {job_id!r} is registered in etcd at {etcd}")
    return state


def run(args) -> int:
    from elastictrain.cli.status_view import render
    from rich.console import Console

    from elastictrain.coord import local_jobs

    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    state = collect(etcd, job_id)
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    tty = sys.stdout.isatty()
    console = Console(color_system="auto" if tty else None, width=None if tty else 100)
    if args.once or not tty:
        console.print(render(state, width=console.width))
        return 0
    return live(state, console)


HISTORY = 240  # step times kept for the sparkline


def live(state, console) -> int:
    """Redraw ``state``'s job until it ends: read again on every change the watch sees."""
    import threading
    from collections import deque

    from elastictrain.cli.job_state import read_job_state
    from elastictrain.cli.status_view import render
    from rich.live import Live

    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.coord.keys import JobKeys

    client = EtcdClient.from_spec(state.etcd, timeout=5.0)
    changed = threading.Event()
    watch = client.watch_prefix(JobKeys(state.job_id).root, lambda events: changed.set(),
                                state.revision + 1)  # fmt: skip
    history: deque[float] = deque(maxlen=HISTORY)
    last_step = -1
    try:
        with Live(render(state, width=console.width, height=console.height), console=console,
                  auto_refresh=False, transient=False) as view:  # fmt: skip
            while state.running:
                if changed.wait(1.0):
                    time.sleep(0.05)  # a burst of writes: read once after it
                    changed.clear()
                    state = read_job_state(client, state.job_id, state.etcd)
                    last_step = _remember(state, history, last_step)
                view.update(render(state, time.time(), history, console.width,
                                   console.height), refresh=True)  # fmt: skip
    except KeyboardInterrupt:
        return 0
    finally:
        watch.cancel()
        client.close()
    console.print(f"job {state.job_id} is no longer running")
    return 0


def _remember(state, history, last_step: int) -> int:
    """Append the median step time when the job's step moved on; the newest step."""
    from elastictrain.cli.status_view import pace

    step, step_s = pace(state)
    if step > last_step and step_s:
        history.append(step_s)
    return max(step, last_step)
