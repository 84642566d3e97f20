"""The few collectives a ``Job`` needs, on one process-group object.

A ``Job`` under an agent owns its process groups (one per world epoch, never registered as
torch's default group, so a new one can be made while an old one is abandoned); under
torchrun it uses the default group. Every operation is launched asynchronously and waited for
through ``wait(work)``, which the in-place world replaces by a wait in slices that gives up
when the world changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Wait = Callable[[dist.Work], None]


def wait_plainly(work: dist.Work) -> None:
    work.wait()


class Collectives:
    def __init__(self, group: dist.ProcessGroup, rank: int, size: int,
                 wait: Wait = wait_plainly) -> None:  # fmt: skip
        self.group = group
        self.rank = rank
        self.size = size
        self.wait = wait

    @classmethod
    def default(cls) -> Collectives:
        """torch's default group (it must be initialised)."""
        group = dist.distributed_c10d._get_default_group()
        return cls(group, dist.get_rank(), dist.get_world_size())

    def all_to_all_async(self, output: torch.Tensor, input: torch.Tensor,
                         output_splits: list[int], input_splits: list[int]) -> dist.Work:
        """Launch an all-to-all of ``input`` (cut by ``input_splits``) into ``output``; wait
        for the returned work."""
        return self.group.alltoall_base(output, input, output_splits, input_splits,
                                        dist.AllToAllOptions())  # fmt: skip

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                   input_splits: list[int]) -> None:  # fmt: skip
        self.wait(self.all_to_all_async(output, input, output_splits, input_splits))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` holds every rank's ``input``, in rank order."""
        self.wait(self.group._allgather_base(output, input))

    def all_reduce_async(self, tensor: torch.Tensor) -> dist.Work:
        """Sum ``tensor`` over the ranks in place; wait for the returned work."""
        return self.group.allreduce([tensor])

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.wait(self.all_reduce_async(tensor))

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = root
        self.wait(self.group.broadcast([tensor], options))
