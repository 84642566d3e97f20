"""Worker sessions: the frame format (pure), and the agent's server with real processes that
connect through the workers' exec shim."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from elastictrain.agent import machine as M
from elastictrain.agent.sessions import SessionServer, WorkerKey
from elastictrain.agent.workers import is_exiting, with_parent_death_signal

from elastictrain import constants
from elastictrain.errors import ElasticTrainError
from elastictrain.session import protocol as P

pytestmark = pytest.mark.timeout(60)


# -- the frame format ---------------------------------------------------------------------------


@pytest.mark.unit
def test_frames_round_trip_whatever_the_cuts():
    messages = [{"type": "progress", "step": i} for i in range(5)] + [{"type": "x", "d": "é" * 9}]
    stream = b"".join(P.encode(m) for m in messages)
    for cut in (1, 3, 7, len(stream)):
        reader = P.FrameReader()
        got = []
        for start in range(0, len(stream), cut):
            got += reader.feed(stream[start : start + cut])
        assert got == messages


@pytest.mark.unit
@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'{"no": "type"}', b'{"type": 3}', b"\xff\xfe"]
)
def test_malformed_frames_are_session_errors(body):
    frame = len(body).to_bytes(4, "big") + body
    with pytest.raises(P.SessionError):
        P.FrameReader().feed(frame)


@pytest.mark.unit
def test_oversized_frames_are_refused_both_ways():
    with pytest.raises(P.SessionError, match="exceeds"):
        P.FrameReader().feed((P.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(P.SessionError, match="exceeds"):
        P.encode({"type": "x", "data": "a" * P.MAX_FRAME_BYTES})
    assert P.unb64(P.b64(b"\x00\x01meta")) == b"\x00\x01meta"
    with pytest.raises(P.SessionError):
        P.unb64("not base64!")


# -- the server, with real worker processes ------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from elastictrain.session.client import worker_session
    session = worker_session()
    if session is None:
        print("no session", flush=True)
        sys.exit(3)
    session.attach("snapshot")
    session.progress(5)
    mode = sys.argv[1]
    if mode == "call":
        print(session.call("echo", value=41)["value"], flush=True)
        try:
            session.call("refuse")
        except Exception as exc:
            print(type(exc).__name__, exc.kind, exc, flush=True)
    if mode == "finish":
        session.finished()
        sys.exit(0)
    print("ready", flush=True)
    time.sleep(60)
    """
)


class Observed:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, observation) -> None:
        self.queue.put((time.monotonic(), observation))

    def next(self, kind: type, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            at, observation = self.queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            if isinstance(observation, kind):
                return at, observation


def _refuse(key, request):
    raise ElasticTrainError("not now")


@pytest.fixture
def server():
    observed = Observed()
    handlers = {"echo": lambda key, r: {"value": r["value"] + 1}, "refuse": _refuse}
    srv = SessionServer(f"test/{os.getpid()}", observed, handlers)
    yield srv, observed
    srv.close()


def _start(srv: SessionServer, key: WorkerKey, mode: str, token: str | None = None):
    env = dict(os.environ, **{
        constants.ENV_SESSION_ADDRESS: srv.env_address,
        constants.ENV_SESSION_TOKEN: token if token is not None else srv.expect(key),
    })  # fmt: skip
    argv = with_parent_death_signal([sys.executable, "-c", WORKER, mode])
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


@pytest.mark.contract
def test_a_killed_worker_is_seen_at_once_with_its_identity(server):
    srv, observed = server
    key = WorkerKey(generation=3, slot=1)
    proc = _start(srv, key, "wait")
    try:
        assert proc.stdout.readline().strip() == "ready"
        _, attached = observed.next(M.WorkerAttached)
        assert (attached.generation, attached.slot, attached.mode) == (3, 1, "snapshot")
        _, beat = observed.next(M.WorkerHeartbeat)
        assert beat.step == 5 and not beat.active
        assert srv.pid_of(key) == proc.pid  # what the kernel says, through the exec shim
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        seen_at, lost = observed.next(M.WorkerLost)
        assert (lost.generation, lost.slot, lost.finished) == (3, 1, False)
        assert seen_at - killed_at < 0.5
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.contract
def test_calls_are_answered_and_errors_keep_their_kind(server):
    srv, _ = server
    proc = _start(srv, WorkerKey(1, 0), "call")
    out = proc.stdout.readline().strip(), proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert out[0] == "42"
    assert out[1] == "SessionRequestError ElasticTrainError not now"


@pytest.mark.contract
def test_a_worker_that_says_finished_is_not_a_crash(server):
    srv, observed = server
    proc = _start(srv, WorkerKey(1, 0), "finish")
    assert proc.wait(30) == 0
    _, lost = observed.next(M.WorkerLost)
    assert lost.finished


@pytest.mark.contract
def test_an_unknown_token_gets_no_session(server):
    srv, observed = server
    proc = _start(srv, WorkerKey(1, 0), "wait", token="forged")
    try:
        # the agent closes the connection: the worker's library sees no agent to talk to
        out = proc.stdout.readline().strip()
        assert out in ("ready", "")
        time.sleep(0.3)
        with pytest.raises(queue.Empty):
            observed.next(M.WorkerAttached, timeout=0.5)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.contract
def test_no_session_address_runs_the_program_plainly():
    argv = with_parent_death_signal([sys.executable, "-c", WORKER, "wait"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETRAIN_SESSION")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and done.stdout.strip() == "no session"


@pytest.mark.contract
def test_a_dying_process_is_exiting_before_it_is_reaped():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not is_exiting(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not is_exiting(proc.pid):  # dying, then a zombie until we reap it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert is_exiting(proc.pid)  # reaped: gone


@pytest.mark.contract
def test_sessions_of_an_older_generation_are_dropped_silently(server):
    srv, observed = server
    proc = _start(srv, WorkerKey(1, 0), "wait")
    try:
        assert proc.stdout.readline().strip() == "ready"
        observed.next(M.WorkerAttached)
        srv.forget(2)
        assert srv.pid_of(WorkerKey(1, 0)) is None
        with pytest.raises(queue.Empty):
            observed.next(M.WorkerLost, timeout=0.5)
    finally:
        proc.kill()
        proc.wait()
