"""``etrain snapshot``: list, save and verify a job's snapshots (memory, chunks, disk)."""

from __future__ import annotations

import json
from collections import defaultdict


def add_parser(sub) -> None:
    p = sub.add_parser("snapshot", help="list, save or verify a job's snapshots")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    for name, help_text, run in (
        ("list", "steps held in memory, committed step, sizes, chunk health per node", run_list),
        ("save", "write the committed step to the disk tier now (every node)", run_save),
        ("verify", "check every record and chunk in memory (and on disk with --dir)", run_verify),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "--etcd", default=None, help="etcd address(es); default: the local job's"
        )
        action.add_argument("--job-id", "--rdzv-id", dest="job_id", default=None)
        action.add_argument("--credentials", default=None, metavar="DIR",
                            help="the job's credentials (default: the local job's)")
        action.add_argument("--dir", default=None, help="the job's --snapshot-dir (disk tier)")
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(run=run)


def _indexes(args):
    """(job id, [(node record, snapshot index)]) of the job's live agents."""
    from elastictrain.coord import local_jobs
    from elastictrain.coord.nodes import running_job_nodes
    from elastictrain.errors import AgentUnavailableError
    from elastictrain.rpc.agent_client import AgentClient

    if args.dir and not args.etcd and not args.job_id:
        return None, []
    etcd, job_id = local_jobs.resolve_etcd(args.etcd, args.job_id)
    local_jobs.use_credentials(job_id, args.credentials)
    records = running_job_nodes(etcd, job_id)
    out = []
    for record in records:
        try:
            with AgentClient(record.endpoint) as agent:
                out.append((record, agent.snapshot_index()))
        except AgentUnavailableError:
            out.append((record, None))
    return job_id, out


def chunk_health(indexes) -> dict[str, dict]:
    """For the committed step: per owner, chunks present on live agents vs needed (pure)."""
    committed = max((ix.committed_step for _, ix in indexes if ix is not None), default=-1)
    owners: dict[str, dict] = {}
    present: dict[str, set[int]] = defaultdict(set)
    for _, index in indexes:
        if index is None:
            continue
        for chunk in index.chunks:
            if chunk.step != committed:
                continue
            present[chunk.owner].add(chunk.index)
            # the owner keeps no chunk of its own (its records serve while it lives)
            owners[chunk.owner] = {"k": chunk.k, "total": chunk.k + chunk.m - 1,
                                   "redundancy": chunk.redundancy}  # fmt: skip
    for owner, info in owners.items():
        info["present"] = len(present[owner])
        info["recoverable"] = info["present"] >= info["k"]
    return {"step": committed, "owners": owners}


def run_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    job_id, indexes = _indexes(args)
    nodes = []
    for record, index in indexes:
        if index is None:
            nodes.append({"node": record.node_id, "state": "UNREACHABLE"})
            continue
        steps: dict[int, dict] = {}
        for r in index.records:
            entry = steps.setdefault(r.step, {"ranks": [], "bytes": 0})
            entry["ranks"].append(r.rank)
            entry["bytes"] += r.nbytes
        nodes.append({
            "node": record.node_id, "committed": index.committed_step,
            "steps": {str(s): v for s, v in sorted(steps.items())},
            "chunks": len(index.chunks), "memory_bytes": index.memory_bytes,
        })  # fmt: skip
    disk = _disk_listing(args.dir) if args.dir else {}
    health = chunk_health(indexes) if indexes else {}
    if args.json:
        print(json.dumps({"job_id": job_id, "nodes": nodes, "chunk_health": health, "disk": disk},
                         indent=2))  # fmt: skip
        return 0
    console = Console(color_system=None, width=120, soft_wrap=True)
    if nodes:
        table = Table(title=f"job {job_id}: snapshots in memory", title_justify="left")
        for column in ("node", "committed", "step", "ranks", "MB", "chunks held", "memory MB"):
            table.add_column(column)
        for node in nodes:
            if "steps" not in node:
                table.add_row(node["node"], node["state"], "", "", "", "", "")
                continue
            rows = list(node["steps"].items()) or [("-", {"ranks": [], "bytes": 0})]
            for i, (step, entry) in enumerate(rows):
                lead = [node["node"], str(node["committed"])] if i == 0 else ["", ""]
                tail = (
                    [str(node["chunks"]), f"{node['memory_bytes'] / 1e6:.1f}"]
                    if i == 0
                    else ["", ""]
                )
                table.add_row(*lead, step, ",".join(map(str, sorted(entry["ranks"]))),
                              f"{entry['bytes'] / 1e6:.2f}", *tail)  # fmt: skip
        console.print(table)
        health_table = Table(title=f"chunk health of committed step {health['step']}",
                             title_justify="left")  # fmt: skip
        for column in ("owner", "redundancy", "chunks present", "needed", "recoverable"):
            health_table.add_column(column)
        for owner, info in sorted(health["owners"].items()):
            present = f"{info['present']}/{info['total']}"
            ok = "yes" if info["recoverable"] else "NO"
            health_table.add_row(owner, info["redundancy"], present, str(info["k"]), ok)
        console.print(health_table)
    if disk:
        table = Table(title=f"disk tier {args.dir}", title_justify="left")
        for column in ("node", "steps"):
            table.add_column(column)
        for node, steps in disk.items():
            table.add_row(node, ", ".join(str(s) for s in steps) or "-")
        console.print(table)
    return 0


