"""LR schedules defined in samples (pure): the same curve against `samples_seen` however the
effective batch is factored, with the partial last window of an epoch counted exactly.

Every duration (warmup, milestones, cosine length) is given in `schedule.unit` = epochs, samples
or steps and converted once to samples through the plan. The multiplier of optimizer step s is a
function of the samples seen before it, `Plan.samples_after(s)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stepwise.contract.errors import ConfigError

SCHEDULES = ("constant", "cosine", "multistep")
UNITS = ("epochs", "samples", "steps")


@dataclass(frozen=True)
class Schedule:
    """A multiplier of the scaled LR as a function of samples seen (all lengths in samples)."""

    name: str = "constant"
    warmup_samples: int = 0
    warmup_start_factor: float = 1.0
    decay_samples: int = 0  # cosine: samples from the start to the end of the decay
    min_lr_factor: float = 0.0
    milestones_samples: tuple[int, ...] = ()
    gamma: float = 0.1

    @property
    def constant(self) -> bool:
        """The factor is 1 at every step (nothing to step)."""
        return self.name == "constant" and self.warmup_samples == 0

    def factor(self, samples_before: int) -> float:
        """The LR multiplier of an optimizer step that starts after `samples_before` samples."""
        if samples_before < self.warmup_samples:
            progress = samples_before / self.warmup_samples
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * progress
        if self.name == "cosine":
            span = max(self.decay_samples - self.warmup_samples, 1)
            progress = min((samples_before - self.warmup_samples) / span, 1.0)
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            return self.min_lr_factor + (1.0 - self.min_lr_factor) * cosine
        if self.name == "multistep":
            return self.gamma ** sum(samples_before >= m for m in self.milestones_samples)
        return 1.0


def to_samples(value: float, unit: str, *, samples_per_epoch: int, samples_after_steps) -> int:
    """A duration in epochs, samples or optimizer steps, as a number of samples."""
    if unit == "epochs":
        return int(round(value * samples_per_epoch))
    if unit == "steps":
        return samples_after_steps(int(value))
    return int(value)


def make_schedule(*, name: str, unit: str, warmup: float, warmup_start_factor: float,
                  total: float | None, min_lr_factor: float, milestones: list[float],
                  gamma: float, samples_per_epoch: int, run_samples: int,
                  samples_after_steps) -> Schedule:
    """Validate the schedule keys and convert their durations to samples.

    Args:
        run_samples: the samples the whole run processes (the plan's total).
        samples_after_steps: the plan's step -> samples function, for `unit=steps`.
    """
    if name not in SCHEDULES:
        raise ConfigError("schedule.name", name, "unknown schedule",
                          f"use one of {', '.join(SCHEDULES)}")
    if unit not in UNITS:
        raise ConfigError("schedule.unit", unit, "unknown unit", f"use one of {', '.join(UNITS)}")
    convert = lambda value: to_samples(value, unit, samples_per_epoch=samples_per_epoch,  # noqa: E731
                                       samples_after_steps=samples_after_steps)
    if warmup < 0:
        raise ConfigError("schedule.warmup", warmup, "must be >= 0", "set 0 for no warmup")
    warmup_samples = convert(warmup)
    if warmup_samples > run_samples:
        raise ConfigError("schedule.warmup", warmup, f"warmup of {warmup_samples} samples is "
                          f"longer than the whole run ({run_samples} samples)",
                          "shorten schedule.warmup or lengthen the run")
    if not 0.0 < warmup_start_factor <= 1.0:
        raise ConfigError("schedule.warmup_start_factor", warmup_start_factor,
                          "must be in (0, 1]", "warmup starts at this fraction of the LR, e.g. 0.1")
    if not 0.0 <= min_lr_factor <= 1.0:
        raise ConfigError("schedule.min_lr_factor", min_lr_factor, "must be in [0, 1]",
                          "set the cosine floor as a fraction of the LR, e.g. 0.0")
    decay = run_samples if total is None else convert(total)
    if name == "cosine" and not warmup_samples < decay <= run_samples:
        raise ConfigError("schedule.total", total, f"the cosine must end after the warmup "
                          f"({warmup_samples} samples) and by the end of the run "
                          f"({run_samples} samples)", "set null to decay over the whole run")
    marks = tuple(sorted(convert(m) for m in milestones))
    if name == "multistep":
        if not marks:
            raise ConfigError("schedule.milestones", list(milestones), "multistep needs milestones",
                              "give e.g. schedule.milestones=[30,60]")
        if marks[-1] > run_samples:
            raise ConfigError("schedule.milestones", list(milestones), f"a milestone lies beyond "
                              f"the end of the run ({run_samples} samples = "
                              f"{run_samples / samples_per_epoch:.4g} epochs)",
                              "drop it or lengthen the run")
        if not 0.0 < gamma <= 1.0:
            raise ConfigError("schedule.gamma", gamma, "must be in (0, 1]", "use e.g. 0.1")
    cosine, multistep = name == "cosine", name == "multistep"
    return Schedule(name=name, warmup_samples=warmup_samples,
                    warmup_start_factor=warmup_start_factor if warmup_samples else 1.0,
                    decay_samples=decay if cosine else 0,
                    min_lr_factor=min_lr_factor if cosine else 0.0,
                    milestones_samples=marks if multistep else (), gamma=gamma if multistep else 0.1)


def adapt_adam(betas: tuple[float, float], eps: float, kappa: float) -> tuple[tuple[float, float],
                                                                              float]:
    """The rest of the square-root rule (Malladi et al. 2022) for Adam-type optimizers:
    1 - beta -> kappa (1 - beta) for both betas, eps -> eps / sqrt(kappa)."""
    adapted = tuple(1.0 - kappa * (1.0 - beta) for beta in betas)
    if any(not 0.0 <= beta < 1.0 for beta in adapted):
        raise ConfigError("lr_scaling.adapt_betas", True, f"kappa = E / base_batch_size = {kappa:.4g}"
                          f" turns betas {list(betas)} into {[round(b, 6) for b in adapted]}, "
                          "outside [0, 1)", "use a smaller effective batch or adapt_betas=false")
    return (adapted[0], adapted[1]), eps / math.sqrt(kappa)


def adapted_optimizer_args(config: Any, plan: Any) -> dict[str, Any]:
    """Optimizer keyword arguments that the LR rule changes: lr, and betas/eps under adapt_betas."""
    args: dict[str, Any] = {"lr": plan.lr}
    if config.lr_scaling.adapt_betas:
        kappa = plan.effective_batch_size / plan.base_batch_size
        betas, eps = adapt_adam(tuple(config.optim.betas), config.optim.eps, kappa)
        args.update(betas=betas, eps=eps)
    return args
