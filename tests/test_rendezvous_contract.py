"""The c10d store contract, run against real servers, and the join as torch's handler.

* :class:`StoreContract` -- the ``torch.distributed.Store`` contract. A subclass provides the
  abstract fixture ``store`` (an empty key space whose default timeout is ``STORE_TIMEOUT``)
  and, optionally, ``store_peer`` (a factory of further clients on the same key space).

Implementations run here, all on real servers (no mocks): our ``EtcdStore`` on etcd, and a
real ``TCPStore`` (the reference semantics). Plus an end-to-end round of two torchrun
handlers (the join) on etcd and the torch handler registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch.distributed as dist
from conftest import etcd_binaries
from torch.distributed.elastic.rendezvous import RendezvousInfo, RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import handler_registry

from elastictrain.coord.embedded import EmbeddedEtcd
from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.rendezvous import registration
from elastictrain.rendezvous.join import EtcdJoinHandler, JoinPolicy
from elastictrain.rendezvous.store import EtcdStore


@pytest.fixture(scope="module", params=etcd_binaries(), ids=lambda v: f"etcd-{v[0]}")
def etcd_server(request):
    """This module runs on every etcd version installed (overrides the session fixture)."""
    _version, binary = request.param
    with EmbeddedEtcd(binary=binary) as server:
        yield server


pytestmark = pytest.mark.timeout(30)

#: Default timeout of every store under test. Blocking tests assert they return far sooner.
STORE_TIMEOUT = timedelta(seconds=10)
#: A short timeout for the "times out" cases, and the slack allowed above it.
SHORT = timedelta(seconds=0.3)
SLACK_S = 2.5
#: How soon after a write a blocked reader must wake (the default timeout is 10 s).
PROMPT_S = 1.5

StoreFactory = Callable[[], dist.Store]


def _run_threads(targets: list[Callable[[], None]], timeout: float = 20.0) -> None:
    """Run each callable in its own thread, started together; re-raise the first error."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait(timeout=timeout)
                fn()
            except BaseException as exc:  # surfaced in the test thread below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"
    if errors:
        raise errors[0]


class TCPStorePool:
    """One real TCPStore server and up to ``PEERS`` extra clients, shared by this module's tests.

    Every TCPStore connection costs its client two reverse-DNS lookups of the peer address (in
    torch's socket code); where the resolver is slow or rate-limited (as in our CI sandbox,
    which drops one PTR query in ~50 and stalls 5 s) a connection per test would dominate the
    run time. So the connections are made once, and :meth:`fresh` wipes the keys and resets
    the timeouts before each test: every test still sees an empty TCPStore.
    """

    PEERS = 8

    def __init__(self) -> None:
        self.master = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT
        )
        self._peers: list[dist.TCPStore] = []
        self._handed_out = 0

    def fresh(self) -> dist.TCPStore:
        for client in [self.master, *self._peers]:
            client.set_timeout(STORE_TIMEOUT)
        for key in self.master.list_keys():
            self.master.delete_key(key)
        assert self.master.num_keys() == 0
        self._handed_out = 0
        return self.master

    def peer(self) -> dist.TCPStore:
        """A client of its own (one per call within a test, at most ``PEERS``)."""
        if self._handed_out == len(self._peers):
            assert len(self._peers) < self.PEERS, "a test asked for too many TCPStore peers"
            self._peers.append(
                dist.TCPStore("127.0.0.1", self.master.port, is_master=False, timeout=STORE_TIMEOUT)
            )
        self._handed_out += 1
        return self._peers[self._handed_out - 1]


@pytest.fixture(scope="module")
def tcp_pool() -> TCPStorePool:
    return TCPStorePool()


# =============================================================================================
# c10d store contract
# =============================================================================================


def _assert_times_out(fn: Callable[[], object], timeout: timedelta) -> float:
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        fn()
    elapsed = time.monotonic() - started
    assert timeout.total_seconds() * 0.8 <= elapsed < timeout.total_seconds() + SLACK_S, elapsed
    return elapsed


