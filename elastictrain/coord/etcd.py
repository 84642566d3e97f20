"""Our one door to etcd v3.

Wraps ``pyetcd`` (the maintained fork of the ``etcd3`` client) so that the rest of the code sees
a small typed API and one error type. Three things the plain client does not give:

* **Fast reconnect.** Each endpoint is retried one second after a failure (the library's default
  is 300 s, which leaves a client dead long after etcd came back), and every call is retried on
  transient gRPC errors until its deadline.
* **A lease keeper** (:class:`LeaseKeeper`): a thread that refreshes a lease at a third of its TTL
  and reports when the lease is lost, so a node's keys vanish when (and only when) the node dies.
* **Resumable watches** (:class:`PrefixWatch`): a watch that is re-created from the last revision
  it delivered after a disconnect, so no event is lost across an etcd restart.

Thread-safety: an :class:`EtcdClient` may be shared by threads; gRPC channels are thread-safe.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exceptions

from elastictrain.constants import (
    ENV_ETCD_CACERT,
    ENV_ETCD_CERT,
    ENV_ETCD_KEY,
    ENV_ETCD_PASSWORD_FILE,
    ENV_ETCD_USER,
    ETCD_REQUEST_TIMEOUT_S,
)
from elastictrain.coord.failover import (
    FAILED_MEMBER_RETRY_S,
    fail_over,
    in_use,
    retry_failed_members,
)
from elastictrain.coord.watch_stream import WatchStream
from elastictrain.errors import ConfigError, CoordinationUnavailableError

logger = logging.getLogger(__name__)

# Reconnect within a fraction of a second once etcd is back: gRPC's default backoff grows to
# seconds after an outage, long enough for a short lease to run out before its keepalive.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500)]  # fmt: skip

_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_TRANSIENT_ERRORS = (
    etcd_exceptions.ConnectionFailedError,
    etcd_exceptions.ConnectionTimeoutError,
    etcd_exceptions.NoServerAvailableError,
    etcd_exceptions.InternalServerError,
)


class _Gate:
    """This process's way to etcd, closed on purpose for a while (``etrain chaos partition``):
    every call fails as if etcd were unreachable, watches break and are not re-created, lease
    keepalives do not get through. The server and the channels are untouched."""

    def __init__(self) -> None:
        self._until = 0.0

    def close_for(self, seconds: float) -> None:
        self._until = time.monotonic() + seconds

    def open(self) -> None:
        self._until = 0.0

    def closed_s(self) -> float:
        """Seconds until the way is open again (0: open)."""
        return max(0.0, self._until - time.monotonic())


REACH = _Gate()


class _CutOff(Exception):
    """A call made while :data:`REACH` is closed."""


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """Parse ``host:port[,host:port...]`` (an ``http://`` prefix is accepted and dropped)."""
    endpoints: list[tuple[str, int]] = []
    for raw in spec.split(","):
        item = raw.strip()
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme) :]
        item = item.rstrip("/")
        host, sep, port_text = item.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ConfigError(f"--etcd: {raw.strip()!r} is not host:port")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ConfigError(f"--etcd: port {port} is out of range 1..65535")
        endpoints.append((host.strip("[]"), port))
    if not endpoints:
        raise ConfigError("--etcd: no endpoint given")
    return endpoints


