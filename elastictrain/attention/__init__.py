"""Core attention balanced over the ranks: :func:`core_attention` (the drop-in for a
transformer block), the pure planner, the dispatch, and a ``Job``'s rounds."""

from elastictrain.attention.plan import AttentionPolicy
from elastictrain.attention.rounds import core_attention

__all__ = ["AttentionPolicy", "core_attention"]
