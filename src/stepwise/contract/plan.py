"""The batch contract (DESIGN section 1) as a pure function: sizes and budgets in, every count out.

Nothing here imports torch. The training loop only consumes a `Plan`; it never re-derives a count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from stepwise.contract.errors import ConfigError
from stepwise.contract.schedule import Schedule, make_schedule

PARTIAL_WINDOW_POLICIES = ("step", "drop")
LR_RULES = ("none", "linear", "sqrt")


def lr_scale_factor(rule: str, effective_batch_size: int, base_batch_size: int) -> float:
    """Factor applied to `optim.lr`: linear (Goyal et al. 2017) or square-root (Malladi et al. 2022).

    Args:
        rule: one of `none`, `linear`, `sqrt`.
        effective_batch_size: samples per optimizer step, E.
        base_batch_size: the effective batch at which `optim.lr` was tuned.
    """
    if rule not in LR_RULES:
        raise ConfigError("lr_scaling.rule", rule, "unknown rule", f"use one of {', '.join(LR_RULES)}")
    if base_batch_size <= 0:
        raise ConfigError(
            "lr_scaling.base_batch_size", base_batch_size, "must be positive",
            "set it to the effective batch size at which optim.lr was tuned, e.g. 32",
        )
    ratio = effective_batch_size / base_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def derive_accum(effective_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """The accum k with b * k * W == E, or a ConfigError naming the nearest valid targets."""
    if effective_batch_size <= 0:
        raise ConfigError(
            "effective_batch_size", effective_batch_size, "must be positive",
            "give a positive target, or null to use accum",
        )
    unit = per_device_batch_size * world_size
    if effective_batch_size % unit:
        below = (effective_batch_size // unit) * unit
        above = below + unit
        nearest = f"{below} or {above}" if below > 0 else f"{above}"
        raise ConfigError(
            "effective_batch_size", effective_batch_size,
            f"not a multiple of data.batch_size x world_size = "
            f"{per_device_batch_size} x {world_size} = {unit}",
            f"use effective_batch_size={nearest}, or change data.batch_size",
        )
    return effective_batch_size // unit


def _positive(key: str, value: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, f"must be a positive integer ({meaning})", f"set {key}=1 or more")


def _budget(key: str, value: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != -1):
        raise ConfigError(key, value, f"must be a positive number of {unit}, or -1 for no limit",
                          f"set {key}=-1 or a positive integer")


@dataclass(frozen=True)
class Window:
    """One optimizer step's share of an epoch: micro-steps [first_micro_step, +micro_steps)."""

    first_micro_step: int
    micro_steps: int
    samples: int
    items: int | None = None  # its loss items, when the data states them (stepwise/contract/items.py)


