"""``Job``: a training loop that owns its data plan, its reduction and its snapshots.

::

    job = Job(model, optimizer, dataset, loss_fn, global_batch=64, micro_batch=4, steps=1000,
              scheduler=sched)
    for step in job:                # each iteration runs one optimizer step
        if job.rank == 0 and step % 10 == 0:
            print(step, job.loss)   # the step's loss over the whole global batch

``loss_fn(model, batch)`` returns the **mean** loss of the micro-batch (it is weighted by the
micro-batch's share of the global batch), or ``(loss_sum, count)`` (the sum is divided by the
global count, e.g. of tokens, after the reduction). ``dataset`` is map-style (``len`` and
``[i]``); ``collate_fn`` builds a micro-batch from its samples (default: torch's).

The step count, the learning-rate schedule and the global batch never depend on the world:
step ``s`` always uses the same samples, split over the same logical workers
(:mod:`elastictrain.train.data_plan`), and the gradient is summed over them in one fixed order
(``reduction="deterministic"``, bit-identical at any world size) or by the backend's
all-reduce (``reduction="fast"``, within rounding). Under ``etrain launch`` the state after
every ``snapshot_every`` steps goes into the agent's memory (:class:`Snapshotter`), and a
restarted job resumes from it.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from elastictrain.errors import ConfigError
from elastictrain.train.data_plan import DataPlan, plan_hosting
from elastictrain.train.reduction import DeterministicReducer, FastReducer

logger = logging.getLogger(__name__)

REDUCTIONS = ("deterministic", "fast")

LossFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, Any]"]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device`` (dicts, lists, tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def seed_everything(seed: int) -> None:
    """Seed torch (every device), Python's and NumPy's generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed & 0xFFFFFFFF)
    except ImportError:
        pass


class Job:
    """A training job whose results do not depend on how many ranks run it; see the module
    docstring. Call it ``for step in job`` (or :meth:`run`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Any,
        loss_fn: LossFn,
        *,
        global_batch: int,
        micro_batch: int,
        steps: int,
        scheduler: Any = None,
        logical_workers: int | None = None,
        reduction: str = "deterministic",
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: torch.device | str | None = None,
        snapshot_every: int = 1,
        capacities: Sequence[float] | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
        if steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        if snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.steps = steps
        self.reduction = reduction
        self.plan = DataPlan(
            dataset_size=len(dataset),
            global_batch=global_batch,
            micro_batch=micro_batch,
            logical_workers=logical_workers or global_batch // micro_batch,
            seed=seed,
        )
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn
        params = list(model.parameters())
        self.device = torch.device(device) if device is not None else (
            params[0].device if params else torch.device("cpu"))  # fmt: skip
        self._init_process_group()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._capacities = list(capacities) if capacities is not None else [1.0] * self.world
        if len(self._capacities) != self.world:
            raise ConfigError(f"capacities has {len(self._capacities)} entries for a world of "
                              f"{self.world}")  # fmt: skip
        self._params = params
        self._deterministic = DeterministicReducer(params, self.plan.logical_workers, self.device)
        self._fast = FastReducer(params, self.device) if reduction == "fast" else None
        self._permutation: tuple[int, torch.Tensor] | None = None
        self.loss: float | None = None
        self.step = 0  # steps done
        from elastictrain.snapshot.worker import Snapshotter

        self._snapshots = Snapshotter(
            model=model, optimizer=optimizer, scheduler=scheduler, every=snapshot_every,
            rank=self.rank, world=self.world,
        )  # fmt: skip

    def _init_process_group(self) -> None:
        if dist.is_initialized():
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if "RANK" not in os.environ:  # a plain single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "0")
            dist.init_process_group(backend, rank=0, world_size=1,
                                    store=dist.HashStore())  # fmt: skip
            return
        dist.init_process_group(backend)

    # -- the loop ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        restored = self._snapshots.restore()
        self.step = restored.step + 1 if restored is not None else 0
        if restored is not None:
            logger.info("rank %d: resumed after step %d (%s)", self.rank, restored.step,
                        restored.source)  # fmt: skip
        while self.step < self.steps:
            step = self.step
            self.loss = self._train_step(step)
            self.step = step + 1
            self._snapshots.snapshot(step, data_position={"step": step + 1})
            yield step
        self._snapshots.wait()

    def run(self) -> int:
        """Train to the end; returns the steps done."""
        for _ in self:
            pass
        return self.step

    def hosting(self) -> list[tuple[int, int]]:
        """Every rank's block of logical workers."""
        return plan_hosting(self.plan.logical_workers, self._capacities)

    def _train_step(self, step: int) -> float:
        blocks = self.hosting()
        start, end = blocks[self.rank]
        sum_mode = False
        fast = self._fast
        if fast is None:
            self._deterministic.begin(start, end)
        hosted = torch.zeros(2, dtype=torch.float64, device=self.device)
        for logical in range(start, end):
            extras = torch.zeros(2, dtype=torch.float64, device=self.device)
            if fast is None:
                for p in self._params:
                    p.grad = None
            for micro in range(self.plan.micro_batches):
                if fast is not None and logical == end - 1 and micro == self.plan.micro_batches - 1:
                    fast.arm()
                sum_mode = self._micro_batch(step, logical, micro, extras)
            if fast is None:
                self._deterministic.leaf_done(extras)
            else:
                hosted += extras
        if fast is None:
            total = self._deterministic.reduce(blocks, self.rank)
        else:
            total = fast.reduce(hosted)
        loss, count = total.tolist()
        if sum_mode:
            for p in self._params:
                if p.grad is not None:
                    p.grad.div_(count)
            loss /= count
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _micro_batch(self, step: int, logical: int, micro: int, extras: torch.Tensor) -> bool:
        """Forward and backward of one micro-batch; adds its loss share and its count to
        ``extras`` (on the device: no wait for it). True when the loss came as a sum."""
        seed_everything(self.plan.micro_seed(step, logical, micro))
        epoch, first, _ = self.plan.batch_slice(step, logical)
        begin = first + micro * self.plan.micro_batch
        order = self._epoch_order(epoch)
        samples = [self.dataset[int(i)] for i in order[begin : begin + self.plan.micro_batch]]
        batch = to_device(self.collate_fn(samples), self.device)
        out = self.loss_fn(self.model, batch)
        if isinstance(out, tuple):
            loss_sum, count = out
            loss_sum.backward()
            extras[0] += loss_sum.detach().double()
            extras[1] += count.double() if isinstance(count, torch.Tensor) else float(count)
            return True
        share = self.plan.micro_batch / self.plan.global_batch
        (out * share).backward()
        extras[0] += out.detach().double() * share
        extras[1] += self.plan.micro_batch
        return False

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.plan.epoch_seed(epoch))
            order = torch.randperm(self.plan.dataset_size, generator=generator)
            self._permutation = (epoch, order)
        return self._permutation[1]

    def close(self) -> None:
        self._snapshots.close()
        if self._fast is not None:
            self._fast.close()
