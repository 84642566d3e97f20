"""Rendezvous benchmarks on one machine, printed as tables.

1. Two agents (two `etrain launch` processes, one etcd, 2 workers each): from process start to
   the last worker's first line (agent start + rendezvous + worker spawn); beside it the same
   for two `torchrun` processes on torch's c10d rendezvous, measured in the same run.
2. N simulated agents (threads that only rendezvous, each with its own etcd client or store
   client) against one etcd: the time for all of them to complete one round, for our join
   (one key per node; the short waits of a process share its one watch stream) and torch's
   dynamic rendezvous on a TCPStore (torch's own c10d backend). Our agents ran torch's dynamic
   rendezvous on an etcd backend before the join: its rows in RESULTS.md are from then. Each
   round runs in a process of its own, stopped after --cap seconds.

    python benchmarks/rendezvous_bench.py [--repeats 3] [--agents 64 256 1000] [--cap 120]
                                          [--skip-pair] [--backends join c10d]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

from elastictrain.coord.embedded import EmbeddedEtcd

WORKER = """import sys, time
print("WORKER_START", time.time(), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_starts(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"^WORKER_START ([0-9.]+)", text, re.M)]


def _run_pair(cmds: list[list[str]], workdir: Path) -> tuple[float, list[str]]:
    """Start both commands at once; returns (t0, outputs)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    procs = [
        subprocess.Popen(
            c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir, env=env
        )
        for c in cmds
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{cmds[0][:4]} failed:\n{out}")
    return t0, outs


def bench_two_agents(etcd: str, repeats: int) -> list[dict]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="etrain-bench-"))
    script = workdir / "worker.py"
    script.write_text(WORKER)
    for i in range(repeats):
        job = f"bench-{os.getpid()}-{i}"
        cmds = [
            [sys.executable, "-m", "elastictrain.cli.main", "launch", "--nnodes", "2",
             "--nproc-per-node", "2", "--etcd", etcd, "--job-id", job, "--node-id", node,
             str(script)]
            for node in ("a", "b")
        ]  # fmt: skip
        t0, outs = _run_pair(cmds, workdir)
        starts = [t for out in outs for t in _worker_starts(out)]
        rows.append(
            {"system": "etrain launch (etcd v3)", "total": max(starts) - t0, "workers": len(starts)}
        )
        port = _free_port()
        cmds = [
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
             "--node-rank", str(rank), str(script)]
            for rank in (0, 1)
        ]  # fmt: skip
        t0, outs = _run_pair(cmds, workdir)
        starts = [t for out in outs for t in _worker_starts(out)]
        rows.append(
            {"system": "torchrun (c10d)", "total": max(starts) - t0, "workers": len(starts)}
        )
    return rows


def bench_simulated(etcd: str, agents: int, backend: str) -> dict:
    """One round of ``agents`` threads; ``backend`` is ``join`` (ours: one key per node) or
    ``c10d`` (torch's dynamic rendezvous on a TCPStore, for comparison). Returns the round
    time and the writes of the join's state (the dynamic rendezvous' set_state calls; the
    join's etcd writes)."""
    if backend == "join":
        return _bench_join(etcd, agents)
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    job = f"sim-{uuid.uuid4().hex[:8]}-{agents}"
    closers = []
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def make(i: int):
        params = RendezvousParameters(
            backend=backend, endpoint=etcd, run_id=job, min_nodes=agents, max_nodes=agents,
            local_addr=f"sim{i}", join_timeout=600, last_call_timeout=1,
        )  # fmt: skip
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        closers.append(store)
        return dr.create_handler(store, C10dRendezvousBackend(store, job), params)

    handlers = [make(i) for i in range(agents)]
    sets = _count_sets(handlers)
    round_s = _one_round(handlers)
    for h in handlers:
        h._stop_heartbeats()
    return {"backend": backend, "agents": agents, "round": round_s, "sets": sets[0]}


def _bench_join(etcd: str, agents: int) -> dict:
    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.coord.keys import JobKeys
    from elastictrain.rendezvous.join import EtcdJoinHandler, JoinPolicy

    job = f"sim-{uuid.uuid4().hex[:8]}-{agents}"
    policy = JoinPolicy(min_nodes=agents, max_nodes=agents, last_call_s=1, join_timeout_s=600)
    writes = [0]
    clients = []
    for _ in range(agents):
        client = EtcdClient.from_spec(etcd, timeout=30)
        for name in ("put", "create_with"):
            original = getattr(client, name)

            def counted(*a, _original=original, **k):
                writes[0] += 1
                return _original(*a, **k)

            setattr(client, name, counted)
        clients.append(client)
    handlers = [EtcdJoinHandler(c, JobKeys(job), policy, node_id=f"sim{i}", local_addr="127.0.0.1",
                                lease_ttl=60) for i, c in enumerate(clients)]  # fmt: skip
    round_s = _one_round(handlers)
    for h in handlers:
        h.shutdown()
    for c in clients:
        c.close()
    return {"backend": "join", "agents": agents, "round": round_s, "sets": writes[0]}


def _one_round(handlers) -> float:
    """Seconds from a common start until every handler's next_rendezvous has returned (the
    ranks checked)."""
    ranks: list[int] = []
    done_at: list[float] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(len(handlers) + 1)

    def join(h) -> None:
        gate.wait()
        try:
            info = h.next_rendezvous()
            ranks.append(info.rank)
            done_at.append(time.time())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(h,), daemon=True) for h in handlers]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.time()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} simulated agents failed: {errors[0]!r}")
    assert sorted(ranks) == list(range(len(handlers))), "ranks are not 0..N-1"
    return max(done_at) - t0


