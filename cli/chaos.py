"""``etrain chaos``: fault injection through the owning agent."""

from __future__ import annotations

import signal as signal_module


def _target(parser) -> None:
    parser.add_argument("--etcd", default=None, help="etcd address(es); default: the local job's")
    parser.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
    parser.add_argument("--credentials", default=None, metavar="DIR",
                        help="the job's credentials (default: the local job's)")  # fmt: skip


def _seconds(parser, required: bool, what: str) -> None:
    default = None if required else 0.0
    parser.add_argument("--for", dest="seconds", type=float, required=required,
                        default=default, metavar="SECONDS", help=what)  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("chaos", help="inject faults into a running job, or run a fault scenario")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    kill = actions.add_parser("kill", help="kill one worker by global rank, or a whole agent")
    which = kill.add_mutually_exclusive_group(required=True)
    which.add_argument("--rank", type=int, help="global rank of the worker")
    which.add_argument("--agent", metavar="NODE",
                       help="the node whose agent (and its workers) to kill")  # fmt: skip
    kill.add_argument("--signal", default="SIGKILL", help="signal name or number (default SIGKILL)")
    _target(kill)
    kill.set_defaults(run=run_kill)
    hang = actions.add_parser("hang", help="stop one worker (SIGSTOP) for a while")
    hang.add_argument("--rank", type=int, required=True, help="global rank of the worker")
    _seconds(hang, True, "continue it (SIGCONT) after SECONDS")
    _target(hang)
    hang.set_defaults(run=run_hang)
    slow = actions.add_parser("slow", help="make one rank's compute slower (a Job API worker)")
    slow.add_argument("--rank", type=int, required=True, help="global rank of the worker")
    how = slow.add_mutually_exclusive_group(required=True)
    how.add_argument("--factor", type=float, default=None,
                     help="each micro-batch takes FACTOR times as long (> 1)")  # fmt: skip
    how.add_argument("--off", action="store_true", help="end the rank's slowdown")
    _seconds(slow, False, "end it by itself after SECONDS (default: when --off)")
    _target(slow)
    slow.set_defaults(run=run_slow)
    part = actions.add_parser("partition", help="cut one agent off etcd for a while")
    part.add_argument("--node", required=True, help="the node whose agent to cut off")
    _seconds(part, True, "reach etcd again after SECONDS")
    _target(part)
    part.set_defaults(run=run_node_fault, fault="partition")
    restart = actions.add_parser("etcd-restart", help="restart the job's embedded etcd")
    _target(restart)
    restart.set_defaults(run=run_etcd_restart)
    corrupt = actions.add_parser("corrupt-chunk",
                                 help="flip a byte of the snapshot chunks one agent holds")
    corrupt.add_argument("--node", required=True, help="the node whose held chunks to corrupt")
    _seconds(corrupt, False, "and the chunks it receives for SECONDS more (default 0)")
    _target(corrupt)
    corrupt.set_defaults(run=run_node_fault, fault="corrupt_chunk")
    full = actions.add_parser("disk-full", help="fill the file system of a node's disk tier")
    full.add_argument("--node", required=True, help="the node whose disk tier to fill")
    _seconds(full, True, "free it again after SECONDS")
    full.add_argument("--max-bytes", type=int, default=0, metavar="N",
                      help="refuse when more than N bytes are free (default 1 GiB)")  # fmt: skip
    _target(full)
    full.set_defaults(run=run_node_fault, fault="disk_full")
    scenario = actions.add_parser("run", help="run a fault scenario and check its results")
    scenario.add_argument("scenario", metavar="SCENARIO.toml")
    scenario.add_argument("--repeat", type=int, default=None,
                          help="repetitions (default: the scenario's)")  # fmt: skip
    scenario.add_argument("--workdir", default=None,
                          help="keep the runs' files here (default: a temporary directory)")
    scenario.set_defaults(run=run_scenario)


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


def _agents(args):
    """(job id, the job's running agents' records), with its credentials in use."""
    from elastictrain.coord import local_jobs
    from elastictrain.coord.nodes import running_job_nodes

    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    return job_id, running_job_nodes(etcd, job_id)


def _answer(reply) -> int:
    from elastictrain.errors import ConfigError

    if not reply.ok:
        raise ConfigError(f"node {reply.node_id}: {reply.message}")
    print(f"node {reply.node_id}: {reply.message}")
    return 0