def format_endpoints(endpoints: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"{host}:{port}" for host, port in endpoints)


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that starts with ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix; ``value`` is empty for deletions."""

    key: str
    value: bytes
    deleted: bool
    mod_revision: int


def _kv_from_proto(kv) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        lease=kv.lease,
    )


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a secured etcd: TLS (its CA, and a client certificate when etcd asks for
    one) and a login (user, and a file holding the password). Given to ``etrain launch`` as
    flags, it travels in the environment to every process of the job (``ETRAIN_ETCD_*``)."""

    cacert: str = ""
    cert: str = ""
    key: str = ""
    user: str | None = None
    password_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--etcd-cert and --etcd-key go together")
        if (self.cert or self.key) and not self.cacert:
            raise ConfigError("a client certificate for etcd needs --etcd-cacert")
        if bool(self.user) != bool(self.password_file):
            raise ConfigError("--etcd-user and --etcd-password-file go together")

    @classmethod
    def from_env(cls) -> EtcdSecurity:
        env = os.environ
        return cls(env.get(ENV_ETCD_CACERT, ""), env.get(ENV_ETCD_CERT, ""),
                   env.get(ENV_ETCD_KEY, ""), env.get(ENV_ETCD_USER) or None,
                   env.get(ENV_ETCD_PASSWORD_FILE, ""))  # fmt: skip

    def to_env(self) -> dict[str, str]:
        pairs = {ENV_ETCD_CACERT: self.cacert, ENV_ETCD_CERT: self.cert, ENV_ETCD_KEY: self.key,
                 ENV_ETCD_USER: self.user or "", ENV_ETCD_PASSWORD_FILE: self.password_file}
        return {name: value for name, value in pairs.items() if value}

    def _read(self, path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise ConfigError(f"{what} {path}: {exc.strerror}") from exc

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.cacert:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.cacert, "--etcd-cacert"),
            private_key=self._read(self.key, "--etcd-key") if self.key else None,
            certificate_chain=self._read(self.cert, "--etcd-cert") if self.cert else None,
        )

    def password(self) -> str | None:
        if not self.password_file:
            return None
        return self._read(self.password_file, "--etcd-password-file").decode().strip()


