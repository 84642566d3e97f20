"""Many short watches on one etcd watch stream, their creates pipelined.

A watch of its own (:class:`~elastictrain.coord.etcd.PrefixWatch`) costs a stream and
threads, and the client library creates watches one at a time, each waiting for etcd's
answer. Where a process waits on many keys for a while (a thousand simulated agents joining a
round, say), :class:`WatchStream` sends every create at once and matches etcd's ``created``
answers to them in order, as etcd sends them (and as etcd's own Go client matches them).
A watch given a start revision misses nothing between its create and etcd's answer.

If the stream breaks, every watch on it gets ``None`` once and is gone: its owner reads its
keys again and watches anew (the next watch starts a new stream).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exceptions

from elastictrain.coord.failover import fail_over, in_use

logger = logging.getLogger(__name__)

Deliver = Callable[[list | None], None]  # etcd's events (mvccpb.Event), or None: broken


class Watch:
    """One watch on a :class:`WatchStream`; :meth:`WatchStream.cancel` ends it."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.watch_id: int | None = None  # etcd's, once created
        self.cancelled = False


class WatchStream:
    """One bidirectional watch stream to etcd through ``raw`` (a pyetcd client), started at
    the first watch and again after a break."""

    def __init__(self, raw: pyetcd.MultiEndpointEtcd3Client) -> None:
        self._raw = raw
        self._lock = threading.Lock()
        self._requests: queue.Queue | None = None
        self._pending: deque[Watch] = deque()  # created in this order, not yet answered
        self._live: dict[int, Watch] = {}

    def add(self, key: bytes, start_revision: int, deliver: Deliver,
            range_end: bytes | None = None) -> Watch:  # fmt: skip
        """Watch ``key`` (or ``[key, range_end)``) from ``start_revision`` on."""
        watch = Watch(deliver)
        create = pyetcd.etcdrpc.WatchCreateRequest(key=key, start_revision=start_revision)
        if range_end is not None:
            create.range_end = range_end
        with self._lock:
            if self._requests is None:
                self._requests = queue.Queue()
                threading.Thread(target=self._run, args=(self._requests,), daemon=True,
                                 name="etcd-watch-stream").start()  # fmt: skip
            self._pending.append(watch)
            self._requests.put(pyetcd.etcdrpc.WatchRequest(create_request=create))
        return watch

    def cancel(self, watch: Watch) -> None:
        with self._lock:
            watch.cancelled = True
            if watch.watch_id is not None and self._live.pop(watch.watch_id, None) is not None:
                self._send_cancel(watch.watch_id)

    def _send_cancel(self, watch_id: int) -> None:  # under the lock
        if self._requests is not None:
            cancel = pyetcd.etcdrpc.WatchCancelRequest(watch_id=watch_id)
            self._requests.put(pyetcd.etcdrpc.WatchRequest(cancel_request=cancel))

    def _run(self, requests: queue.Queue) -> None:
        raw = self._raw
        member = in_use(raw)
        try:
            stub = pyetcd.etcdrpc.WatchStub(raw.channel)
            member = in_use(raw)  # the channel may have moved to another member
            for response in stub.Watch(iter(requests.get, None),
                                                credentials=raw.call_credentials,
                                                metadata=raw.metadata):  # fmt: skip
                target = None
                with self._lock:
                    if response.created:
                        if not self._pending:
                            logger.warning("etcd confirmed a watch nobody asked for")
                            continue
                        watch = self._pending.popleft()
                        watch.watch_id = response.watch_id
                        if watch.cancelled:
                            self._send_cancel(response.watch_id)
                        elif response.canceled:  # refused (a compacted start revision)
                            target = watch
                        else:
                            self._live[response.watch_id] = watch
                    elif response.canceled:
                        target = self._live.pop(response.watch_id, None)
                    else:
                        target = self._live.get(response.watch_id)
                if target is not None:
                    target.deliver(None if response.canceled else list(response.events))
        except (grpc.RpcError, ValueError, etcd_exceptions.Etcd3Exception) as exc:
            # ValueError, Etcd3Exception: no member to use now
            logger.debug("the shared watch stream broke: %s", exc)
            fail_over(raw, member)  # the next stream goes to another member, if there is one
        finally:
            with self._lock:
                dead = [*self._pending, *self._live.values()]
                self._pending.clear()
                self._live.clear()
                if self._requests is requests:
                    self._requests = None
                requests.put(None)
            for watch in dead:
                if not watch.cancelled:
                    watch.deliver(None)
