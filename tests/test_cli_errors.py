"""Bad input: one line (plus a hint), a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastictrain.coord.embedded import free_loopback_port

ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*ETRAIN, *args], capture_output=True, text=True, timeout=timeout)


def _assert_clean_error(done: subprocess.CompletedProcess, needle: str, code: int | None = None):
    assert done.returncode != 0
    if code is not None:
        assert done.returncode == code
    assert "Traceback" not in done.stderr
    assert needle in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["launch", "missing_script.py"], "training script 'missing_script.py' not found"),
        (["launch", "--nnodes", "3:2", __file__], "MIN (3) is greater than MAX (2)"),
        (["launch", "--nnodes", "x", __file__], "expected N or MIN:MAX"),
        (["launch", "--nproc-per-node", "0", __file__], "--nproc-per-node '0'"),
        (["launch", "--max-restarts", "-1", "--etcd", "127.0.0.1:1", __file__], "--max-restarts"),
        (["launch", "--etcd", "nohost", __file__], "is not host:port"),
        (["launch", "--rdzv-conf", "bogus=1", __file__], "--rdzv-conf 'bogus=1'"),
        (["launch", "--job-id", "bad/id", "--etcd", "127.0.0.1:1", __file__], "job id 'bad/id'"),
        (["launch", "--rdzv-backend", "c10d", __file__], "only etcd-v3"),
        (["launch", "--fault", "kill:rank=1", __file__], "expected KIND:rank=R:step=S"),
        (["launch", "--fault", "boom:rank=1:step=2", __file__], "KIND one of kill"),
        (["launch", "--hot-spares", "-1", "--etcd", "127.0.0.1:1", __file__], "--hot-spares"),
        (["chaos", "kill", "--rank", "-1", "--etcd", "127.0.0.1:1"], "--rank -1"),
        (
            ["chaos", "kill", "--rank", "0", "--signal", "SIGNOPE", "--etcd", "127.0.0.1:1"],
            "unknown signal",
        ),
        (["chaos", "slow", "--rank", "0", "--factor", "0.5", "--etcd", "127.0.0.1:1"],
         "--factor 0.5"),
        (["chaos", "slow", "--rank", "0", "--off", "--for", "3", "--etcd", "127.0.0.1:1"],
         "not with --off"),
        (["chaos", "slow", "--rank", "0", "--etcd", "127.0.0.1:1"], "one of the arguments"),
        (["chaos", "hang", "--rank", "0", "--for", "0", "--etcd", "127.0.0.1:1"], "--for 0"),
        (["chaos", "hang", "--rank", "-2", "--for", "1", "--etcd", "127.0.0.1:1"], "--rank -2"),
        (["chaos", "partition", "--node", "a", "--etcd", "127.0.0.1:1"], "--for"),
        (["chaos", "disk-full", "--node", "a", "--for", "2", "--max-bytes", "-1",
          "--etcd", "127.0.0.1:1"], "--max-bytes -1"),
        (["chaos", "kill", "--rank", "0", "--agent", "a"], "not allowed with argument"),
        (["launch", "--metrics-port", "70000", "--etcd", "127.0.0.1:1", __file__],
         "--metrics-port 70000"),
        (["launch", "--drain-timeout", "0", "--etcd", "127.0.0.1:1", __file__],
         "--drain-timeout must be > 0"),
        (["drain", "--node", "a", "--wait", "-1", "--etcd", "127.0.0.1:1"], "--wait -1"),
        (["drain", "--node", "../a", "--etcd", "127.0.0.1:1"], "node id"),
        (["chaos", "run", "/nonexistent/scenario.toml"], "cannot read it"),
        (["chaos", "run", "--repeat", "0", __file__], "not TOML"),
        (["launch", "--fault", "slow:rank=1:step=2", __file__], "a slowdown needs a factor"),
        (["bogus-command"], "invalid choice"),
        (["launch", "--snapshot-dir", __file__, __file__], "is not a directory"),
        (["launch", "--etcd", "127.0.0.1:1", "--etcd-cert", "c.pem", __file__], "go together"),
        (["launch", "--etcd-cacert", "ca.pem", __file__], "are for --etcd"),
        (["launch", "--etcd", "127.0.0.1:1", "--etcd-cacert", "/nonexistent", __file__],
         "--etcd-cacert /nonexistent"),
        (["launch", "--snapshot-dir", "/proc/etrain-snapshots", __file__], "is not writable"),
    ],
)
def test_bad_input_is_one_line(args, needle, runtime_dir):
    _assert_clean_error(_run(*args), needle)


@pytest.mark.timeout(60)
def test_a_runtime_directory_others_may_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("ETRAIN_RUNTIME_DIR", str(shared))
    script = tmp_path / "train.py"
    script.write_text("print('never runs')\n")
    _assert_clean_error(_run("launch", "--standalone", str(script)), "writable by you only")


@pytest.mark.timeout(60)
def test_unreachable_etcd(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('never runs')\n")
    port = free_loopback_port()
    done = _run("launch", "--etcd", f"127.0.0.1:{port}", str(script))
    _assert_clean_error(done, f"etcd at 127.0.0.1:{port} did not answer", code=3)


@pytest.mark.timeout(60)
def test_unknown_job(etcd_endpoint, runtime_dir):
    for args in (["status", "--once"], ["chaos", "kill", "--rank", "0"], ["drain", "--node", "a"]):
        done = _run(*args, "--etcd", etcd_endpoint, "--job-id", "no-such-job")
        _assert_clean_error(done, "no agent of job 'no-such-job' is registered", code=2)
    done = _run("status", "--once", "--job-id", "no-such-local-job")
    _assert_clean_error(done, "no running local job 'no-such-local-job'", code=2)


@pytest.mark.timeout(30)
def test_help_is_fast_and_lists_commands():
    done = _run("--help")
    assert done.returncode == 0
    for command in ("launch", "status", "chaos"):
        assert command in done.stdout


@pytest.mark.timeout(60)
def test_no_etcd_binary_says_how_to_install_one(tmp_path, monkeypatch, runtime_dir):
    script = tmp_path / "train.py"
    script.write_text("print('never runs')\n")
    monkeypatch.setenv("ETRAIN_ETCD_BIN", str(tmp_path / "no-etcd-here"))
    done = _run("launch", str(script))
    _assert_clean_error(done, "is not an executable")
    assert "apt-get install etcd-server" in done.stderr
