"""Jobs on this machine that run on an embedded etcd: where to find their etcd.

The agent that starts the embedded etcd writes ``<runtime dir>/<job>/etcd.json``; other local
agents of the same job, ``etrain status`` and ``etrain chaos`` read it. The file is removed
when that agent stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elastictrain import constants
from elastictrain.coord.keys import validate_name
from elastictrain.errors import ConfigError, JobNotFoundError
from elastictrain.leftovers import pid_alive


@dataclass(frozen=True)
class LocalJob:
    job_id: str
    etcd: str
    owner_pid: int


def private_runtime_dir() -> Path:
    """The runtime directory, made mode 0700 if missing; one that another user owns or that
    others may write is refused (its files say where a job's etcd is)."""
    root = Path(constants.runtime_dir())
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
    except OSError as exc:
        raise ConfigError(f"runtime directory {root}: {exc.strerror}") from exc
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ConfigError(f"runtime directory {root} must be yours and writable by you only: "
                          f"it is owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}")
    return root


def job_dir(job_id: str) -> Path:
    """This machine's private directory of one job (made mode 0700)."""
    path = private_runtime_dir() / validate_name("job id", job_id)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _job_file(job_id: str) -> Path:
    return private_runtime_dir() / validate_name("job id", job_id) / "etcd.json"


@contextlib.contextmanager
def exclusive(job_id: str) -> Iterator[None]:
    """Serialises "find or start the job's embedded etcd" among local agents of one job, so two
    launches started together do not both start one."""
    path = _job_file(job_id).with_name("lock")
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(job_id: str, etcd: str) -> Path:
    path = _job_file(job_id)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job_id": job_id, "etcd": etcd, "owner_pid": os.getpid()}))
    tmp.replace(path)
    return path


def withdraw(job_id: str) -> None:
    path = _job_file(job_id)
    try:
        data = json.loads(path.read_text())
        if data.get("owner_pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def find(job_id: str) -> LocalJob | None:
    """The local job's embedded etcd, if its owning agent is still alive."""
    path = _job_file(job_id)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    job = LocalJob(job_id=data["job_id"], etcd=data["etcd"], owner_pid=int(data["owner_pid"]))
    return job if pid_alive(job.owner_pid) else None


def list_local() -> list[LocalJob]:
    root = Path(constants.runtime_dir())
    if not root.is_dir():
        return []
    jobs = [find(entry.name) for entry in sorted(root.iterdir()) if entry.is_dir()]
    return [job for job in jobs if job is not None]


def use_credentials(job_id: str, explicit: str | None) -> str | None:
    """Point this process's agent clients at the job's credentials: ``explicit``
    (--credentials), else those it was handed, else the local job's; None: none found (a job
    run with --insecure)."""
    from elastictrain.credentials import JobCredentials

    if explicit:
        directory = JobCredentials.load(os.path.abspath(explicit)).directory
    elif os.environ.get(constants.ENV_CREDENTIALS):
        return os.environ[constants.ENV_CREDENTIALS]
    else:
        local = Path(constants.runtime_dir()) / validate_name("job id", job_id) / "credentials"
        if not local.joinpath("token").exists():
            return None
        directory = JobCredentials.load(local).directory
    os.environ[constants.ENV_CREDENTIALS] = directory
    return directory


def resolve_etcd(etcd: str | None, job_id: str | None) -> tuple[str, str]:
    """``(etcd endpoint, job id)`` for a command that talks to a running job.

    With ``--etcd`` the job id defaults to the default id. Without it, the job's embedded etcd
    is looked up locally; with no job id either, the one local job is taken.
    """
    if job_id is not None:
        from elastictrain.coord.keys import validate_name

        validate_name("job id", job_id)
    if etcd:
        return etcd, job_id or constants.DEFAULT_JOB_ID
    if job_id:
        job = find(job_id)
        if job is None:
            raise JobNotFoundError(
                f"no running local job {job_id!r} (and no --etcd given to look elsewhere)"
            )
        return job.etcd, job.job_id
    jobs = list_local()
    if not jobs:
        raise JobNotFoundError("no running local job found; pass --etcd and --job-id")
    if len(jobs) > 1:
        names = ", ".join(j.job_id for j in jobs)
        raise ConfigError(f"several local jobs are running ({names}); pick one with --job-id")
    return jobs[0].etcd, jobs[0].job_id
