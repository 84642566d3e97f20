"""Contract suites for the rendezvous backend and the c10d store, run against real servers.

Two reusable suites, written like torch's ``RendezvousBackendTestMixin``:

* :class:`RendezvousBackendContract` -- torch's ``RendezvousBackend`` fencing-token contract.
  A subclass provides the abstract fixture ``backend`` (a backend on a fresh, empty state) and,
  optionally, ``backend_peer`` (a factory of further participants on the same state, each with
  its own connection; by default the same object is shared).
* :class:`StoreContract` -- the ``torch.distributed.Store`` contract. A subclass provides the
  abstract fixture ``store`` (an empty key space whose default timeout is ``STORE_TIMEOUT``)
  and, optionally, ``store_peer`` (a factory of further clients on the same key space).

Implementations run here, all on real servers (no mocks):

* backend: our ``EtcdV3RendezvousBackend`` on etcd, and torch's ``C10dRendezvousBackend`` on a
  real ``TCPStore`` (the reference; two cases where it legitimately differs are skipped for it);
* store: our ``EtcdStore`` on etcd, and a real ``TCPStore`` (the reference semantics).

Plus an end-to-end rendezvous of two handlers on etcd and the torch handler registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch.distributed as dist
from conftest import etcd_binaries
from torch.distributed.elastic.rendezvous import (
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousBackend,
)
from torch.distributed.elastic.rendezvous.registry import handler_registry

from elastictrain.coord.embedded import EmbeddedEtcd
from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.rendezvous import registration
from elastictrain.rendezvous.backend import EtcdV3RendezvousBackend
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

BackendFactory = Callable[[], RendezvousBackend]
StoreFactory = Callable[[], dist.Store]


def _set(backend: RendezvousBackend, state: bytes, token=None):
    result = backend.set_state(state, token)
    assert result is not None, "set_state returned None while a state exists"
    return result


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
# Rendezvous backend contract
# =============================================================================================


class RendezvousBackendContract:
    """torch's ``RendezvousBackend`` contract. Subclass it and provide ``backend``."""

    #: Whether a token names one write (etcd revision) rather than the state's content.
    #: Content-addressed tokens (C10d: the base64 of the state) cannot tell two writes of the
    #: same bytes apart; the two cases that depend on that are skipped for such backends.
    tokens_are_unique_per_write = True

    @pytest.fixture
    def backend(self) -> RendezvousBackend:
        raise NotImplementedError("a backend contract subclass must provide the backend fixture")

    @pytest.fixture
    def backend_peer(self, backend) -> BackendFactory:
        """Another participant on the same state; override to give each its own connection."""
        return lambda: backend

    def corrupt_state(self, backend: RendezvousBackend) -> None:
        """Store a state that ``get_state`` must reject; skip where no state can be corrupt."""
        pytest.skip(f"{type(self).__name__}: the backend holds opaque bytes; none are corrupt")

    # -- get_state ------------------------------------------------------------------------------

    def test_get_state_on_absent_state_returns_none(self, backend):
        assert backend.get_state() is None

    def test_get_state_returns_what_was_set(self, backend):
        _, token, _ = _set(backend, b"x")
        assert backend.get_state() == (b"x", token)

    def test_get_state_raises_state_error_on_corrupt_state(self, backend):
        self.corrupt_state(backend)
        with pytest.raises(RendezvousStateError):
            backend.get_state()

    # -- set_state: create-if-absent ------------------------------------------------------------

    def test_create_with_none_token_sets_absent_state(self, backend):
        state, token, has_set = _set(backend, b"first")
        assert (state, has_set) == (b"first", True)
        assert token is not None
        assert backend.get_state() == (b"first", token)

    def test_second_create_does_not_overwrite(self, backend, backend_peer):
        _, token1, _ = _set(backend, b"first")
        state2, token2, has_set2 = _set(backend_peer(), b"second")
        assert (state2, token2, has_set2) == (b"first", token1, False)
        assert backend.get_state() == (b"first", token1)

    def test_lost_create_with_identical_bytes_reports_has_set_false(self, backend, backend_peer):
        if not self.tokens_are_unique_per_write:
            pytest.skip("has_set is a bytes comparison for content-addressed tokens (C10d)")
        _, token1, has_set1 = _set(backend, b"same")
        state2, token2, has_set2 = _set(backend_peer(), b"same")
        assert has_set1 is True
        assert (state2, token2, has_set2) == (b"same", token1, False)

    # -- set_state: fencing tokens --------------------------------------------------------------

    def test_current_token_writes_and_returns_new_token(self, backend):
        _, token1, _ = _set(backend, b"v1")
        state2, token2, has_set2 = _set(backend, b"v2", token1)
        assert (state2, has_set2) == (b"v2", True)
        assert token2 != token1
        assert backend.get_state() == (b"v2", token2)

    def test_token_from_get_state_is_current(self, backend, backend_peer):
        _set(backend, b"v1")
        peer = backend_peer()
        read = peer.get_state()
        assert read is not None
        state, token, has_set = _set(peer, b"v2", read[1])
        assert (state, has_set) == (b"v2", True)
        assert backend.get_state() == (b"v2", token)

    def test_stale_token_returns_current_state_and_token(self, backend, backend_peer):
        _, token1, _ = _set(backend, b"v1")
        _, token2, _ = _set(backend_peer(), b"v2", token1)
        state3, token3, has_set3 = _set(backend, b"v3", token1)
        assert (state3, token3, has_set3) == (b"v2", token2, False)
        assert backend.get_state() == (b"v2", token2)

    def test_token_is_spent_by_a_write_of_identical_bytes(self, backend):
        if not self.tokens_are_unique_per_write:
            pytest.skip("content-addressed tokens (C10d) are equal for equal bytes (ABA)")
        _, token1, _ = _set(backend, b"same")
        _, token2, _ = _set(backend, b"same", token1)
        assert token2 != token1
        state, token, has_set = _set(backend, b"other", token1)
        assert (state, token, has_set) == (b"same", token2, False)

    # -- set_state: tokens the backend never issued ---------------------------------------------

    @pytest.mark.parametrize(
        "garbage",
        ["invalid", b"not-a-token", object(), 3.5, -1],
        ids=["str", "bytes", "object", "float", "negative-int"],
    )
    def test_unknown_token_returns_current_state_without_writing(self, backend, garbage):
        # torch's contract (C10dRendezvousBackend): a token the backend cannot match is a
        # stale one -- no write, no exception, the current state and token come back.
        _, token1, _ = _set(backend, b"v1")
        state, token, has_set = _set(backend, b"v2", garbage)
        assert (state, token, has_set) == (b"v1", token1, False)
        assert backend.get_state() == (b"v1", token1)

    @pytest.mark.parametrize(
        "garbage", ["invalid", b"not-a-token", 12345], ids=["str", "bytes", "int"]
    )
    def test_unknown_token_on_absent_state_writes_nothing(self, backend, garbage):
        assert backend.set_state(b"v1", garbage) is None
        assert backend.get_state() is None

    # -- concurrency ----------------------------------------------------------------------------

    @pytest.mark.timeout(30)
    def test_concurrent_cas_increments_lose_no_update(self, backend, backend_peer):
        # The state is "<count>/<last writer>": the writer's id keeps two racing writes from
        # carrying identical bytes, which content-addressed backends (C10d) cannot tell apart
        # (both racers would see has_set True; see the identical-bytes cases above).
        writers, per_writer = 8, 5
        _set(backend, b"0/init")
        wins: list[tuple[int, object]] = []
        lock = threading.Lock()
        peers = [backend_peer() for _ in range(writers)]

        def increment(writer: int, peer: RendezvousBackend) -> None:
            for _ in range(per_writer):
                current = peer.get_state()
                assert current is not None
                state, token = current
                for _attempt in range(1000):
                    new = f"{int(state.split(b'/')[0]) + 1}/{writer}".encode()
                    state, token, has_set = _set(peer, new, token)
                    if has_set:
                        assert state == new
                        with lock:
                            wins.append((int(new.split(b"/")[0]), token))
                        break
                else:
                    raise AssertionError("a writer never won its compare-and-swap")

        _run_threads([lambda w=w, p=p: increment(w, p) for w, p in enumerate(peers)])

        total = writers * per_writer
        final = backend.get_state()
        assert final is not None and int(final[0].split(b"/")[0]) == total
        # every increment won exactly once: values 1..total, each with its own token
        assert sorted(value for value, _ in wins) == list(range(1, total + 1))
        assert len({repr(token) for _, token in wins}) == total


