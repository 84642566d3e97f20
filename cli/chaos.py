"""``etrain chaos``: fault injection through the owning agent."""

from __future__ import annotations

import signal as signal_module


def _target(parser) -> None:
    parser.add_argument("--etcd", default=None, help="etcd address(es); default: the local job's")
    parser.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
    parser.add_argument("--credentials", default=None, metavar="DIR",
                        help="the job's credentials (default: the local job's)")  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("chaos", help="inject faults into a running job")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    kill = actions.add_parser("kill", help="kill one worker by global rank")
    kill.add_argument("--rank", type=int, required=True, help="global rank of the worker")
    kill.add_argument("--signal", default="SIGKILL", help="signal name or number (default SIGKILL)")
    _target(kill)
    kill.set_defaults(run=run_kill)
    slow = actions.add_parser("slow", help="make one rank's compute slower (a Job API worker)")
    slow.add_argument("--rank", type=int, required=True, help="global rank of the worker")
    how = slow.add_mutually_exclusive_group(required=True)
    how.add_argument("--factor", type=float, default=None,
                     help="each micro-batch takes FACTOR times as long (> 1)")  # fmt: skip
    how.add_argument("--off", action="store_true", help="end the rank's slowdown")
    slow.add_argument("--for", dest="seconds", type=float, default=0.0, metavar="SECONDS",
                      help="end it by itself after SECONDS (default: when --off)")  # fmt: skip
    _target(slow)
    slow.set_defaults(run=run_slow)


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


def _on_owner(args, ask) -> int:
    """Ask the agent whose running worker holds ``args.rank``; print its answer."""
    from elastictrain.coord import local_jobs
    from elastictrain.coord.nodes import running_job_nodes
    from elastictrain.errors import AgentUnavailableError, ConfigError
    from elastictrain.rpc.agent_client import AgentClient

    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    refused = ""
    for record in running_job_nodes(etcd, job_id):
        try:
            with AgentClient(record.endpoint) as agent:
                status = agent.get_status()
                if not any(w.rank == args.rank and not w.exited for w in status.workers):
                    continue
                reply = ask(agent)
        except AgentUnavailableError:
            continue
        if reply.ok:
            print(f"node {reply.node_id}: {reply.message}")
            return 0
        refused = f"node {reply.node_id}: {reply.message}"
    raise ConfigError(refused or f"no running worker has rank {args.rank} in job {job_id!r}")


def run_kill(args) -> int:
    from elastictrain.errors import ConfigError

    if args.rank < 0:
        raise ConfigError(f"--rank {args.rank}: must be >= 0")
    sig = parse_signal(args.signal)
    return _on_owner(args, lambda agent: agent.kill(args.rank, sig))


def run_slow(args) -> int:
    from elastictrain.errors import ConfigError

    if args.rank < 0:
        raise ConfigError(f"--rank {args.rank}: must be >= 0")
    factor = 1.0 if args.off else args.factor
    if not args.off and not 1 < factor <= 1000:
        raise ConfigError(f"--factor {factor:g}: must be > 1 and <= 1000")
    if not 0 <= args.seconds <= 7 * 86400 or (args.off and args.seconds):
        raise ConfigError("--for: seconds in [0, 604800], and not with --off")
    return _on_owner(args, lambda agent: agent.slow(args.rank, factor, args.seconds))
