"""`stepwise verify`'s runs: the job under each factoring of its effective batch, a few optimizer
steps in float64 on the CPU from the same weights and seed, each step's window loss and
parameters recorded, and the differences against the reference factoring (E, 1, 1).

One factoring runs in this process (single) or in two spawned gloo ranks (DDP), built exactly as
training builds it (stepwise/run/build.py); a `change` (stepwise/run/diagnosis.py) may alter the
built model or the config first.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from stepwise.config.parallel_schemas import DDPConfig, ParallelConfig
from stepwise.contract.dist_env import DistEnv
from stepwise.contract.verdict import Factoring, StepDifference, tolerance
from stepwise.parallel.replica import Replica

Snapshot = dict[str, Any]  # {"step", "loss", "params": {name: float64 CPU tensor}}


def factoring_config(config: Any, factoring: Factoring, steps: int) -> Any:
    """The job's config for one factoring: float64 on the CPU, `steps` optimizer steps, nothing
    resumed, checkpointed, tested or logged, no callbacks."""
    config = copy.deepcopy(config)
    config.data.batch_size, config.accum = factoring.batch_size, factoring.accum
    config.effective_batch_size = None
    config.parallel = (DDPConfig(nproc=factoring.world_size) if factoring.world_size > 1
                       else ParallelConfig())
    trainer = config.trainer
    trainer.precision, trainer.device, trainer.compile, trainer.channels_last = "64", "cpu", False, False
    trainer.max_steps, trainer.max_epochs, trainer.max_samples = steps, -1, -1
    trainer.checkpoint_every_n_steps, trainer.test, trainer.resume = 0, False, "none"
    trainer.monitor, trainer.early_stopping_patience = None, None
    trainer.progress_bar, trainer.on_nonfinite = False, "stop"
    config.logger.backend, config.callbacks, config.dry_run = "none", None, False
    return config


def forward_order(model: nn.Module, run_once: Callable[[], None]) -> list[tuple[str, str]]:
    """(parameter name, its module's class) in the order the forward of `run_once` first calls
    their modules; parameters of modules it never calls come last."""
    called: dict[str, nn.Module] = {}  # in first-call order
    modules = dict(model.named_modules())
    def note(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:  # None: the inputs stay as they are
            called.setdefault(name, module)
        return hook

    hooks = [module.register_forward_pre_hook(note(name)) for name, module in modules.items()]
    try:
        run_once()
    finally:
        for hook in hooks:
            hook.remove()
    order = [(f"{name}.{p}" if name else p, type(module).__name__)
             for name, module in called.items() for p, _ in module.named_parameters(recurse=False)]
    seen = {name for name, _ in order}
    return order + [(name, "?") for name, _ in model.named_parameters() if name not in seen]


def record_steps(job: Any, replica: Replica, change: Callable | None = None) -> dict[str, Any]:
    """Train the job's plan step by step; after each optimizer step its window's mean loss and
    every parameter (float64, CPU). `change(model)` alters the built model first (an experiment)."""
    from stepwise.run.build import build_trainer
    from stepwise.tracking.tracker import NullTracker

    trainer = build_trainer(job, replica, NullTracker())
    bare = Replica.unwrap(trainer.model)
    if change is not None:
        change(bare)
    snapshots: list[Snapshot] = []
    steps = iter(_steps(trainer))
    order = forward_order(bare, lambda: snapshots.append(next(steps)))
    snapshots += list(steps)
    return {"order": order, "snapshots": snapshots}


def _steps(trainer: Any):
    for epoch in range(trainer.plan.epochs):
        for window, batches in trainer.windows(epoch):
            trainer.train_step(batches, window)
            loss = trainer.replica.sum(trainer.last_shares.double()).item()
            yield {"step": trainer.counters.global_step,
                   "loss": loss / trainer.replica.loss_multiplier,
                   "params": {name: value.detach().double().cpu().clone() for name, value in
                              Replica.unwrap(trainer.model).named_parameters()}}


def run_factoring(config: Any, factoring: Factoring, steps: int, run_dir: Path,
                  change: Callable | None = None) -> dict[str, Any]:
    """Prepare and run one factoring: in this process, or in spawned DDP ranks (rank 0's record;
    `change` is pickled to them)."""
    from stepwise.run.job import prepare
    from stepwise.run.offline import run

    job = prepare(factoring_config(config, factoring, steps), run_dir=run_dir, start_dir=run_dir,
                  env=DistEnv())
    return run(job, functools.partial(record_steps, change=change))


def differences(reference: dict[str, Any], other: dict[str, Any]) -> list[StepDifference]:
    """Each step of `other` against the same step of `reference`; the parameters beyond the
    tolerance are named in the reference's forward order (the first 3)."""
    found = []
    for ref, run in zip(reference["snapshots"], other["snapshots"]):
        limit = tolerance(ref["step"])
        loss = abs(run["loss"] - ref["loss"]) / (1 + abs(ref["loss"]))
        beyond, max_abs, max_rel = [], 0.0, 0.0
        for name, module in reference["order"]:
            a, b = ref["params"][name], run["params"][name]
            diff = (b - a).abs()
            abs_diff, rel = diff.max().item(), (diff / (1 + a.abs())).max().item()
            max_abs, max_rel = max(max_abs, abs_diff), max(max_rel, rel)
            if rel > limit and len(beyond) < 3:
                beyond.append({"name": name, "module": module, "max_abs": abs_diff,
                               "max_rel": rel})
        found.append(StepDifference(ref["step"], loss, max_abs, max_rel, beyond))
    return found


def summary(run: dict[str, Any]) -> list[dict[str, float]]:
    """A run's losses per step, for verify.json."""
    return [{"step": s["step"], "loss": s["loss"]} for s in run["snapshots"]]

