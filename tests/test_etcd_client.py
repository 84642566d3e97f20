"""Our etcd client against a real etcd that dies and comes back."""

from __future__ import annotations

import threading
import time

import pytest

from elastictrain.coord.embedded import EmbeddedEtcd
from elastictrain.coord.etcd import EtcdClient, LeaseKeeper, parse_endpoints
from elastictrain.errors import ConfigError, CoordinationUnavailableError


@pytest.mark.timeout(60)
def test_client_and_watch_survive_an_etcd_restart():
    with EmbeddedEtcd() as server:
        client = EtcdClient.from_spec(server.endpoint, timeout=15)
        seen: list[str] = []
        arrived = threading.Event()

        def on_events(events):
            seen.extend(e.key for e in events)
            if "/w/after" in seen:
                arrived.set()

        watch = client.watch_prefix("/w/", on_events, client.revision() + 1)
        client.put("/w/before", b"1")
        server.restart()
        started = time.monotonic()
        client.put("/w/after", b"2")  # retried until the server answers again
        recovered = time.monotonic() - started
        assert arrived.wait(10), f"watch did not resume; saw {seen}"
        assert seen == ["/w/before", "/w/after"]  # nothing lost, nothing repeated
        assert recovered < 5, f"client took {recovered:.1f} s to recover"
        watch.cancel()
        client.close()


@pytest.mark.timeout(30)
def test_unreachable_etcd_raises_a_typed_error_within_the_timeout():
    with EmbeddedEtcd() as server:
        endpoint = server.endpoint
    client = EtcdClient.from_spec(endpoint, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(CoordinationUnavailableError, match="did not answer"):
        client.get("/x")
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_lease_keeper_keeps_keys_and_revoke_removes_them(etcd_client, job_id):
    keeper = LeaseKeeper(etcd_client, ttl=1)
    etcd_client.put(f"/{job_id}/k", b"v", lease=keeper.lease_id)
    time.sleep(2.5)  # longer than the TTL: only the keeper's refreshes keep it
    assert etcd_client.get(f"/{job_id}/k") is not None
    keeper.close(revoke=True)
    assert etcd_client.get(f"/{job_id}/k") is None


def test_parse_endpoints():
    assert parse_endpoints("http://a:1, b:2") == [("a", 1), ("b", 2)]
    for bad in ("a", "a:x", "a:0", ":1"):
        with pytest.raises(ConfigError):
            parse_endpoints(bad)


@pytest.mark.timeout(60)
def test_many_key_watches_share_one_stream_and_a_restart_tells_each_of_them():
    """``watch_keys``: 300 watches created at once on the process's one stream, each sees its
    own key (a put before the watch existed too: it starts at a revision); a cancelled one
    sees nothing; when etcd restarts, every live one is told (None) to read again."""
    with EmbeddedEtcd() as server:
        client = EtcdClient.from_spec(server.endpoint, timeout=15)
        start = client.revision() + 1
        client.put("/k/0", b"early")
        seen: dict[int, list] = {i: [] for i in range(300)}
        done = threading.Semaphore(0)

        def watcher(i):
            def on_events(events):
                seen[i].append(None if events is None else [(e.key, e.value) for e in events])
                done.release()
            return on_events

        cancels = [client.watch_keys([f"/k/{i}"], watcher(i), start) for i in range(300)]
        cancels[299]()
        for i in range(1, 300):
            client.put(f"/k/{i}", str(i))
        for _ in range(299):
            assert done.acquire(timeout=20)
        assert seen[0] == [[("/k/0", b"early")]]
        assert all(seen[i] == [[(f"/k/{i}", str(i).encode())]] for i in range(1, 299))
        assert seen[299] == []
        server.restart()
        for _ in range(299):
            assert done.acquire(timeout=20)
        assert all(seen[i][-1] is None for i in range(299))
        client.close()