class _LateWriter:
    """Writes ``items`` through ``store`` from another thread after ``delay`` seconds."""

    def __init__(self, store: dist.Store, items: dict[str, str], delay: float) -> None:
        self.started_at: float | None = None  # monotonic time just before the first write
        self.finished_at: float | None = None  # monotonic time once every write returned
        self._store, self._items, self._delay = store, items, delay
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(self._delay)
        self.started_at = time.monotonic()
        for key, value in self._items.items():
            self._store.set(key, value)
        self.finished_at = time.monotonic()

    def assert_reader_was_prompt(self, returned_at: float) -> None:
        """A reader blocked on these keys returned (at ``returned_at``) after the writes began
        and within ``PROMPT_S`` of their end -- woken by the write, not by a timeout."""
        self._thread.join(5)
        assert self.started_at is not None and self.finished_at is not None, "writer unfinished"
        assert returned_at >= self.started_at, "the reader returned before anything was written"
        lag = returned_at - self.finished_at
        assert lag < PROMPT_S, f"the reader returned {lag:.2f} s after the write"


class StoreContract:
    """The ``torch.distributed.Store`` contract. Subclass it and provide ``store``."""

    @pytest.fixture
    def store(self) -> dist.Store:
        raise NotImplementedError("a store contract subclass must provide the store fixture")

    @pytest.fixture
    def store_peer(self, store) -> StoreFactory:
        """Another client of the same key space; override to give each its own connection."""
        return lambda: store

    def test_default_timeout_is_configured(self, store):
        assert store.timeout == STORE_TIMEOUT

    # -- set / get ------------------------------------------------------------------------------

    def test_set_get_bytes(self, store, store_peer):
        blob = bytes(range(256))
        store.set("bin", blob)
        assert store.get("bin") == blob
        assert store_peer().get("bin") == blob

    def test_set_get_str_is_utf8(self, store):
        store.set("text", "héllo wörld")
        assert store.get("text") == "héllo wörld".encode()

    def test_set_overwrites_and_empty_value_is_a_value(self, store):
        store.set("k", "one")
        store.set("k", "two")
        assert store.get("k") == b"two"
        store.set("empty", b"")
        assert store.get("empty") == b""
        assert store.check(["empty"]) is True

    # -- blocking reads -------------------------------------------------------------------------

    def test_get_blocks_until_another_client_writes(self, store, store_peer):
        # default timeout 10 s: a watch/notification wakes the reader right after the write
        writer = _LateWriter(store_peer(), {"late": "arrived"}, delay=0.4)
        value = store.get("late")
        writer.assert_reader_was_prompt(time.monotonic())
        assert value == b"arrived"

    def test_wait_returns_once_all_keys_exist(self, store, store_peer):
        store.set("a", "1")
        writer = _LateWriter(store_peer(), {"b": "2", "c": "3"}, delay=0.3)
        store.wait(["a", "b", "c"])
        writer.assert_reader_was_prompt(time.monotonic())
        assert store.multi_get(["a", "b", "c"]) == [b"1", b"2", b"3"]

    def test_wait_on_existing_keys_returns_at_once(self, store):
        store.set("here", "x")
        started = time.monotonic()
        store.wait(["here"], SHORT)
        assert time.monotonic() - started < SHORT.total_seconds()

    def test_wait_with_timeout_raises_dist_store_error(self, store):
        store.set("present", "x")
        _assert_times_out(lambda: store.wait(["present", "never"], SHORT), SHORT)

    def test_wait_timeout_overrides_a_longer_default(self, store):
        # default is STORE_TIMEOUT (10 s): only the override can end this within the bound
        _assert_times_out(lambda: store.wait(["never"], SHORT), SHORT)

    def test_wait_timeout_overrides_a_shorter_default(self, store, store_peer):
        store.set_timeout(timedelta(seconds=0.2))
        writer = _LateWriter(store_peer(), {"slow": "v"}, delay=0.6)
        store.wait(["slow"], timedelta(seconds=8))
        writer.assert_reader_was_prompt(time.monotonic())
        assert store.get("slow") == b"v"

    def test_set_timeout_bounds_get_and_wait(self, store):
        store.set_timeout(SHORT)
        assert store.timeout == SHORT
        _assert_times_out(lambda: store.get("never"), SHORT)
        _assert_times_out(lambda: store.wait(["never"]), SHORT)

    # -- check / delete / num_keys --------------------------------------------------------------

    def test_check(self, store):
        assert store.check(["k"]) is False
        store.set("k", "v")
        assert store.check(["k"]) is True
        assert store.check(["k", "missing"]) is False
        # (no check([]) / multi_get([]): TCPStore's server logs keys[0] of the request at
        # TORCH_DISTRIBUTED_DEBUG=DETAIL and segfaults on an empty key list)

    def test_delete_key(self, store):
        store.set("gone", "v")
        assert store.delete_key("gone") is True
        assert store.check(["gone"]) is False
        assert store.delete_key("gone") is False
        _assert_times_out(lambda: store.wait(["gone"], SHORT), SHORT)

    def test_num_keys(self, store):
        base = store.num_keys()
        store.set("n1", "v")
        store.set("n2", "v")
        store.set("n1", "again")  # an overwrite is no new key
        assert store.num_keys() == base + 2
        store.delete_key("n1")
        assert store.num_keys() == base + 1

    # -- add ------------------------------------------------------------------------------------

    def test_add_semantics(self, store):
        assert store.add("ctr", 3) == 3  # an absent counter starts at 0
        assert store.add("ctr", -1) == 2
        assert store.get("ctr") == b"2"  # ASCII decimal, as TCPStore keeps it
        assert store.add("zero", 0) == 0
        assert store.check(["zero"]) is True

    @pytest.mark.timeout(30)
    def test_concurrent_add_gives_exact_total(self, store, store_peer):
        threads, per_thread = 8, 20
        returned: list[int] = []
        lock = threading.Lock()
        peers = [store_peer() for _ in range(threads)]

        def work(peer: dist.Store) -> None:
            mine = [peer.add("hits", 1) for _ in range(per_thread)]
            with lock:
                returned.extend(mine)

        _run_threads([lambda p=p: work(p) for p in peers])
        total = threads * per_thread
        assert store.get("hits") == str(total).encode()
        # add is atomic: each call saw a distinct intermediate value
        assert sorted(returned) == list(range(1, total + 1))

    # -- compare_set (TCPStore is the reference) ------------------------------------------------

    def test_compare_set_absent_key_with_empty_expected_creates(self, store):
        assert store.compare_set("cs", "", "new") == b"new"
        assert store.get("cs") == b"new"

    def test_compare_set_absent_key_with_nonempty_expected_returns_expected(self, store):
        assert store.compare_set("cs", "guess", "new") == b"guess"
        assert store.check(["cs"]) is False

    def test_compare_set_matching_value_swaps(self, store):
        store.set("cs", "old")
        assert store.compare_set("cs", "old", "new") == b"new"
        assert store.get("cs") == b"new"

    def test_compare_set_mismatch_returns_current_and_keeps_it(self, store):
        store.set("cs", "current")
        assert store.compare_set("cs", "stale", "new") == b"current"
        assert store.get("cs") == b"current"

    def test_compare_set_existing_empty_value_matches_empty_expected(self, store):
        store.set("cs", b"")
        assert store.compare_set("cs", "", "filled") == b"filled"
        assert store.get("cs") == b"filled"

    def test_compare_set_binary_values(self, store):
        store.set("cs", b"\x00\x01")
        assert store.compare_set("cs", b"\x00\x01", b"\xff\x00") == b"\xff\x00"
        assert store.get("cs") == b"\xff\x00"

    @pytest.mark.timeout(30)
    def test_concurrent_compare_set_has_one_winner(self, store, store_peer):
        contenders = 8
        results: dict[int, bytes] = {}
        lock = threading.Lock()
        peers = [store_peer() for _ in range(contenders)]

        def claim(i: int, peer: dist.Store) -> None:
            got = peer.compare_set("leader", "", f"node-{i}")
            with lock:
                results[i] = got

        _run_threads([lambda i=i, p=p: claim(i, p) for i, p in enumerate(peers)])
        leader = store.get("leader")
        winners = [i for i, got in results.items() if got == f"node-{i}".encode()]
        assert len(winners) == 1, results
        assert leader == f"node-{winners[0]}".encode()
        assert set(results.values()) == {leader}

    # -- multi_get / multi_set / append ---------------------------------------------------------

    def test_multi_set_and_multi_get(self, store):
        store.multi_set(["m1", "m2", "m3"], [b"\x00one", "two", b""])
        assert store.multi_get(["m3", "m1", "m2"]) == [b"", b"\x00one", b"two"]
        assert store.get("m2") == b"two"

    def test_multi_get_blocks_until_all_keys_exist(self, store, store_peer):
        store.set("g1", "1")
        writer = _LateWriter(store_peer(), {"g2": "2"}, delay=0.3)
        values = store.multi_get(["g1", "g2"])
        writer.assert_reader_was_prompt(time.monotonic())
        assert values == [b"1", b"2"]

    def test_append(self, store):
        store.append("log", "a")
        store.append("log", b"b")
        assert store.get("log") == b"ab"

    # -- through torch.distributed.PrefixStore (as the rendezvous hands it out) -----------------

    def test_prefix_store_namespaces_keys(self, store):
        ps = dist.PrefixStore("run.0", store)
        other = dist.PrefixStore("run.1", store)
        ps.set("k", "v")
        assert ps.get("k") == b"v"
        assert store.get("run.0/k") == b"v"
        assert ps.check(["k"]) is True
        assert other.check(["k"]) is False
        nested = dist.PrefixStore("inner", ps)
        nested.set("k", b"\x00")
        assert store.get("run.0/inner/k") == b"\x00"

    def test_prefix_store_full_api(self, store):
        ps = dist.PrefixStore("pfx", store)
        base = ps.num_keys()
        assert ps.add("ctr", 5) == 5
        assert store.get("pfx/ctr") == b"5"
        assert ps.compare_set("cs", "", "a") == b"a"
        assert ps.compare_set("cs", "a", "b") == b"b"
        assert ps.compare_set("cs", "zzz", "c") == b"b"
        ps.multi_set(["x", "y"], ["1", b"2"])
        assert ps.multi_get(["y", "x"]) == [b"2", b"1"]
        ps.append("log", "a")
        ps.append("log", "b")
        assert ps.get("log") == b"ab"
        assert ps.num_keys() == base + 5  # ctr, cs, x, y, log (counts the whole store)
        assert ps.delete_key("x") is True
        assert ps.delete_key("x") is False
        assert store.check(["pfx/x"]) is False
        assert ps.num_keys() == base + 4

    def test_prefix_store_blocking_wait_and_timeout(self, store, store_peer):
        ps = dist.PrefixStore("pfx", store)
        # keep the peer referenced: a PrefixStore holds only the C++ side of a Python store
        peer = store_peer()
        writer = _LateWriter(dist.PrefixStore("pfx", peer), {"late": "v"}, delay=0.3)
        value = ps.get("late")
        writer.assert_reader_was_prompt(time.monotonic())
        assert value == b"v"
        assert store.get("pfx/late") == b"v"
        _assert_times_out(lambda: ps.wait(["never"], SHORT), SHORT)


