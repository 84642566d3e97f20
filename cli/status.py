"""``etrain status``: the job's nodes and workers, from etcd and each node's agent."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show a running job's nodes and workers")
    p.add_argument("--etcd", default=None, help="etcd address(es); default: the local job's")
    p.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
    p.add_argument("--credentials", default=None, metavar="DIR",
                   help="the job's credentials (default: the local job's)")
    p.add_argument("--once", action="store_true", help="print one plain table and exit")
    p.add_argument("--json", action="store_true", help="print JSON and exit")
    p.set_defaults(run=run)


@dataclass
class WorkerRow:
    rank: int
    local_rank: int
    pid: int
    state: str
    exit_code: int | None
    step: int = -1  # steps done, as its last heartbeat said (-1: not known)
    speed: float = 0.0  # samples per second of its own compute (0: not known)
    share: float = -1.0  # its share of the global batch (-1: not known)


@dataclass
class NodeRow:
    node_id: str
    endpoint: str
    hostname: str
    state: str
    restart_count: int = 0
    max_restarts: int = 0
    round: int = 0
    group_rank: int = -1
    world_size: int = 0
    workers: list[WorkerRow] = field(default_factory=list)
    disk_error: str = ""


@dataclass
class JobStatus:
    job_id: str
    etcd: str
    nodes: list[NodeRow]


def collect(etcd: str, job_id: str) -> JobStatus:
    """Read the job's registered nodes from etcd, then ask each agent for its status."""
    from elastictrain.coord.nodes import running_job_nodes
    from elastictrain.errors import AgentUnavailableError
    from elastictrain.rpc.agent_client import AgentClient

    records = running_job_nodes(etcd, job_id)
    rows: list[NodeRow] = []
    for record in records:
        row = NodeRow(record.node_id, record.endpoint, record.hostname, "UNREACHABLE")
        try:
            with AgentClient(record.endpoint, timeout=3.0) as agent:
                st = agent.get_status()
        except AgentUnavailableError:
            rows.append(row)
            continue
        row.state = st.state
        row.restart_count = st.restart_count
        row.max_restarts = st.max_restarts
        row.round = st.round
        row.group_rank = st.group_rank
        row.world_size = st.world_size
        row.disk_error = st.disk_error
        row.workers = [
            WorkerRow(w.rank, w.local_rank, w.pid, w.state, w.exit_code if w.exited else None,
                      w.step, round(w.speed, 3), round(w.share, 5))  # fmt: skip
            for w in sorted(st.workers, key=lambda w: w.rank)
        ]
        rows.append(row)
    return JobStatus(job_id=job_id, etcd=etcd, nodes=rows)


def render_table(status: JobStatus):
    from rich.table import Table

    table = Table(title=f"job {status.job_id}  (etcd {status.etcd})", title_justify="left")
    for column in ("node", "agent", "state", "restarts", "round", "rank", "local", "pid", "worker",
                   "step", "speed", "share"):  # fmt: skip
        table.add_column(column)
    for node in status.nodes:
        restarts = f"{node.restart_count}/{node.max_restarts}"
        state = node.state + (f" (disk tier: {node.disk_error})" if node.disk_error else "")
        base = [node.node_id, node.endpoint, state, restarts, str(node.round)]
        if not node.workers:
            table.add_row(*base, "-", "-", "-", "-", "-", "-", "-")
        for i, w in enumerate(node.workers):
            lead = base if i == 0 else [""] * len(base)
            state = w.state if w.exit_code is None else f"{w.state} ({w.exit_code})"
            pace = [str(w.step) if w.step >= 0 else "-",
                    f"{w.speed:.3g}/s" if w.speed > 0 else "-",
                    f"{w.share:.1%}" if w.share >= 0 else "-"]  # fmt: skip
            table.add_row(*lead, str(w.rank), str(w.local_rank), str(w.pid), state, *pace)
    return table


def run(args) -> int:
    from rich.console import Console

    from elastictrain.coord import local_jobs

    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    status = collect(etcd, job_id)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    # The live view comes later; --once (and the default for now) prints one table.
    Console(color_system=None, width=120, soft_wrap=True).print(render_table(status))
    return 0
