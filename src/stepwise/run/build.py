"""The one place that turns a job's config into its parts: model, optimizer, scheduler, loss,
metrics, callbacks and the Trainer. The run, `data.batch_size=auto`, the probes, the tests and the
benchmarks all build through here, so that they build the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from stepwise.config.components import build
from stepwise.contract.errors import ConfigError

DEFAULT_LOSS = {"classification": {"_target_": "stepwise.models.CrossEntropy"},
                "regression": {"_target_": "stepwise.models.MSE"}}
# With `metrics` null, classification logs val/accuracy counted by the loop itself (exact, in the
# loss's all-reduce): importing torchmetrics (and the torchvision it imports) adds ~3.5 s to the
# start of every run on 2 CPU cores, so it is imported only for metrics the user configures.
BUILT_IN_ACCURACY = None


def node(value: Any) -> dict[str, Any]:
    """A component's config as a plain dict, whether it has a stepwise schema or not."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def build_model(config: Any, data: Any) -> nn.Module:
    """The model factory called with its keys, and the data's shape keys that it names."""
    model = build("model", node(config.model), data.shape_keys())
    if not isinstance(model, nn.Module):
        raise ConfigError("model._target_", node(config.model)["_target_"], f"returned a "
                          f"{type(model).__name__}, not a torch.nn.Module",
                          "point it at an nn.Module class or a function that returns one")
    return model


def build_optimizer(config: Any, plan: Any, parameters) -> torch.optim.Optimizer:
    """The `optim` class (built with `_partial_`) on `parameters`, with the plan's LR."""
    from stepwise.contract.schedule import adapted_optimizer_args

    return build("optim", node(config.optim))(parameters, **adapted_optimizer_args(config, plan))


def build_scheduler(optimizer: torch.optim.Optimizer, plan: Any):
    """Stepped once per optimizer step; the factor is a function of the samples seen before it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: plan.schedule.factor(plan.samples_after(step)))


def loss_node(config: Any, data: Any) -> dict[str, Any]:
    return node(config.loss) if config.loss is not None else DEFAULT_LOSS[data.task]


def loss_spec(config: Any, data: Any) -> dict[str, Any]:
    """The `loss` node to build: a function is the loss itself (`_partial_` with its other
    keys), a class is built into one."""
    import inspect

    from stepwise.config.components import locate

    spec = loss_node(config, data)
    if inspect.isfunction(locate("loss", spec.get("_target_"))):
        spec = {"_partial_": True, **spec}
    return spec


def build_loss(config: Any, data: Any):
    """The `loss` component (per-item values, stepwise/models/losses.py); by default, the data's task's."""
    loss = build("loss", loss_spec(config, data))
    if not callable(loss):
        raise ConfigError("loss._target_", loss_node(config, data)["_target_"], f"built a "
                          f"{type(loss).__name__}, which cannot be called as loss(output, target)",
                          "point it at a loss class or function (with _partial_: true)")
    return loss


def metrics_nodes(config: Any, data: Any) -> dict[str, dict[str, Any]]:
    if config.metrics is None:
        return {}
    if not isinstance(config.metrics, dict):
        raise ConfigError("metrics", config.metrics, "must map names to torchmetrics configs",
                          "write metrics={accuracy: {_target_: torchmetrics...}}")
    return {name: node(value) for name, value in config.metrics.items()}


def build_metrics(config: Any, data: Any) -> dict[str, Any] | None:
    """{name: torchmetrics.Metric}, each logged as `val/<name>`; None: the loop's own accuracy
    (`metrics` null on classification data)."""
    if config.metrics is None and data.task == "classification":
        return BUILT_IN_ACCURACY
    nodes = metrics_nodes(config, data)
    if not nodes:
        return {}
    from stepwise.config.vision_import import torchvision

    torchvision()  # torchmetrics imports torchvision, which needs this next to a CPU-only torch
    from torchmetrics import Metric

    metrics = {}
    for name, value in nodes.items():
        if not isinstance(value, dict) or "_target_" not in value:
            raise ConfigError(f"metrics.{name}", value, "needs a _target_",
                              f"write metrics.{name}={{_target_: torchmetrics...}}")
        metric = build(f"metrics.{name}", value, data.shape_keys())
        if not isinstance(metric, Metric):
            raise ConfigError(f"metrics.{name}._target_", value["_target_"], f"built a "
                              f"{type(metric).__name__}, not a torchmetrics.Metric (whose states "
                              "stepwise reduces exactly over ranks)",
                              "use a torchmetrics class, or subclass torchmetrics.Metric")
        metrics[name] = metric
    return metrics


def build_trainer(job: Any, replica: Any, tracker: Any):
    """Build the model, optimizer, scheduler, loss, metrics, callbacks and loaders, seeded by
    `seed`."""
    from stepwise.callbacks.building import build_callbacks
    from stepwise.data.loaders import fetch_split, make_loaders
    from stepwise.loop.callbacks import Callbacks
    from stepwise.loop.precision import Precision, compile_model, param_dtype, set_tf32, to_memory_format
    from stepwise.loop.trainer import Trainer
    from stepwise.loop.trainer_parts import LoopSettings, NullProgress, Parts
    from stepwise.run.checkpoint import checkpoint_saver

    cfg, plan, trainer_cfg = job.config, job.plan, job.config.trainer
    dtype = param_dtype(trainer_cfg.precision)
    set_tf32(trainer_cfg.tf32, replica.device)
    torch.manual_seed(cfg.seed)
    model = to_memory_format(build_model(cfg, job.data).to(dtype), trainer_cfg.channels_last)
    wrapped = compile_model(replica.wrap(model, trainer_cfg.precision), trainer_cfg.compile)
    optimizer = build_optimizer(cfg, plan, wrapped.parameters())
    metrics = build_metrics(cfg, job.data)
    if metrics is not None:
        metrics = {name: metric.to(replica.device) for name, metric in metrics.items()}
    parts = Parts(model=wrapped, optimizer=optimizer, scheduler=build_scheduler(optimizer, plan),
                  loss=build_loss(cfg, job.data), metrics=metrics)
    callbacks = Callbacks(build_callbacks(cfg.callbacks), run_dir=job.run_dir,
                          batch=lambda split, indices: fetch_split(job.data, split, dtype, indices))
    train_loader, val_loader = make_loaders(
        job.data, plan, replica, seed=cfg.seed, dtype=dtype, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.persistent_workers, prefetch_factor=cfg.data.prefetch_factor)
    return Trainer(parts, plan, train_loader=train_loader, val_loader=val_loader, replica=replica,
                   tracker=tracker, progress=NullProgress(), settings=LoopSettings.of(trainer_cfg),
                   save=checkpoint_saver(job, tracker),
                   precision=Precision(trainer_cfg.precision, replica.device), items=job.items,
                   best=best_keeper(job, tracker), callbacks=callbacks)


def best_keeper(job: Any, tracker: Any):
    """`trainer.monitor`'s best checkpoint and early stopping, or None when nothing is monitored."""
    from stepwise.contract.monitor import BestKeeper, Monitor
    from stepwise.run.checkpoint import best_saver

    cfg = job.config.trainer
    if cfg.monitor is None:
        return None
    monitor = Monitor(cfg.monitor, cfg.monitor_mode, cfg.early_stopping_patience, cfg.min_delta)
    return BestKeeper(monitor, best_saver(job, tracker))
