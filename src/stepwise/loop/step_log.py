"""What the loop logs per optimizer step: values kept on the device, read at flush points.

A logged step's loss (and gradient norm) stays a device tensor until the next read of the
device: at the first logged step `trainer.flush_every_n_steps` or more after the previous read,
and at the last step, a stop, a checkpoint and an evaluation. A read is one host sync and, in
DDP, one all-reduce (every unread step's loss summed over ranks, which also checks them for NaN
and inf), at the same step on every rank. Throughput is measured on the host between reads at
logged steps: the sync makes the wall time honest.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from stepwise.contract.errors import NonFiniteLoss

log = logging.getLogger(__name__)

AUTO_POINTS = 100  # the train/loss points a run gets at least (all its steps when it has fewer)
MIB = 2 ** 20


def log_interval(configured: int | None, total_steps: int) -> int:
    """Optimizer steps between logged steps: `trainer.log_every_n_steps`, or (null) the largest
    interval that still gives min(total_steps, AUTO_POINTS) points."""
    return configured if configured is not None else max(1, total_steps // AUTO_POINTS)


def progress_line(step: int, total: int, loss: float, samples_per_s: float,
                  seconds_per_step: float) -> str:
    """`step 120/450 (27%) loss 0.4123 samples/s 5321 eta 0:00:41`: the progress bar's facts as
    one line, for output that is not a terminal (a SLURM job's file), where tqdm shows nothing."""
    seconds = max(total - step, 0) * seconds_per_step
    eta = datetime.timedelta(seconds=round(seconds)) if math.isfinite(seconds) else "?"
    percent = min(round(100 * step / max(total, 1)), 100 if step >= total else 99)
    return (f"step {step}/{total} ({percent}%) loss {loss:.4f} "
            f"samples/s {samples_per_s:.0f} eta {eta}")


def peak_memory(device: torch.device) -> dict[str, float]:
    """The peak memory so far in MiB: what tensors took on a CUDA device
    (`train/peak_memory_mb`), else this process's peak resident set (`train/peak_rss_mb`)."""
    if device.type == "cuda":
        return {"train/peak_memory_mb": torch.cuda.max_memory_allocated(device) / MIB}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"train/peak_rss_mb": rss / (MIB if sys.platform == "darwin" else 1024)}


@dataclass
class _Point:
    """A logged step whose loss is not read yet."""

    step: int
    metrics: dict[str, float]  # what the host knows: lr, samples_seen, items_seen, skipped_steps
    loss: float | None  # known already: a step skipped for a non-finite loss
    norm: torch.Tensor | None  # the gradient norm applied, on the device


@dataclass
class _Window:
    """The host's measure since the last throughput point."""

    time: float
    step: int
    samples: int
    items: int
    paused: float = 0.0  # evaluations and checkpoints: not optimizer steps


