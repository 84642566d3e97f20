"""Rendezvous benchmarks on one machine, printed as tables.

1. Two agents (two `etrain launch` processes, one etcd, 2 workers each): from process start to
   the last worker's first line (agent start + rendezvous + worker spawn); beside it the same
   for two `torchrun` processes on torch's c10d rendezvous, measured in the same run.
2. N simulated agents (threads that only rendezvous, each with its own etcd connection) against
   one etcd: the time for all of them to complete one round.

    python benchmarks/rendezvous_bench.py [--repeats 3] [--agents 64]
"""

from __future__ import annotations

import argparse
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
    """One round of ``agents`` threads; ``backend`` is ``etcd-v3`` (ours) or ``c10d`` (torch's,
    on a TCPStore, for comparison). Returns the round time and the compare-and-set count."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.rendezvous.registration import create_handler

    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    job = f"sim-{uuid.uuid4().hex[:8]}-{agents}"
    closers = []
    server = None
    if backend == "c10d":
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def make(i: int):
        params = RendezvousParameters(
            backend=backend, endpoint=etcd, run_id=job, min_nodes=agents, max_nodes=agents,
            local_addr=f"sim{i}", join_timeout=600, last_call_timeout=1,
        )  # fmt: skip
        if backend == "c10d":
            store = dist.TCPStore("127.0.0.1", server.port, is_master=False)
            closers.append(store)
            return dr.create_handler(store, C10dRendezvousBackend(store, job), params)
        client = EtcdClient.from_spec(etcd, timeout=30)
        closers.append(client)
        return create_handler(params, client=client)

    handlers = [make(i) for i in range(agents)]
    sets = _count_sets(handlers)
    ranks: list[int] = []
    done_at: list[float] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(agents + 1)

    def join(h) -> None:
        gate.wait()
        try:
            info = h.next_rendezvous()
            ranks.append(info.rank)
            done_at.append(time.time())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(h,)) for h in handlers]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.time()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} simulated agents failed: {errors[0]!r}")
    assert sorted(ranks) == list(range(agents)), "ranks are not 0..N-1"
    for h in handlers:
        h._stop_heartbeats()
    for c in closers:
        if isinstance(c, EtcdClient):
            c.close()
    return {"backend": backend, "agents": agents, "round": max(done_at) - t0, "sets": sets[0]}


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agents", type=int, nargs="+", default=[8, 32, 64])
    args = parser.parse_args()
    print(
        f"# rendezvous benchmarks  {datetime.now():%Y-%m-%d %H:%M}  host {socket.gethostname()} "
        f"({os.cpu_count()} cores)"
    )
    with EmbeddedEtcd() as etcd:
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
        print("\n## simulated agents (threads in one process, own connection each): one round")
        print("| agents | backend              | round (s) | set_state calls |")
        print("|-------:|----------------------|----------:|----------------:|")
        for n in args.agents:
            for backend in ("etcd-v3", "c10d"):
                r = bench_simulated(etcd.endpoint, n, backend)
                name = "etcd-v3 (ours)" if backend == "etcd-v3" else "c10d TCPStore (torch)"
                print(f"| {n:6d} | {name:<20} | {r['round']:9.2f} | {r['sets']:15d} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
