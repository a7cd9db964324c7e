"""The monitored metric (`trainer.monitor`): the best evaluation so far, and early stopping.

Pure: no torch. The trainer feeds it each evaluation's metrics, which are already reduced over
ranks, so every rank takes the same decisions at the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from stepwise.contract.errors import ConfigError

log = logging.getLogger("stepwise.loop.trainer")
MODES = ("min", "max")
BEST_PREFIX = "best/"


@dataclass
class Monitor:
    """Which evaluation is the best so far, and whether patience has run out.

    Args:
        name: the metric, as the evaluation returns it (`val/loss`, `val/accuracy`, ...).
        mode: `min` (lower is better) or `max`.
        patience: stop after this many evaluations in a row without improvement (None: never).
        min_delta: an improvement must beat the best by more than this.
    """

    name: str
    mode: str = "min"
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None  # the best value so far (None: no evaluation yet)
    best_step: int | None = None  # the global_step of that evaluation
    best_metrics: dict[str, float] = field(default_factory=dict)  # all of its metrics
    evaluations: int = 0
    bad_evaluations: int = 0  # in a row, since the best
    stopped_at: int | None = None  # the global_step at which patience ran out

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best by more than `min_delta` (NaN never does)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: dict[str, float], step: int, final: bool = False) -> bool:
        """Record the evaluation at `step`; True if it is the new best.

        Patience that runs out at the `final` evaluation stops nothing (the run is over anyway).
        Raises ConfigError if the evaluation has no metric `name` (e.g. a torchmetrics metric
        that returned a vector: its elements are `val/<name>/<i>`).
        """
        if self.name not in metrics:
            raise ConfigError("trainer.monitor", self.name, "the evaluation returned no such "
                              f"metric (it returned {', '.join(sorted(metrics))})",
                              "monitor one of those")
        value = float(metrics[self.name])
        self.evaluations += 1
        if self.improves(value):
            self.best, self.best_step, self.best_metrics = value, step, dict(metrics)
            self.bad_evaluations = 0
            return True
        self.bad_evaluations += 1
        if self.patience is not None and self.bad_evaluations >= self.patience and not final:
            self.stopped_at = step
        return False

    @property
    def stopped(self) -> bool:
        """Whether patience ran out: the run ends at `stopped_at`, before its plan's last step."""
        return self.stopped_at is not None

    def best_record(self) -> dict[str, float]:
        """`best/<metric>` for each metric of the best evaluation, and `best/global_step`."""
        if self.best_step is None:
            return {}
        record = {f"{BEST_PREFIX}{key}": value for key, value in self.best_metrics.items()}
        record[f"{BEST_PREFIX}global_step"] = self.best_step
        return record

    def why_stopped(self) -> str:
        return (f"{self.name} has not improved on {self.best:.6g} (global_step {self.best_step}, "
                f"mode {self.mode}, min_delta {self.min_delta:g}) for {self.bad_evaluations} "
                f"evaluations (trainer.early_stopping_patience={self.patience})")

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values only: checkpoints are read with torch.load(weights_only=True)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any] | None) -> bool:
        """Continue from a checkpoint's monitor state; False (state ignored) if it monitored
        another metric or mode, or had none. An early stop stands only if this run's patience
        has run out too (a resume with more patience trains on)."""
        if not state or (state["name"], state["mode"]) != (self.name, self.mode):
            return False
        for key in ("best", "best_step", "best_metrics", "evaluations", "bad_evaluations",
                    "stopped_at"):
            setattr(self, key, state[key])
        self.best_metrics = dict(self.best_metrics)
        if self.patience is None or self.bad_evaluations < self.patience:
            self.stopped_at = None
        return True


class BestKeeper:
    """What the loop does after each evaluation with `trainer.monitor`: write best.pt and log
    `best/*` when it improved, and stop early when patience has run out.

    Args:
        monitor: the metric's state (checkpointed with the loop's).
        save_best: writes checkpoints/best.pt from the trainer (collective in DDP).
    """

    def __init__(self, monitor: Monitor, save_best: Callable[[Any], None]) -> None:
        self.monitor, self.save_best = monitor, save_best

    def after_evaluation(self, trainer: Any, metrics: dict[str, float]) -> None:
        """Every rank gets the same metrics (reduced over ranks), so every rank decides alike."""
        step, total = trainer.counters.global_step, trainer.plan.total_optimizer_steps
        if self.monitor.update(metrics, step, final=step == total):
            self.save_best(trainer)
            trainer.tracker.log_metrics(self.monitor.best_record(), step=step)
        if self.monitor.stopped:
            log.info("early stop at global_step %d of %d: %s", step, total,
                     self.monitor.why_stopped())

    @property
    def stopped_at(self) -> int | None:
        return self.monitor.stopped_at


def metric_names(data: Any, metrics_config: Any, evaluated: tuple[str, ...] = ()) -> list[str]:
    """What the evaluation logs for this data and `metrics` config (a torchmetrics metric that
    returns a vector logs `val/<name>/<i>` instead of `val/<name>`); with each suffix in
    `evaluated` (a callback's other weights, the EMA's `ema`), also `val_<suffix>/<name>`."""
    names = ["val/loss"]
    if metrics_config is None:
        if getattr(data, "task", "classification") == "classification":
            names.append("val/accuracy")
    elif isinstance(metrics_config, dict):
        names += [f"val/{name}" for name in metrics_config]
    return names + [f"val_{suffix}/{name[len('val/'):]}" for suffix in evaluated
                    for name in names]


def check_monitor(trainer: Any, data: Any, metrics_config: Any,
                  evaluated: tuple[str, ...] = ()) -> None:
    """`trainer.monitor`, `monitor_mode`, `early_stopping_patience` and `min_delta`, checked
    before any work (`evaluated`: see `metric_names`). Raises ConfigError on the first bad one."""
    name, patience = trainer.monitor, trainer.early_stopping_patience
    if trainer.monitor_mode not in MODES:
        raise ConfigError("trainer.monitor_mode", trainer.monitor_mode, "unknown value",
                          "use min (lower is better, e.g. val/loss) or max (e.g. val/accuracy)")
    if patience is not None and patience < 1:
        raise ConfigError("trainer.early_stopping_patience", patience, "must be at least 1 "
                          "(evaluations without improvement before stopping)",
                          "set e.g. trainer.early_stopping_patience=3, or null for no early stop")
    if not trainer.min_delta >= 0:
        raise ConfigError("trainer.min_delta", trainer.min_delta, "must be >= 0",
                          "set e.g. trainer.min_delta=0.001, or 0")
    if name is None:
        if patience is not None:
            raise ConfigError("trainer.early_stopping_patience", patience, "needs a metric to "
                              "watch", "set trainer.monitor=val/loss (or another val/ metric)")
        return
    known = metric_names(data, metrics_config, evaluated)
    if data.val_samples == 0:
        raise ConfigError("trainer.monitor", name, "the data has no validation set, so nothing "
                          "is evaluated", "give the data validation samples, or set "
                          "trainer.monitor=null")
    vector_metric = any(name.startswith(f"{known_name}/") for known_name in known
                        if not known_name.endswith("/loss"))
    if name not in known and not vector_metric:
        prefix = name.split("/", 1)[0]
        added = (f" ({prefix}/* comes from a callback that evaluates other weights: "
                 f"callbacks=ema gives val_ema/*)" if prefix.startswith("val_") else "")
        raise ConfigError("trainer.monitor", name, "the evaluation logs no such metric",
                          f"use one of {', '.join(known)}{added}")
