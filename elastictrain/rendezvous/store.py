"""A c10d ``Store`` on etcd v3 transactions and watches.

Keys live under ``prefix``. Blocking reads (``get``, ``wait``) read once and, for keys still
missing, watch them from the revision after that read, so a key written in between is never
missed and nobody polls. Counters (``add``) and ``compare_set`` are compare-and-swap loops on
the key's ``mod_revision``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import grpc
import torch.distributed as dist
from pyetcd import exceptions as etcd_exceptions
from pyetcd.events import DeleteEvent

from elastictrain.coord.etcd import EtcdClient
from elastictrain.errors import CoordinationUnavailableError

logger = logging.getLogger(__name__)


def _as_bytes(value: str | bytes | bytearray | list[int]) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class StoreInterruptedError(dist.DistStoreError):
    """A blocking read gave up because its caller no longer needs it (a newer world)."""


class EtcdStore(dist.Store):
    """c10d key/value store over etcd v3 (thread-safe).

    ``interrupted``, if given, is asked while a read blocks (at least every 50 ms); when it
    returns True the read raises :class:`StoreInterruptedError`, so a process group that waits
    for a peer that will never come can be given up at once."""

    def __init__(self, client: EtcdClient, prefix: str, timeout: timedelta | None = None,
                 interrupted: Callable[[], bool] | None = None) -> None:  # fmt: skip
        super().__init__()  # the pybind trampoline needs this
        self._client = client
        self._interrupted = interrupted
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        if timeout is not None:
            self.set_timeout(timeout)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _timeout_s(self, override: timedelta | None = None) -> float:
        timeout = override if override is not None else self.timeout
        return timeout.total_seconds()

    # -- writes ---------------------------------------------------------------------------------

    def set(self, key: str, value) -> None:
        self._client.put(self._key(key), _as_bytes(value))

    def multi_set(self, keys: list[str], values: list) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def add(self, key: str, amount: int) -> int:
        full = self._key(key)
        while True:
            kv = self._client.get(full)
            revision = 0 if kv is None else kv.mod_revision
            current = 0 if kv is None else int(kv.value.decode() or "0")
            new = current + amount
            written, _ = self._client.compare_and_swap(full, str(new).encode(), revision)
            if written:
                return new

    def append(self, key: str, value) -> None:
        full = self._key(key)
        while True:
            kv = self._client.get(full)
            revision = 0 if kv is None else kv.mod_revision
            current = b"" if kv is None else kv.value
            written, _ = self._client.compare_and_swap(full, current + _as_bytes(value), revision)
            if written:
                return

    def compare_set(self, key: str, expected_value, desired_value) -> bytes:
        """c10d semantics: set if the value equals ``expected`` (an absent key matches ``b""``);
        return the value now stored, or ``expected`` if the key is absent and was not set."""
        full = self._key(key)
        expected = _as_bytes(expected_value)
        desired = _as_bytes(desired_value)
        while True:
            kv = self._client.get(full)
            if kv is None:
                if expected:
                    return expected
                written, now = self._client.compare_and_swap(full, desired, 0)
            elif kv.value == expected:
                written, now = self._client.compare_and_swap(full, desired, kv.mod_revision)
            else:
                return kv.value
            if written:
                return desired
            if now is not None and now.value != expected:
                return now.value

    def delete_key(self, key: str) -> bool:
        return self._client.delete(self._key(key))

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        return self._wait_for([key], self._timeout_s())[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        values = self._wait_for(list(keys), self._timeout_s())
        return [values[key] for key in keys]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(list(keys), self._timeout_s(timeout))

    def check(self, keys: list[str]) -> bool:
        return all(self._client.get(self._key(key)) is not None for key in keys)

    def num_keys(self) -> int:
        kvs, _ = self._client.get_prefix(self.prefix)
        return len(kvs)

    def list_keys(self) -> list[str]:
        kvs, _ = self._client.get_prefix(self.prefix)
        return [kv.key[len(self.prefix) :] for kv in kvs]

    # torch's pybind trampoline for Python stores dispatches these two C++ virtuals by their C++
    # names, so a C++ caller (``dist.PrefixStore`` -- the store the rendezvous hands out -- and
    # ProcessGroups) looks up ``getNumKeys`` / ``deleteKey``, not the Python-side names.
    def getNumKeys(self) -> int:
        return self.num_keys()

    def deleteKey(self, key: str) -> bool:
        return self.delete_key(key)

    # -- blocking core --------------------------------------------------------------------------

    def _read(self, keys: list[str]) -> tuple[dict[str, bytes], int]:
        """Read ``keys``; returns what exists and a revision no later than every read."""
        found: dict[str, bytes] = {}
        revision = self._client.revision()
        for key in keys:
            kv = self._client.get(self._key(key))
            if kv is not None:
                found[key] = kv.value
        return found, revision

    def _wait_for(self, keys: list[str], timeout_s: float) -> dict[str, bytes]:
        deadline = time.monotonic() + timeout_s
        found, revision = self._read(keys)
        missing = [key for key in keys if key not in found]
        if not missing:
            return found
        arrived: dict[str, bytes] = {}
        done = threading.Event()
        broken = threading.Event()
        lock = threading.Lock()
        by_full = {self._key(key): key for key in missing}

        def on_response(response) -> None:
            if isinstance(response, Exception):
                broken.set()
                return
            with lock:
                for ev in response.events:
                    name = by_full.get(ev.key.decode())
                    if name is None:
                        continue
                    if isinstance(ev, DeleteEvent):
                        arrived.pop(name, None)
                    else:
                        arrived[name] = bytes(ev.value)
                if len(arrived) == len(missing):
                    done.set()

        watcher = self._client.raw.get_watcher()
        try:
            try:
                for full in by_full:
                    watcher.add_callback(full, on_response, start_revision=revision + 1)
            except (grpc.RpcError, etcd_exceptions.Etcd3Exception, ValueError) as exc:
                # etcd unreachable: fall back to reading until the deadline
                logger.debug("store watch not created (%s); polling", exc)
                broken.set()
            while not done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._interrupted is not None and self._interrupted():
                    raise StoreInterruptedError(f"interrupted waiting for {missing}")
                if broken.is_set():
                    time.sleep(min(0.1, remaining))
                    try:
                        again, _ = self._read(missing)
                    except CoordinationUnavailableError:
                        continue
                    with lock:
                        arrived.update(again)
                        if len(arrived) == len(missing):
                            done.set()
                    continue
                done.wait(min(remaining, 0.5 if self._interrupted is None else 0.05))
        finally:
            try:
                watcher.close()
            except Exception:
                logger.debug("closing a store watch failed", exc_info=True)
        if not done.is_set():
            absent = [key for key in missing if key not in arrived]
            raise dist.DistStoreError(
                f"timed out after {timeout_s:.1f} s waiting for store keys {absent} "
                f"under {self.prefix}"
            )
        found.update(arrived)
        return found
