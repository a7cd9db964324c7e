"""Warnings for legal values that are almost certainly slips (pure: no torch), one line each in
the form of a ConfigError's, `key=value: why; fix: ...`; none of them refuses a run.

Each threshold is stated where its line is made. The lines about the plan are kept in it
(`Plan.warnings`: plan.json, the checkpoint, the MLflow param `plan_warnings`); the others are
only logged. Rank 0 logs them all once, before training and in a dry run (stepwise/run/job.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from stepwise.contract.errors import one_line
from stepwise.contract.plan import Plan

# lr_scaling=none: a warning when E is more than this many times lr_scaling.base_batch_size, or
# less than its 1/LR_RATIO (the plan table's "lr per sample" row says any ratio but 1). Not at 4x
# itself: data=cifar10 alone is b=128 over the base 32, and says so in that row.
LR_RATIO = 4.0
# data.drop_last, trainer.partial_window=drop: a warning when they leave out this fraction of the
# training samples of every epoch, or more.
DROPPED_FRACTION = 0.25


@dataclass(frozen=True)
class Knobs:
    """The config values the warnings read beside the plan (plain values: tests state them)."""

    factor_key: str = "accum"  # the key that set k: accum, or effective_batch_size when given
    warmup: float = 0.0  # schedule.warmup, in schedule.unit
    unit: str = "epochs"
    val_every_n_epochs: int = 1
    early_stopping_patience: int | None = None
    log_every_n_steps: int | None = None


def knobs(config: Any) -> Knobs:
    """The `Knobs` of a typed Config (stepwise/config/schemas.py)."""
    trainer = config.trainer
    return Knobs(
        factor_key="accum" if config.effective_batch_size is None else "effective_batch_size",
        warmup=config.schedule.warmup, unit=config.schedule.unit,
        val_every_n_epochs=trainer.val_every_n_epochs,
        early_stopping_patience=trainer.early_stopping_patience,
        log_every_n_steps=trainer.log_every_n_steps)


def advise(plan: Plan, knobs: Knobs) -> Plan:
    """`plan` with its warnings (`Plan.warnings`)."""
    return replace(plan, warnings=plan_warnings(plan, knobs))


def plan_warnings(plan: Plan, knobs: Knobs) -> tuple[str, ...]:
    """The warning lines about the plan's own numbers: batch against data, samples left out,
    the LR per sample, the warmup."""
    found = (_batch_over_data(plan, knobs), _dropped(plan), _lr_per_sample(plan),
             _warmup(plan, knobs))
    return tuple(line for line in found if line)


def run_warnings(plan: Plan, knobs: Knobs) -> tuple[str, ...]:
    """The warning lines about keys the plan does not hold, against its counts."""
    found = (_patience(plan, knobs), _log_interval(plan, knobs))
    return tuple(line for line in found if line)


def _batch_over_data(plan: Plan, knobs: Knobs) -> str:
    """b x W > N: an epoch is one partial micro-step. Else E > N: one partial optimizer step.
    E = N exactly (full-batch gradient descent) is a choice, and says nothing."""
    n, b, k, w = plan.train_samples, plan.per_device_batch_size, plan.accum, plan.world_size
    unit, effective = plan.micro_batch_samples, plan.effective_batch_size
    if unit > n:
        idle = f", and accum={k} has nothing to accumulate" if k > 1 else ""
        return one_line("data.batch_size", b, f"b x W = {b} x {w} = {unit} is more than the {n} "
                        f"training samples, so an epoch is one micro-step of {n} samples: no "
                        f"batch is ever full{idle}", f"use data.batch_size={max(n // w, 1)} or less")
    if effective <= n:
        return ""
    most = n // unit
    value, fix = ((k, f"accum={most}") if knobs.factor_key == "accum"
                  else (effective, f"effective_batch_size={most * unit}"))
    return one_line(knobs.factor_key, value, f"E = b x k x W = {b} x {k} x {w} = {effective} is "
                    f"more than the {n} training samples, so each epoch is one optimizer step of "
                    f"{n} samples, not {effective} ({plan.epochs} epochs = "
                    f"{plan.total_optimizer_steps} steps)", f"use {fix} or less (E <= N = {n})")


def _dropped(plan: Plan) -> str:
    """data.drop_last or trainer.partial_window=drop leave out DROPPED_FRACTION of an epoch."""
    n, dropped, unit = plan.train_samples, plan.samples_dropped_per_epoch, plan.micro_batch_samples
    if dropped < DROPPED_FRACTION * n:
        return ""
    by_drop_last = n % unit if plan.drop_last else 0
    why = (f"{dropped} of the {n} training samples ({dropped / n:.0%}) are left out of every "
           f"epoch (the tail of its permutation)")
    if by_drop_last == dropped:
        return one_line("data.drop_last", True, f"{why}: the last micro-batch holds fewer than "
                        f"b x W = {unit}", "use data.drop_last=false (a short last micro-batch "
                        "is weighted exactly), or a data.batch_size that leaves less over")
    short = f"the last window holds fewer than E = {plan.effective_batch_size}"
    if not by_drop_last:
        return one_line("trainer.partial_window", "drop", f"{why}: {short}",
                        "use trainer.partial_window=step (the last window takes its own step, "
                        "weighted by its samples), or an effective batch that leaves less over")
    return one_line("data.drop_last", True, f"with trainer.partial_window=drop, {why}: the last "
                    f"micro-batch holds fewer than b x W = {unit} and {short}",
                    "use data.drop_last=false trainer.partial_window=step")


def _lr_per_sample(plan: Plan) -> str:
    """lr_scaling=none with E more than LR_RATIO times base_batch_size, or as many times less."""
    effective, base = plan.effective_batch_size, plan.base_batch_size
    ratio = effective / base
    if plan.lr_rule != "none" or 1 / LR_RATIO <= ratio <= LR_RATIO:
        return ""
    size, share = ((f"{ratio:.3g}x", f"1/{ratio:.3g} of") if ratio > 1
                   else (f"1/{1 / ratio:.3g} of", f"{1 / ratio:.3g}x"))
    return one_line("lr_scaling", "none", f"E={effective} is {size} lr_scaling.base_batch_size="
                    f"{base} and optim.lr={plan.base_lr:g} is used unscaled, so the LR per sample "
                    f"is {share} that at the base (runs that differ in accum, data.batch_size or "
                    f"world size train at different LRs per sample)",
                    f"use lr_scaling=linear (sqrt for Adam-type optimizers), or "
                    f"lr_scaling.base_batch_size={effective} if optim.lr was tuned at E={effective}")


def _warmup(plan: Plan, knobs: Knobs) -> str:
    """A warmup that ends at the run's last step or later: no step at the full LR. (Longer than
    the run is refused by schedule.py.)"""
    total = plan.total_optimizer_steps
    if plan.schedule.warmup_samples == 0 or plan.warmup_steps < total:
        return ""
    length = {"epochs": f"{plan.total_samples / plan.samples_per_epoch:.4g} epochs",
              "steps": f"{total} steps"}.get(knobs.unit, f"{plan.total_samples} samples")
    return one_line("schedule.warmup", f"{knobs.warmup:g}", f"the warmup "
                    f"({plan.schedule.warmup_samples} samples = {plan.warmup_steps} optimizer "
                    f"steps) lasts the whole run ({total} steps), so no step trains at the full "
                    f"lr {plan.lr:.6g}", f"shorten it (schedule.unit={knobs.unit}; the run is {length})")


def _patience(plan: Plan, knobs: Knobs) -> str:
    """Early stopping that cannot stop the run: the first evaluation is always the best so far
    and the last one stops nothing (monitor.py), so patience p needs p + 2 evaluations."""
    patience, every = knobs.early_stopping_patience, knobs.val_every_n_epochs
    evaluations = -(-plan.epochs // every)  # and after the last epoch (trainer.py)
    if patience is None or evaluations >= patience + 2:
        return ""
    fix = (f"use trainer.early_stopping_patience={evaluations - 2} or less, or train more epochs"
           if evaluations >= 3 else "evaluate more often (trainer.val_every_n_epochs) or train "
                                    "more epochs, or set trainer.early_stopping_patience=null")
    times = f"{evaluations} time{'s' * (evaluations != 1)}"
    return one_line("trainer.early_stopping_patience", patience, f"the run evaluates {times} "
                    f"(every trainer.val_every_n_epochs={every} of its {plan.epochs} epochs, and "
                    f"after the last), the first is always the best so far and the last stops "
                    f"nothing, so early stopping never stops it", fix)


def _log_interval(plan: Plan, knobs: Knobs) -> str:
    """trainer.log_every_n_steps at or above the run's steps: train/* has one point, the last."""
    every, total = knobs.log_every_n_steps, plan.total_optimizer_steps
    if every is None or total < 2 or every < total:
        return ""
    return one_line("trainer.log_every_n_steps", every, f"not less than the run's {total} "
                    "optimizer steps, so train/loss and train/lr are logged at the last step "
                    "only: curves of one point", f"use e.g. trainer.log_every_n_steps="
                    f"{max(total // 10, 1)}, or null for min(steps, 100) points")
