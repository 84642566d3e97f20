"""Fault scenarios (``etrain chaos run SCENARIO.toml``): the file format, read and checked.

A scenario names a job, a schedule of faults and how often to run it::

    name = "kill a worker"
    repeat = 3
    max_rel_diff = 0.0            # 0: the final state must be bit-identical
    timeout_s = 300               # one run, start to end

    [job]
    script = "../train_job.py"    # relative to the scenario file
    args = ["--steps", "60", "--out", "{run_dir}/final.pt"]
    result = "final.pt"           # written by the script, relative to the run's directory
    nodes = 2
    nproc_per_node = 2
    hot_spares = 1
    launch_args = ["--hang-timeout", "3"]
    disk_mb = 0                   # > 0: each node's disk tier on a tmpfs of this size

    [[fault]]
    kind = "kill"                 # kill, kill_agent, hang, slow, partition, etcd_restart,
    rank = 3                      # corrupt_chunk, disk_full
    at_step = 20                  # or at_s = 5.0 (seconds after the first step)

Everything is checked here, before any process starts: a mistake is one line naming the
field. ``{run_dir}`` in the job's arguments is each run's own directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from elastictrain.errors import ConfigError

FAULT_KINDS = ("kill", "kill_agent", "hang", "slow", "partition", "etcd_restart",
               "corrupt_chunk", "disk_full")  # fmt: skip
RANK_FAULTS = ("kill", "hang", "slow")
NODE_FAULTS = ("kill_agent", "partition", "corrupt_chunk", "disk_full")
TIMED_FAULTS = ("hang", "partition", "disk_full")  # they need seconds
ETCD_NODE = 0  # the first node runs the job's embedded etcd
MAX_REPEAT = 100


class ScenarioError(ConfigError):
    """A scenario file that cannot be run as written."""


def node_name(index: int) -> str:
    return f"n{index}"


@dataclass(frozen=True)
class JobSpec:
    script: Path
    args: tuple[str, ...] = ()
    result: str = "final.pt"
    nodes: int = 2
    nproc_per_node: int = 2
    hot_spares: int = 1
    launch_args: tuple[str, ...] = ()
    disk_mb: int = 0

    def __post_init__(self) -> None:
        if not self.script.is_file():
            raise ScenarioError(f"job.script {self.script}: no such file")
        if not 1 <= self.nodes <= 16:
            raise ScenarioError(f"job.nodes {self.nodes}: must be in [1, 16]")
        if not 1 <= self.nproc_per_node <= 64:
            raise ScenarioError(f"job.nproc_per_node {self.nproc_per_node}: must be in [1, 64]")
        if not 0 <= self.hot_spares <= 8:
            raise ScenarioError(f"job.hot_spares {self.hot_spares}: must be in [0, 8]")
        if not 0 <= self.disk_mb <= 1 << 16:
            raise ScenarioError(f"job.disk_mb {self.disk_mb}: must be in [0, 65536]")
        if not self.result or Path(self.result).is_absolute() or ".." in Path(self.result).parts:
            raise ScenarioError(f"job.result {self.result!r}: a path inside the run's directory")

    @property
    def ranks(self) -> int:
        return self.nodes * self.nproc_per_node


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    at_step: int | None = None
    at_s: float | None = None
    rank: int = -1
    node: str = ""
    seconds: float = 0.0
    factor: float = 0.0
    max_bytes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ScenarioError(f"fault kind {self.kind!r}: one of {', '.join(FAULT_KINDS)}")
        if (self.at_step is None) == (self.at_s is None):
            raise ScenarioError(f"fault {self.kind}: give exactly one of at_step and at_s")
        if self.at_step is not None and self.at_step < 0:
            raise ScenarioError(f"fault {self.kind}: at_step {self.at_step} must be >= 0")
        if self.at_s is not None and not (0 <= self.at_s < 86400 and math.isfinite(self.at_s)):
            raise ScenarioError(f"fault {self.kind}: at_s {self.at_s} must be in [0, 86400)")
        if self.kind in RANK_FAULTS and self.rank < 0:
            raise ScenarioError(f"fault {self.kind}: needs rank >= 0")
        if self.kind in NODE_FAULTS and not self.node:
            raise ScenarioError(f"fault {self.kind}: needs node (n0, n1, ...)")
        if self.kind in TIMED_FAULTS and not 0 < self.seconds <= 3600:
            raise ScenarioError(f"fault {self.kind}: needs seconds in (0, 3600]")
        if self.kind == "slow" and not 1 < self.factor <= 1000:
            raise ScenarioError(f"fault slow: factor {self.factor} must be in (1, 1000]")

    def describe(self) -> str:
        target = f" rank {self.rank}" if self.kind in RANK_FAULTS else (
            f" {self.node}" if self.node else "")  # fmt: skip
        when = f"step {self.at_step}" if self.at_step is not None else f"{self.at_s:g} s"
        extra = f" {self.seconds:g} s" if self.seconds else ""
        if self.kind == "slow":
            extra = f" x{self.factor:g}" + extra
        return f"{self.kind.replace('_', '-')}{target}{extra} at {when}"


@dataclass(frozen=True)
class Scenario:
    name: str
    job: JobSpec
    faults: tuple[FaultSpec, ...]
    repeat: int = 1
    max_rel_diff: float = 0.0
    timeout_s: float = 300.0
    path: Path = field(default=Path("."), compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.repeat <= MAX_REPEAT:
            raise ScenarioError(f"repeat {self.repeat}: must be in [1, {MAX_REPEAT}]")
        if not (0 <= self.max_rel_diff < 1 and math.isfinite(self.max_rel_diff)):
            raise ScenarioError(f"max_rel_diff {self.max_rel_diff}: must be in [0, 1)")
        if not 10 <= self.timeout_s <= 86400:
            raise ScenarioError(f"timeout_s {self.timeout_s}: must be in [10, 86400]")
        if not self.faults:
            raise ScenarioError("a scenario needs at least one [[fault]]")
        nodes = {node_name(i) for i in range(self.job.nodes)}
        for fault in self.faults:
            if fault.kind in RANK_FAULTS and fault.rank >= self.job.ranks:
                raise ScenarioError(f"fault {fault.kind}: rank {fault.rank} is not in a job of "
                                    f"{self.job.ranks} ranks")  # fmt: skip
            if fault.kind in NODE_FAULTS and fault.node not in nodes:
                raise ScenarioError(f"fault {fault.kind}: node {fault.node!r} is not one of "
                                    f"{', '.join(sorted(nodes))}")  # fmt: skip
            if fault.kind == "kill_agent" and fault.node == node_name(ETCD_NODE):
                raise ScenarioError(f"fault kill_agent: {fault.node} runs the job's etcd; "
                                    "kill another node")  # fmt: skip
            if fault.kind == "disk_full" and not self.job.disk_mb:
                raise ScenarioError("fault disk_full: needs job.disk_mb (a tmpfs of that size)")


_SCENARIO_KEYS = {"name", "repeat", "max_rel_diff", "timeout_s", "job", "fault"}
_JOB_KEYS = {"script", "args", "result", "nodes", "nproc_per_node", "hot_spares", "launch_args",
             "disk_mb"}  # fmt: skip
_FAULT_KEYS = {"kind", "at_step", "at_s", "rank", "node", "seconds", "factor", "max_bytes"}


def _typed(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
           default: Any = None) -> Any:  # fmt: skip
    value = table.get(key, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ScenarioError(f"{where}{key} = {value!r}: must be a {name}")
    return value


def _strings(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ScenarioError(f"{where}{key}: must be a list of strings")
    return tuple(value)


def _unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ScenarioError(f"{where}{extra[0]}: unknown key (known: {', '.join(sorted(known))})")


def parse_scenario(text: str, path: Path) -> Scenario:
    """The scenario in ``text`` (read from ``path``: relative scripts are found from there)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not TOML: {exc}") from exc
    _unknown(data, _SCENARIO_KEYS, "")
    job = data.get("job")
    if not isinstance(job, dict):
        raise ScenarioError("a scenario needs a [job] table")
    _unknown(job, _JOB_KEYS, "job.")
    script = _typed(job, "script", str, "job.")
    if not script:
        raise ScenarioError("job.script: the training script to run")
    spec = JobSpec(
        script=(path.parent / script).resolve(), args=_strings(job, "args", "job."),
        result=_typed(job, "result", str, "job.", "final.pt"),
        nodes=_typed(job, "nodes", int, "job.", 2),
        nproc_per_node=_typed(job, "nproc_per_node", int, "job.", 2),
        hot_spares=_typed(job, "hot_spares", int, "job.", 1),
        launch_args=_strings(job, "launch_args", "job."),
        disk_mb=_typed(job, "disk_mb", int, "job.", 0),
    )  # fmt: skip
    faults = data.get("fault", [])
    if not isinstance(faults, list) or not all(isinstance(f, dict) for f in faults):
        raise ScenarioError("fault: must be an array of tables ([[fault]])")
    specs = []
    for i, fault in enumerate(faults):
        where = f"fault[{i}]."
        _unknown(fault, _FAULT_KEYS, where)
        specs.append(FaultSpec(
            kind=_typed(fault, "kind", str, where, ""),
            at_step=_typed(fault, "at_step", int, where),
            at_s=_typed(fault, "at_s", float, where), rank=_typed(fault, "rank", int, where, -1),
            node=_typed(fault, "node", str, where, ""),
            seconds=_typed(fault, "seconds", float, where, 0.0),
            factor=_typed(fault, "factor", float, where, 0.0),
            max_bytes=_typed(fault, "max_bytes", int, where, 0),
        ))  # fmt: skip
    return Scenario(
        name=_typed(data, "name", str, "", path.stem), job=spec, faults=tuple(specs),
        repeat=_typed(data, "repeat", int, "", 1),
        max_rel_diff=_typed(data, "max_rel_diff", float, "", 0.0),
        timeout_s=_typed(data, "timeout_s", float, "", 300.0), path=path,
    )  # fmt: skip


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not a text file") from exc
    return parse_scenario(text, path)
