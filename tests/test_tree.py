"""The fixed reduction tree: any hosting of the leaves gives the same additions (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastictrain.train.tree import BlockSum, Node, cover, depth, merge


def _add(a: str, b: str) -> str:
    return f"({a}+{b})"


def _reference(leaves: int) -> str:
    """The root computed from its definition, one process summing every leaf."""

    def value(node: Node) -> str | None:
        start, end = node.span(leaves)
        if start >= end:
            return None
        if node.level == 0:
            return f"g{start}"
        left = value(Node(node.level - 1, node.index * 2))
        right = value(Node(node.level - 1, node.index * 2 + 1))
        return left if right is None else _add(left, right)

    return value(Node(depth(leaves), 0))


def _blocks(leaves: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, leaves, *(c % (leaves + 1) for c in cuts)})
    return list(zip(points, points[1:], strict=False))


@settings(max_examples=300, deadline=None)
@given(leaves=st.integers(1, 70), cuts=st.lists(st.integers(0, 70), max_size=12))
def test_any_split_into_blocks_sums_exactly_like_one_process(leaves, cuts):
    partials = []
    for start, end in _blocks(leaves, cuts):
        block = BlockSum(start, end, leaves, _add)
        for leaf in range(start, end):
            block.push(f"g{leaf}")
        got = block.partials()
        assert [n for n, _ in got] == cover(start, end, leaves)
        partials += got
    assert merge(reversed(partials), leaves, _add) == _reference(leaves)


def test_the_tree_of_a_few_leaves():
    assert _reference(1) == "g0"
    assert _reference(3) == "((g0+g1)+g2)"
    assert _reference(5) == "(((g0+g1)+(g2+g3))+g4)"
    assert cover(1, 7, 8) == [Node(0, 1), Node(1, 1), Node(1, 2), Node(0, 6)]
    assert cover(4, 5, 5) == [Node(2, 1)]  # the lone last leaf is its subtree's value


@pytest.mark.parametrize("leaves", [4, 6])
def test_a_block_holds_a_logarithmic_number_of_values(leaves):
    block = BlockSum(0, leaves, leaves, _add)
    for leaf in range(leaves):
        block.push(f"g{leaf}")
        assert len(block._stack) <= depth(leaves) + 1
    assert [n for n, _ in block.partials()] == [Node(depth(leaves), 0)]


def test_bad_partials_and_blocks_are_refused():
    with pytest.raises(ValueError, match="cover"):
        merge([(Node(1, 0), "a")], 4, _add)
    with pytest.raises(ValueError, match="overlap"):
        merge([(Node(1, 0), "a"), (Node(0, 1), "b"), (Node(1, 1), "c")], 4, _add)
    with pytest.raises(ValueError, match="twice"):
        merge([(Node(0, 0), "a"), (Node(0, 0), "a")], 1, _add)
    with pytest.raises(ValueError, match="not within"):
        cover(2, 9, 8)
    block = BlockSum(0, 2, 2, _add)
    block.push("g0")
    with pytest.raises(ValueError, match="1 of its 2"):
        block.partials()
    block.push("g1")
    with pytest.raises(ValueError, match="no leaf 2"):
        block.push("g2")
    with pytest.raises(ValueError, match="at least one leaf"):
        depth(0)
