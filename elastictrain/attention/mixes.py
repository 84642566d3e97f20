"""Long-tailed document mixes packed into ranks' batches, the way long-context training packs
them: documents are laid end to end over the ranks' token buffers, and one that crosses a
buffer's end continues on the next rank as its own document (attention stays within a rank's
part). Used by the benchmarks and the tests of the planner; a fixed seed gives a fixed mix."""

from __future__ import annotations

import random

from elastictrain.attention.plan import Document


def long_tailed_lengths(total: int, rng: random.Random, shortest: int = 64,
                        alpha: float = 1.1, longest: int | None = None) -> list[int]:  # fmt: skip
    """Pareto-distributed document lengths (``alpha`` near 1: a few very long documents
    hold much of the tokens) that add up to ``total``."""
    lengths: list[int] = []
    left = total
    while left > 0:
        length = int(shortest * rng.paretovariate(alpha))
        if longest is not None:
            length = min(length, longest)
        length = max(1, min(length, left))
        lengths.append(length)
        left -= length
    return lengths


def pack(lengths: list[int], ranks: int, tokens_per_rank: int) -> list[Document]:
    """``lengths`` laid end to end over ``ranks`` buffers of ``tokens_per_rank`` tokens."""
    documents: list[Document] = []
    rank, room = 0, tokens_per_rank
    for length in lengths:
        while length > 0 and rank < ranks:
            piece = min(length, room)
            documents.append(Document(piece, rank))
            length -= piece
            room -= piece
            if room == 0:
                rank, room = rank + 1, tokens_per_rank
    return documents


def packed_mix(ranks: int, tokens_per_rank: int, seed: int = 0,
               alpha: float = 1.1) -> list[Document]:  # fmt: skip
    """A long-tailed mix of ``ranks * tokens_per_rank`` tokens, packed."""
    rng = random.Random(seed)
    total = ranks * tokens_per_rank
    return pack(long_tailed_lengths(total, rng, alpha=alpha), ranks, tokens_per_rank)
