"""What the training loop is given (its parts and settings) and what it counts (Counters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class Counters:
    """What has been executed. `global_step` counts optimizer-step windows, skipped ones included
    (`skipped_steps`), so that the schedule stays aligned with the samples seen."""

    global_step: int = 0
    micro_steps: int = 0
    samples_seen: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    items_seen: int = 0  # loss items (e.g. target tokens), when they are not the samples


@dataclass
class Parts:
    """What the loop trains and measures with (stepwise/run/build.py builds them from the config)."""

    model: nn.Module  # wrapped for the parallel mode (single, DataParallel or DDP)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimizer step
    loss: Callable  # per-item values (stepwise/models/losses.py); the loop reduces them
    # torchmetrics, logged as val/<name>; None: val/accuracy counted by the loop (classification)
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class LoopSettings:
    """The `trainer.*` keys the loop itself reads."""

    grad_clip_norm: float | None = None
    log_every_n_steps: int | None = None  # None: enough for 100 points (stepwise/loop/step_log.py)
    flush_every_n_steps: int = 50
    val_every_n_epochs: int = 1
    on_nonfinite: str = "stop"
    checkpoint_every_n_steps: int = 0
    channels_last: bool = False

    @classmethod
    def of(cls, trainer_cfg: Any) -> LoopSettings:
        return cls(**{f.name: getattr(trainer_cfg, f.name) for f in fields(cls)})


class NullProgress:
    """A progress bar that shows nothing: ranks other than 0, `trainer.progress_bar=false`."""

    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...
