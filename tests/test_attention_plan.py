"""The core-attention planner (pure): tasks cover every query once, costs add up, no task is
cut below the floor, the cuts do not depend on the world, and the work is balanced in
proportion to speed."""

from __future__ import annotations

import pytest

from elastictrain.attention.mixes import pack, packed_mix
from elastictrain.attention.plan import (
    AttentionPolicy,
    Document,
    cut_document,
    plan_attention,
    task_cost,
)
from elastictrain.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_a_tasks_cost_counts_its_query_key_pairs():
    for start, end in [(0, 1), (0, 7), (3, 7), (6, 7), (100, 612)]:
        assert task_cost(start, end) == sum(i + 1 for i in range(start, end))


def _check_cover(documents, plan, floor):
    by_doc: dict[int, list] = {}
    for task in plan.tasks:
        by_doc.setdefault(task.doc, []).append(task)
        assert task.owner == documents[task.doc].owner
        length = task.end - task.start
        assert length >= floor or length == documents[task.doc].length, task
    for i, doc in enumerate(documents):
        spans = sorted((t.start, t.end) for t in by_doc[i])
        assert spans[0][0] == 0 and spans[-1][1] == doc.length
        # no gap, no overlap
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert sum(plan.pairs) == sum(task_cost(0, d.length) for d in documents)
    runners = {r: sum(t.cost for t in ts) for r, ts in plan.by_runner.items()}
    assert [runners[r] for r in plan.ranks] == list(plan.pairs)
    # modelled work: the pairs, a cost per query and key row, and each run's prefix
    policy = AttentionPolicy()
    rows = policy.query_cost + policy.key_cost
    for r, load in zip(plan.ranks, plan.loads, strict=True):
        mine = plan.by_runner[r]
        ends = {(t.doc, t.end) for t in mine}
        prefixes = sum(t.start for t in mine if (t.doc, t.start) not in ends)  # runs' firsts
        queries = sum(t.end - t.start for t in mine)
        assert load == runners[r] + rows * queries + policy.key_cost * prefixes


@pytest.mark.parametrize(("ranks", "tokens"), [(8, 128 * 1024), (64, 128 * 1024)])
def test_long_tailed_batches_are_balanced_and_every_query_is_attended_once(ranks, tokens):
    for seed in range(3):
        documents = packed_mix(ranks, tokens, seed)
        plan = plan_attention(documents, range(ranks))
        _check_cover(documents, plan, 1024)
        assert plan.imbalance <= 1.05 < plan.naive_imbalance


def test_a_rank_at_half_speed_gets_half_the_work():
    documents = packed_mix(8, 128 * 1024, 1)
    speeds = [1.0] * 8
    speeds[3] = 0.5
    plan = plan_attention(documents, range(8), speeds)
    _check_cover(documents, plan, 1024)
    assert plan.imbalance <= 1.05  # modelled time: work / speed
    others = sum(plan.loads[i] for i in range(8) if i != 3) / 7
    assert plan.loads[3] / others == pytest.approx(0.5, abs=0.03)


def test_one_document_longer_than_a_ranks_share_is_cut_into_tails():
    documents = [Document(200_000, 0)] + [Document(1000, r) for r in range(1, 4)]
    plan = plan_attention(documents, range(4))
    _check_cover(documents, plan, 1024)
    assert plan.imbalance <= 1.05
    assert len([t for t in plan.tasks if t.doc == 0]) >= 4  # the long one runs everywhere


def test_tiny_documents_move_whole_and_a_world_of_survivors_is_planned():
    documents = pack([100] * 400 + [300] * 40 + [9000], 4, 13_000)
    survivors = [d for d in documents if d.owner != 2]  # rank 2 is gone: its world is 0, 1, 3
    plan = plan_attention(survivors, [0, 1, 3])
    _check_cover(survivors, plan, 1024)  # a tiny document is never cut
    assert set(plan.by_runner) == {0, 1, 3} and plan.imbalance <= 1.05
    assert any(t.runner != t.owner and t.end - t.start < 512 for t in plan.tasks)
    single = plan_attention([Document(5000, 7)], [7])
    assert {t.runner for t in single.tasks} == {7} and single.imbalance == 1.0
    _check_cover([Document(5000, 7)], single, 1024)


def test_the_cuts_do_not_depend_on_the_world_or_the_speeds():
    """A rank's batch is cut the same way whichever ranks exist and however fast they are:
    only where the pieces run changes (what makes attention bit-identical after a
    recovery)."""
    documents = packed_mix(4, 64 * 1024, 2)
    cuts = None
    for ranks, speeds in [(range(4), None), (range(4), [1, 0.5, 2, 1]), (range(6), None)]:
        plan = plan_attention(documents, ranks, speeds)
        _check_cover(documents, plan, 1024)
        found = [(t.doc, t.start, t.end, t.piece) for t in plan.tasks]
        assert cuts is None or found == cuts
        cuts = found
    # survivors: rank 3's batch is gone, the others' are cut as before
    survivors = [d for d in documents if d.owner != 3]
    plan = plan_attention(survivors, range(3))
    assert [(t.start, t.end) for t in plan.tasks] == [(s, e) for doc, s, e, _ in cuts
                                                      if documents[doc].owner != 3]


def test_pieces_are_of_about_equal_work_and_none_below_the_floor():
    policy = AttentionPolicy()
    spans = cut_document(100_000, 100_000, policy)
    costs = [task_cost(s, e) for s, e in spans]
    assert len(spans) > 32 and max(costs) / min(costs) < 1.5
    assert all(e - s >= policy.min_task for s, e in spans)
    assert cut_document(900, 100_000, policy) == [(0, 900)]  # too short to cut
    assert len(cut_document(5_000, 1_000_000, policy)) == 1  # little work for its batch


def test_the_tokens_sent_count_a_prefix_once_per_runner():
    documents = [Document(40_000, 0), Document(100, 1)]
    plan = plan_attention(documents, range(2))
    moved = [t for t in plan.tasks if t.runner != t.owner]
    assert {t.runner for t in moved if t.doc == 0} == {1}
    prefixes: dict[tuple[int, int], int] = {}
    for t in moved:
        prefixes[t.doc, t.runner] = max(prefixes.get((t.doc, t.runner), 0), t.end)
    queries = sum(t.end - t.start for t in moved)
    assert plan.moved_tokens == 2 * queries + 2 * sum(prefixes.values())


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="not in the world"):
        plan_attention([Document(10, 5)], [0, 1])
    with pytest.raises(ConfigError, match="one finite speed"):
        plan_attention([Document(10, 0)], [0], [0.0])
    with pytest.raises(ConfigError, match="each once"):
        plan_attention([], [0, 0])
    with pytest.raises(ConfigError, match="a document of 0 tokens"):
        Document(0, 0)
    with pytest.raises(ConfigError, match="min_task"):
        AttentionPolicy(min_task=0)
    with pytest.raises(ConfigError, match="pieces"):
        AttentionPolicy(pieces=0)