class _Runs:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


class TestEtcdV3RendezvousBackendContract(RendezvousBackendContract):
    @pytest.fixture
    def backend(self, etcd_client, job_id) -> Iterator[EtcdV3RendezvousBackend]:
        keys = JobKeys(job_id)
        yield EtcdV3RendezvousBackend(etcd_client, keys.rendezvous_state)
        etcd_client.delete_prefix(keys.root)

    @pytest.fixture
    def backend_peer(self, backend, etcd_endpoint) -> Iterator[BackendFactory]:
        clients: list[EtcdClient] = []

        def make() -> EtcdV3RendezvousBackend:
            client = EtcdClient.from_spec(etcd_endpoint, timeout=5.0)
            clients.append(client)
            return EtcdV3RendezvousBackend(client, backend.key)

        yield make
        for client in clients:
            client.close()

    def test_name(self, backend):
        assert backend.name == "etcd-v3"

    def test_token_is_the_key_mod_revision(self, backend, etcd_client):
        _, token, _ = _set(backend, b"x")
        kv = etcd_client.get(backend.key)
        assert kv is not None and token == kv.mod_revision

    def test_float_token_is_not_truncated_into_a_revision(self, backend):
        # int(float(rev)) == rev: a coercing parser would let this foreign token win the compare
        _, token, _ = _set(backend, b"v1")
        state, new_token, has_set = _set(backend, b"v2", float(token))
        assert (state, new_token, has_set) == (b"v1", token, False)

    def test_the_handler_sees_only_states_the_allow_list_reads(self, backend, tmp_path):
        import pickle

        from torch.distributed.elastic.rendezvous import RendezvousStateError
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _RendezvousState

        from elastictrain.rendezvous.backend import CheckedBackend

        checked = CheckedBackend(backend)
        real = pickle.dumps(_RendezvousState())
        assert checked.set_state(real)[0] == real and checked.get_state()[0] == real
        marker = tmp_path / "ran"
        crafted = pickle.dumps(_Runs(str(marker)))
        _set(backend, crafted, backend.get_state()[1])  # written behind the handler's back
        with pytest.raises(RendezvousStateError, match="posix.system"):
            checked.get_state()
        assert not marker.exists()

    def test_decimal_text_of_the_current_revision_is_that_token(self, backend):
        _, token, _ = _set(backend, b"v1")
        state, new_token, has_set = _set(backend, b"v2", str(token))
        assert (state, has_set) == (b"v2", True)
        assert new_token != token