@dataclass(frozen=True)
class Plan:
    """Every count of a run, computed once before training and checked after it.

    A "micro-step" below is a global micro-step: one forward/backward on every replica, together
    covering `micro_batch_samples` = b * W consecutive samples of the epoch permutation.
    """

    train_samples: int
    per_device_batch_size: int
    accum: int
    world_size: int
    effective_batch_size: int
    drop_last: bool
    partial_window: str
    max_steps: int
    max_epochs: int
    max_samples: int
    micro_batch_samples: int
    micro_steps_per_epoch: int
    optimizer_steps_per_epoch: int
    last_window_micro_steps: int
    last_window_samples: int
    samples_per_epoch: int
    samples_dropped_per_epoch: int
    epochs: int
    budget: str
    total_optimizer_steps: int
    total_micro_steps: int
    total_samples: int
    lr_rule: str
    base_lr: float
    base_batch_size: int
    lr_scale_factor: float
    lr: float
    schedule: Schedule = Schedule()
    warmup_steps: int = 0
    final_lr: float = 0.0
    # Legal values that are most likely slips, one line each (stepwise/contract/advice.py).
    warnings: tuple[str, ...] = ()
    # The evaluation splits' sizes, stated beside N (no count of the training depends on them).
    val_samples: int = 0
    test_samples: int = 0

    # -- windows and shards -------------------------------------------------------------------
    def window(self, step_in_epoch: int) -> Window:
        """The micro-steps and real samples of optimizer step `step_in_epoch` of an epoch."""
        if not 0 <= step_in_epoch < self.optimizer_steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} outside 0..{self.optimizer_steps_per_epoch - 1}")
        first = step_in_epoch * self.accum
        if step_in_epoch == self.optimizer_steps_per_epoch - 1:
            return Window(first, self.last_window_micro_steps, self.last_window_samples)
        return Window(first, self.accum, self.effective_batch_size)

    def used_micro_steps_per_epoch(self) -> int:
        """Micro-steps that belong to some optimizer step (a dropped partial window excluded)."""
        last = self.optimizer_steps_per_epoch - 1
        return last * self.accum + self.last_window_micro_steps

    def shard(self, micro_step: int, rank: int, blocks: int = 1) -> tuple[int, int]:
        """[start, stop) of the epoch permutation that `rank` processes at global `micro_step`.

        Rank r takes the r-th block of b inside the micro-step's slice (DESIGN rule 1); a process
        that drives several replicas (DataParallel) takes `blocks` consecutive blocks. Near the end
        of an epoch a block can be short or empty (start == stop): an empty one is processed as a
        single zero-weight padding sample, so that every rank runs the same micro-steps.
        """
        start = micro_step * self.micro_batch_samples + rank * blocks * self.per_device_batch_size
        stop = start + blocks * self.per_device_batch_size
        return min(start, self.samples_per_epoch), min(stop, self.samples_per_epoch)

    def lr_at(self, step: int) -> float:
        """The LR of optimizer step `step` (0-based): the scaled LR times the schedule's factor."""
        return self.lr * self.schedule.factor(self.samples_after(step))

    def steps_for_samples(self, samples: int) -> int:
        """The fewest optimizer steps after which at least `samples` samples have been seen."""
        epochs, rest = divmod(samples, self.samples_per_epoch)
        return epochs * self.optimizer_steps_per_epoch + -(-rest // self.effective_batch_size)

    def micro_steps_after(self, steps: int) -> int:
        """Micro-steps each replica has run once `steps` optimizer steps have run."""
        epochs, rest = divmod(steps, self.optimizer_steps_per_epoch)
        return epochs * self.used_micro_steps_per_epoch() + rest * self.accum

    def samples_after(self, steps: int) -> int:
        """`samples_seen` once `steps` optimizer steps have run from the start of training."""
        epochs, rest = divmod(steps, self.optimizer_steps_per_epoch)
        # rest < steps per epoch, so those windows are all full ones.
        return epochs * self.samples_per_epoch + rest * self.effective_batch_size

    # -- reporting ----------------------------------------------------------------------------
    def lr_per_sample(self) -> str:
        """Under `lr_scaling=none`, the LR per sample against that at `base_batch_size` ('' when
        the LR is scaled or E is the base): runs of another E train at another LR per sample."""
        if self.lr_rule != "none" or self.effective_batch_size == self.base_batch_size:
            return ""
        ratio = self.effective_batch_size / self.base_batch_size
        share = f"1/{ratio:.3g} of" if ratio > 1 else f"{1 / ratio:.3g}x"
        return (f"{share} that at base_batch_size={self.base_batch_size} "
                f"(E={self.effective_batch_size}, lr_scaling=none)")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def summary(self) -> str:
        """The plan in one line (an MLflow run's description)."""
        return (f"E={self.effective_batch_size} (b={self.per_device_batch_size} x "
                f"k={self.accum} x W={self.world_size}) on N={self.train_samples}: "
                f"{self.total_optimizer_steps} optimizer steps over {self.epochs} epochs "
                f"(bound by {self.budget}), {self.total_samples} samples, lr {self.lr:.6g} "
                f"({self.lr_rule} x {self.lr_scale_factor:.6g}), {self.schedule.name} schedule")

    def table(self, extra: Sequence[tuple[str, Any]] = ()) -> str:
        """The plan as the short table printed before training (`extra` rows at the end)."""
        last = (
            f"{self.last_window_micro_steps} micro-steps, {self.last_window_samples} samples"
        )
        rows = [
            ("train_samples (N)", self.train_samples),
            ("val_samples, test_samples", f"{self.val_samples}, {self.test_samples}"),
            ("per_device_batch_size (b)", self.per_device_batch_size),
            ("accum (k)", self.accum),
            ("world_size (W)", self.world_size),
            ("effective_batch_size (E=b*k*W)", self.effective_batch_size),
            ("micro_steps_per_epoch", self.micro_steps_per_epoch),
            ("optimizer_steps_per_epoch", self.optimizer_steps_per_epoch),
            ("last window of an epoch", last),
            ("samples dropped per epoch", self.samples_dropped_per_epoch),
            ("epochs", self.epochs),
            ("total_optimizer_steps", f"{self.total_optimizer_steps} (bound by {self.budget})"),
            ("total samples", self.total_samples),
            ("lr", f"{self.lr:.6g} = {self.base_lr:.6g} x {self.lr_scale_factor:.6g} "
                   f"({self.lr_rule}, base_batch_size={self.base_batch_size})"),
            *([("lr per sample", self.lr_per_sample())] if self.lr_per_sample() else []),
            ("schedule", f"{self.schedule.name}, warmup {self.schedule.warmup_samples} samples "
                         f"= {self.warmup_steps} steps, final lr {self.final_lr:.6g}"),
            *extra,
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _check_inputs(b: int, k: int, w: int, partial_window: str, max_steps: int, max_epochs: int,
                  max_samples: int, base_lr: float, n: int) -> None:
    _positive("data.batch_size", b, "samples per replica per micro-step")
    _positive("accum", k, "micro-steps per optimizer step")
    _positive("world_size", w, "data-parallel replicas")
    if partial_window not in PARTIAL_WINDOW_POLICIES:
        raise ConfigError("trainer.partial_window", partial_window, "unknown policy",
                          f"use one of {', '.join(PARTIAL_WINDOW_POLICIES)}")
    _budget("trainer.max_steps", max_steps, "optimizer steps")
    _budget("trainer.max_epochs", max_epochs, "epochs")
    _budget("trainer.max_samples", max_samples, "samples")
    if max_steps == -1 and max_epochs == -1 and max_samples == -1:
        raise ConfigError("trainer.max_epochs", max_epochs,
                          "no budget: max_steps and max_samples are -1 too",
                          "set trainer.max_epochs, trainer.max_steps or trainer.max_samples")
    if not base_lr > 0:
        raise ConfigError("optim.lr", base_lr, "must be positive", "set optim.lr, e.g. optim.lr=0.1")
    if n <= 0:
        raise ConfigError("data", n, "the training set is empty",
                          "check the data group's size settings")


def _epoch_shape(n: int, b: int, k: int, w: int, drop_last: bool, partial_window: str
                 ) -> tuple[int, int, int, int]:
    """(micro-steps, optimizer steps, micro-steps of the last window, samples used) per epoch."""
    unit, effective = b * w, b * w * k
    kept = (n // unit) * unit if drop_last else n
    micro_steps = -(-kept // unit)
    full_windows, rest = divmod(micro_steps, k)
    if rest and partial_window == "step":
        steps_per_epoch, last_micro = full_windows + 1, rest
    else:
        steps_per_epoch, last_micro = full_windows, k
    if steps_per_epoch == 0:
        raise ConfigError(
            "data.batch_size", b,
            f"the plan has no optimizer step: {n} training samples do not fill one window of "
            f"b x k x W = {b} x {k} x {w} = {effective} with data.drop_last={str(drop_last).lower()}"
            f" and trainer.partial_window={partial_window}",
            "lower data.batch_size or accum, or use trainer.partial_window=step and "
            "data.drop_last=false",
        )
    return micro_steps, steps_per_epoch, last_micro, min(kept, steps_per_epoch * effective)


def make_plan(
    *,
    train_samples: int,
    per_device_batch_size: int,
    accum: int,
    world_size: int = 1,
    drop_last: bool = False,
    partial_window: str = "step",
    max_steps: int = -1,
    max_epochs: int = -1,
    max_samples: int = -1,
    base_lr: float = 0.1,
    lr_rule: str = "none",
    base_batch_size: int = 32,
    schedule: dict | None = None,
    val_samples: int = 0,
    test_samples: int = 0,
) -> Plan:
    """Validate the inputs and compute the plan (DESIGN section 1, rules 1 to 4).

    Args:
        schedule: the `schedule` config keys (name, unit, warmup, ...); None: constant LR.
        val_samples, test_samples: the sizes of the evaluation splits, stated in the plan.

    Raises:
        ConfigError: a bad size or budget, or a plan with no optimizer step at all.
    """
    _check_inputs(per_device_batch_size, accum, world_size, partial_window, max_steps,
                  max_epochs, max_samples, base_lr, train_samples)
    b, k, w, n = per_device_batch_size, accum, world_size, train_samples
    unit, effective = b * w, b * w * k
    micro_steps, steps_per_epoch, last_micro, used = _epoch_shape(n, b, k, w, drop_last,
                                                                  partial_window)

    factor = lr_scale_factor(lr_rule, effective, base_batch_size)

    plan = Plan(
        train_samples=n, per_device_batch_size=b, accum=k, world_size=w,
        effective_batch_size=effective, drop_last=drop_last, partial_window=partial_window,
        max_steps=max_steps, max_epochs=max_epochs, max_samples=max_samples,
        micro_batch_samples=unit,
        micro_steps_per_epoch=micro_steps, optimizer_steps_per_epoch=steps_per_epoch,
        last_window_micro_steps=last_micro,
        last_window_samples=used - (steps_per_epoch - 1) * effective,
        samples_per_epoch=used, samples_dropped_per_epoch=n - used,
        epochs=0, budget="", total_optimizer_steps=0, total_micro_steps=0, total_samples=0,
        lr_rule=lr_rule, base_lr=float(base_lr),
        base_batch_size=base_batch_size, lr_scale_factor=factor, lr=float(base_lr) * factor,
        val_samples=val_samples, test_samples=test_samples,
    )
    budgets = {  # optimizer steps each budget allows; the smallest binds (ties: listed first)
        "max_epochs": max_epochs * steps_per_epoch if max_epochs != -1 else math.inf,
        "max_samples": plan.steps_for_samples(max_samples) if max_samples != -1 else math.inf,
        "max_steps": max_steps if max_steps != -1 else math.inf,
    }
    budget = min(budgets, key=budgets.get)
    total = int(budgets[budget])
    plan = replace(
        plan, epochs=-(-total // steps_per_epoch), budget=budget, total_optimizer_steps=total,
        total_micro_steps=plan.micro_steps_after(total), total_samples=plan.samples_after(total),
    )
    if schedule is not None:
        plan = replace(plan, schedule=make_schedule(
            **schedule, samples_per_epoch=used, run_samples=plan.total_samples,
            samples_after_steps=plan.samples_after))
    warmup_steps = plan.steps_for_samples(plan.schedule.warmup_samples)
    return replace(plan, warmup_steps=warmup_steps, final_lr=plan.lr_at(total - 1))
