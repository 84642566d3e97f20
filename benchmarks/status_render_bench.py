"""``etrain status`` on a large job: reading 64 nodes x 8 workers from etcd and drawing one
frame of the live view.

    python benchmarks/status_render_bench.py --nodes 64 --workers 8 --repeats 20

A private etcd holds 64 status records (8 workers each), a world of 512 ranks and 2,000
events; the table gives the median time of ``read_job_state`` and of rendering one frame
into a 200 x 60 console (the live view reads at most once per change and draws once a
second).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    from elastictrain.agent.world import Member, World
    from elastictrain.cli.job_state import read_job_state
    from elastictrain.cli.status_view import render
    from rich.console import Console

    from elastictrain.coord.embedded import EmbeddedEtcd
    from elastictrain.coord.etcd import EtcdClient
    from elastictrain.coord.keys import JobKeys
    from elastictrain.events import Event
    from elastictrain.node_status import NodeStatus, SnapshotStatus, WorkerStatus

    keys = JobKeys("render-bench")
    now = time.time()
    with EmbeddedEtcd(name="render-bench") as etcd:
        client = EtcdClient.from_spec(etcd.endpoint, timeout=10.0)
        members = []
        for n in range(args.nodes):
            node = f"node-{n:03d}"
            workers = tuple(WorkerStatus(s, n * args.workers + s, 1000 + s, "RUNNING", step=500,
                                         step_s=1.25, speed=3.2e4, share=1 / 512)
                            for s in range(args.workers))  # fmt: skip
            status = NodeStatus(node, node, f"10.0.{n // 256}.{n % 256}:7000", 10 + n, "RUNNING",
                                round=1, world_size=args.nodes * args.workers, epoch=3,
                                started=now - 3600, updated=now, workers=workers,
                                snapshot=SnapshotStatus(memory_bytes=80 << 30, records=8,
                                                        chunks=16, committed_step=499))  # fmt: skip
            client.put(keys.node_status(node), status.encode())
            client.put(keys.node(node), b"{}")
            members += [Member(node, s, "x") for s in range(args.workers)]
        client.put(keys.world, World("r", 3, tuple(members)).encode())
        for i in range(args.events):
            event = Event("recovered" if i % 3 else "replan", f"node-{i % args.nodes:03d}",
                          now - args.events + i, "", {"rank": i % 512, "agree_s": 0.3})
            client.put(keys.event(event.node, "w", i), event.encode())
        reads, frames = [], []
        for _ in range(args.repeats):
            began = time.perf_counter()
            state = read_job_state(client, keys.job_id, etcd.endpoint)
            reads.append(time.perf_counter() - began)
            console = Console(file=io.StringIO(), width=200, color_system=None)
            began = time.perf_counter()
            console.print(render(state, now, [1.25] * 100, 200, height=60))
            frames.append(time.perf_counter() - began)
        client.close()
    print(f"\n{args.nodes} nodes x {args.workers} workers, {args.events} events, "
          f"{args.repeats} repeats, median\n")  # fmt: skip
    print("| what | ms |\n|---|--:|")
    print(f"| read_job_state (etcd, every prefix) | {statistics.median(reads) * 1e3:.1f} |")
    print(f"| render one frame (200 x 60) | {statistics.median(frames) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
