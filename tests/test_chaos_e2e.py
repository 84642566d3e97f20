"""``etrain chaos run`` end to end: a scenario with several fault classes on 2 real agents x 2
workers (real etcd, gloo), each fault made through its agent and recorded, the job recovered
in place, the final parameters bit-identical to the fault-free run."""

from __future__ import annotations

from pathlib import Path

import pytest
from elastictrain.cli.chaos_run import run_scenario
from elastictrain.cli.scenario import parse_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.alone]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SCENARIO = f"""
name = "ci"
repeat = 1
timeout_s = 240
[job]
script = "{EXAMPLES / 'train_job.py'}"
args = ["--steps", "90", "--step-sleep", "0.25", "--out", "{{run_dir}}/final.pt"]
launch_args = ["--node-ttl", "3", "--hang-timeout", "2"]
[[fault]]
kind = "kill"
rank = 3
at_step = 20
[[fault]]
kind = "hang"
rank = 1
seconds = 4
at_step = 30
[[fault]]
kind = "etcd_restart"
at_step = 40
[[fault]]
kind = "corrupt_chunk"
node = "n0"
seconds = 25
at_step = 50
[[fault]]
kind = "kill_agent"
node = "n1"
at_step = 50
"""


@pytest.mark.timeout(420)
def test_a_scenario_of_faults_recovers_in_place_with_the_fault_free_result(tmp_path,
                                                                           runtime_dir):
    scenario = parse_scenario(SCENARIO, tmp_path / "ci.toml")
    (result,) = run_scenario(scenario, tmp_path / "runs")
    assert result.ok, result.problem
    assert result.difference is not None and result.difference.identical
    kill, hang, restart, corrupt, kill_agent = result.outcomes
    assert all(o.fired for o in result.outcomes)
    # the killed worker is seen at once, its rank taken in place
    assert kill.detect_s is not None and kill.detect_s < 1.0
    assert kill.recoveries >= 4 and kill.steps_redone <= 1  # at most the step in flight
    # the stopped worker is declared hung once the hang timeout has passed
    assert hang.detect_s is not None and 1.5 < hang.detect_s < 4.0 and hang.recoveries >= 1
    assert restart.recoveries == 0  # ridden out
    # the lost agent's ranks are recovered by the survivors, from intact copies only
    assert kill_agent.recoveries >= 2 and kill_agent.detect_s is not None
    assert kill_agent.healed  # n0's copies of n1's records were corrupt: from a survivor
    assert corrupt.recoveries == 0
    assert result.exit_codes["n0"] == 0 and result.exit_codes["n1"] == -9
