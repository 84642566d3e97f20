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

A slow rank is given less work (``stragglers``, :mod:`elastictrain.train.stragglers`): every
rank times its own compute and carries its speed in the step's reduction, every rank makes
the same verdict from the same speeds, and a re-plan moves logical workers between ranks at
the next step. The results do not change (with the deterministic reduction, not a bit).
Re-plans need enough logical workers to be fine-grained: at least 16 per rank is a good rule.

With ``attention=AttentionPolicy()`` a model that calls
:func:`elastictrain.attention.core_attention` has its attention balanced over the ranks: the
step's micro-batches run in rounds (every rank's ``i``-th together), each round's attention
is planned over the current world in proportion to the capacities above, and the results
stay bit-identical at any world size (:mod:`elastictrain.attention.rounds`).

The step count, the learning-rate schedule and the global batch never depend on the world:
step ``s`` always uses the same samples, split over the same logical workers
(:mod:`elastictrain.train.data_plan`), and the gradient is summed over them in one fixed order
(``reduction="deterministic"``, bit-identical at any world size) or by the backend's
all-reduce (``reduction="fast"``, within rounding). Under ``etrain launch`` the state after
every ``snapshot_every`` steps goes into the agent's memory (:class:`Snapshotter`), and a
restarted job resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from elastictrain.attention.plan import AttentionPolicy
from elastictrain.constants import ENV_SPARE
from elastictrain.errors import ConfigError
from elastictrain.train.collectives import Collectives
from elastictrain.train.data_plan import DataPlan, plan_hosting
from elastictrain.train.heal import share_state
from elastictrain.train.inplace import (
    CollectiveFailed,
    InPlaceWorld,
    WorldChanged,
    WorldLeft,
    WorldView,
)
from elastictrain.train.reduction import EXTRAS, DeterministicReducer, FastReducer
from elastictrain.train.resume import ResumePlan, plan_resume
from elastictrain.train.stragglers import (
    StragglerPolicy,
    StragglerState,
    hosting_capacities,
    straggler_verdict,
)
from elastictrain.train.timing import ComputeClock, slowed

if TYPE_CHECKING:
    from elastictrain.attention.rounds import AttentionRounds

logger = logging.getLogger(__name__)

