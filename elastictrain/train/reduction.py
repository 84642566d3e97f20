"""Gradient reductions over the logical workers, with torch.distributed collectives.

Both reductions sum, never average by the world size: the loss is already scaled by each
micro-batch's share of the global batch (or the global count divides the sum afterwards), so
the gradient's scale is that of the global batch at any world size.

- :class:`DeterministicReducer`: the fixed tree of :mod:`elastictrain.train.tree`. Each rank
  flattens every hosted logical worker's gradient (and its float64 extras: the loss, the
  sample or token count, and any per-rank values the step carries) and sums them into its
  block's cover; one ``all_to_all_single`` sends shard ``j`` of every partial to rank ``j``;
  rank ``j`` merges its shard in tree order; one ``all_gather_into_tensor`` returns the whole
  reduced gradient. The bytes on the wire are those of a ring all-reduce; the result is
  bit-identical at any world size.
- :class:`FastReducer`: the hosted logical workers accumulate straight into ``.grad``; during
  the step's last backward, buckets of gradients are all-reduced as soon as they are ready
  (post-accumulate hooks, as DDP does), overlapped with the rest of the backward.

Collectives go through :class:`~elastictrain.train.collectives.Collectives`, whose wait gives
up when the world changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elastictrain.train.collectives import Collectives
from elastictrain.train.tree import BlockSum, Node, cover, merge

EXTRAS = 2  # the loss and the count, float64 (a step may carry more values after them)


@dataclass(frozen=True)
class _Group:
    """The trainable parameters of one dtype, flattened in model order."""

    dtype: torch.dtype
    params: tuple[torch.nn.Parameter, ...]
    numel: int


def _groups(params: Sequence[torch.nn.Parameter]) -> list[_Group]:
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    return [_Group(dtype, tuple(ps), sum(p.numel() for p in ps)) for dtype, ps in by_dtype.items()]


def _flatten(group: _Group, device: torch.device) -> torch.Tensor:
    parts = [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=group.dtype,
                                                                   device=device)
        for p in group.params
    ]  # fmt: skip
    return torch.cat(parts) if parts else torch.zeros(0, dtype=group.dtype, device=device)


def _unflatten_into_grads(group: _Group, flat: torch.Tensor) -> None:
    offset = 0
    for p in group.params:
        n = p.numel()
        view = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = view.clone()
        else:
            p.grad.copy_(view)
        offset += n


def _add(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return left.add_(right)


class DeterministicReducer:
    """Sums logical workers' gradients in the fixed tree order; see the module docstring."""

    def __init__(self, params: Sequence[torch.nn.Parameter], logical_workers: int,
                 device: torch.device) -> None:  # fmt: skip
        self.groups = _groups([p for p in params if p.requires_grad])
        self.leaves = logical_workers
        self.device = device
        self._block: BlockSum | None = None
        self._extras = EXTRAS

    def begin(self, start: int, end: int, extras: int = EXTRAS) -> None:
        """This rank hosts logical workers ``[start, end)`` this step; each pushes ``extras``
        float64 values (the same number on every rank)."""
        self._block = BlockSum(start, end, self.leaves, _add_all)
        self._extras = extras

    def leaf_done(self, extras: torch.Tensor) -> None:
        """The next hosted logical worker's gradient is in ``.grad``; ``extras`` is its float64
        ``(loss, count, ...)``. The gradients are taken: zero them before the next one."""
        assert self._block is not None
        flats = [_flatten(g, self.device) for g in self.groups]
        self._block.push([*flats, extras.to(self.device, torch.float64)])

    def discard(self) -> None:
        """Drop the step's partials (the step is abandoned)."""
        self._block = None

    def reduce(self, blocks: Sequence[tuple[int, int]], coll: Collectives) -> torch.Tensor:
        """Write the reduced gradient into ``.grad``; returns the reduced extras.

        ``blocks`` are every rank's blocks of logical workers this step (the same on all)."""
        assert self._block is not None
        mine = self._block.partials()
        self._block = None
        world, rank = len(blocks), coll.rank
        covers = [cover(s, e, self.leaves) for s, e in blocks]
        assert [n for n, _ in mine] == covers[rank]
        extras_out = None
        for index, kind in enumerate([*self.groups, None]):
            numel = kind.numel if kind is not None else self._extras
            dtype = kind.dtype if kind is not None else torch.float64
            reduced = self._reduce_one([v[index] for _, v in mine], covers, world, numel, dtype,
                                       coll)  # fmt: skip
            if kind is not None:
                _unflatten_into_grads(kind, reduced)
            else:
                extras_out = reduced
        assert extras_out is not None
        return extras_out

    def _reduce_one(self, values: list[torch.Tensor], covers: list[list[Node]], world: int,
                    numel: int, dtype: torch.dtype, coll: Collectives) -> torch.Tensor:  # fmt: skip
        shard = -(-numel // world)
        padded = shard * world
        if world == 1:
            return merge(zip(covers[0], values, strict=True), self.leaves, _add)[:numel]
        inputs = []
        for value in values:
            if padded > numel:
                value = torch.cat([value, value.new_zeros(padded - numel)])
            inputs.append(value.view(world, shard))
        # send: for each destination j, my partials' shard j, in my cover's order
        send = (torch.stack(inputs, dim=1).reshape(-1) if inputs
                else torch.zeros(0, dtype=dtype, device=self.device))  # fmt: skip
        counts = [len(c) for c in covers]
        receive = torch.empty(sum(counts) * shard, dtype=dtype, device=self.device)
        coll.all_to_all(receive, send, [n * shard for n in counts], [len(values) * shard] * world)
        pieces = receive.view(-1, shard)
        nodes = [node for c in covers for node in c]
        root = merge(zip(nodes, pieces, strict=True), self.leaves, _add)
        out = torch.empty(padded, dtype=dtype, device=self.device)
        coll.all_gather(out, root.contiguous())
        return out[:numel]


def _add_all(left: list[torch.Tensor], right: list[torch.Tensor]) -> list[torch.Tensor]:
    return [a.add_(b) for a, b in zip(left, right, strict=True)]


class FastReducer:
    """The backend's all-reduce in buckets, launched while the last backward still runs."""

    def __init__(self, params: Sequence[torch.nn.Parameter], device: torch.device,
                 bucket_bytes: int = 25 << 20) -> None:  # fmt: skip
        self.device = device
        trainable = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = []
        size, current = 0, []
        for p in reversed(trainable):  # gradients arrive roughly in reverse order
            if current and (size + p.numel() * p.element_size() > bucket_bytes
                            or p.dtype != current[0].dtype):  # fmt: skip
                self.buckets.append(current)
                size, current = 0, []
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._coll: Collectives | None = None
        self._pending: list[int] = []
        self._launched: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in trainable]

    def arm(self, coll: Collectives) -> None:
        """The next backward is the step's last on this rank: launch buckets as they fill."""
        self._armed = True
        self._coll = coll
        self._pending = [len(b) for b in self.buckets]
        self._launched = {}

    def _ready(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        index = self._bucket_of[id(param)]
        self._pending[index] -= 1
        if self._pending[index] == 0:
            self._launch(index)

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        flat = torch.cat([
            p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket
        ])  # fmt: skip
        assert self._coll is not None
        self._launched[index] = (self._coll.all_reduce_async(flat), flat)

    def discard(self) -> None:
        """Drop the step's launched buckets (the step is abandoned)."""
        self._armed = False
        self._launched = {}

    def reduce(self, extras: torch.Tensor, coll: Collectives) -> torch.Tensor:
        """Finish the step's all-reduces (launching the buckets no backward filled, as on a
        rank that hosts no logical worker) and write the sums into ``.grad``."""
        if not self._armed:
            self.arm(coll)
        self._armed = False
        for index in range(len(self.buckets)):
            if index not in self._launched:
                self._launch(index)
        total = extras.to(self.device, torch.float64).clone()
        extras_work = coll.all_reduce_async(total)
        for index, (work, flat) in sorted(self._launched.items()):
            coll.wait(work)
            offset = 0
            for p in self.buckets[index]:
                view = flat[offset : offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
                offset += p.numel()
        coll.wait(extras_work)
        self._launched = {}
        return total

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
