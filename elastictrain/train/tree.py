"""The fixed binary tree that sums gradients over the logical workers, in one order always.

Leaves are the logical workers ``0 .. L-1``; the tree is the complete binary tree over the
next power of two, with the leaves past ``L`` empty. A node ``(level, index)`` covers leaves
``[index * 2**level, (index + 1) * 2**level)`` clipped to ``L``; its value is its leaf's
gradient at level 0, else ``left + right`` when both children cover leaves, else its only
child's value unchanged. Floating-point addition is not associative, so this one definition
is what makes a reduction bit-identical whichever ranks host which logical workers: a rank
that hosts a block of leaves sums them into the nodes of that block's *cover* (its maximal
aligned subtrees, :func:`cover`) with :class:`BlockSum`; any set of partials that covers
``[0, L)`` exactly is merged into the root by :func:`merge`, with the same additions as if one
process had summed all the leaves.

Pure: the sums are done by a caller-given ``add(left, right) -> value``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, order=True)
class Node:
    level: int
    index: int

    def span(self, leaves: int) -> tuple[int, int]:
        """The leaves ``[start, end)`` under this node (end clipped to ``leaves``)."""
        start = self.index << self.level
        return start, min(start + (1 << self.level), leaves)

    def empty(self, leaves: int) -> bool:
        start, end = self.span(leaves)
        return start >= end

    @property
    def parent(self) -> Node:
        return Node(self.level + 1, self.index >> 1)

    @property
    def sibling(self) -> Node:
        return Node(self.level, self.index ^ 1)


def depth(leaves: int) -> int:
    """Levels below the root: the root is ``Node(depth, 0)``."""
    if leaves < 1:
        raise ValueError(f"a tree needs at least one leaf, got {leaves}")
    return (leaves - 1).bit_length()


def cover(start: int, end: int, leaves: int) -> list[Node]:
    """The maximal aligned subtrees whose leaves are exactly ``[start, end)``, left to right."""
    if not 0 <= start <= end <= leaves:
        raise ValueError(f"block [{start}, {end}) is not within {leaves} leaves")
    nodes = []
    while start < end:
        level = 0
        while True:
            up = Node(level + 1, start >> (level + 1))
            first, last = up.span(leaves)
            if first != start or last > end or level + 1 > depth(leaves):
                break
            level += 1
        node = Node(level, start >> level)
        nodes.append(node)
        start = node.span(leaves)[1]
    return nodes


class BlockSum(Generic[T]):
    """Sums a block's leaves, fed in order, into the values of the block's cover.

    Keeps at most one pending value per level (a stack), so a block of ``n`` leaves holds
    ``O(log n)`` values at a time."""

    def __init__(self, start: int, end: int, leaves: int, add: Callable[[T, T], T]) -> None:
        self.start, self.end, self.leaves = start, end, leaves
        self._add = add
        self._next = start
        self._stack: list[tuple[Node, T]] = []

    def push(self, value: T) -> None:
        """The next leaf's value (leaf ``start``, then ``start + 1``, ...)."""
        if self._next >= self.end:
            raise ValueError(f"block [{self.start}, {self.end}) has no leaf {self._next}")
        node = Node(0, self._next)
        self._next += 1
        self._stack.append((node, value))
        self._settle()

    def _settle(self) -> None:
        while self._stack:
            node, value = self._stack[-1]
            parent = node.parent
            first, last = parent.span(self.leaves)
            if first < self.start or last > self.end or parent.level > depth(self.leaves):
                return  # the parent reaches outside the block: ``node`` is in the cover
            if node.index & 1 == 0:
                if not node.sibling.empty(self.leaves):
                    return  # wait for the right sibling
                self._stack[-1] = (parent, value)  # an only child: the value moves up as is
                continue
            left_node, left = self._stack[-2]
            assert left_node == node.sibling
            self._stack[-2:] = [(parent, self._add(left, value))]

    def partials(self) -> list[tuple[Node, T]]:
        """The cover's values, left to right (every leaf must have been pushed)."""
        if self._next != self.end:
            raise ValueError(f"block [{self.start}, {self.end}) got {self._next - self.start} "
                             f"of its {self.end - self.start} leaves")  # fmt: skip
        return list(self._stack)


def merge(partials: Iterable[tuple[Node, T]], leaves: int, add: Callable[[T, T], T]) -> T:
    """The root's value from partials that cover ``[0, leaves)`` exactly once."""
    level_nodes: dict[Node, T] = {}
    for node, value in partials:
        if node in level_nodes:
            raise ValueError(f"node {node} given twice")
        level_nodes[node] = value
    covered = sorted(n.span(leaves) for n in level_nodes)
    position = 0
    for first, last in covered:
        if first != position:
            raise ValueError(f"partials do not cover leaves [0, {leaves}) exactly: gap or overlap "
                             f"at leaf {position}")  # fmt: skip
        position = last
    if position != leaves:
        raise ValueError(f"partials cover leaves [0, {position}) of {leaves}")
    top = depth(leaves)
    for level in range(top):
        for node in sorted(n for n in level_nodes if n.level == level):
            if node not in level_nodes:
                continue  # consumed as a right sibling
            value = level_nodes.pop(node)
            sibling = node.sibling
            if node.index & 1:
                raise ValueError(f"node {node} has no left sibling among the partials")
            if sibling.empty(leaves):
                level_nodes[node.parent] = value
            elif sibling in level_nodes:
                level_nodes[node.parent] = add(value, level_nodes.pop(sibling))
            else:
                raise ValueError(f"node {node}'s sibling is split below it among the partials")
    (root,) = level_nodes
    assert root == Node(top, 0)
    return level_nodes[root]
