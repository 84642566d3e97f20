"""A replicated etcd losing a member: what our client pays, printed as a table.

A 3-member cluster on loopback (``EtcdCluster``, election timeout ``--election-ms``). For
each case a client writes every ``--interval`` seconds; the member it uses is SIGKILLed (a
follower, or the leader: the leadership is handed to that member first). Measured: the
longest write from the kill on (the stall a caller sees), the first write's time, and the
median write before the kill; a lease kept by a ``LeaseKeeper`` (TTL ``--ttl``) is checked
to be alive after. One fresh cluster per repetition.

    python benchmarks/etcd_failover_bench.py [--repeats 5] [--election-ms 1000] [--ttl 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime

from elastictrain.coord.embedded import EtcdCluster
from elastictrain.coord.etcd import EtcdClient, LeaseKeeper


def _writes(client: EtcdClient, count: int, interval: float) -> list[float]:
    """How long each of ``count`` writes took, one every ``interval`` seconds."""
    took = []
    for i in range(count):
        began = time.perf_counter()
        client.put("/bench/k", str(i))
        took.append(time.perf_counter() - began)
        time.sleep(interval)
    return took


def one(victim: str, election_ms: int, ttl: int, interval: float) -> dict:
    with EtcdCluster(3, election_ms=election_ms, name="failover-bench") as cluster:
        client = EtcdClient.from_spec(cluster.endpoints, timeout=30)
        client.revision()
        netloc = client.raw.endpoint_in_use.netloc
        in_use = [m.endpoint for m in cluster.members].index(netloc)
        if victim == "leader":
            cluster.make_leader(in_use)
        elif cluster.leader() == in_use:
            cluster.make_leader((in_use + 1) % 3)
        silences: list[float] = []
        keeper = LeaseKeeper(client, ttl=ttl, on_unconfirmed=silences.append)
        client.put("/bench/leased", b"1", lease=keeper.lease_id)
        before = _writes(client, 20, interval)
        cluster.members[in_use].sigkill()
        after = _writes(client, 40, interval)
        alive = client.get("/bench/leased") is not None and not keeper.lost
        keeper.close()
        client.close()
    return {"before": statistics.median(before), "first": after[0], "worst": max(after),
            "alive": alive, "silent": max(silences, default=0.0)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--election-ms", type=int, default=1000)
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args()
    print(f"# etcd failover, {datetime.now():%Y-%m-%d %H:%M}, 3 members on loopback, "
          f"election timeout {args.election_ms} ms, lease TTL {args.ttl} s, "
          f"{args.repeats} repeats")  # fmt: skip
    print("| member killed | write before (median) | first write after | worst write after "
          "(median, max) | lease kept | keeper silent (max) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for victim in ("follower", "leader"):
        rows = [one(victim, args.election_ms, args.ttl, args.interval)
                for _ in range(args.repeats)]  # fmt: skip
        worst = [r["worst"] for r in rows]
        before = statistics.median(r["before"] for r in rows)
        print(f"| {victim} (the client's) | {before * 1e3:.1f} ms "
              f"| {statistics.median(r['first'] for r in rows) * 1e3:.0f} ms "
              f"| {statistics.median(worst) * 1e3:.0f} ms, {max(worst) * 1e3:.0f} ms "
              f"| {sum(r['alive'] for r in rows)}/{len(rows)} "
              f"| {max(r['silent'] for r in rows):.2f} s |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
