"""The training loop: it consumes a Plan, counts what it executes, and never re-derives a count."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from stepwise.contract.errors import EmptyWindow, PlanMismatch
from stepwise.contract.items import ItemPlan
from stepwise.contract.monitor import BestKeeper
from stepwise.contract.plan import Plan, Window
from stepwise.contract.plan_check import mismatches, planned_counts
from stepwise.data.batches import call_model, to_device
from stepwise.data.failures import naming_user_errors
from stepwise.loop.callbacks import Callbacks
from stepwise.loop.item_tally import ItemTally
from stepwise.loop.loop_state import load_loop_state, loop_state
from stepwise.loop.precision import Precision, inputs_memory_format
from stepwise.loop.signals import STOP, Stopped, StopSignals
from stepwise.loop.step_log import StepLog
from stepwise.loop.trainer_parts import Counters, LoopSettings, NullProgress, Parts
from stepwise.loop.validation import evaluate
from stepwise.models.losses import masked_sum, mean_of, per_sample
from stepwise.parallel.replica import Replica

log = logging.getLogger(__name__)

Batch = tuple[Any, torch.Tensor, int]  # inputs, target, real samples (the rest is padding)


class Trainer:
    """Runs the plan: windows of micro-steps, one optimizer step each, validation per epoch.

    Args:
        parts: model, optimizer, scheduler, loss and metrics; `plan.lr` is in the optimizer.
        plan: the batch plan.
        train_loader: yields this process's micro-batches, from a `MicroBatchSampler`, as
            (inputs, target) pairs.
        val_loader: this process's shard of the validation set (may be None).
        replica: parallel mode, rank and reductions.
        tracker: MLflow on the main rank, a null tracker elsewhere.
        progress: a tqdm-like bar on the main rank, a null one elsewhere.
        settings: the loop's `trainer.*` keys.
        precision: autocast and the fp16 GradScaler (`trainer.precision`).
        items: each window's loss items, when the data states them per sample (else counted).
        best: `trainer.monitor`'s best checkpoint and early stopping (None: not monitored).
        callbacks: the `callbacks` group's, called at the hooks (stepwise/loop/callbacks.py).

    Per micro-step the loop only runs forward and backward (and adds the loss to a device
    tensor); the host waits for the device only at logging points, checkpoints and the end,
    except under `on_nonfinite=skip`, which must look at every step's loss before stepping.
    """

    def __init__(self, parts: Parts, plan: Plan, *, train_loader, val_loader, replica: Replica,
                 tracker, progress=None, settings: LoopSettings | None = None,
                 save: Callable[[Trainer], None] | None = None,
                 precision: Precision | None = None, stop_signals: StopSignals = STOP,
                 items: ItemPlan | None = None, best: BestKeeper | None = None,
                 callbacks: Callbacks | None = None) -> None:
        self.model, self.optimizer, self.scheduler = parts.model, parts.optimizer, parts.scheduler
        settings = settings or LoopSettings()
        self.loss, self.metrics, self.plan, self.settings = parts.loss, parts.metrics, plan, settings
        self.item_mask = getattr(parts.loss, "item_mask", None)  # looked up once: per micro-step
        self.mean_loss = mean_of(parts.loss)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.replica, self.tracker = replica, tracker
        self.progress = progress or NullProgress()
        self.save = save or (lambda trainer: None)
        self.stop_signals = stop_signals
        self.precision = precision or Precision("32", replica.device)
        self.copy_to = replica.device if replica.device.type != "cpu" else None  # batches' device
        self.stop_vote = replica.lagged_max()  # a signal on any rank stops all, one step later
        self.counters = Counters()
        self.real_samples = 0  # this process's real samples, summed over ranks at the end
        self.last_lr = float("nan")  # the LR of the last optimizer step taken
        self.last_shares: torch.Tensor | None = None  # its loss shares, on the device
        self.items = items
        self.tally = ItemTally(replica, parts.loss)  # the items of a loss that masks them
        self.best = best
        self.step_log = StepLog(plan, replica, tracker, self.tally, settings)
        self.callbacks = callbacks or Callbacks({})
        self.callbacks.attach(self)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train until the plan's total of optimizer steps; return the last validation metrics
        and the executed `global_step` (with `trainer.monitor`, also the best evaluation's as
        `best/*`). Stops early when the monitor's patience runs out. Raises Stopped after a stop
        signal (checkpoint saved)."""
        metrics: dict[str, float] = {}
        # A run resumed from its early stop's checkpoint has nothing left to do.
        epochs = self.counters.epoch if self.early_stopped else self.plan.epochs
        self.step_log.start(self.counters)
        try:
            if self.callbacks:
                self.callbacks.fit_start()
            for epoch in range(self.counters.epoch, epochs):
                self.counters.epoch = epoch
                for window, batches in self.windows(epoch):
                    stop = self.train_step(batches, window)
                    self.counters.step_in_epoch += 1
                    if self.callbacks:  # after the step's count, before its checkpoint
                        self.callbacks.step_end(bool(stop) or self.step_log.logs(
                            self.counters.global_step))
                    self._after_step(stop)
                last = epoch == self.plan.epochs - 1
                if self.val_loader is not None and (last or
                                                    (epoch + 1) % self.settings.val_every_n_epochs == 0):
                    metrics = self._evaluate_and_log()
                    if self.best is not None:
                        self.best.after_evaluation(self, metrics)
                if self.counters.step_in_epoch == self.plan.optimizer_steps_per_epoch:
                    self.counters.epoch, self.counters.step_in_epoch = epoch + 1, 0
                if self.early_stopped:
                    break
        except Stopped as stopped:
            self.stop_vote.close()  # every rank has the same exchange in flight: finish it
            self.callbacks.exception(stopped)
            raise
        except Exception as err:
            self.step_log.salvage(self.counters)  # the logged steps before a crash
            self.callbacks.exception(err)
            raise
        self.stop_vote.close()
        self.check_losses()
        self.check_against_plan()
        final = {"global_step": self.counters.global_step}
        self.tracker.log_metrics(final, step=self.counters.global_step)
        metrics = {**metrics, **(self.best.monitor.best_record() if self.best else {}), **final}
        if self.callbacks:
            self.callbacks.fit_end(metrics)
        return metrics

    @property
    def early_stopped(self) -> bool:
        return self.best is not None and self.best.stopped_at is not None

    def windows(self, epoch: int) -> Iterator[tuple[Window, list[Batch]]]:
        """The epoch's optimizer-step windows, each with its micro-batches on the device, from
        `counters.step_in_epoch` on (a resumed run skips what it has done without loading it)."""
        start = self.counters.step_in_epoch
        self.train_loader.batch_sampler.set_epoch(epoch, start * self.plan.accum)
        batches = iter(self.train_loader)
        for step_in_epoch in range(start, self.plan.optimizer_steps_per_epoch):
            if self.counters.global_step >= self.plan.total_optimizer_steps:
                return
            window = self._window(epoch, step_in_epoch)
            micro = range(window.first_micro_step, window.first_micro_step + window.micro_steps)
            yield window, [self._to_device(self._load(batches, epoch, j), j) for j in micro]

    def _load(self, batches: Iterator, epoch: int, micro_step: int) -> tuple[Any, torch.Tensor]:
        """The next micro-batch; an error of the user's dataset or collate function names it."""
        with naming_user_errors(lambda: f"global_step {self.counters.global_step}, micro-step "
                                        f"{micro_step} of epoch {epoch}, rank {self.replica.rank}"):
            return next(batches)

    def _window(self, epoch: int, step_in_epoch: int) -> Window:
        """The plan's window, with its loss items when the data states them."""
        window = self.plan.window(step_in_epoch)
        if self.items is None:
            return window
        items = self.items.window(epoch, step_in_epoch)
        if items == 0:
            raise EmptyWindow(f"optimizer step {self.counters.global_step + 1} (epoch {epoch}, "
                              f"samples {self.items.samples_of(epoch, step_in_epoch)}) has no "
                              "loss items: the data's item_counts are 0 for all its samples")
        return dataclasses.replace(window, items=items)

    def train_step(self, batches: list[Batch], window: Window) -> int:
        """One optimizer step: the gradient of the mean loss over the window's real samples.

        Returns the number of a stop signal that some rank received (0: none).
        """
        shares = self.last_shares = self._accumulate(batches, window)  # on the device
        step = self.counters.global_step + 1
        if window.items is not None:
            self.counters.items_seen += window.items
        norm = skipped = None
        if self.settings.on_nonfinite == "skip" and self._any_rank_nonfinite(shares):
            self._skip(step, "non-finite loss")
            skipped = shares
        else:
            self.step_log.unchecked.append((step, shares))
            self.precision.unscale_(self.optimizer)
            norm = self._grad_norm(step)
            if not self.precision.step(self.optimizer):
                self._skip(step, "float16 gradients overflowed (the GradScaler lowered its scale)")
                norm = None
        lr = self.last_lr = self.scheduler.get_last_lr()[0]
        if self.plan.schedule.constant:
            pass  # its factor is 1 at every step: stepping it would change nothing
        elif self.counters.skipped_steps:
            with warnings.catch_warnings():
                # A skipped step still advances the schedule (a function of the samples seen).
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.global_step = step
        self.counters.micro_steps += len(batches)
        self.counters.samples_seen += window.samples
        stop = self.stop_vote.exchange(self.stop_signals.signum)
        self.progress.update(1)
        # a stopped run shows its last step; the losses stay on the device until a read is due
        if self.step_log.record(step, self.counters, lr, norm, skipped, force=bool(stop)):
            self.check_losses()
        return stop

    def _grad_norm(self, step: int) -> torch.Tensor | None:
        """The total norm of the gradient about to be applied (after accumulation, the DDP
        all-reduce and unscaling), clipped to `grad_clip_norm` if set: a device tensor, computed
        only at logged steps when there is no clipping."""
        logs = self.step_log.logs(step)
        if self.settings.grad_clip_norm is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip_norm)
            if hasattr(norm, "full_tensor"):  # FSDP: the norm of shards, completed by every rank
                return norm.full_tensor() if logs else None
            return norm
        if logs and self.step_log.partial_norms:  # FSDP without clipping
            # The squared norm of this rank's shards: the step log sums them over ranks in the
            # all-reduce that reads the losses (a DTensor norm here would cost a collective and
            # DTensor dispatch per logged step: 3% of a W7 step in benchmarks/fsdp.py).
            shards = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
            return torch.stack([torch.linalg.vector_norm(g).double() for g in shards]).square().sum()
        if logs and self.replica.is_main:
            return nn.utils.get_total_norm([p.grad for p in self.model.parameters()
                                            if p.grad is not None])
        return None

    def _accumulate(self, batches: list[Batch], window: Window) -> torch.Tensor:
        """Forward/backward every micro-step; DDP all-reduces on the last one only.

        Each micro-step's backward loss is its share of the mean loss over the window's real
        items: the sum of its real items' losses times `loss_multiplier / window items`. When
        the items are samples, the window's count is the plan's; a full micro-batch then
        computes its share as its mean loss times `real * loss_multiplier / window.samples`
        (skipped when that is exactly 1). When the loss masks items (tokens), the count is the
        data's (`window.items`, no communication), else counted in the loaded window, over
        ranks, before the first forward. Returns the sum of the shares: over ranks, divided by
        `loss_multiplier`, it is the window's mean loss.
        """
        multiplier = self.replica.loss_multiplier
        masks = ([self.item_mask(target) for _, target, _ in batches] if self.item_mask
                 else [None] * len(batches))
        items = None
        if masks[0] is not None:
            step = self.counters.global_step + 1
            items = self.tally.window(step, [m[:real] for m, (_, _, real) in zip(masks, batches)],
                                      window.items)
        shares = []
        for i, ((inputs, target, real), mask) in enumerate(zip(batches, masks)):
            with self.replica.no_sync(self.model, sync=i == len(batches) - 1):
                with self.precision.autocast():
                    out = call_model(self.model, inputs)
                    if mask is not None:
                        values = self.loss(out, target)
                        share = masked_sum(values, mask, real) * (multiplier / items)
                    elif real == len(target):
                        share = self.mean_loss(out, target)
                        if real * multiplier != window.samples:
                            share = share * (real * multiplier / window.samples)
                    else:
                        share = per_sample(self.loss(out, target))[:real].sum() * (
                            multiplier / window.samples)
                self.precision.backward(share)
            shares.append(share.detach())
            self.real_samples += real
        return shares[0] if len(shares) == 1 else torch.stack(shares).sum()

    def _any_rank_nonfinite(self, shares: torch.Tensor) -> bool:
        """Whether some rank's loss is NaN or infinite (a host sync, and in DDP a small
        all-reduce: every rank takes the same decision at the same step)."""
        return bool(self.replica.sum((~torch.isfinite(shares)).double()).item())

    def _skip(self, step: int, why: str) -> None:
        self.counters.skipped_steps += 1
        log.warning("%s at optimizer step %d: step skipped (%d so far)", why, step,
                    self.counters.skipped_steps)

    def check_losses(self) -> None:
        """Read the device (stepwise/loop/step_log.py): check the losses of the steps since the last
        read (one sync, and one all-reduce in DDP, at the same step on every rank) and send the
        logged steps' metrics; raise NonFiniteLoss under `on_nonfinite=stop`."""
        loss = self.step_log.read(self.counters)
        if loss is not None:
            self.progress.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def _after_step(self, stop: int) -> None:
        """Checkpoint when due or when asked to stop; then honour the stop."""
        every = self.settings.checkpoint_every_n_steps
        if stop or (every and self.counters.global_step % every == 0
                    and self.counters.global_step < self.plan.total_optimizer_steps):
            self.check_losses()  # never checkpoint weights that a non-finite step has spoilt
            with self.step_log.paused():
                self.save(self)
        if stop:
            raise Stopped(stop, checkpointed=True)

    def _to_device(self, batch: tuple[Any, torch.Tensor], micro_step: int) -> Batch:
        inputs, target = batch
        start, stop = self.plan.shard(micro_step, self.replica.rank,
                                      self.replica.blocks_per_process)
        real = stop - start
        if len(target) != max(real, 1):
            raise PlanMismatch(f"micro-step {micro_step}: the loader gave {len(target)} samples, "
                               f"the plan {real}")
        inputs, target = self._on_device(inputs, target)
        return inputs, target, real

    def _on_device(self, inputs: Any, target: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if self.copy_to is not None:
            inputs, target = to_device((inputs, target), self.copy_to)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs_memory_format(inputs, self.settings.channels_last)
        return inputs, target

    # -- validation and the final check ------------------------------------------------------------
    def evaluate(self, split: str = "val", loader=None) -> dict[str, float]:
        """Exact `<split>/*` metrics over this process's shard of the validation set, or of
        `loader`'s split (stepwise/loop/validation.py)."""
        when = f"after epoch {self.counters.epoch}" if split == "val" else "after fitting"
        with naming_user_errors(lambda: f"{'validation' if split == 'val' else split} {when}, "
                                        f"global_step {self.counters.global_step}, "
                                        f"rank {self.replica.rank}"):
            return evaluate(self.model, self.val_loader if loader is None else loader, self.loss,
                            self.metrics, self.replica, self.precision, self._on_device, prefix=split)

    def evaluate_with_callbacks(self, split: str = "val", loader=None) -> dict[str, float]:
        """`evaluate`, and the metrics the callbacks add to it (the EMA's `<split>_ema/*`)."""
        metrics = self.evaluate(split, loader)
        if self.callbacks:
            loader = self.val_loader if loader is None else loader
            metrics.update(self.callbacks.evaluation_end(split, metrics, loader))
        return metrics

    def _evaluate_and_log(self) -> dict[str, float]:
        """Evaluate after reading the steps before (timed without it), and log the metrics
        with `train/samples_seen` and `epoch` (epochs done) at the same step."""
        self.check_losses()
        with self.step_log.paused():
            metrics = self.evaluate_with_callbacks()
        done = self.counters.epoch + self.counters.step_in_epoch / self.plan.optimizer_steps_per_epoch
        self.step_log.evaluation(metrics, self.counters, done)
        return metrics

    def check_against_plan(self) -> None:
        """Fail the run if the executed counts differ from the plan: the whole plan, or, after an
        early stop, the plan up to the step it stopped at (the end of an epoch)."""
        real = int(self.replica.sum(torch.tensor(self.real_samples, device=self.replica.device,
                                                 dtype=torch.float64)).item())
        steps = self.best.stopped_at if self.early_stopped else self.plan.total_optimizer_steps
        items = self.items if self.items is not None and self.tally.active else None
        planned = planned_counts(self.plan, items, steps)
        executed = {**asdict(self.counters), "real samples processed": real,
                    "final lr": self.last_lr}
        wrong = mismatches(executed, planned)
        cut = f" up to its early stop at global_step {steps}" if self.early_stopped else ""
        if wrong:
            raise PlanMismatch(f"the run did not execute its plan{cut}: " + "; ".join(wrong))
        log.info("executed as planned%s: %d optimizer steps, %d micro-steps, %d samples", cut,
                 self.counters.global_step, self.counters.micro_steps, self.counters.samples_seen)

    # -- state for checkpoints (stepwise/loop/loop_state.py) -------------------------------------
    def state_dict(self) -> dict:
        """Everything an exact resume needs from the loop (collective in DDP: call on every rank)."""
        return loop_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` stopped (the RNG too, when the world size is the same)."""
        load_loop_state(self, state)