class EtcdClient:
    """A thread-safe etcd v3 client with retries until a per-call deadline.

    Args:
        endpoints: ``[(host, port), ...]`` of the cluster's client URLs.
        timeout: seconds one call (with its retries) may take before
            :class:`CoordinationUnavailableError` is raised.
    """

    def __init__(self, endpoints: Sequence[tuple[str, int]], timeout: float = 10.0,
                 security: EtcdSecurity | None = None) -> None:  # fmt: skip
        if not endpoints:
            raise ConfigError("EtcdClient needs at least one endpoint")
        if timeout <= 0:
            raise ConfigError(f"EtcdClient timeout must be > 0, got {timeout}")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        # Each RPC gets at most this long; the retry loop spans ``timeout``.
        self._rpc_timeout = min(timeout, ETCD_REQUEST_TIMEOUT_S)
        security = security or EtcdSecurity()
        transport = security.channel_credentials()
        try:
            self._client = pyetcd.MultiEndpointEtcd3Client(
                endpoints=[
                    pyetcd.Endpoint(host, port, secure=transport is not None, creds=transport,
                                    time_retry=FAILED_MEMBER_RETRY_S, opts=_CHANNEL_OPTIONS)
                    for host, port in endpoints
                ],
                timeout=self._rpc_timeout,
                failover=len(endpoints) > 1,
                user=security.user, password=security.password(),
            )  # fmt: skip
        except grpc.RpcError as exc:  # authentication happens at construction
            raise CoordinationUnavailableError(
                f"etcd at {format_endpoints(self.endpoints)} refused the login of "
                f"{security.user!r}: {exc.code().name}") from exc  # fmt: skip
        self._lock = threading.Lock()
        self._security = security
        self.closed = False

    @classmethod
    def from_spec(cls, spec: str, timeout: float = 10.0) -> EtcdClient:
        """A client of ``host:port[,host:port]``, with the TLS and login this process was
        given (:meth:`EtcdSecurity.from_env`)."""
        return cls(parse_endpoints(spec), timeout=timeout, security=EtcdSecurity.from_env())

    @property
    def endpoint_spec(self) -> str:
        return format_endpoints(self.endpoints)

    @property
    def raw(self) -> pyetcd.MultiEndpointEtcd3Client:
        """The wrapped client, for transactions built by callers in this package."""
        return self._client

    def close(self) -> None:
        self.closed = True  # watches on it end; a call raises instead of using a closed channel
        try:
            self._client.close()
        except Exception:  # closing a half-dead channel must not mask the caller's error
            logger.debug("closing the etcd client failed", exc_info=True)

    # -- retry core ---------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[[], object], timeout: float | None = None):
        """Run ``fn`` against etcd, retrying transient failures until the deadline."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.05
        while True:
            if self.closed:
                raise CoordinationUnavailableError(f"etcd {what}: the client is closed")
            member_failed = True
            member = in_use(self._client)
            try:
                if REACH.closed_s() > 0:
                    raise _CutOff("cut off from etcd on purpose")
                return fn()
            except _CutOff as exc:  # not the member's fault: no failover
                last = exc
                member_failed = False
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in _TRANSIENT_CODES:
                    raise CoordinationUnavailableError(f"etcd {what} failed: {code}") from exc
                last: Exception = exc
            except _TRANSIENT_ERRORS as exc:
                last = exc
            except ValueError as exc:  # pyetcd raises this while an endpoint is marked failed
                last = exc
            if member_failed and fail_over(self._client, member) and time.monotonic() < deadline:
                continue  # another member is tried at once
            if time.monotonic() + delay > deadline:
                raise CoordinationUnavailableError(
                    f"etcd at {self.endpoint_spec} did not answer ({what}): {last}"
                ) from last
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            self._reset_failed_endpoints()

    def _reset_failed_endpoints(self) -> None:
        retry_failed_members(self._client)

    # -- key/value ------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        def op():
            resp = self._client.get_response(key)
            return _kv_from_proto(resp.kvs[0]) if resp.count else None

        return self.call(f"get {key}", op)

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` (sorted by key) and the store revision they were read at."""

        def op():
            resp = self._client.get_range_response(
                _as_bytes(prefix), prefix_range_end(_as_bytes(prefix)), sort_order="ascend"
            )
            return [_kv_from_proto(kv) for kv in resp.kvs], resp.header.revision

        return self.call(f"get prefix {prefix}", op)

    def get_range(self, start: str, end: str) -> tuple[list[KeyValue], int]:
        """Keys in ``[start, end)`` and the revision they were read at."""

        def op():
            resp = self._client.get_range_response(_as_bytes(start), _as_bytes(end),
                                                   sort_order="ascend")  # fmt: skip
            return [_kv_from_proto(kv) for kv in resp.kvs], resp.header.revision

        return self.call(f"get range {start}", op)

    def watch_keys(self, keys: Sequence[str], on_events: Callable[[list[WatchEvent] | None], None],
                   start_revision: int) -> Callable[[], None]:  # fmt: skip
        """Watch exact ``keys`` from ``start_revision`` on the process's one watch stream to
        this etcd (no thread or stream of its own: for short waits, many at once).
        ``on_events(None)`` if the stream breaks: the caller reads the keys again. Returns
        the cancel function."""

        def deliver(events: list | None) -> None:
            if events is None or REACH.closed_s() > 0:
                on_events(None)
                return
            on_events([WatchEvent(key=ev.kv.key.decode(), value=bytes(ev.kv.value),
                                  deleted=ev.type == ev.DELETE, mod_revision=ev.kv.mod_revision)
                       for ev in events])  # fmt: skip

        stream = _shared_watches(self.endpoints, self.timeout, self._security)
        if REACH.closed_s() > 0:
            raise CoordinationUnavailableError("cut off from etcd on purpose")
        watches = [stream.add(_as_bytes(key), start_revision, deliver) for key in keys]

        def cancel() -> None:
            for watch in watches:
                stream.cancel(watch)

        return cancel

    def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (no values travel)."""

        def op():
            request = pyetcd.etcdrpc.RangeRequest(
                key=_as_bytes(prefix), range_end=prefix_range_end(_as_bytes(prefix)),
                count_only=True)  # fmt: skip
            return int(self._client.kvstub.Range(request, self._rpc_timeout,
                                                 credentials=self._client.call_credentials,
                                                 metadata=self._client.metadata).count)

        return self.call(f"count prefix {prefix}", op)

    def created_before(self, prefix: str, revision: int) -> tuple[KeyValue | None, int]:
        """The key under ``prefix`` created last before ``revision`` (None: none was), and
        the revision it was read at."""

        def op():
            request = pyetcd.etcdrpc.RangeRequest(
                key=_as_bytes(prefix), range_end=prefix_range_end(_as_bytes(prefix)), limit=1,
                max_create_revision=revision - 1,
                sort_order=pyetcd.etcdrpc.RangeRequest.DESCEND,
                sort_target=pyetcd.etcdrpc.RangeRequest.CREATE)  # fmt: skip
            resp = self._client.kvstub.Range(request, self._rpc_timeout,
                                             credentials=self._client.call_credentials,
                                             metadata=self._client.metadata)  # fmt: skip
            return (_kv_from_proto(resp.kvs[0]) if resp.kvs else None), resp.header.revision

        if revision <= 1:  # (a max_create_revision of 0 is no bound at all)
            return None, revision
        return self.call(f"created before {revision} under {prefix}", op)

    def create_with(self, key: str, value: str | bytes, also: dict[str, str | bytes]
                    ) -> tuple[bool, KeyValue | None]:  # fmt: skip
        """Write ``key`` only if it does not exist, and ``also`` (key -> value) with it, in one
        transaction. Returns (created, the key as it is now)."""
        txn = self._client.transactions

        def op():
            return self._client.transaction(
                compare=[txn.create(key) == 0],
                success=[txn.put(key, value)] + [txn.put(k, v) for k, v in also.items()],
                failure=[txn.get(key)],
            )

        ok, responses = self.call(f"create {key}", op)
        if ok:
            return True, None
        found = responses[-1]
        if not found:
            return False, None
        raw_value, meta = found[0]
        return False, KeyValue(key=key, value=bytes(raw_value),
                               create_revision=meta.create_revision,
                               mod_revision=meta.mod_revision, version=meta.version,
                               lease=meta.lease_id)  # fmt: skip

    def put(self, key: str, value: str | bytes, lease: int | None = None,
            timeout: float | None = None) -> int:  # fmt: skip
        """Write unconditionally; returns the new revision."""
        resp = self.call(f"put {key}", lambda: self._client.put(key, value, lease=lease),
                         timeout=timeout)  # fmt: skip
        return resp.header.revision

    def create(self, key: str, value: str | bytes, lease: int | None = None) -> bool:
        """Write only if ``key`` does not exist; True if this call created it."""
        txn = self._client.transactions
        ok, _ = self.call(
            f"create {key}",
            lambda: self._client.transaction(
                compare=[txn.create(key) == 0],
                success=[txn.put(key, value, lease=lease)],
                failure=[],
            ),
        )
        return bool(ok)

    def compare_and_swap(
        self, key: str, value: str | bytes, mod_revision: int, lease: int | None = None,
        unchanged: Mapping[str, int] | None = None,
    ) -> tuple[bool, KeyValue | None]:
        """Write ``value`` if the key's ``mod_revision`` still equals the given one and each
        key of ``unchanged`` still has its given mod revision (0: still absent).

        ``mod_revision == 0`` means "only if absent". Returns ``(written, current)``, read in
        the same transaction: the key as written, or the winner's value on a lost race
        (``None`` if the key does not exist). A refusal with ``current`` still at
        ``mod_revision`` means a key of ``unchanged`` moved.
        """
        txn = self._client.transactions
        compare = [txn.create(key) == 0] if mod_revision == 0 else [txn.mod(key) == mod_revision]
        for other, revision in (unchanged or {}).items():
            compare.append(txn.create(other) == 0 if revision == 0 else txn.mod(other) == revision)

        def op():
            return self._client.transaction(
                compare=compare,
                success=[txn.put(key, value, lease=lease), txn.get(key)],
                failure=[txn.get(key)],
            )

        ok, responses = self.call(f"compare-and-swap {key}", op)
        found = responses[-1]
        if not found:
            return bool(ok), None
        raw_value, meta = found[0]
        return bool(ok), KeyValue(
            key=key,
            value=bytes(raw_value),
            create_revision=meta.create_revision,
            mod_revision=meta.mod_revision,
            version=meta.version,
            lease=meta.lease_id,
        )

    def delete(self, key: str) -> bool:
        return bool(self.call(f"delete {key}", lambda: self._client.delete(key)))

    def delete_range(self, start: str, end: str) -> int:
        """Delete keys in ``[start, end)``."""

        def op():
            request = self._client._build_delete_request(_as_bytes(start), _as_bytes(end))
            return self._client.kvstub.DeleteRange(request, self._rpc_timeout)

        return int(self.call(f"delete range {start}", op).deleted)

    def delete_prefix(self, prefix: str) -> int:
        resp = self.call(f"delete prefix {prefix}", lambda: self._client.delete_prefix(prefix))
        return int(resp.deleted)

    def delete_prefix_if_unchanged(self, prefix: str, guard_key: str, mod_revision: int) -> bool:
        """Delete everything under ``prefix`` if ``guard_key`` still has ``mod_revision``
        (0: still absent). True if deleted."""
        txn = self._client.transactions
        guard = (
            txn.create(guard_key) == 0 if mod_revision == 0 else txn.mod(guard_key) == mod_revision
        )
        end = prefix_range_end(_as_bytes(prefix))

        def op():
            ok, _ = self._client.transaction(
                compare=[guard], success=[txn.delete(_as_bytes(prefix), range_end=end)], failure=[]
            )
            return ok

        return bool(self.call(f"delete prefix {prefix}", op))

    def revision(self) -> int:
        """The store's current revision."""
        return self.call("revision", lambda: self._client.get_response("/").header.revision)

    # -- leases ---------------------------------------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        lease = self.call("lease grant", lambda: self._client.lease(ttl))
        return int(lease.id)

    def refresh_lease(self, lease_id: int, timeout: float | None = None) -> int:
        """Refresh once, giving up after ``timeout`` (default: one RPC's); returns the
        remaining TTL (0 or less: the lease is gone)."""
        limit = self._rpc_timeout if timeout is None else timeout

        def op():
            request = iter([pyetcd.etcdrpc.LeaseKeepAliveRequest(ID=lease_id)])
            responses = list(self._client.leasestub.LeaseKeepAlive(
                request, limit, credentials=self._client.call_credentials,
                metadata=self._client.metadata))  # fmt: skip
            return responses[0].TTL if responses else 0

        return int(self.call("lease keepalive", op, timeout=limit))

    def revoke_lease(self, lease_id: int) -> None:
        try:
            self.call("lease revoke", lambda: self._client.revoke_lease(lease_id), timeout=2.0)
        except CoordinationUnavailableError:
            logger.debug("lease %x not revoked (etcd unreachable); it will expire", lease_id)

    # -- watches --------------------------------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        on_events: Callable[[list[WatchEvent]], None],
        start_revision: int | None = None,
    ) -> PrefixWatch:
        watch = PrefixWatch(self, prefix, on_events, start_revision)
        watch.start()
        return watch