REDUCTIONS = ("deterministic", "fast")
MIRROR_READY_S = 10.0  # a spare waits this long for its worker's first write into its mirror

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
        stragglers: StragglerPolicy | None = StragglerPolicy(),  # noqa: B008 (frozen)
        attention: AttentionPolicy | None = None,
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
        self._params = params
        self._deterministic = DeterministicReducer(params, self.plan.logical_workers, self.device)
        self._fast = FastReducer(params, self.device) if reduction == "fast" else None
        self._permutation: tuple[int, torch.Tensor] | None = None
        self._initial_capacities = list(capacities) if capacities is not None else None
        self._policy = stragglers
        self._straggling = StragglerState.even(1)
        self._clock = ComputeClock(self.device)
        # core attention (the model calls core_attention): micro-batches run in rounds
        self._attention: AttentionRounds | None = None
        if attention is not None:
            from elastictrain.attention.rounds import AttentionRounds  # it uses train's modules

            self._attention = AttentionRounds(attention, self.device, around=self._clock.leave_out)
        self.attention: dict[str, Any] | None = None  # the last step's planning, if any
        self._failed_said = False  # this rank reported itself failed (a far too slow rank)
        self.replans: list[dict[str, Any]] = []  # straggler re-plans of this process
        self.speed = 0.0  # this rank's last measured samples per compute-second
        self.speeds: list[float] = []  # every rank's, as the last step's reduction carried them
        self.loss: float | None = None
        self.step = 0  # optimizer steps done
        self.recoveries: list[dict[str, Any]] = []  # in-place recoveries of this process
        self.left_after: int | None = None  # drained: the steps it did before it left
        self._warmed = False  # a hot spare built its optimizer state ahead of time
        self._inplace = InPlaceWorld.attach(self.device)
        self._view: WorldView | None = None
        self._coll: Collectives | None = None
        if self._inplace is None:
            self._init_process_group()
            self._coll = Collectives.default()
        self.rank = self._coll.rank if self._coll is not None else -1  # -1: a hot spare
        self.world = self._coll.size if self._coll is not None else 0
        shape_to = self._inplace.session if self._inplace is not None else None
        if shape_to is not None:  # for etrain status
            shape_to.describe_job(self.plan.global_batch, self.plan.logical_workers)
        latest = self._inplace.latest() if self._inplace is not None else None
        if latest is not None and latest.rank >= 0:  # the rank it starts with, until a change
            self.rank, self.world = latest.rank, latest.size
        self._capacities: list[float] = []
        self._hosting: tuple[tuple[float, ...], list[tuple[int, int]]] | None = None
        from elastictrain.snapshot.worker import Snapshotter

        self._snapshots = Snapshotter(
            model=model, optimizer=optimizer, scheduler=scheduler, every=snapshot_every,
            rank=max(self.rank, 0), world=max(self.world, 1),
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

    def _set_world(self, rank: int, size: int) -> None:
        """A new world: the work is split as at the start again (its ranks are measured
        afresh)."""
        initial = self._initial_capacities
        self._capacities = (list(initial) if initial is not None and len(initial) == size
                            else [1.0] * size)  # fmt: skip
        self._straggling = StragglerState(tuple(self._capacities), slow_for=(0,) * size)
        self._clock.forget()
        self._failed_said = False
        self.rank, self.world = rank, size
        self._snapshots.rank, self._snapshots.world = rank, size

    # -- the loop ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        """The steps, in place or not. A worker whose node is drained leaves at the step
        boundary the drain planned: the loop ends early and :attr:`rank` is -1."""
        try:
            yield from self._steps()
        except WorldLeft as exc:
            logger.info("rank %d: left the world after %d steps (%s)", self.rank, self.step,
                        exc)  # fmt: skip
            self.left_after = self.step
            self.rank = -1
            self._progress(self.step, active=False)
            self._snapshots.wait()  # its last step's snapshot is whole before it exits

    def _steps(self) -> Iterator[int]:
        first_after_recovery: float | None = None
        if self._inplace is not None:
            if os.environ.get(ENV_SPARE) == "1":
                if self._inplace.is_spare:
                    self._warm_up_spare()
                    # its mirror in use first (if it has one): then every step is in it
                    if not self._snapshots.wait_mirror(timeout=MIRROR_READY_S):
                        logger.info("hot spare: its device mirror holds no step yet")
                self._inplace.ready()  # only now may its agent count on it
            if self._reform(first=True):  # a spare, named by a world that moved on
                first_after_recovery = time.monotonic()
        else:
            self._set_world(self.rank, self.world)
            restored = self._snapshots.restore()
            self.step = restored.step if restored is not None else 0
            if restored is not None:
                logger.info("rank %d: resumed after %d steps (%s)", self.rank, restored.step,
                            restored.source)  # fmt: skip
            elif self.step == 0:
                self._snapshots.snapshot(0, data_position={"step": 0})
        while self.step < self.steps:
            step = self.step
            if self._inplace is not None:
                self._inplace.steps_done = step
                self._inplace.fire_faults(step)
                self._snapshots.poll_mirror(self.device)
                if self._inplace.changed_since(self._view):
                    self._reform()
                    first_after_recovery = time.monotonic()
                    continue
            self._progress(step, active=True)
            try:
                self.loss = self._train_step(step)
            except (WorldChanged, CollectiveFailed) as exc:
                if self._inplace is None:
                    raise
                logger.warning("rank %d: step %d abandoned: %s", self.rank, step, exc)
                self._reform()
                first_after_recovery = time.monotonic()
                continue
            self.step = step + 1
            self._snapshots.snapshot(self.step, data_position={"step": self.step})
            self._progress(self.step, active=True)
            if first_after_recovery is not None:
                self._report_recovery(time.monotonic() - first_after_recovery)
                first_after_recovery = None
            yield step
        self._progress(self.step, active=False)
        self._snapshots.wait()

    def run(self) -> int:
        """Train to the end; returns the steps done."""
        for _ in self:
            pass
        return self.step

    def _progress(self, steps_done: int, active: bool) -> None:
        session = self._snapshots.session
        if session is not None:
            share = None
            if self._capacities and 0 <= self.rank < len(self._capacities):
                start, end = self.hosting()[self.rank]
                share = (end - start) / self.plan.logical_workers
            session.progress(steps_done, active=active, speed=self.speed or None, share=share)

    # -- in place -------------------------------------------------------------------------------

    def _warm_up_spare(self) -> None:
        """A hot spare builds what a restore fills in place and what a first step needs: one
        forward and backward of a micro-batch (kernels chosen, memory cached), then one
        optimizer step at learning rate 0 (its state allocated; the parameters do not move).
        Buffers the forward changed are put back: a restore would overwrite them, a fresh
        world shares them."""
        if self.optimizer.state:
            return
        started = time.monotonic()
        with torch.no_grad():
            buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self._micro_batch(0, 0, 0, torch.zeros(2, dtype=torch.float64, device=self.device))
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for p in self._params:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        try:
            self.optimizer.step()
        finally:
            for group, lr in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
        self._warmed = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        mapped = self._snapshots.premap(self.device)
        mirror = self._snapshots.offer_mirror(self.device)
        logger.info("hot spare ready in %.2f s (%.2f GB of snapshot segments mapped, %.2f GB "
                    "of device mirror): waiting for a rank", time.monotonic() - started,
                    mapped / 1e9, mirror / 1e9)  # fmt: skip

    def _reform(self, first: bool = False) -> bool:
        """Join the next world: discard the step in flight, form the new group, agree where to
        go on from, restore in place if this rank's state is not that step's. True when it
        was a recovery (not the job's first world)."""
        assert self._inplace is not None
        started = time.monotonic()
        if not first:
            self._inplace.fire_faults(self.step, at="reform")
        self._progress(self.step, active=False)  # waiting for a world is no hang
        self._deterministic.discard()
        if self._fast is not None:
            self._fast.discard()
        self.optimizer.zero_grad(set_to_none=True)
        self._inplace.abandon()
        self._coll = None
        live = -1 if first else self.step
        mirror_s = 0.0
        while True:
            # a spare keeps the node's snapshot segments mapped (new ones appear) meanwhile
            spare = self._warmed and first
            idle = (lambda: self._snapshots.premap(self.device)) if spare else None
            view = self._inplace.next_world(self._view, idle=idle)
            self._view = view
            if spare and live < 0:  # the state its worker left in the spare's device mirror
                loading = time.monotonic()
                mirrored = self._snapshots.restore_mirror()
                if mirrored is not None:
                    live = self.step = mirrored.step
                    mirror_s = time.monotonic() - loading
            try:
                formed_at = time.monotonic()
                coll = self._inplace.form(view)
                formed = time.monotonic()
                plan = self._agree(coll, live)
                agreed = time.monotonic()
                self._set_world(view.rank, view.size)
                self._coll = coll
                restored = self._resume(plan, coll)
                break
            except (WorldChanged, CollectiveFailed) as exc:
                logger.warning("rank %d: world epoch %d abandoned while re-forming: %s",
                               view.rank, view.epoch, exc)  # fmt: skip
                self._inplace.abandon()
                continue
            except (RuntimeError, dist.DistError) as exc:  # NCCL: raised at a launch, or lazily
                if not self._inplace.changed_since(view):
                    raise
                logger.warning("rank %d: world epoch %d superseded while re-forming: %s",
                               view.rank, view.epoch, exc)  # fmt: skip
                self._inplace.abandon()
                continue
        done = time.monotonic()
        self._truncate(plan.step, view.epoch)
        if first and view.epoch == 0:
            return False
        if first:  # a spare: its recovery begins when the world names it
            started = view.received
        report = {
            "epoch": view.epoch, "rank": view.rank, "world_size": view.size,
            "resume_step": plan.step, "steps_before": live, "restored": restored,
            "healed_from": plan.heal_from,
            "wait_s": round(formed_at - started - mirror_s, 4),
            "reform_s": round(formed - formed_at, 4), "agree_s": round(agreed - formed, 4),
            "restore_s": round(done - agreed + mirror_s, 4), "mirror": mirror_s > 0,
            "world_received_s": round(started - view.received, 4) if view.received <= started
            else 0.0,
        }  # fmt: skip
        self.recoveries.append(report)
        logger.info("rank %d: re-formed in place at epoch %d: %s", view.rank, view.epoch,
                    plan.reason)  # fmt: skip
        return True

    def _report_recovery(self, first_step_s: float) -> None:
        if not self.recoveries:
            return
        report = self.recoveries[-1] | {"first_step_s": round(first_step_s, 4)}
        self.recoveries[-1] = report
        assert self._inplace is not None
        self._inplace.session.recovered(report)
        self._snapshots.release_spent_mirror()

    def _agree(self, coll: Collectives, live: int) -> ResumePlan:
        """Every member's steps done, gathered; rank 0 decides from what the agents hold and
        tells the others (one decider per epoch: if it dies, the epoch fails)."""
        # on the job's device: NCCL groups take CUDA tensors only
        steps = torch.full((1,), live, dtype=torch.int64, device=self.device)
        every = torch.empty(coll.size, dtype=torch.int64, device=self.device)
        coll.all_gather(every, steps)
        decided = torch.zeros(3, dtype=torch.int64, device=self.device)
        if coll.rank == 0:
            complete = self._snapshots.complete_steps() if self._snapshots.enabled else set()
            plan = plan_resume(every.tolist(), complete, heal=True)
            decided[0] = -2 if plan is None else plan.step
            decided[1] = 1 if plan is not None and plan.fresh else 0
            decided[2] = -1 if plan is None else plan.heal_from
        coll.broadcast(decided, root=0)
        step, fresh, heal_from = int(decided[0]), bool(decided[1]), int(decided[2])
        if step == -2:
            raise ConfigError("the members of the new world share no step to resume from")
        steps_done = every.tolist()
        restore = tuple(not fresh and s != step for s in steps_done)
        keep = sum(1 for r in restore if not r)
        how = "restore it" if heal_from < 0 else f"take rank {heal_from}'s"
        reason = ("a new job" if fresh else f"resume after {step} steps: {keep} member(s) keep "
                  f"their state, {len(restore) - keep} {how}")  # fmt: skip
        return ResumePlan(step, restore, fresh, reason, heal_from)

    def _resume(self, plan: ResumePlan, coll: Collectives) -> bool:
        """Bring this rank to ``plan.step``; True if it restored from the records."""
        if plan.fresh:
            if self._warmed:  # a spare in a job with nothing to restore: start clean
                self.optimizer.state.clear()
            restored = self._snapshots.restore()  # a job restarted from the disk tier
            if restored is not None:
                self.step = restored.step
                return True
            self._share_initial_state(coll)
            self.step = 0
            return False
        self.step = plan.step
        if plan.heal_from >= 0:  # no step is whole in the records: from a member's memory
            share_state(coll, plan.heal_from, self.model, self.optimizer, self.scheduler,
                        self.device)  # fmt: skip
            return plan.restore[coll.rank]
        if not plan.restore[coll.rank]:
            return False
        restored = self._snapshots.restore(plan.step)
        if restored is None or restored.step != plan.step:
            raise CollectiveFailed(f"step {plan.step} could not be restored")
        return True

    def _share_initial_state(self, coll: Collectives) -> None:
        """A new job: every rank starts from rank 0's parameters and buffers (as DDP does)."""
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                coll.broadcast(tensor.data, root=0)

    def _truncate(self, step: int, epoch: int) -> None:
        """Records after ``step`` belong to an abandoned future: the agent drops them."""
        session = self._snapshots.session
        if session is not None and self._snapshots.enabled:
            session.call("truncate_snapshots", after_step=step, epoch=epoch)
        if self.step == 0 and step == 0:
            self._snapshots.snapshot(0, data_position={"step": 0})

    def hosting(self) -> list[tuple[int, int]]:
        """Every rank's block of logical workers."""
        key = tuple(self._capacities)
        if self._hosting is None or self._hosting[0] != key:
            self._hosting = (key, plan_hosting(self.plan.logical_workers, key))
        return list(self._hosting[1])

    def _train_step(self, step: int) -> float:
        coll = self._coll
        assert coll is not None
        blocks = self.hosting()
        start, end = blocks[self.rank]
        sum_mode = False
        fast = self._fast
        # Alone in the world, the accumulated .grad is the sum already when it holds one
        # logical worker (or any number, on the fast path): no copy, no collective.
        direct = coll.size == 1 and (fast is not None or end - start == 1)
        # after the loss and the count: every rank's speed in the step before, each in its
        # own slot (the others add zeros, so the sum is exact and the same on every rank)
        timed = self._policy is not None
        width = EXTRAS + coll.size if timed else EXTRAS
        if fast is None and not direct:
            self._deterministic.begin(start, end, width)
        hosted = torch.zeros(width, dtype=torch.float64, device=self.device)
        self.speed = self._clock.speed() if timed else 0.0
        factor = self._inplace.slowdown(step) if self._inplace is not None else 1.0
        attention = self._attention
        capacities = self._capacities if attention is not None else None
        if attention is not None:
            attention.begin_step()
        if timed:
            self._clock.start()
        for logical in range(start, end):
            extras = torch.zeros(width, dtype=torch.float64, device=self.device)
            if logical == start and timed:
                extras[EXTRAS + coll.rank] = self.speed
            if fast is None:
                for p in self._params:
                    p.grad = None
            for micro in range(self.plan.micro_batches):
                last = logical == end - 1 and micro == self.plan.micro_batches - 1
                # attention's collectives run inside the backward: buckets wait until after
                if fast is not None and not direct and last and attention is None:
                    fast.arm(coll)
                with (attention.round(coll, capacities) if attention is not None
                      else contextlib.nullcontext()):  # fmt: skip
                    if factor > 1:
                        sum_mode = slowed(lambda: self._micro_batch(step, logical, micro, extras),  # noqa: B023
                                          factor, self.device, self._clock.clock)  # fmt: skip
                    else:
                        sum_mode = self._micro_batch(step, logical, micro, extras)
            if fast is None and not direct:
                self._deterministic.leaf_done(extras)
            else:
                hosted += extras
        if attention is not None:  # the rounds of ranks that host more micro-batches
            rounds = max(e - s for s, e in blocks) * self.plan.micro_batches
            for _ in range(rounds - (end - start) * self.plan.micro_batches):
                attention.serve(coll, capacities)
        if timed:
            self._clock.stop((end - start) * self.plan.per_worker)
        if direct:
            for p in self._params:  # as the reductions do: an unused parameter's sum is 0
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            total = hosted
        elif fast is None:
            total = self._deterministic.reduce(blocks, coll)
        else:
            total = fast.reduce(hosted, coll)
        loss, count, *speeds = total.tolist()
        self.speeds = speeds
        if self._inplace is not None and self._inplace.changed_since(self._view):
            # NCCL: an abort can make a pending reduction return early; never apply it
            raise WorldChanged(f"world epoch {self._view.epoch} superseded during step {step}")
        if sum_mode:
            for p in self._params:
                if p.grad is not None:
                    p.grad.div_(count)
            loss /= count
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._judge(step, speeds)
        if attention is not None:
            self._report_attention(step, attention)
        return loss

    def _report_attention(self, step: int, attention: AttentionRounds) -> None:
        """The step's attention imbalance before and after planning: rank 0 says it (a
        ``attention`` event each step, and ``etrain status``)."""
        self.attention = attention.stats.report(step)
        session = self._snapshots.session
        if self.rank == 0 and session is not None:
            session.attention(self.attention)

    def _judge(self, step: int, speeds: list[float]) -> None:
        """The straggler verdict on the speeds that came with step ``step``'s reduction (the
        same on every rank): a re-plan takes effect at the next step."""
        if self._policy is None or len(speeds) < 2:
            return
        self._straggling, verdict = straggler_verdict(self._straggling, speeds, self._policy)
        if verdict.action == "keep":
            return
        session = self._snapshots.session
        report = {"action": verdict.action, "reason": verdict.reason, "step": step,
                  "speeds": [round(s, 3) for s in verdict.speeds],
                  "capacities": list(verdict.capacities)}  # fmt: skip
        if verdict.action == "replan":
            self._capacities = list(hosting_capacities(verdict.capacities,
                                                       self.plan.logical_workers))  # fmt: skip
            blocks = self.hosting()
            report["workers"] = [end - start for start, end in blocks]
            self.replans.append(report)
            logger.info("rank %d: re-planned after step %d: %s", self.rank, step, verdict.reason)
            if self.rank == 0 and session is not None:
                session.straggler(report)
        elif self.rank in verdict.failed and not self._failed_said:
            # this rank is the one far too slow: its agent takes it out of the world
            self._failed_said = True
            logger.warning("rank %d: declared failed after step %d: %s", self.rank, step,
                           verdict.reason)  # fmt: skip
            if session is not None:
                session.straggler(report | {"failed": list(verdict.failed)})

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
        session = self._snapshots.session
        self._snapshots.close()
        if self._fast is not None:
            self._fast.close()
        if self._inplace is not None:
            self._inplace.close()
        if session is not None:
            session.finished()
