"""The key layout of one job in etcd; every key the project writes is built here."""

from __future__ import annotations

from dataclasses import dataclass

from elastictrain import constants
from elastictrain.errors import ConfigError

_ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def validate_name(kind: str, name: str) -> str:
    if not name or not set(name) <= _ALLOWED or len(name) > 128:
        raise ConfigError(
            f"{kind} {name!r} must be 1-128 characters of letters, digits, '-', '_' or '.'"
        )
    return name


@dataclass(frozen=True)
class JobKeys:
    """``/etrain/<job>/...``: nodes (leased), rendezvous state, c10d store, restart signal."""

    job_id: str

    def __post_init__(self) -> None:
        validate_name("job id", self.job_id)

    @property
    def root(self) -> str:
        return f"{constants.KEY_ROOT}/{self.job_id}/"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.root}nodes/"

    def node(self, node_id: str) -> str:
        return f"{self.nodes_prefix}{node_id}"

    @property
    def store_prefix(self) -> str:
        return f"{self.root}store/"

    # -- the join (:mod:`elastictrain.rendezvous.join`) -----------------------------------------

    @property
    def join_prefix(self) -> str:
        return f"{self.root}join/"

    @property
    def join_last(self) -> str:
        """The number of the newest round that formed (or was closed)."""
        return f"{self.join_prefix}last"

    @property
    def join_closed(self) -> str:
        """Set once: the job takes no more rounds."""
        return f"{self.join_prefix}closed"

    def join_nodes(self, round_number: int) -> str:
        """Each joiner's key in a round, leased: the prefix."""
        return f"{self.join_prefix}{round_number:010d}/nodes/"

    def join_node(self, round_number: int, node_id: str) -> str:
        return f"{self.join_nodes(round_number)}{validate_name('node id', node_id)}"

    def join_result(self, round_number: int) -> str:
        """Written once per round by its closer (or by closing the job): who is in it."""
        return f"{self.join_prefix}{round_number:010d}/result"

    def join_store(self, round_number: int) -> str:
        """The c10d store of a round's agents."""
        return f"{self.join_prefix}{round_number:010d}/store/"

    @property
    def control_prefix(self) -> str:
        """Low-traffic keys every agent watches: restart requests, the outcome, round progress."""
        return f"{self.root}ctl/"

    @property
    def restart_signal(self) -> str:
        """Rewritten by an agent whose workers failed: every agent restarts its group."""
        return f"{self.control_prefix}restart"

    @property
    def outcome(self) -> str:
        """The job's final failure, written once by the agent that ends it."""
        return f"{self.control_prefix}outcome"

    @property
    def rounds_prefix(self) -> str:
        return f"{self.control_prefix}rounds/"

    def round_done(self, round_id: str, node_id: str) -> str:
        return f"{self.rounds_prefix}{round_id}/done/{node_id}"

    def round_left(self, round_id: str) -> str:
        """Set when a round's nodes leave it for a rendezvous: nobody joins it in place."""
        return f"{self.rounds_prefix}{round_id}/left"

    def drain(self, node_id: str) -> str:
        """``{"by": ...}``: the node is asked to leave the job (``etrain drain``)."""
        return f"{self.control_prefix}drain/{validate_name('node id', node_id)}"

    @property
    def snapshot_committed(self) -> str:
        """``{"step": s, ...}``: the newest snapshot every node has stored."""
        return f"{self.control_prefix}snapshot"

    @property
    def job_ca(self) -> str:
        """The fingerprint of the CA the job's agents use ("insecure": none), set by the first."""
        return f"{self.control_prefix}ca"

    @property
    def world(self) -> str:
        """The round's in-place world (who holds which rank), moved forward by CAS."""
        return f"{self.control_prefix}world"

    @property
    def events_prefix(self) -> str:
        """Versioned event records (:mod:`elastictrain.events`), ordered by creation."""
        return f"{self.root}events/"

    def event(self, node_id: str, writer: str, seq: int) -> str:
        return f"{self.events_prefix}{node_id}/{writer}/{seq:010d}"

    @property
    def status_prefix(self) -> str:
        """Each node's status record (:mod:`elastictrain.node_status`), leased."""
        return f"{self.root}status/"

    def node_status(self, node_id: str) -> str:
        return f"{self.status_prefix}{node_id}"

    @property
    def snapshot_done_prefix(self) -> str:
        return f"{self.root}snap/done/"

    @property
    def snapshot_fence(self) -> str:
        """Moved by a node before it drops uncommitted steps: done marks older than its last
        move do not count, and a commit fails if it moved meanwhile."""
        return f"{self.root}snap/fence"

    def snapshot_done(self, step: int, node_id: str = "") -> str:
        """A node that holds every local rank's record of ``step`` (prefix without a node)."""
        return f"{self.snapshot_done_prefix}{step:012d}/{node_id}"
