"""The ``Job`` API on real gloo process groups: the results do not depend on the world."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from elastictrain.errors import ConfigError
from elastictrain.train.data_plan import DataPlan, derive_seed, plan_hosting

pytestmark = pytest.mark.timeout(180)


def _train(tmp_path, world: int, *args: str) -> dict:
    out = tmp_path / f"w{world}-{'-'.join(args) or 'default'}.pt"
    import job_train

    argv = ["--out", str(out), *args]
    mp.start_processes(job_train.run, args=(world, str(tmp_path / f"store-{out.stem}"), argv),
                       nprocs=world, start_method="spawn")  # fmt: skip
    return torch.load(out)


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


@pytest.mark.contract
def test_deterministic_reduction_is_bit_identical_at_any_world_size(tmp_path):
    one = _train(tmp_path, 1)
    for world in (2, 3):
        other = _train(tmp_path, world)
        assert _identical(other["params"], one["params"]), f"world {world} differs"
        assert other["losses"] == one["losses"]


@pytest.mark.contract
def test_fast_reduction_stays_within_rounding_of_the_deterministic_one(tmp_path):
    exact = _train(tmp_path, 1)
    fast = _train(tmp_path, 2, "--reduction", "fast")
    assert _relative(fast["params"], exact["params"]) < 1e-5
    assert fast["losses"] == pytest.approx(exact["losses"], rel=1e-5)


@pytest.mark.contract
def test_a_summed_loss_is_divided_by_the_global_count(tmp_path):
    mean = _train(tmp_path, 1)
    summed = _train(tmp_path, 2, "--loss", "sum")
    # mse over the whole global batch, whichever way it is normalised
    assert summed["losses"] == pytest.approx(mean["losses"], rel=1e-6)
    assert _relative(summed["params"], mean["params"]) < 1e-5


@pytest.mark.unit
def test_the_data_plan_is_a_function_of_the_step_only():
    plan = DataPlan(dataset_size=100, global_batch=16, micro_batch=2, logical_workers=4)
    assert plan.steps_per_epoch == 6 and plan.micro_batches == 2
    assert plan.batch_slice(0, 0) == (0, 0, 4) and plan.batch_slice(7, 3) == (1, 28, 32)
    assert plan.micro_seed(3, 1, 0) == DataPlan(100, 16, 2, 4).micro_seed(3, 1, 0)
    assert (
        len({plan.micro_seed(s, lw, j) for s in range(3) for lw in range(4) for j in range(2)})
        == 24
    )
    assert derive_seed(1, "a") != derive_seed(1, "b")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"global_batch": 16, "micro_batch": 3, "logical_workers": 4}, "micro_batch"),
        ({"global_batch": 16, "micro_batch": 2, "logical_workers": 3}, "divide global_batch"),
        ({"global_batch": 0, "micro_batch": 2, "logical_workers": 1}, ">= 1"),
        ({"global_batch": 256, "micro_batch": 2, "logical_workers": 4}, "fewer than one"),
    ],
)
def test_bad_batch_shapes_are_one_line_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        DataPlan(dataset_size=100, **config)


@pytest.mark.unit
def test_hosting_is_contiguous_and_follows_capacities():
    assert plan_hosting(8, [1, 1, 1, 1]) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert plan_hosting(8, [1, 1, 1]) == [(0, 3), (3, 6), (6, 8)]
    assert plan_hosting(8, [3, 1]) == [(0, 6), (6, 8)]
    assert plan_hosting(2, [1, 1, 1]) == [(0, 1), (1, 2), (2, 2)]  # a rank may host none
    assert plan_hosting(5, [0.5, 0, 1]) == [(0, 2), (2, 2), (2, 5)]
    with pytest.raises(ValueError):
        plan_hosting(4, [0, 0])
