"""``etrain chaos``: fault injection through the owning agent."""

from __future__ import annotations

import signal as signal_module


def add_parser(sub) -> None:
    p = sub.add_parser("chaos", help="inject faults into a running job")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    kill = actions.add_parser("kill", help="kill one worker by global rank")
    kill.add_argument("--rank", type=int, required=True, help="global rank of the worker")
    kill.add_argument("--signal", default="SIGKILL", help="signal name or number (default SIGKILL)")
    kill.add_argument("--etcd", default=None, help="etcd address(es); default: the local job's")
    kill.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
    kill.add_argument("--credentials", default=None, metavar="DIR",
                      help="the job's credentials (default: the local job's)")
    kill.set_defaults(run=run_kill)


def parse_signal(text: str) -> int:
    from elastictrain.errors import ConfigError

    if text.isdigit():
        number = int(text)
        if number not in {int(s) for s in signal_module.valid_signals()}:
            raise ConfigError(f"--signal {text}: not a valid signal number")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal_module.Signals[name])
    except KeyError as exc:
        raise ConfigError(f"--signal {text!r}: unknown signal") from exc


def run_kill(args) -> int:
    from elastictrain.coord import local_jobs
    from elastictrain.coord.nodes import running_job_nodes
    from elastictrain.errors import AgentUnavailableError, ConfigError
    from elastictrain.rpc.agent_client import AgentClient

    if args.rank < 0:
        raise ConfigError(f"--rank {args.rank}: must be >= 0")
    sig = parse_signal(args.signal)
    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    records = running_job_nodes(etcd, job_id)
    for record in records:
        try:
            with AgentClient(record.endpoint) as agent:
                status = agent.get_status()
                if not any(w.rank == args.rank and not w.exited for w in status.workers):
                    continue
                reply = agent.kill(args.rank, sig)
        except AgentUnavailableError:
            continue
        if reply.ok:
            print(f"node {reply.node_id}: {reply.message}")
            return 0
    raise ConfigError(f"no running worker has rank {args.rank} in job {job_id!r}")
