"""Which samples every step uses, who computes them, and with which random numbers (pure).

A job has a fixed number of **logical workers**, chosen at its start. Step ``s`` (0-based)
takes the ``global_batch`` samples at ``[p * G, (p + 1) * G)`` of epoch ``e``'s permutation of
the dataset (``e, p = divmod(s, steps_per_epoch)``; the permutation is seeded by ``(seed,
e)``; an epoch's tail that does not fill a batch is dropped). Logical worker ``l`` always gets
part ``l`` of the ``L`` equal parts, cut into micro-batches of ``micro_batch``. Before each
micro-batch the random generators are seeded from ``(seed, s, l, j)``, so a sample sees the
same data and the same dropout at any world size, and no random state has to be saved.

Physical ranks host logical workers by :func:`plan_hosting`: contiguous blocks, sized by the
ranks' capacities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from elastictrain.errors import ConfigError


@dataclass(frozen=True)
class DataPlan:
    dataset_size: int
    global_batch: int
    micro_batch: int
    logical_workers: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ConfigError(
                f"global_batch ({self.global_batch}) and micro_batch ({self.micro_batch}) "
                "must be >= 1"
            )
        if self.logical_workers < 1 or self.global_batch % self.logical_workers:
            raise ConfigError(
                f"logical_workers ({self.logical_workers}) must divide global_batch "
                f"({self.global_batch})"
            )
        if self.per_worker % self.micro_batch:
            raise ConfigError(
                f"micro_batch ({self.micro_batch}) must divide the {self.per_worker} samples "
                f"each of the {self.logical_workers} logical workers gets per step"
            )
        if self.dataset_size < self.global_batch:
            raise ConfigError(
                f"the dataset has {self.dataset_size} samples, fewer than one global batch "
                f"({self.global_batch})"
            )

    @property
    def per_worker(self) -> int:
        return self.global_batch // self.logical_workers

    @property
    def micro_batches(self) -> int:
        """Micro-batches per logical worker per step."""
        return self.per_worker // self.micro_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def epoch_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, "epoch", epoch)

    def batch_slice(self, step: int, logical: int) -> tuple[int, int, int]:
        """``(epoch, start, end)``: logical worker ``logical``'s positions in the epoch's
        permutation at ``step``."""
        if step < 0 or not 0 <= logical < self.logical_workers:
            raise ValueError(f"no logical worker {logical} at step {step}")
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + logical * self.per_worker
        return epoch, start, start + self.per_worker

    def micro_seed(self, step: int, logical: int, micro: int) -> int:
        """The seed of the random generators before micro-batch ``micro`` of ``logical``."""
        return derive_seed(self.seed, "micro", step, logical, micro)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across processes and versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def plan_hosting(logical_workers: int, capacities: Sequence[float]) -> list[tuple[int, int]]:
    """Each rank's block ``[start, end)`` of logical workers, contiguous in rank order, sized
    in proportion to its capacity (largest remainders; ties go to the lower rank)."""
    if not capacities:
        raise ValueError("no ranks to host logical workers")
    if any(c < 0 for c in capacities) or not any(c > 0 for c in capacities):
        raise ValueError(f"capacities must be >= 0 with one > 0, got {list(capacities)}")
    weights = [Fraction(c).limit_denominator(1 << 20) for c in capacities]
    total = sum(weights)
    exact = [w * logical_workers / total for w in weights]
    counts = [int(x) for x in exact]
    left = logical_workers - sum(counts)
    order = sorted(range(len(exact)), key=lambda r: (-(exact[r] - counts[r]), r))
    for rank in order[:left]:
        counts[rank] += 1
    blocks, start = [], 0
    for count in counts:
        blocks.append((start, start + count))
        start += count
    return blocks
