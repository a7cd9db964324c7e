"""The training loop: it consumes a Plan, counts what it executes, and never re-derives a count."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stepwise.distributed import Replica
from stepwise.plan import Plan, Window

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, int]  # inputs, targets, real samples (rest is padding)


def per_sample_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss with one value per sample, so that the loop can weight real samples exactly."""
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    return lambda out, y: F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


class PlanMismatch(RuntimeError):
    """What was executed differs from the plan: the run is failed, never reported as fine."""


@dataclass
class Counters:
    global_step: int = 0
    micro_steps: int = 0
    samples_seen: int = 0
    epoch: int = 0


class Trainer:
    """Runs the plan: windows of micro-steps, one optimizer step each, validation per epoch.

    Args:
        model: the wrapped model (single, DataParallel or DistributedDataParallel).
        optimizer, scheduler: the scheduler is stepped once per optimizer step.
        plan: the batch plan; `plan.lr` is already in the optimizer.
        task: `classification` or `regression` (chooses the per-sample loss).
        train_loader: yields this process's micro-batches, from a `MicroBatchSampler`.
        val_loader: this process's shard of the validation set (may be None).
        replica: parallel mode, rank and reductions.
        tracker: MLflow on the main rank, a null tracker elsewhere.
        progress: a tqdm-like bar on the main rank, a null one elsewhere.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, plan: Plan, task: str,
                 train_loader, val_loader, replica: Replica, tracker, progress,
                 grad_clip_norm: float | None = None, log_every_n_steps: int = 1,
                 val_every_n_epochs: int = 1) -> None:
        self.model, self.optimizer, self.scheduler, self.plan = model, optimizer, scheduler, plan
        self.task, self.loss_fn = task, per_sample_loss(task)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.replica, self.tracker, self.progress = replica, tracker, progress
        self.grad_clip_norm = grad_clip_norm
        self.log_every_n_steps, self.val_every_n_epochs = log_every_n_steps, val_every_n_epochs
        self.counters = Counters()
        self.real_samples = 0  # this process's real samples, summed over ranks at the end
        self.last_lr = float("nan")  # the LR of the last optimizer step taken

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train until the plan's total of optimizer steps; return the last validation metrics
        and the executed `global_step`."""
        metrics: dict[str, float] = {}
        for epoch in range(self.counters.epoch, self.plan.epochs):
            self.counters.epoch = epoch
            for window, batches in self.windows(epoch):
                self.train_step(batches, window)
            last = epoch == self.plan.epochs - 1
            if self.val_loader is not None and (last or (epoch + 1) % self.val_every_n_epochs == 0):
                metrics = self.evaluate()
                self.tracker.log_metrics(metrics, step=self.counters.global_step)
            self.counters.epoch = epoch + 1
        self.check_against_plan()
        final = {"global_step": self.counters.global_step}
        self.tracker.log_metrics(final, step=self.counters.global_step)
        return {**metrics, **final}

    def windows(self, epoch: int) -> Iterator[tuple[Window, list[Batch]]]:
        """The epoch's optimizer-step windows, each with its micro-batches on the device."""
        self.train_loader.batch_sampler.set_epoch(epoch)
        batches = iter(self.train_loader)
        for step_in_epoch in range(self.plan.optimizer_steps_per_epoch):
            if self.counters.global_step >= self.plan.total_optimizer_steps:
                return
            window = self.plan.window(step_in_epoch)
            micro = range(window.first_micro_step, window.first_micro_step + window.micro_steps)
            yield window, [self._to_device(next(batches), j) for j in micro]

    def train_step(self, batches: list[Batch], window: Window) -> torch.Tensor:
        """One optimizer step: the gradient of the mean loss over the window's real samples."""
        scale = self.replica.loss_multiplier / window.samples
        loss_sum = torch.zeros((), device=self.replica.device, dtype=torch.float64)
        for i, (x, y, real) in enumerate(batches):
            with self.replica.no_sync(self.model, sync=i == len(batches) - 1):
                batch_sum = self.loss_fn(self.model(x), y)[:real].sum()
                (batch_sum * scale).backward()
            loss_sum += batch_sum.detach()
            self.real_samples += real
        if self.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        lr = self.last_lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.global_step += 1
        self.counters.micro_steps += len(batches)
        self.counters.samples_seen += window.samples
        self._log_step(loss_sum, window, lr)
        return loss_sum

    def _log_step(self, loss_sum: torch.Tensor, window: Window, lr: float) -> None:
        step = self.counters.global_step
        self.progress.update(1)
        if step % self.log_every_n_steps and step != self.plan.total_optimizer_steps:
            return
        loss = self.replica.sum(loss_sum).item() / window.samples  # the only host sync
        self.progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.tracker.log_metrics(
            {"train/loss": loss, "train/lr": lr, "train/samples_seen": self.counters.samples_seen},
            step=step,
        )

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor], micro_step: int) -> Batch:
        x, y = batch
        start, stop = self.plan.shard(micro_step, self.replica.rank,
                                      self.replica.blocks_per_process)
        real = stop - start
        if len(y) != max(real, 1):
            raise PlanMismatch(f"micro-step {micro_step}: the loader gave {len(y)} samples, "
                               f"the plan {real}")
        device = self.replica.device
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), real

    # -- validation and the final check ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact validation metrics: sums and counts reduced over ranks, never means of means."""
        self.model.eval()
        device = self.replica.device
        totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
        for x, y in self.val_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = self.model(x)
            totals[0] += self.loss_fn(out, y).sum()
            if self.task == "classification":
                totals[1] += (out.argmax(dim=1) == y).sum()
            totals[2] += len(y)
        self.model.train()
        loss_sum, correct, count = self.replica.sum(totals).tolist()
        metrics = {"val/loss": loss_sum / max(count, 1)}
        if self.task == "classification":
            metrics["val/accuracy"] = correct / max(count, 1)
        return metrics

    def check_against_plan(self) -> None:
        """Fail the run if the executed counts differ from the plan."""
        real = int(self.replica.sum(torch.tensor(self.real_samples, device=self.replica.device,
                                                 dtype=torch.float64)).item())
        executed = {
            "global_step": (self.counters.global_step, self.plan.total_optimizer_steps),
            "micro_steps": (self.counters.micro_steps, self.plan.total_micro_steps),
            "samples_seen": (self.counters.samples_seen, self.plan.total_samples),
            "real samples processed": (real, self.plan.total_samples),
        }
        wrong = [f"{name}: executed {got}, planned {want}"
                 for name, (got, want) in executed.items() if got != want]
        if not math.isclose(self.last_lr, self.plan.final_lr, rel_tol=1e-9, abs_tol=1e-15):
            wrong.append(f"final lr: executed {self.last_lr!r}, planned {self.plan.final_lr!r}")
        if wrong:
            raise PlanMismatch("the run did not execute its plan: " + "; ".join(wrong))
        log.info("executed as planned: %d optimizer steps, %d micro-steps, %d samples",
                 self.counters.global_step, self.counters.micro_steps, self.counters.samples_seen)