def _on_owner(args, ask) -> int:
    """Ask the agent whose running worker holds ``args.rank``; print its answer."""
    from elastictrain.errors import AgentUnavailableError, ConfigError
    from elastictrain.rpc.agent_client import AgentClient

    if args.rank < 0:
        raise ConfigError(f"--rank {args.rank}: must be >= 0")
    job_id, records = _agents(args)
    refused = ""
    for record in records:
        try:
            with AgentClient(record.endpoint) as agent:
                status = agent.get_status()
                if not any(w.rank == args.rank and not w.exited for w in status.workers):
                    continue
                reply = ask(agent)
        except AgentUnavailableError:
            continue
        if reply.ok:
            return _answer(reply)
        refused = f"node {reply.node_id}: {reply.message}"
    raise ConfigError(refused or f"no running worker has rank {args.rank} in job {job_id!r}")


def _on_node(args, node: str, ask) -> int:
    """Ask the agent of node ``node``; print its answer."""
    from elastictrain.errors import AgentUnavailableError, ConfigError
    from elastictrain.rpc.agent_client import AgentClient

    job_id, records = _agents(args)
    record = next((r for r in records if r.node_id == node), None)
    if record is None:
        known = ", ".join(sorted(r.node_id for r in records))
        raise ConfigError(f"job {job_id!r} has no running node {node!r} (running: {known})")
    try:
        with AgentClient(record.endpoint) as agent:
            return _answer(ask(agent))
    except AgentUnavailableError as exc:
        raise ConfigError(f"node {node}: its agent did not answer: {exc}") from exc


def _check_seconds(seconds: float) -> None:
    from elastictrain.errors import ConfigError

    if not 0 < seconds <= 7 * 86400:
        raise ConfigError(f"--for {seconds:g}: seconds in (0, 604800]")


def run_kill(args) -> int:
    sig = parse_signal(args.signal)
    if args.agent is not None:
        return _on_node(args, args.agent, lambda agent: agent.inject("kill_agent"))
    return _on_owner(args, lambda agent: agent.kill(args.rank, sig))


def run_hang(args) -> int:
    _check_seconds(args.seconds)
    return _on_owner(args, lambda agent: agent.inject("hang", rank=args.rank,
                                                      seconds=args.seconds))  # fmt: skip


def run_slow(args) -> int:
    from elastictrain.errors import ConfigError

    factor = 1.0 if args.off else args.factor
    if not args.off and not 1 < factor <= 1000:
        raise ConfigError(f"--factor {factor:g}: must be > 1 and <= 1000")
    if not 0 <= args.seconds <= 7 * 86400 or (args.off and args.seconds):
        raise ConfigError("--for: seconds in [0, 604800], and not with --off")
    return _on_owner(args, lambda agent: agent.slow(args.rank, factor, args.seconds))


def run_node_fault(args) -> int:
    """partition, corrupt-chunk, disk-full: one node's agent."""
    from elastictrain.errors import ConfigError

    seconds = getattr(args, "seconds", 0.0)
    if args.fault != "corrupt_chunk" or seconds:
        _check_seconds(seconds)
    max_bytes = getattr(args, "max_bytes", 0)
    if max_bytes < 0:
        raise ConfigError(f"--max-bytes {max_bytes}: must be >= 0")
    return _on_node(args, args.node, lambda agent: agent.inject(
        args.fault, seconds=seconds, max_bytes=max_bytes))  # fmt: skip


def run_etcd_restart(args) -> int:
    """The agent that runs the job's embedded etcd restarts it."""
    from elastictrain.errors import AgentUnavailableError, ConfigError
    from elastictrain.rpc.agent_client import AgentClient

    job_id, records = _agents(args)
    for record in records:
        try:
            with AgentClient(record.endpoint) as agent:
                reply = agent.inject("etcd_restart")
        except AgentUnavailableError:
            continue
        if reply.ok:
            return _answer(reply)
    raise ConfigError(f"no agent of job {job_id!r} runs its etcd (an etcd given with --etcd "
                      "is restarted by whoever runs it)")  # fmt: skip


def run_scenario(args) -> int:
    from .chaos_run import run_scenario_file

    return run_scenario_file(args.scenario, repeat=args.repeat, workdir=args.workdir)
