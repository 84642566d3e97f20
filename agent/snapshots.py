"""The agent's side of snapshots: hold records, announce complete steps, commit in etcd.

A step is *committed* when every participant of the current round holds complete records of
all its local ranks for it: each agent writes ``snap/done/<step>/<node>`` once its local ranks
are done, and whoever then sees all participants there raises ``ctl/snapshot`` to that step (a
compare-and-set that only moves forward). Every agent watches ``ctl/snapshot`` and frees what
the retention plan says. etcd I/O runs on one background thread so ``EndSnapshot`` returns at
once.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Collection

from elastictrain.coord.etcd import EtcdClient
from elastictrain.coord.keys import JobKeys
from elastictrain.errors import CoordinationUnavailableError
from elastictrain.snapshot.memory_store import Record, SnapshotStore

logger = logging.getLogger(__name__)


def committable(done_nodes: Collection[str], participants: Collection[str]) -> bool:
    """Pure commit rule: every participant has announced the step."""
    return bool(participants) and set(participants) <= set(done_nodes)


class SnapshotCoordinator:
    """Bridges the local :class:`SnapshotStore` and the job's commit state in etcd."""

    def __init__(
        self,
        client: EtcdClient,
        keys: JobKeys,
        node_id: str,
        store: SnapshotStore,
        round_members: Callable[[], tuple[frozenset[str], frozenset[int]]],
    ) -> None:
        self._client = client
        self._keys = keys
        self._node_id = node_id
        self.store = store
        self._round_members = round_members  # (participant node ids, local global ranks)
        self._announced: set[int] = set()
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="snapshot-commit", daemon=True)
        self._thread.start()

    # -- called from gRPC threads ---------------------------------------------------------------

    def begin(self, rank: int, step: int, nbytes: int) -> Record:
        return self.store.begin(rank, step, nbytes)

    def end(self, rank: int, step: int, meta: bytes, checksum: int) -> bool:
        self.store.end(rank, step, meta, checksum)
        self._queue.put(step)
        committed = self.store.committed
        return committed is not None and committed >= step

    # -- called from the watch thread ----------------------------------------------------------

    def on_committed(self, value: bytes) -> None:
        step = int(json.loads(value)["step"])
        self.store.mark_committed(step)
        self._announced = {s for s in self._announced if s > step}

    # -- background -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            step = self._queue.get()
            if step is None:
                return
            try:
                self._announce_if_complete(step)
            except CoordinationUnavailableError as exc:
                logger.warning("snapshot step %d not announced: %s", step, exc)
            except Exception:
                logger.exception("snapshot step %d not announced", step)

    def _announce_if_complete(self, step: int) -> None:
        participants, local_ranks = self._round_members()
        if step in self._announced or not local_ranks:
            return
        if step not in self.store.complete_steps(local_ranks):
            return
        self._client.put(self._keys.snapshot_done(step, self._node_id), b"1")
        self._announced.add(step)
        kvs, _ = self._client.get_prefix(self._keys.snapshot_done(step))
        done = {kv.key.rsplit("/", 1)[-1] for kv in kvs}
        if committable(done, participants):
            self._commit(step, sorted(participants))

    def _commit(self, step: int, nodes: list[str]) -> None:
        key = self._keys.snapshot_committed
        value = json.dumps({"step": step, "nodes": nodes})
        while True:
            current = self._client.get(key)
            if current is not None and int(json.loads(current.value)["step"]) >= step:
                return
            written, _ = self._client.compare_and_swap(
                key, value, current.mod_revision if current else 0
            )
            if written:
                logger.debug("snapshot step %d committed", step)
                # announcements of older steps are no longer needed
                self._client.delete_range(
                    self._keys.snapshot_done_prefix, self._keys.snapshot_done(step)
                )
                return

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self.store.close()