class TestC10dRendezvousBackendContract(RendezvousBackendContract):
    """torch's own backend on a real TCPStore: the reference the contract is written from."""

    tokens_are_unique_per_write = False

    @pytest.fixture
    def backend(self, tcp_pool, job_id) -> C10dRendezvousBackend:
        return C10dRendezvousBackend(tcp_pool.fresh(), job_id)

    @pytest.fixture
    def backend_peer(self, backend, tcp_pool, job_id) -> BackendFactory:
        # each peer its own TCPStore connection, as separate nodes would have
        return lambda: C10dRendezvousBackend(tcp_pool.peer(), job_id)

    def corrupt_state(self, backend: RendezvousBackend) -> None:
        assert isinstance(backend, C10dRendezvousBackend)
        backend._store.set(backend._key, "non_base64")


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
# End to end: torch's DynamicRendezvousHandler on etcd
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
    errors: list[BaseException] = []

    def join(i: int) -> None:
        try:
            infos[i] = handlers[i].next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(25)
        assert not errors, errors
        assert len(infos) == 2, "a handler did not finish its rendezvous"

        ranks = sorted(info.rank for info in infos.values())
        assert ranks == [0, 1]
        assert {info.world_size for info in infos.values()} == {2}
        boot = {
            (i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port)
            for i in infos.values()
        }
        assert len(boot) == 1, boot
        ((master_addr, master_port),) = boot
        assert master_addr == "127.0.0.1"
        assert 0 < master_port < 65536

        # the master port is rank 0's live TCPStore, reachable by the workers
        worker = dist.TCPStore(master_addr, master_port, is_master=False, timeout=STORE_TIMEOUT)
        worker.set("hello", "world")
        assert worker.get("hello") == b"world"

        # the rendezvous store both handlers got is one key space on etcd
        by_rank = {info.rank: info for info in infos.values()}
        by_rank[0].store.set("from-rank-0", "x")
        assert by_rank[1].store.get("from-rank-0") == b"x"

        # and the rendezvous state really lives in etcd under the job's key
        assert etcd_client.get(JobKeys(job_id).rendezvous_state) is not None
    finally:
        for handler in handlers:
            handler.shutdown()
        etcd_client.delete_prefix(JobKeys(job_id).root)


def test_torch_handler_registry_creates_our_handler(etcd_endpoint, etcd_client, job_id):
    registration.register()
    registration.register()  # idempotent
    state_key = JobKeys(job_id).rendezvous_state
    handler = handler_registry.create_handler(_params(etcd_endpoint, job_id))
    try:
        assert isinstance(handler, DynamicRendezvousHandler)
        assert handler.get_backend() == "etcd-v3"
        assert handler.settings.run_id == job_id
        assert (handler.settings.min_nodes, handler.settings.max_nodes) == (2, 2)
        assert handler.settings.timeout.last_call == timedelta(seconds=1)
        # wired to our etcd: closing the rendezvous writes its state under the job's key
        assert etcd_client.get(state_key) is None
        assert handler.is_closed() is False
        handler.set_closed()
        assert handler.is_closed() is True
        assert etcd_client.get(state_key) is not None
    finally:
        handler.shutdown()
        etcd_client.delete_prefix(JobKeys(job_id).root)