class TestEtcdStoreContract(StoreContract):
    @pytest.fixture
    def store(self, etcd_client, job_id) -> Iterator[EtcdStore]:
        keys = JobKeys(job_id)
        yield EtcdStore(etcd_client, keys.store_prefix, timeout=STORE_TIMEOUT)
        etcd_client.delete_prefix(keys.root)

    @pytest.fixture
    def store_peer(self, store, etcd_endpoint) -> Iterator[StoreFactory]:
        clients: list[EtcdClient] = []

        def make() -> EtcdStore:
            client = EtcdClient.from_spec(etcd_endpoint, timeout=5.0)
            clients.append(client)
            return EtcdStore(client, store.prefix, timeout=STORE_TIMEOUT)

        yield make
        for client in clients:
            client.close()

    def test_keys_live_under_the_prefix(self, store, etcd_client):
        store.set("k", "v")
        kv = etcd_client.get(store.prefix + "k")
        assert kv is not None and kv.value == b"v"
        assert store.list_keys() == ["k"]


class TestTCPStoreReference(StoreContract):
    """A real TCPStore: the reference the store contract (compare_set above all) follows."""

    @pytest.fixture
    def store(self, tcp_pool) -> dist.TCPStore:
        return tcp_pool.fresh()

    @pytest.fixture
    def store_peer(self, store, tcp_pool) -> StoreFactory:
        # a client per caller: a TCPStore client serialises its calls, so a get blocked on a
        # shared client would hold up the very write it waits for
        return tcp_pool.peer


