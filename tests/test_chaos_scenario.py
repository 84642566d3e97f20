"""Scenario files and the verdicts of their runs (pure: no process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from elastictrain.cli.chaos_run import RunResult, verdict_table
from elastictrain.cli.chaos_verdict import compare_states, fault_outcomes
from elastictrain.cli.scenario import ScenarioError, load_scenario, parse_scenario

from elastictrain.events import Event

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "chaos"

GOOD = """
name = "t"
repeat = 2
[job]
script = "train.py"
args = ["--out", "{run_dir}/final.pt"]
nodes = 2
nproc_per_node = 2
[[fault]]
kind = "kill"
rank = 3
at_step = 5
[[fault]]
kind = "partition"
node = "n1"
seconds = 4
at_s = 2.5
"""


@pytest.fixture
def where(tmp_path) -> Path:
    (tmp_path / "train.py").write_text("")
    return tmp_path / "s.toml"


def test_a_scenario_is_read_with_its_faults_in_order(where):
    scenario = parse_scenario(GOOD, where)
    assert scenario.repeat == 2 and scenario.job.ranks == 4
    assert scenario.job.script == (where.parent / "train.py").resolve()
    assert [f.kind for f in scenario.faults] == ["kill", "partition"]
    assert scenario.faults[1].at_s == 2.5 and scenario.faults[1].seconds == 4.0
    assert scenario.faults[0].describe() == "kill rank 3 at step 5"


@pytest.mark.parametrize(("change", "needle"), [
    (("repeat = 2", "repeat = 0"), "repeat 0"),
    (("repeat = 2", "repeat = true"), "repeat = True: must be a int"),
    (("nodes = 2", "nodes = 0"), "job.nodes 0"),
    (("nodes = 2", "nodez = 2"), "job.nodez: unknown key"),
    (('script = "train.py"', 'script = "nope.py"'), "no such file"),
    (("rank = 3", "rank = 4"), "rank 4 is not in a job of 4 ranks"),
    (('node = "n1"', 'node = "n7"'), "node 'n7' is not one of n0, n1"),
    (("seconds = 4", "seconds = 0"), "needs seconds"),
    (("at_step = 5", "at_step = 5\nat_s = 1"), "exactly one of at_step and at_s"),
    (('kind = "kill"', 'kind = "explode"'), "fault kind 'explode'"),
    (('kind = "partition"', 'kind = "kill_agent"'), "runs the job's etcd") ,
    (("[job]", "[jobs]"), "jobs: unknown key"),
    (('args = ["--out", "{run_dir}/final.pt"]', 'args = "--out"'), "job.args: must be a list"),
    (("repeat = 2", "repeat = ["), "not TOML"),
])  # fmt: skip
def test_a_bad_scenario_is_one_line_naming_the_field(where, change, needle):
    old, new = change
    text = GOOD.replace(old, new)
    if new.startswith('kind = "kill_agent"'):
        text = text.replace('node = "n1"', 'node = "n0"')
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, where)
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_shipped_scenario_is_valid():
    paths = sorted(EXAMPLES.glob("*.toml"))
    assert {p.stem for p in paths} >= {"kill", "kill_agent", "hang", "slow", "partition",
                                       "etcd_restart", "corrupt_chunk", "disk_full", "all"}
    kinds = set()
    for path in paths:
        scenario = load_scenario(path)
        kinds |= {f.kind for f in scenario.faults}
    assert kinds == {"kill", "kill_agent", "hang", "slow", "partition", "etcd_restart",
                     "corrupt_chunk", "disk_full"}
    everything = load_scenario(EXAMPLES / "all.toml")
    assert {f.kind for f in everything.faults} == kinds and everything.repeat == 3


def _event(kind: str, at: float, **details) -> Event:
    return Event(kind, "n0", at, "", details)


def test_a_recovery_belongs_to_the_newest_fault_made_before_it():
    events = [
        _event("chaos", 100.0, fault="kill"),
        _event("worker_lost", 100.3),
        _event("recovered", 100.9, rank=3, wait_s=0.1, reform_s=0.2, agree_s=0.05,
               restore_s=0.3, first_step_s=0.2, steps_before=12, resume_step=11),
        _event("recovered", 101.0, rank=0, wait_s=0.0, reform_s=0.25, agree_s=0.04,
               restore_s=0.0, first_step_s=0.1, steps_before=12, resume_step=11),
        _event("chaos", 110.0, fault="etcd_restart"),
        _event("etcd_back", 111.0),
    ]
    kill, restart, never = fault_outcomes(
        [("kill rank 3", 100.0), ("etcd-restart", 110.0), ("hang rank 1", None)], events)
    assert kill.fired and kill.recoveries == 2 and kill.epochs == 1
    assert kill.detect_s == pytest.approx(0.3)
    assert kill.total_s == pytest.approx(1.0)
    assert kill.split == {"wait": 0.1, "reform": 0.25, "agree": 0.05, "restore": 0.3,
                          "first_step": 0.2}
    assert kill.steps_redone == 1
    assert restart.fired and restart.recoveries == 0 and restart.detect_s is None
    assert not never.fired


def test_a_fault_that_takes_two_worlds_counts_the_steps_each_redid():
    events = [  # a node cut off: the world shrinks (2 steps redone), then grows (none)
        _event("node_lost", 53.0),
        _event("recovered", 53.5, epoch=3, reform_s=0.2, steps_before=130, resume_step=128),
        _event("recovered", 53.6, epoch=3, reform_s=0.3, steps_before=129, resume_step=128),
        _event("recovered", 61.0, epoch=4, reform_s=0.9, steps_before=164, resume_step=164),
    ]
    (cut,) = fault_outcomes([("partition n1", 50.0)], events)
    assert (cut.epochs, cut.recoveries, cut.steps_redone, cut.healed) == (2, 3, 2, False)
    assert cut.split["reform"] == 0.3  # the first world's
    assert cut.total_s == pytest.approx(11.0)  # until the last world's first step


def test_states_compare_bit_for_bit_or_by_their_largest_relative_difference():
    a = {"w": torch.tensor([1.0, 2.0, 4.0]), "n": {"b": torch.tensor([3])}}
    same = compare_states({"w": a["w"].clone(), "n": {"b": torch.tensor([3])}}, a)
    assert same.identical and same.max_rel_diff == 0
    near = compare_states({"w": torch.tensor([1.0, 2.0, 4.001]), "n": a["n"]}, a)
    assert not near.identical and near.max_rel_diff == pytest.approx(0.001 / 4, rel=1e-3)
    # -0.0 and 0.0 are equal numbers but not the same bits
    signed = compare_states({"z": torch.tensor([-0.0])}, {"z": torch.tensor([0.0])})
    assert not signed.identical
    assert "only one" in compare_states({"w": a["w"]}, a).problem
    wider = compare_states({"w": a["w"].double(), "n": a["n"]}, a)
    assert "w: torch.float64[3] vs torch.float32[3]" in wider.problem


def test_the_verdict_table_has_a_row_per_fault():
    outcomes = fault_outcomes([("kill rank 3", 100.0), ("etcd-restart", 110.0)], [
        _event("worker_lost", 100.2),
        _event("recovered", 100.8, wait_s=0.1, steps_before=5, resume_step=5),
    ])
    ok = RunResult("run1", outcomes, difference=compare_states({"w": torch.ones(1)},
                                                               {"w": torch.ones(1)}))  # fmt: skip
    bad = RunResult("run2", outcomes, problem="node n1 exited 1")
    table = verdict_table([ok, bad]).splitlines()
    assert len(table) == 2 + 4
    assert "| run1 | kill rank 3 | yes | 0.20 |" in table[2] and "bit-identical" in table[2]
    assert "| etcd-restart | rode it out |" in table[3]
    assert "| run2 | kill rank 3 | no |" in table[4] and "node n1 exited 1" in table[4]