def _disk_listing(root: str) -> dict[str, list[int]]:
    import os

    from elastictrain.errors import ConfigError
    from elastictrain.snapshot.disk import list_snapshots

    if not os.path.isdir(root):
        raise ConfigError(f"--dir {root!r} is not a directory")
    out = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            out[entry.name] = [info.step for info in list_snapshots(entry.path)]
    return out


def run_save(args) -> int:
    from elastictrain.errors import AgentUnavailableError, ConfigError
    from elastictrain.rpc.agent_client import AgentClient

    job_id, indexes = _indexes(args)
    if not indexes:
        raise ConfigError("snapshot save needs a running job (--etcd/--job-id)")
    failures = 0
    for record, _ in indexes:
        try:
            with AgentClient(record.endpoint, timeout=600) as agent:
                reply = agent.save_snapshot()
        except AgentUnavailableError as exc:
            print(f"node {record.node_id}: {exc}")
            failures += 1
            continue
        if reply.ok:
            print(f"node {record.node_id}: step {reply.step} -> {reply.path} "
                  f"({reply.raw_bytes / 1e6:.1f} MB -> {reply.compressed_bytes / 1e6:.1f} MB, "
                  f"{reply.seconds:.2f} s)")  # fmt: skip
        else:
            print(f"node {record.node_id}: not saved: {reply.message}")
            failures += 1
    return 1 if failures else 0


def run_verify(args) -> int:
    import os

    from elastictrain.errors import AgentUnavailableError
    from elastictrain.rpc.agent_client import AgentClient
    from elastictrain.snapshot.erasure import chunk_checksum
    from elastictrain.snapshot.erasure import chunk_checksum as record_checksum

    problems: list[str] = []
    checked = 0
    _job_id, indexes = _indexes(args)
    for record, index in indexes:
        if index is None:
            problems.append(f"node {record.node_id}: agent unreachable")
            continue
        try:
            with AgentClient(record.endpoint, timeout=120) as agent:
                for info in index.records:
                    data = bytearray(info.nbytes)
                    agent.read_snapshot(info.rank, info.step, data)
                    checked += 1
                    if record_checksum(data) != info.checksum:
                        problems.append(f"node {record.node_id}: record rank {info.rank} "
                                        f"step {info.step}: checksum mismatch")  # fmt: skip
                for chunk in index.chunks:
                    data = bytearray(chunk.chunk_bytes)
                    agent.get_chunk(chunk.owner, chunk.step, chunk.index, data)
                    checked += 1
                    if chunk_checksum(data) != chunk.checksums[chunk.index]:
                        where = f"chunk {chunk.index} of {chunk.owner} step {chunk.step}"
                        problems.append(f"node {record.node_id}: {where}: checksum mismatch")
        except AgentUnavailableError as exc:
            problems.append(f"node {record.node_id}: {exc}")
    health = chunk_health(indexes) if indexes else {"owners": {}}
    for owner, info in health["owners"].items():
        if not info["recoverable"]:
            problems.append(f"owner {owner}: only {info['present']} of {info['k']} chunks needed")
    if args.dir:
        from elastictrain.snapshot.disk import verify_snapshot

        for node, steps in _disk_listing(args.dir).items():
            if steps:
                report = verify_snapshot(os.path.join(args.dir, node))
                checked += report.records
                problems.extend(f"disk {node} step {report.step}: {p}" for p in report.problems)
    for line in problems:
        print(f"FAIL {line}")
    print(f"{checked} record(s)/chunk(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0