def _count_sets(handlers) -> list[int]:
    """Counts every set_state of the handlers' backends (one shared counter)."""
    count = [0]
    for h in handlers:
        backend = h._state_holder._backend
        original = backend.set_state

        def counted(state, token=None, _original=original):
            count[0] += 1
            return _original(state, token)

        backend.set_state = counted
    return count


NAMES = {"join": "join (ours)",
         "c10d": "torch dynamic, TCPStore"}


def _simulated_row(etcd: str, agents: int, backend: str, cap_s: float) -> dict | None:
    """One simulated round in a process of its own (a round past ``cap_s`` is stopped:
    None)."""
    cmd = [sys.executable, __file__, "--one", backend, str(agents), "--etcd", etcd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{backend} x {agents} failed: {exc.stderr[-2000:]}") from exc
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agents", type=int, nargs="+", default=[64, 256, 1000])
    parser.add_argument("--backends", nargs="+", default=["join", "c10d"])
    parser.add_argument("--cap", type=float, default=120.0,
                        help="seconds a simulated round may take before it is stopped")
    parser.add_argument("--skip-pair", action="store_true", help="only the simulated rounds")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "AGENTS"), help=argparse.SUPPRESS)
    parser.add_argument("--etcd", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(bench_simulated(args.etcd, int(args.one[1]), args.one[0])))
        return 0
    print(
        f"# rendezvous benchmarks  {datetime.now():%Y-%m-%d %H:%M}  host {socket.gethostname()} "
        f"({os.cpu_count()} cores)"
    )
    with EmbeddedEtcd() as etcd:
        if not args.skip_pair:
            rows = bench_two_agents(etcd.endpoint, args.repeats)
            print("\n## 2 agents x 2 workers: process start -> last worker started (s)")
            print(f"| {'system':<26} | {'median':>7} | {'min':>7} | {'max':>7} | runs |")
            print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|{'-' * 9}|------|")
            for system in dict.fromkeys(r["system"] for r in rows):
                vals = [r["total"] for r in rows if r["system"] == system]
                print(
                    f"| {system:<26} | {statistics.median(vals):7.2f} | {min(vals):7.2f} | "
                    f"{max(vals):7.2f} | {len(vals):4d} |"
                )
        print("\n## simulated agents (threads in one process, own etcd connection or store "
              "client each): one round")
        print("| agents | rendezvous | round (s) | writes of the join's state |")
        print("|-------:|---|----------:|---:|")
        for n in args.agents:
            for backend in args.backends:
                r = _simulated_row(etcd.endpoint, n, backend, args.cap)
                if r is None:
                    print(f"| {n} | {NAMES[backend]} | > {args.cap:.0f} (stopped) | |",
                          flush=True)
                else:
                    print(f"| {n} | {NAMES[backend]} | {r['round']:.2f} | {r['sets']} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
