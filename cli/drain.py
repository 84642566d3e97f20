"""``etrain drain --node N``: ask one node to leave a running job, which goes on without it.

The request is a key in etcd (``ctl/drain/<node>``) that the node's agent watches; the agent
does what it does on SIGTERM (``docs/beyond-one-machine.md``). ``--wait`` waits for its agent
to deregister and prints how the drain ended.
"""

from __future__ import annotations

import json
import time


def add_parser(sub) -> None:
    p = sub.add_parser("drain", help="ask a node to leave the job at a step boundary (the job "
                                     "goes on without it)")  # fmt: skip
    p.add_argument("--node", required=True, help="the node to drain")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for the node to leave, and say how it ended")
    p.add_argument("--etcd", default=None, help="etcd address(es); default: the local job's")
    p.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
    p.add_argument("--credentials", default=None, metavar="DIR",
                   help="the job's credentials (default: the local job's)")  # fmt: skip
    p.set_defaults(run=run_drain)


def run_drain(args) -> int:
    from elastictrain.coord import local_jobs
    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.coord.keys import JobKeys, validate_name
    from elastictrain.coord.nodes import list_nodes, running_job_nodes
    from elastictrain.errors import ConfigError, JobNotFoundError
    from elastictrain.events import read_events

    if args.wait < 0:
        raise ConfigError(f"--wait {args.wait}: must be >= 0 s")
    node = validate_name("node id", args.node)
    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    nodes = [r.node_id for r in running_job_nodes(etcd, job_id)]
    if node not in nodes:
        raise JobNotFoundError(f"node {node!r} is not a running agent of job {job_id!r} "
                               f"(running: {', '.join(sorted(nodes))})")  # fmt: skip
    keys = JobKeys(job_id)
    client = EtcdClient.from_spec(etcd, timeout=5.0)
    try:
        client.put(keys.drain(node), json.dumps({"by": "etrain drain", "time": time.time()}))
        print(f"asked node {node} to leave job {job_id}")
        if args.wait <= 0:
            return 0
        deadline = time.monotonic() + args.wait
        while any(r.node_id == node for r in list_nodes(client, keys)):
            if time.monotonic() >= deadline:
                print(f"node {node} is still running after {args.wait:g} s")
                return 1
            time.sleep(0.2)
        ends = [e for e in read_events(client, job_id)
                if e.node == node and e.kind in ("drained", "drain_timeout", "drain")]  # fmt: skip
        last = ends[-1] if ends else None
        print(f"node {node} left: {last.reason}" if last is not None else f"node {node} left")
        return 0 if last is None or last.kind != "drain_timeout" else 1
    finally:
        client.close()
