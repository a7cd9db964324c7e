"""A sweep's best child run: chosen by the metric its jobs optimise, and carried by the parent run
(its run id, its params of interest, that metric and its `test/*` metrics), so that the parent's
row in the MLflow UI says what the sweep found and how it does on the held-out test split.

The criterion is read from the children's own params (the flattened config they logged), so it
is right for whatever launcher ran them:
- jobs with `trainer.monitor=M`: `best/<optimized_metric or M>` (the value at each run's best
  evaluation, what `main.objective` returns), in the sweeper's direction, else `monitor_mode`;
- otherwise `optimized_metric` (default `val/loss`), in the sweeper's direction, else `min`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PARAMS_OF_INTEREST = ("effective_batch_size", "accum", "lr", "per_device_batch_size",
                      "world_size")
NONE = str(None)  # how MLflow params hold a null config value (stepwise logs str(value))


@dataclass(frozen=True)
class Criterion:
    metric: str
    mode: str  # min | max


def sweeper_direction(direction: Any) -> str | None:
    """`hydra.sweeper.direction` (Optuna's `minimize`/`maximize`) as min/max; None otherwise
    (the basic sweeper has none; a multi-objective list names no single best)."""
    return {"minimize": "min", "maximize": "max"}.get(str(direction).lower())


def _shared(runs, key: str) -> str | None:
    """The value of param `key` that the runs share (the first run's, with a warning, if they
    differ); None for a null or missing one."""
    values = [run.data.params.get(key, NONE) for run in runs]
    if len(set(values)) > 1:
        log.warning("the sweep's jobs differ in %s (%s): the best child is chosen by the first "
                    "job's", key, ", ".join(sorted(set(values))))
    return None if not values or values[0] == NONE else values[0]


def criterion(runs, direction: str | None = None) -> Criterion:
    """Which metric, lower or higher, makes a child the best (see the module docstring)."""
    monitor, optimized = _shared(runs, "trainer.monitor"), _shared(runs, "optimized_metric")
    if monitor is not None:
        mode = direction or _shared(runs, "trainer.monitor_mode") or "min"
        return Criterion(f"best/{optimized or monitor}", mode)
    return Criterion(optimized or "val/loss", direction or "min")


def best_child(runs, rule: Criterion):
    """The run with the best value of `rule.metric` (the first in job order on a tie); None if
    no run logged a finite one."""
    scored = [(run.data.metrics[rule.metric], i, run) for i, run in enumerate(runs)
              if math.isfinite(run.data.metrics.get(rule.metric, math.nan))]
    if not scored:
        return None
    sign = 1 if rule.mode == "min" else -1
    return min(scored, key=lambda item: (sign * item[0], item[1]))[2]


def carry_best_child(client, parent_run_id: str, runs, direction: str | None = None) -> str | None:
    """Log the best child onto the parent: param and tag `best_child_run_id`, the child's params
    of interest under their own names (the parent's columns in the UI), its overrides, its
    metric, and its test metrics (`test/*`, when it has a test split) beside it. Returns the
    child's run id (None: no child logged the metric)."""
    from mlflow.entities import Metric, Param, RunTag

    from stepwise.tracking.tracker import retrying

    rule = criterion(runs, direction)
    run = best_child(runs, rule)
    if run is None:
        log.warning("no child run logged %s: the sweep's parent names no best child", rule.metric)
        return None
    child_id, params = run.info.run_id, run.data.params
    carried = {"best_child_run_id": child_id,
               "best_child.overrides": run.data.tags.get("stepwise.overrides", ""),
               "best_child.criterion": f"{rule.mode} {rule.metric}",
               **{key: params[key] for key in PARAMS_OF_INTEREST if key in params}}
    value = run.data.metrics[rule.metric]
    tested = {key: v for key, v in sorted(run.data.metrics.items()) if key.startswith("test/")}
    now = int(time.time() * 1000)
    retrying(client.log_batch, parent_run_id,
             metrics=[Metric(key, v, now, 0) for key, v in {rule.metric: value, **tested}.items()],
             params=[Param(key, str(v)) for key, v in carried.items()],
             tags=[RunTag("stepwise.best_child_run_id", child_id)])
    log.info("best child of the sweep: run %s (%s, %s %s=%.6g%s)", child_id,
             carried["best_child.overrides"], rule.mode, rule.metric, value,
             "".join(f", {key}={v:.6g}" for key, v in tested.items()))
    return child_id