class StepLog:
    """Per-step values noted without a host sync, read and sent to the tracker at flush points.

    Args:
        plan: the run's plan (its total of optimizer steps).
        replica: sums the losses over ranks; its device has the memory peak.
        tracker: where the metrics go.
        tally: the loop's ItemTally (settled at each read; items are logged when it is active).
        settings: the loop's `trainer.*` keys: `log_every_n_steps` (None: `log_interval`),
            `flush_every_n_steps`, `on_nonfinite` (stop: a non-finite loss fails at the read).
        lines: write `progress_line` at each read at a logged step; None: on the main rank
            when stdout is not a terminal (tqdm then shows no bar, e.g. in a SLURM job's file).
        clock: seconds, for the throughput.
    """

    def __init__(self, plan, replica, tracker, tally, settings, lines: bool | None = None,
                 clock=time.perf_counter) -> None:
        self.plan, self.replica, self.tracker, self.tally = plan, replica, tracker, tally
        self.total = plan.total_optimizer_steps
        self.every = log_interval(settings.log_every_n_steps, self.total)
        self.flush_every, self.on_nonfinite = settings.flush_every_n_steps, settings.on_nonfinite
        self.lines = replica.is_main and not sys.stdout.isatty() if lines is None else lines
        self.clock = clock
        # FSDP without clipping: a point's norm is this rank's squared norm of its shards
        self.partial_norms = replica.mode == "fsdp" and settings.grad_clip_norm is None
        self.unchecked: list[tuple[int, torch.Tensor]] = []  # (step, its loss shares) unread
        self.points: list[_Point] = []
        self.read_step = 0  # the step of the last read
        self.sent_step = -1  # the last step whose train metrics were sent
        self.reads = 0  # host reads of the losses (for tests)
        self.window: _Window | None = None

    def start(self, counters) -> None:
        """Training (re)starts at `counters`: the throughput is measured from now."""
        self.read_step = counters.global_step
        self.window = _Window(self.clock(), counters.global_step, counters.samples_seen,
                              counters.items_seen)

    def logs(self, step: int) -> bool:
        """Whether `step` is a logged step (every `every`-th and the last; a stop forces one)."""
        return step % self.every == 0 or step == self.total

    def record(self, step: int, counters, lr: float, norm: torch.Tensor | None = None,
               skipped: torch.Tensor | None = None, force: bool = False) -> bool:
        """Note what the host knows of a logged step; its loss stays on the device (in
        `unchecked`). Returns whether the device must be read now.

        Args:
            norm: the gradient norm it applied, a device tensor (None: not applied or unknown).
            skipped: its loss shares, when it was skipped for a non-finite loss (such steps are
                not in `unchecked`: deciding the skip was a host sync already).
            force: log it even off the interval, and read now (a stop).
        """
        if step % self.every and step != self.total and not force:
            return False
        metrics = {"train/lr": lr, "train/samples_seen": counters.samples_seen}
        if self.tally.active:
            metrics["train/items_seen"] = counters.items_seen
        if counters.skipped_steps:
            metrics["train/skipped_steps"] = counters.skipped_steps
        loss = None
        if skipped is not None:
            loss = self.replica.sum(skipped).item() / self.replica.loss_multiplier
        self.points.append(_Point(step, metrics, loss, norm))
        return force or step == self.total or step - self.read_step >= self.flush_every

    def read(self, counters) -> float | None:
        """Read the device: check every unread step's loss, send the logged steps' metrics, and
        at a logged step the throughput since the last one. Raises NonFiniteLoss naming the
        first bad step under `on_nonfinite=stop`. Returns the loss of the last logged step read
        (None: none)."""
        items_after = self.tally.settle(counters, self.plan)
        points, self.points = self.points, []
        sums, norm_values = self._read_device(points)
        norms = iter(norm_values)
        self.read_step = counters.global_step
        bad = [step for step, value in sums.items() if not math.isfinite(value)]
        if bad and self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite loss at optimizer step {bad[0]} (samples "
                                f"{self.plan.samples_after(bad[0] - 1)}..); "
                                "trainer.on_nonfinite=skip would drop such steps instead")
        if not points:
            return None
        for point in points:
            metrics = point.metrics
            metrics["train/loss"] = (point.loss if point.loss is not None
                                     else sums[point.step] / self.replica.loss_multiplier)
            if point.norm is not None:
                metrics["train/grad_norm"] = next(norms)
            if point.step in items_after:
                metrics["train/items_seen"] = items_after[point.step]
        last = points[-1]
        if last.step == counters.global_step:
            last.metrics.update(self._throughput(counters, last.metrics["train/loss"]))
        for point in points:
            self.tracker.log_metrics(point.metrics, step=point.step)
        self.sent_step = last.step
        return last.metrics["train/loss"]

    def _read_device(self, points: list[_Point]) -> tuple[dict[int, float], list[float]]:
        """{step: loss shares summed over ranks} of the unread steps, and the points' gradient
        norms, in one copy to the host."""
        if not self.unchecked:
            return {}, []
        steps, shares = zip(*self.unchecked)
        self.unchecked = []
        losses = torch.stack(shares).double()
        norms = [point.norm.double().to(losses.device) for point in points
                 if point.norm is not None]
        self.reads += 1
        if self.partial_norms and norms:
            # each rank's squared norm of its shards: summed with the losses, then the root
            values = self.replica.sum(torch.cat([losses, torch.stack(norms)])).tolist()
            return dict(zip(steps, values)), [math.sqrt(v) for v in values[len(steps):]]
        summed = self.replica.sum(losses)
        if norms:
            summed = torch.cat([summed, torch.stack(norms)])
        values = summed.tolist()
        return dict(zip(steps, values)), values[len(steps):]

    def _throughput(self, counters, loss: float) -> dict[str, float]:
        """Samples (and items) per second, seconds per optimizer step and the memory peak, over
        the steps since the last logged read; writes the progress line."""
        now, window = self.clock(), self.window
        self.window = _Window(now, counters.global_step, counters.samples_seen,
                              counters.items_seen)
        if window is None:
            return {}
        seconds = now - window.time - window.paused
        steps = counters.global_step - window.step
        if steps <= 0 or seconds <= 0:
            return {}
        metrics = {"train/samples_per_s": (counters.samples_seen - window.samples) / seconds,
                   "train/step_time_s": seconds / steps}
        if self.tally.active:
            metrics["train/items_per_s"] = (counters.items_seen - window.items) / seconds
        metrics.update(peak_memory(self.replica.device))
        if self.lines:
            log.info(progress_line(counters.global_step, self.total, loss,
                                   metrics["train/samples_per_s"], seconds / steps))
        return metrics

    def salvage(self, counters) -> None:
        """After a failure, send the logged steps not read yet, if that needs no other rank (in
        DDP and FSDP the ranks are not at the same point any more: no collective is safe)."""
        if not self.replica.distributed:
            with contextlib.suppress(Exception):
                self.read(counters)

    @contextlib.contextmanager
    def paused(self):
        """Leave what happens inside (an evaluation, a checkpoint) out of the step time."""
        started = self.clock()
        try:
            yield
        finally:
            if self.window is not None:
                self.window.paused += self.clock() - started

    def evaluation(self, metrics: dict[str, Any], counters, epoch: float) -> None:
        """Log validation metrics with the axes runs are compared on: `train/samples_seen`
        (unless that step's train metrics have it already) and `epoch` (epochs done)."""
        axes = {"epoch": epoch}
        if self.sent_step != counters.global_step:
            axes["train/samples_seen"] = counters.samples_seen
        self.tracker.log_metrics({**metrics, **axes}, step=counters.global_step)
