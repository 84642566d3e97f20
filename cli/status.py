"""``etrain status``: a running job's nodes and workers, from the status records in etcd.

Every agent publishes its node's record (:mod:`elastictrain.node_status`); this command reads
them once through :func:`~elastictrain.cli.job_state.read_job_state` and prints a table
(``--once``) or the versioned JSON of :meth:`JobState.to_json` (``--json``).
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


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.0f}m"


def render_table(state, now: float | None = None):
    from rich.table import Table

    now = time.time() if now is None else now
    world = state.world
    title = f"job {state.job_id}  (etcd {state.etcd})"
    if world is not None:
        title += f"  world {world.size} ranks, epoch {world.epoch}"
    if state.committed_step >= 0:
        title += f"  snapshot step {state.committed_step}"
    table = Table(title=title, title_justify="left")
    for column in ("node", "state", "restarts", "round", "rank", "pid", "worker", "step",
                   "s/step", "speed", "share", "memory"):  # fmt: skip
        table.add_column(column)
    for node_id in sorted(set(state.nodes) | set(state.registered)):
        node = state.nodes.get(node_id)
        if node is None:
            table.add_row(node_id, "STARTING", *["-"] * 10)
            continue
        restarts = f"{node.restart_count}/{node.max_restarts}"
        shown = node.state + (f" (disk tier: {node.snapshot.disk_error})"
                              if node.snapshot.disk_error else "")  # fmt: skip
        if now - node.updated > 10:
            shown += f" (as of {_age(now - node.updated)} ago)"
        memory = f"{node.snapshot.memory_bytes / 2**30:.2f} GiB"
        base = [node_id, shown, restarts, str(node.round)]
        if not node.workers:
            table.add_row(*base, "-", "-", "-", "-", "-", "-", "-", memory)
        for i, w in enumerate(node.workers):
            lead = base if i == 0 else [""] * len(base)
            rank = "spare" if w.spare else str(w.rank) if w.rank >= 0 else "-"
            worker = w.state if w.exit_code is None else f"{w.state} ({w.exit_code})"
            table.add_row(*lead, rank, str(w.pid), worker,
                          str(w.step) if w.step >= 0 else "-",
                          f"{w.step_s:.3f}" if w.step_s >= 0 else "-",
                          f"{w.speed:.3g}/s" if w.speed > 0 else "-",
                          f"{w.share:.1%}" if w.share >= 0 else "-",
                          memory if i == 0 else "")  # fmt: skip
    return table


def run(args) -> int:
    from rich.console import Console

    from elastictrain.coord import local_jobs

    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    state = collect(etcd, job_id)
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    # The live view comes later; --once (and the default for now) prints one table.
    console = Console(color_system=None if not sys.stdout.isatty() else "auto", width=140,
                      soft_wrap=True)  # fmt: skip
    console.print(render_table(state))
    return 0
