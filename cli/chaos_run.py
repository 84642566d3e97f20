"""``etrain chaos run SCENARIO.toml``: run a job fault-free once, then with its faults, and
say whether every run recovered and ended with the fault-free state.

Each run is its own job on this machine: node ``n0``'s ``etrain launch`` starts the job's
private etcd, the other nodes join it, each with its own log in the run's directory. The
runner follows the job through etcd (the nodes' status records give the step, the events give
the recoveries) and makes each fault through its owning agent, as ``etrain chaos`` does, when
the job reaches the fault's step or time. The verdicts are computed by
:mod:`cli.chaos_verdict` from the job's events and the final states.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from elastictrain import constants
from elastictrain.errors import ConfigError, ElasticTrainError

from .chaos_verdict import Difference, FaultOutcome, compare_states, fault_outcomes
from .scenario import (
    ETCD_NODE,
    MAX_REPEAT,
    FaultSpec,
    Scenario,
    ScenarioError,
    load_scenario,
    node_name,
)

logger = logging.getLogger(__name__)

ETRAIN = [sys.executable, "-m", "elastictrain.cli.main"]
_POLL_S = 0.1
_EVENTS_EVERY_S = 0.5
_FIRE_RETRY_S = 15.0  # a rank mid-recovery is not running: try again this long
_ETCD_WAIT_S = 30.0
_SPARE_WAIT_S = 20.0  # a fault that loses ranks waits this long at most for ready spares
LOSES_RANKS = frozenset({"kill", "hang", "kill_agent", "partition"})  # like --fault: they wait


def spares_ready(state, want: int) -> bool:
    """Every node that holds ranks has ``want`` hot spares ready to take one."""
    holding = [n for n in state.nodes.values() if any(w.rank >= 0 for w in n.workers)]
    return all(sum(1 for w in n.workers if w.spare) >= want for n in holding)


@dataclass
class RunResult:
    name: str
    outcomes: list[FaultOutcome] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    difference: Difference | None = None
    wall_s: float = 0.0
    problem: str = ""  # why the run did not end well ('' when it did)

    @property
    def ok(self) -> bool:
        return not self.problem


def _mount_tmpfs(path: Path, megabytes: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700",
                           "tmpfs", str(path)], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise ScenarioError(f"job.disk_mb: could not mount a {megabytes} MB tmpfs at {path} "
                            f"(needs root): {done.stderr.strip()}")  # fmt: skip


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _lateness(fault: FaultSpec, step: int, elapsed: float, shift: tuple[int, float]) -> float:
    """How far past its (shifted) step or time ``fault`` is (< 0: not due yet)."""
    if fault.at_step is not None:
        return step - (fault.at_step + shift[0])
    return elapsed - ((fault.at_s or 0.0) + shift[1])


def _shifted(fault: FaultSpec, shift: tuple[int, float], late: float) -> tuple[int, float]:
    if fault.at_step is not None:
        return shift[0] + int(late), shift[1]
    return shift[0], shift[1] + late


class _Run:
    """One run of the scenario's job, with ``faults`` (none: the reference)."""

    def __init__(self, scenario: Scenario, run_dir: Path, faults: tuple[FaultSpec, ...]) -> None:
        self.scenario = scenario
        self.job = scenario.job
        self.run_dir = run_dir
        self.faults = faults
        self.job_id = f"chaos-{uuid.uuid4().hex[:10]}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.mounts: list[Path] = []
        self.events: list = []
        self.killed: set[str] = set()  # nodes whose agent a fault kills
        self.chaos_log = run_dir / "chaos.log"

    # -- processes ------------------------------------------------------------------------------

    def _launch(self, index: int) -> None:
        node = node_name(index)
        cmd = [*ETRAIN, "launch", "--nnodes", str(self.job.nodes),
               "--nproc-per-node", str(self.job.nproc_per_node), "--job-id", self.job_id,
               "--node-id", node, "--hot-spares", str(self.job.hot_spares),
               "--max-restarts", "0"]  # fmt: skip
        if self.job.disk_mb:
            disk = self.run_dir / f"disk-{node}"
            _mount_tmpfs(disk, self.job.disk_mb)
            self.mounts.append(disk)
            cmd += ["--snapshot-dir", str(disk)]
        args = [a.replace("{run_dir}", str(self.run_dir)) for a in self.job.args]
        cmd += [*self.job.launch_args, str(self.job.script), *args]
        with open(self.run_dir / f"{node}.log", "wb") as log:
            self.procs[node] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.run_dir,
                env=self._env(), start_new_session=True,
            )  # fmt: skip

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(constants.ENV_CREDENTIALS, None)  # each run's job makes its own
        return env

    def _etcd(self) -> str:
        from elastictrain.coord import local_jobs

        deadline = time.monotonic() + _ETCD_WAIT_S
        while time.monotonic() < deadline:
            found = local_jobs.find(self.job_id)
            if found is not None:
                return found.etcd
            if self.procs[node_name(ETCD_NODE)].poll() is not None:
                break
            time.sleep(_POLL_S)
        raise ScenarioError(f"node {node_name(ETCD_NODE)} did not start the job's etcd; see "
                            f"{self.run_dir / (node_name(ETCD_NODE) + '.log')}")  # fmt: skip

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # -- faults ---------------------------------------------------------------------------------

    def _fire(self, fault: FaultSpec, etcd: str) -> str:
        """Make ``fault`` through its agent, as ``etrain chaos`` does; '' or why not."""
        from . import chaos

        ns = argparse.Namespace(etcd=etcd, job_id=self.job_id, credentials=self._credentials(),
                                rank=fault.rank, seconds=fault.seconds, node=fault.node,
                                max_bytes=fault.max_bytes, signal="SIGKILL", agent=None,
                                factor=fault.factor, off=False)  # fmt: skip
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                if fault.kind == "kill":
                    chaos.run_kill(ns)
                elif fault.kind == "kill_agent":
                    ns.agent = fault.node
                    chaos.run_kill(ns)
                elif fault.kind == "hang":
                    chaos.run_hang(ns)
                elif fault.kind == "slow":
                    chaos.run_slow(ns)
                elif fault.kind == "etcd_restart":
                    chaos.run_etcd_restart(ns)
                else:
                    ns.fault = fault.kind
                    chaos.run_node_fault(ns)
        except ElasticTrainError as exc:
            print(f"not made: {exc}", file=out)
            return str(exc)
        finally:
            os.environ.pop(constants.ENV_CREDENTIALS, None)  # this run's only
            with open(self.chaos_log, "a") as log:
                log.write(f"{time.time():.3f} {fault.describe()}: {out.getvalue().strip()}\n")
        if fault.kind == "kill_agent":
            self.killed.add(fault.node)
        return ""

    def _credentials(self) -> str | None:
        """The credentials node n0 made for this run's job (None: not yet)."""
        path = Path(constants.runtime_dir()) / self.job_id / "credentials"
        return str(path) if (path / "token").exists() else None

    def _chaos_time(self, fault: FaultSpec, after: float) -> float:
        """When the agent made it, as its ``chaos`` event says (else when it was asked)."""
        for event in self.events:
            if (event.kind == "chaos" and event.details.get("fault") == fault.kind
                    and event.time >= after - 1.0):  # fmt: skip
                return event.time
        return after

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        from elastictrain.coord.etcd import EtcdClient

        from .job_state import read_job_state
        from .status_view import pace

        self.run_dir.mkdir(parents=True, exist_ok=True)
        result = RunResult(self.run_dir.name)
        started = time.monotonic()
        client = None
        try:
            self._launch(ETCD_NODE)
            etcd = self._etcd()
            for index in range(self.job.nodes):
                if index != ETCD_NODE:
                    self._launch(index)
            client = EtcdClient.from_spec(etcd, timeout=2.0)
            pending = list(self.faults)
            asked: list[tuple[FaultSpec, float]] = []
            first_step_at: float | None = None
            retry_until: float | None = None
            waiting_since: float | None = None
            shift = (0, 0.0)  # steps, seconds: how late the faults made so far were
            next_events = 0.0
            deadline = started + self.scenario.timeout_s
            while any(p.poll() is None for p in self.procs.values()):
                now = time.monotonic()
                if now > deadline:
                    result.problem = f"timed out after {self.scenario.timeout_s:g} s"
                    break
                step, ready = -1, False
                with contextlib.suppress(ElasticTrainError):
                    state = read_job_state(client, self.job_id, etcd)
                    step = pace(state)[0]
                    ready = spares_ready(state, self.job.hot_spares)
                    if now >= next_events:
                        self.events = list(state.events)
                        next_events = now + _EVENTS_EVERY_S
                if step >= 1 and first_step_at is None:
                    first_step_at = now
                # faults due together are made back to back (a corruption, then a loss)
                while pending and first_step_at is not None:
                    fault = pending[0]
                    late = _lateness(fault, step, now - first_step_at, shift)
                    due = late >= 0
                    if due and fault.kind in LOSES_RANKS and not ready:  # spares first
                        waiting_since = waiting_since or now
                        due = now - waiting_since > _SPARE_WAIT_S
                    if not due:
                        break
                    waiting_since = None
                    asked_at = time.time()
                    why = self._fire(fault, etcd)
                    if why:
                        retry_until = retry_until or now + _FIRE_RETRY_S
                        if now <= retry_until:
                            break
                        result.problem = f"{fault.describe()} was not made: {why}"
                    else:
                        asked.append((fault, asked_at))
                        # a fault made late delays the later ones as much: they keep their
                        # distance from it (the job recovers from one before the next)
                        shift = _shifted(fault, shift, late)
                    pending.pop(0)
                    retry_until = None
                time.sleep(_POLL_S)
            self._stop_all()
            for fault in pending:
                result.problem = result.problem or f"{fault.describe()}: the job ended first"
            fired = {id(f): self._chaos_time(f, at) for f, at in asked}
            result.outcomes = fault_outcomes(
                [(f.describe(), fired.get(id(f))) for f in self.faults], self.events)
            result.exit_codes = {n: p.returncode for n, p in self.procs.items()}
            for node, code in result.exit_codes.items():
                if code != 0 and node not in self.killed and not result.problem:
                    result.problem = f"node {node} exited {code}; see its log in {self.run_dir}"
        finally:
            self._stop_all()
            if client is not None:
                client.close()
            for mount in self.mounts:
                _unmount(mount)
            # the job's credentials and etcd address on this machine: the job is over
            shutil.rmtree(Path(constants.runtime_dir()) / self.job_id, ignore_errors=True)
            result.wall_s = time.monotonic() - started
        return result

    def final_state(self):
        import torch

        path = self.run_dir / self.job.result
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict_table(results: list[RunResult]) -> str:
    """The runs' verdicts as a Markdown table (readable in a terminal, pasteable)."""
    head = ("| run | fault | recovered | detect s | wait / re-form / agree / restore / first "
            "step s | total s | steps redone | final state |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for result in results:
        if result.difference is None:
            final = result.problem or "-"
        elif result.difference.identical:
            final = "bit-identical"
        else:
            diff = result.difference
            final = diff.problem or f"max rel diff {diff.max_rel_diff:.2e}"
        for i, outcome in enumerate(result.outcomes or [FaultOutcome("-", False)]):
            if not outcome.fired:
                recovered = "not made"
            elif outcome.recoveries:
                notes = ([f"{outcome.epochs} worlds"] if outcome.epochs > 1 else []) + (
                    ["state from a peer"] if outcome.healed else [])  # fmt: skip
                recovered = "no" if not result.ok else (
                    "yes" + (f" ({', '.join(notes)})" if notes else ""))
            else:
                recovered = "rode it out" if result.ok else "no"
            split = " / ".join(_cell(outcome.split.get(k)) for k in
                               ("wait", "reform", "agree", "restore", "first_step")
                               ) if outcome.split else "-"  # fmt: skip
            lines.append(
                f"| {result.name if i == 0 else ''} | {outcome.fault} | {recovered} | "
                f"{_cell(outcome.detect_s)} | {split} | {_cell(outcome.total_s)} | "
                f"{'-' if outcome.steps_redone is None else outcome.steps_redone} | "
                f"{final if i == 0 else ''} |")  # fmt: skip
    return "\n".join(lines)


def run_scenario(scenario: Scenario, root: Path, out=sys.stdout) -> list[RunResult]:
    """The reference run, then ``scenario.repeat`` runs with the faults; their results."""
    reference_run = _Run(scenario, root / "reference", ())
    reference = reference_run.run()
    state = reference_run.final_state()
    if not reference.ok or state is None:
        why = reference.problem or f"it wrote no {scenario.job.result}"
        raise ScenarioError(f"the fault-free reference run failed: {why} (logs in "
                            f"{reference_run.run_dir})")  # fmt: skip
    print(f"reference: {reference.wall_s:.1f} s", file=out, flush=True)
    results = []
    for i in range(scenario.repeat):
        run = _Run(scenario, root / f"run{i + 1}", scenario.faults)
        result = run.run()
        final = run.final_state()
        if final is None:
            result.problem = result.problem or f"it wrote no {scenario.job.result}"
        else:
            result.difference = compare_states(final, state)
            bound = scenario.max_rel_diff
            if not result.problem and not (result.difference.identical or (
                    bound and result.difference.max_rel_diff <= bound)):  # fmt: skip
                result.problem = (result.difference.problem or
                                  f"differs from the fault-free run by "
                                  f"{result.difference.max_rel_diff:.2e} (bound {bound:g})")
        for outcome in result.outcomes:
            if outcome.fired and not result.problem and outcome.recoveries == 0 \
                    and outcome.detect_s is not None and outcome.fault.startswith("kill"):
                result.problem = f"{outcome.fault}: detected, but no rank re-formed"
        status = "ok" if result.ok else f"FAILED: {result.problem}"
        print(f"{result.name}: {result.wall_s:.1f} s, {status}", file=out, flush=True)
        results.append(result)
    return results


def run_scenario_file(path: str, repeat: int | None = None, workdir: str | None = None) -> int:
    scenario = load_scenario(path)
    if repeat is not None:
        if not 1 <= repeat <= MAX_REPEAT:
            raise ConfigError(f"--repeat {repeat}: must be in [1, {MAX_REPEAT}]")
        scenario = replace(scenario, repeat=repeat)
    root = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="etrain-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    job = scenario.job
    print(f"scenario {scenario.name!r}: {job.nodes} nodes x {job.nproc_per_node} workers, "
          f"{len(scenario.faults)} fault(s), {scenario.repeat} run(s); files in {root}",
          flush=True)  # fmt: skip
    results = run_scenario(scenario, root)
    print(verdict_table(results))
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} runs recovered with the fault-free "
          "result" + ("" if scenario.max_rel_diff == 0 else
                      f" (within {scenario.max_rel_diff:g})"))  # fmt: skip
    return 1 if failed else 0