# =============================================================================================
# End to end: the join as torch's rendezvous handler (torchrun --rdzv-backend etcd-v3)
# =============================================================================================


def _params(endpoint: str, run_id: str) -> RendezvousParameters:
    return RendezvousParameters(
        backend="etcd-v3",
        endpoint=endpoint,
        run_id=run_id,
        min_nodes=2,
        max_nodes=2,
        local_addr="127.0.0.1",
        last_call_timeout=1,
        join_timeout=30,
    )


@pytest.mark.timeout(30)
def test_two_handlers_rendezvous_on_etcd(etcd_endpoint, etcd_client, job_id):
    handlers = [registration.create_handler(_params(etcd_endpoint, job_id)) for _ in range(2)]
    infos: dict[int, RendezvousInfo] = {}

    def join(i: int) -> Callable[[], None]:
        def run() -> None:
            infos[i] = handlers[i].next_rendezvous()

        return run

    try:
        _run_threads([join(0), join(1)], timeout=25)
        assert sorted(info.rank for info in infos.values()) == [0, 1]
        assert {info.world_size for info in infos.values()} == {2}
        boot = {
            (i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port)
            for i in infos.values()
        }
        assert len(boot) == 1, boot
        ((master_addr, master_port),) = boot
        assert master_addr == "127.0.0.1"
        # a free port on rank 0's host, where the workers' rank 0 hosts their store
        # (torchrun: the handler does not use an agent store)
        assert not handlers[0].use_agent_store
        worker_store = dist.TCPStore(master_addr, master_port, is_master=True,
                                     wait_for_workers=False, timeout=STORE_TIMEOUT)  # fmt: skip
        worker_store.set("hello", "world")
        assert worker_store.get("hello") == b"world"
        # the rendezvous store both handlers got is one key space on etcd
        by_rank = {info.rank: info for info in infos.values()}
        by_rank[0].store.set("from-rank-0", "x")
        assert by_rank[1].store.get("from-rank-0") == b"x"
        # and the round really lives in etcd under the job's keys
        assert etcd_client.get(JobKeys(job_id).join_result(0)) is not None
        # torchrun's handler closes the job when it shuts down (as torch's own does)
        handlers[0].shutdown()
        assert handlers[1].is_closed()
    finally:
        for handler in handlers:
            handler.shutdown()
        etcd_client.delete_prefix(JobKeys(job_id).root)


def test_torch_handler_registry_creates_our_handler(etcd_endpoint, etcd_client, job_id):
    registration.register()
    registration.register()  # idempotent
    handler = handler_registry.create_handler(_params(etcd_endpoint, job_id))
    try:
        assert isinstance(handler, EtcdJoinHandler)
        assert handler.get_backend() == "etcd-v3"
        assert handler.get_run_id() == job_id
        assert handler.policy == JoinPolicy(min_nodes=2, max_nodes=2, last_call_s=1,
                                            join_timeout_s=30)  # fmt: skip
        # wired to our etcd: closing the job writes its key
        assert handler.is_closed() is False
        handler.set_closed()
        assert handler.is_closed() is True
        assert etcd_client.get(JobKeys(job_id).join_closed) is not None
    finally:
        handler.shutdown()
        etcd_client.delete_prefix(JobKeys(job_id).root)
