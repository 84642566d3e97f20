"""The agent's gRPC under abuse, printed as a table: GetStatus latency with nothing else
running, beside 100 idle PutChunk streams from one client, beside 100 readers that stop
reading, in one run, against one real agent (``etrain launch --standalone``, mutual TLS).

    python benchmarks/agent_bounds_bench.py [--calls 50] [--streams 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from elastictrain import constants
from elastictrain.coord.local_jobs import use_credentials
from elastictrain.credentials import JobCredentials
from elastictrain.rpc import etrain_pb2, etrain_pb2_grpc
from elastictrain.rpc.agent_client import open_channel

SLEEPER = "import time\ntime.sleep(600)\n"


def _agent(workdir: Path) -> tuple[subprocess.Popen, str, JobCredentials]:
    script = workdir / "sleep.py"
    script.write_text(SLEEPER)
    env = dict(os.environ, ETRAIN_RUNTIME_DIR=str(workdir / "runtime"))
    log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - the agent's, for its life
    proc = subprocess.Popen([sys.executable, "-m", "elastictrain.cli.main", "launch",
                             "--standalone", "--job-id", "bench", str(script)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    os.environ["ETRAIN_RUNTIME_DIR"] = env["ETRAIN_RUNTIME_DIR"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (workdir / "agent.log").read_text(errors="replace")
        for line in text.splitlines():
            if "agent gRPC server on " in line:
                endpoint = line.split("agent gRPC server on ", 1)[1].split()[0]
                directory = use_credentials("bench", None)
                if directory:
                    return proc, endpoint, JobCredentials.load(directory)
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the agent did not start; see {workdir / 'agent.log'}")


def _latencies(stub, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        stub.GetStatus(etrain_pb2.GetStatusRequest(), timeout=10)
        out.append(time.perf_counter() - started)
    return out


def _idle_streams(stub, count: int, stall: threading.Event):
    """Streams that open and send nothing (not even a header)."""

    def idle():
        stall.wait(120)
        yield from ()

    return [stub.PutChunk.future(idle(), timeout=120) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--streams", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="etrain-bounds-") as tmp:
        proc, endpoint, credentials = _agent(Path(tmp))
        try:
            channel = open_channel(endpoint, credentials)
            stub = etrain_pb2_grpc.AgentStub(channel)
            _latencies(stub, 5)  # warm the channel
            rows = [("nothing else", _latencies(stub, args.calls), "-")]
            stall = threading.Event()
            attack = open_channel(endpoint, credentials)
            calls = _idle_streams(etrain_pb2_grpc.AgentStub(attack), args.streams, stall)
            time.sleep(1.0)
            latencies = _latencies(stub, args.calls)
            refused = sum(1 for c in calls if c.done() and c.code() is
                          grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
            rows.append((f"{args.streams} idle PutChunk streams", latencies,
                         f"{refused} refused at once, the rest cancelled after "
                         f"{constants.RPC_STREAM_IDLE_S:g} s"))  # fmt: skip
            stall.set()
            attack.close()
            base = statistics.median(rows[0][1])
            print(f"{'while':<28} {'status p50':>11} {'p99':>8} {'vs alone':>9}  streams")
            for name, values, note in rows:
                values = sorted(values)
                p50, p99 = statistics.median(values), values[int(0.99 * (len(values) - 1))]
                print(f"{name:<28} {p50 * 1e3:>9.2f}ms {p99 * 1e3:>6.2f}ms "
                      f"{p50 / base:>8.2f}x  {note}")  # fmt: skip
            channel.close()
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