_shared: dict[tuple, WatchStream] = {}
_shared_lock = threading.Lock()


def _shared_watches(endpoints: Sequence[tuple[str, int]], timeout: float,
                    security: EtcdSecurity) -> WatchStream:  # fmt: skip
    """The process's one stream for :meth:`EtcdClient.watch_keys` to this etcd (made at first
    use, on a client of its own, kept for the process)."""
    key = (tuple(endpoints), security)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = WatchStream(EtcdClient(endpoints, timeout=timeout,
                                                  security=security).raw)  # fmt: skip
        return _shared[key]


class LeaseKeeper:
    """Keeps one etcd lease alive from a daemon thread.

    From the keeper thread: ``on_lost`` once, when etcd answers that the lease no longer
    exists (its keys are gone: the other nodes consider this one dead). ``on_unconfirmed``,
    with the seconds since the last refresh that got through, at every failed refresh once a
    quarter of the TTL has passed without one (a refresh every sixth of the TTL, each given a
    sixth): etcd may be down for everyone (it then extends every lease when it comes back) or
    this node cut off from it (then the lease runs out after the TTL); the caller tells
    which. ``on_confirmed`` when a refresh gets through again.
    """

    def __init__(
        self,
        client: EtcdClient,
        ttl: int,
        on_lost: Callable[[], None] | None = None,
        on_unconfirmed: Callable[[float], None] | None = None,
        on_confirmed: Callable[[], None] | None = None,
    ) -> None:
        if ttl < 1:
            raise ConfigError(f"lease TTL must be >= 1 s, got {ttl}")
        self._client = client
        self.ttl = ttl
        self._on_lost = on_lost
        self._on_unconfirmed = on_unconfirmed
        self._on_confirmed = on_confirmed
        self._stop = threading.Event()
        self.lease_id = client.grant_lease(ttl)
        self.lost = False
        self.last_ok = time.monotonic()  # the last refresh that got through
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-lease-{self.lease_id:x}", daemon=True
        )
        self._thread.start()

    @property
    def unconfirmed_s(self) -> float:
        """Seconds since a refresh last got through."""
        return time.monotonic() - self.last_ok

    def refresh(self) -> bool | None:
        """One refresh now: True if it got through, False if etcd says the lease is gone,
        None if etcd did not answer."""
        try:
            remaining = self._client.refresh_lease(self.lease_id, timeout=max(self.ttl / 6, 0.2))
        except CoordinationUnavailableError:
            return None
        if remaining <= 0:
            return False
        self.last_ok = time.monotonic()
        return True

    def _run(self) -> None:
        interval = max(self.ttl / 6.0, 0.2)
        unconfirmed = False
        while not self._stop.wait(interval):
            outcome = self.refresh()
            if outcome is False:
                self._mark_lost("etcd reports the lease expired")
                return
            if outcome:
                if unconfirmed and self._on_confirmed is not None:
                    self._on_confirmed()
                unconfirmed = False
                continue
            waited = self.unconfirmed_s
            if waited > self.ttl / 4 and self._on_unconfirmed is not None:
                unconfirmed = True
                self._on_unconfirmed(waited)
            elif waited > self.ttl and self._on_unconfirmed is None:
                self._mark_lost("no keepalive reached etcd within the TTL")
                return

    def _mark_lost(self, why: str) -> None:
        self.lost = True
        logger.warning("lease %x lost: %s", self.lease_id, why)
        if self._on_lost is not None:
            self._on_lost()

    def close(self, revoke: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if revoke and not self.lost:
            self._client.revoke_lease(self.lease_id)


class PrefixWatch:
    """Delivers every change under a prefix, in order, surviving etcd disconnects.

    Events are handed to ``on_events`` from a background thread. After a disconnect the watch
    is re-created from the revision after the last one delivered. If that revision has been
    compacted away, ``on_events`` receives an empty list: the caller must re-read the prefix.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        on_events: Callable[[list[WatchEvent]], None],
        start_revision: int | None,
    ) -> None:
        self._client = client
        self._prefix = _as_bytes(prefix)
        self._on_events = on_events
        self._next_revision = start_revision
        self._stop = threading.Event()
        self._broken = threading.Event()
        self._watch_id: int | None = None
        self._watcher = None
        self._thread = threading.Thread(target=self._run, name=f"etcd-watch-{prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _callback(self, watcher, member: str, response) -> None:
        if watcher is not self._watcher:
            return  # a stream this watch has since replaced: its news are old
        if REACH.closed_s() > 0:  # cut off: what arrives now is never seen
            self._broken.set()
            return
        if isinstance(response, etcd_exceptions.RevisionCompactedError):
            self._next_revision = None
            self._deliver([])
            self._broken.set()
            return
        if isinstance(response, Exception):
            fail_over(self._client.raw, member)  # the member may be gone: watch on another
            self._broken.set()
            return
        events: list[WatchEvent] = []
        for ev in response.events:
            if self._next_revision is not None and ev.mod_revision < self._next_revision:
                continue  # delivered already (by a stream this watch has since replaced)
            deleted = isinstance(ev, pyetcd.events.DeleteEvent)
            events.append(
                WatchEvent(
                    key=ev.key.decode(),
                    value=b"" if deleted else bytes(ev.value),
                    deleted=deleted,
                    mod_revision=ev.mod_revision,
                )
            )
        if events:
            self._next_revision = events[-1].mod_revision + 1
            self._deliver(events)

    def _deliver(self, events: list[WatchEvent]) -> None:
        if self._stop.is_set():
            return
        try:
            self._on_events(events)
        except Exception:
            logger.exception("watch callback for %r failed", self._prefix)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            self._broken.clear()
            if self._stop.wait(REACH.closed_s()) or self._client.closed:
                return
            try:
                # One stream per watch: a broken stream then concerns this watch alone.
                raw = self._client.raw
                watcher = raw.get_watcher()
                member = in_use(raw)
                self._watcher = watcher
                kwargs = {"range_end": prefix_range_end(self._prefix)}
                if self._next_revision is not None:
                    kwargs["start_revision"] = self._next_revision
                callback = functools.partial(self._callback, watcher, member)
                self._watch_id = watcher.add_callback(self._prefix, callback, **kwargs)
                backoff = 0.05
            except (grpc.RpcError, etcd_exceptions.Etcd3Exception, ValueError) as exc:
                logger.debug("watch on %r not (re)created: %s", self._prefix, exc)
                self._close_watcher()
                if not fail_over(self._client.raw, in_use(self._client.raw)):
                    self._client._reset_failed_endpoints()
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 1.0)
                continue
            while not self._stop.is_set() and not self._broken.wait(0.2):
                if REACH.closed_s() > 0:
                    break
            self._close_watcher()
            if not self._stop.is_set():
                logger.info("watch on %r broke; re-creating it", self._prefix)

    def _close_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                watcher.close()
            except Exception:
                logger.debug("closing a watch stream failed", exc_info=True)

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
