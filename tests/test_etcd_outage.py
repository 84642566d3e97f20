"""etcd goes away mid-run: the job rides it out and ends as if it never left; a node cut off
from etcd alone stops its workers before its lease runs out."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
from launch_harness import (
    SCRIPTS,
    Cluster,
    assert_bit_identical,
    load_params,
    process_alive,
    torchrun_reference,
    wait_until,
)

from elastictrain.coord.embedded import EmbeddedEtcd
from elastictrain.coord.etcd import EtcdClient
from elastictrain.events import read_events

pytestmark = [pytest.mark.e2e, pytest.mark.alone]

SCRIPT = SCRIPTS / "snapshot_train.py"


def _args(workdir, steps: int, sleep: float) -> list[str]:
    return ["--steps", str(steps), "--out", str(workdir / "final.pt"), "--sleep", str(sleep)]


def _steps(text: str) -> int:
    return sum(1 for line in text.splitlines() if ": step " in line)


@pytest.mark.timeout(400)
def test_the_job_rides_out_etcd_outages_of_5_10_and_30_s(tmp_path, runtime_dir, job_id):
    steps = 240
    reference = torchrun_reference(tmp_path / "ref", SCRIPT, steps)
    etcd = EmbeddedEtcd().start()
    cluster = Cluster(tmp_path)
    try:
        agents = [cluster.agent(n, etcd=etcd.endpoint, job_id=job_id, script=SCRIPT,
                                script_args=_args(cluster.workdir, steps, 0.25))
                  for n in "ab"]  # fmt: skip
        wait_until(lambda: _steps(agents[0].text()) >= 6, 120, "training under way")
        client = EtcdClient.from_spec(etcd.endpoint)

        def back(node: str) -> int:
            return len([e for e in read_events(client, job_id, "etcd_back") if e.node == node])

        try:
            for outage, outage_s in enumerate((5.0, 10.0, 30.0)):
                before = _steps(agents[0].text())
                etcd.kill()
                time.sleep(outage_s)  # the fault itself: etcd away this long
                assert _steps(agents[0].text()) > before + 4  # training went on without etcd
                etcd.start_again()
                wait_until(lambda n=outage + 1: back("a") >= n and back("b") >= n, 30,
                           "both agents to reach etcd again")  # fmt: skip
            for agent in agents:
                assert agent.wait(250) == 0, agent.text()
            assert_bit_identical(load_params(cluster.workdir / "final.pt"), reference)
            for node in "ab":
                kinds = [e.kind for e in read_events(client, job_id) if e.node == node]
                assert kinds.count("start_round") == 1, kinds  # nobody was restarted
                assert "rejoin" not in kinds and "ride_out" in kinds and "etcd_back" in kinds
        finally:
            client.close()
    finally:
        cluster.close()
        etcd.stop()


class Cuttable:
    """A TCP proxy to etcd that can cut one agent off (open connections reset, new ones
    refused) and let it back."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self.cut = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.close()

    def cut_off(self) -> None:
        self.cut = True
        with self._lock:
            opened, self._open = self._open, []
        for s in opened:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def reconnect(self) -> None:
        self.cut = False

    def close(self) -> None:
        self.cut_off()
        self._server.close()


@pytest.mark.timeout(300)
def test_a_node_cut_off_from_etcd_stops_its_workers_before_its_lease_runs_out(
        tmp_path, runtime_dir, job_id, etcd_endpoint, etcd_client):  # fmt: skip
    steps = 60
    reference = torchrun_reference(tmp_path / "ref", SCRIPT, steps)
    proxy = Cuttable(etcd_endpoint)
    cluster = Cluster(tmp_path)
    try:
        args = _args(cluster.workdir, steps, 0.25)
        a = cluster.agent("a", etcd=etcd_endpoint, job_id=job_id, script=SCRIPT, script_args=args)
        b = cluster.agent("b", etcd=proxy.endpoint, job_id=job_id, script=SCRIPT,
                          script_args=args)  # fmt: skip
        wait_until(lambda: _steps(a.text()) >= 6, 120, "training under way")
        b_workers = [int(p) for p in os.popen(f"pgrep -P {b.popen.pid}").read().split()]
        assert b_workers
        proxy.cut_off()
        cut_at = time.time()
        wait_until(lambda: not any(process_alive(p) for p in b_workers), 10, "b's workers to stop")
        stopped_at = time.time()
        # b's lease (--node-ttl 3) runs out at etcd 3 s after its last keepalive: only then may
        # a take its ranks, and by then b's workers are gone
        assert stopped_at - cut_at < 3.0
        wait_until(lambda: any(e.node == "a" for e in read_events(etcd_client, job_id,
                                                                  "node_lost")),
                   20, "a to see b's lease run out")  # fmt: skip
        lost = next(e for e in read_events(etcd_client, job_id, "node_lost") if e.node == "a")
        assert lost.time > stopped_at
        proxy.reconnect()
        for agent in (a, b):
            assert agent.wait(200) == 0, agent.text()
        assert_bit_identical(load_params(cluster.workdir / "final.pt"), reference)
    finally:
        cluster.close()
        proxy.close()
