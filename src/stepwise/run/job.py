"""From a composed config to a validated job: every user mistake is found here, before any work.

No torch, mlflow or scikit-learn import on this path for vector data, so that `dry_run=true`
takes a fraction of `import torch` (tests/integration/test_startup.py holds it to that).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepwise.callbacks.building import check_callbacks
from stepwise.config.schemas import Config
from stepwise.contract.advice import advise, knobs, run_warnings
from stepwise.contract.dist_env import DistEnv
from stepwise.contract.errors import ConfigError
from stepwise.contract.items import ItemPlan, item_plan
from stepwise.contract.monitor import check_monitor
from stepwise.contract.plan import Plan, derive_accum, make_plan
from stepwise.contract.schedule import adapted_optimizer_args
from stepwise.contract.world import World, resolve_world
from stepwise.data.arrays import ArrayData, build_data, check_fractions
from stepwise.run.probe import check_context, check_model
from stepwise.tracking.auth import check_tracking

if TYPE_CHECKING:
    from stepwise.tracking.sweep import SweepJob

log = logging.getLogger("stepwise")
PARALLEL_MODES = ("single", "dp", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("32", "64", "bf16", "16-mixed")  # see stepwise/loop/precision.py
LOGGER_BACKENDS = ("mlflow", "none")
NONFINITE_POLICIES = ("stop", "skip")
ACTIVATIONS = ("relu", "gelu", "tanh")


@dataclass(frozen=True)
class Job:
    """Everything a run needs, fixed before it starts (derived values live in `plan` only)."""

    config: Config
    data: Any  # ArrayData, ImageData or DatasetData
    plan: Plan
    run_dir: Path
    start_dir: Path
    world: World = World()  # the replicas W, processes per node, and this process's rank
    resume_from: Path | None = None  # the checkpoint this run continues, if any
    sweep: SweepJob | None = None  # set for a job of a multirun: its parent run
    auto_batch_tried: tuple[int, ...] = ()  # data.batch_size=auto: the sizes tried, last fitted
    items: ItemPlan | None = None  # each window's loss items, when the data states them

    def plan_table(self) -> str:
        return self.plan.table(self.items.rows() if self.items is not None else ())

    def config_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self.config)
        tree.pop("defaults", None)
        return tree


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "unknown value", f"use one of {', '.join(allowed)}")


def validate(config: Config) -> None:
    """Check the keys the plan does not cover. Raises ConfigError on the first bad one."""
    _one_of("parallel", config.parallel.mode, PARALLEL_MODES)
    trainer = config.trainer
    _one_of("trainer.device", trainer.device, DEVICES)
    _one_of("trainer.precision", trainer.precision, PRECISIONS)
    if config.parallel.mode == "fsdp":
        from stepwise.parallel.fsdp import check_config

        check_config(config)
    _check_logger(config.logger)
    _one_of("trainer.on_nonfinite", trainer.on_nonfinite, NONFINITE_POLICIES)
    if trainer.checkpoint_every_n_steps < 0:
        raise ConfigError("trainer.checkpoint_every_n_steps", trainer.checkpoint_every_n_steps,
                          "must be >= 0", "use 0 to checkpoint only at the end and on signals")
    if trainer.keep_checkpoints < 1:
        raise ConfigError("trainer.keep_checkpoints", trainer.keep_checkpoints, "must be >= 1",
                          "keep at least one, e.g. trainer.keep_checkpoints=2")
    for key, value in (("trainer.log_every_n_steps", trainer.log_every_n_steps),
                       ("trainer.flush_every_n_steps", trainer.flush_every_n_steps),
                       ("trainer.val_every_n_epochs", trainer.val_every_n_epochs)):
        if value is not None and value < 1:
            auto = ", or null for 100 points a run" if key.endswith("log_every_n_steps") else ""
            raise ConfigError(key, value, "must be at least 1", f"set {key}=1 or more{auto}")
    if trainer.grad_clip_norm is not None and not trainer.grad_clip_norm > 0:
        raise ConfigError("trainer.grad_clip_norm", trainer.grad_clip_norm, "must be positive",
                          "set a positive max norm, or null for no clipping")
    if config.data.num_workers < 0:
        raise ConfigError("data.num_workers", config.data.num_workers, "must be >= 0",
                          "use 0 to load in the main process")
    if hasattr(config.model, "activation"):
        _one_of("model.activation", config.model.activation, ACTIVATIONS)
    check_optim(config.optim)
    check_sizes(config)
    if trainer.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "cuda", "no CUDA device is visible",
                              "use trainer.device=auto or cpu")
    check_fast_path(trainer)


def _check_logger(logger: Any) -> None:
    _one_of("logger.backend", logger.backend, LOGGER_BACKENDS)
    if logger.backend == "mlflow" and logger.tracking_uri:
        from stepwise.tracking.tracker import check_scheme

        check_scheme(logger.tracking_uri)
    if logger.system_metrics_interval_s < 0:
        raise ConfigError("logger.system_metrics_interval_s", logger.system_metrics_interval_s,
                          "must be >= 0", "use 0 for no system metrics")
    if logger.flush_timeout_s < 0:
        raise ConfigError("logger.flush_timeout_s", logger.flush_timeout_s, "must be >= 0",
                          "use 0 to keep what is unsent at the end for stepwise.tracking.replay at once")


def check_optim(optim: Any) -> None:
    """optim.* ranges that torch.optim checks late (at its first step) or never; no torch here."""
    weight_decay, eps = getattr(optim, "weight_decay", 0.0), getattr(optim, "eps", None)
    if weight_decay < 0:
        raise ConfigError("optim.weight_decay", weight_decay, "must be >= 0",
                          "set optim.weight_decay to 0 or more")
    momentum, dampening = getattr(optim, "momentum", 0.0), getattr(optim, "dampening", 0.0)
    if not 0 <= momentum < 1:
        raise ConfigError("optim.momentum", momentum, "must be in [0, 1): the momentum buffer "
                          "weighs the gradient of k steps ago by momentum^k, a series that grows "
                          "without bound at 1 or more, so training diverges",
                          "use e.g. optim.momentum=0.9, or 0 for none")
    if not 0 <= dampening <= 1:
        raise ConfigError("optim.dampening", dampening, "must be in [0, 1] (each gradient enters "
                          "the momentum buffer scaled by 1 - dampening)", "use optim.dampening=0")
    if getattr(optim, "nesterov", False) and (momentum <= 0 or dampening != 0):
        raise ConfigError("optim.nesterov", True, f"needs optim.momentum > 0 and "
                          f"optim.dampening=0 (here momentum={momentum:g}, dampening={dampening:g})",
                          "set e.g. optim.momentum=0.9 optim.dampening=0, or optim.nesterov=false")
    betas = getattr(optim, "betas", None)
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ConfigError("optim.betas", list(betas), "must be two values in [0, 1) (the decay "
                          "rates of the running means of the gradient and of its square)",
                          "use e.g. optim.betas=[0.9,0.999]")
    if betas is not None and eps is not None and not eps > 0:
        raise ConfigError("optim.eps", eps, "must be positive: the update divides by sqrt(v) + "
                          "eps, and v is 0 for a weight whose gradients have all been 0 (0/0 = NaN)",
                          "use e.g. optim.eps=1e-8")
    if eps is not None and eps < 0:
        raise ConfigError("optim.eps", eps, "must be >= 0", "use e.g. optim.eps=1e-8")


def check_sizes(config: Config) -> None:
    """Model layer sizes, seeds and data.* numbers that the builders take without a word, or
    refuse with a traceback (numpy's negative seeds, a zero std)."""
    for name in ("hidden_sizes", "widths"):
        sizes = getattr(config.model, name, None)
        if sizes is not None and any(size < 1 for size in sizes):
            example = ",".join(map(str, getattr(type(config.model)(), name))) or "64"
            raise ConfigError(f"model.{name}", list(sizes), "every layer needs at least 1 unit "
                              "(a layer of 0 cuts the output off from the input)",
                              f"use e.g. model.{name}=[{example}]")
    data = config.data
    for key, value in (("seed", config.seed), ("data.seed", getattr(data, "seed", 0)),
                       ("data.split_seed", getattr(data, "split_seed", 0))):
        if value < 0:
            raise ConfigError(key, value, "must be >= 0 (numpy takes no negative seeds)",
                              f"use e.g. {key}=0")
    for key, low, fix in (("train_samples", 1, "1 or more"), ("num_classes", 1, "1 or more"),
                          ("val_samples", 0, "0 or more"), ("test_samples", 0, "0 or more"),
                          ("noise_std", 0, "0 or more"),
                          ("prefetch_factor", 1, "1 or more, or null for torch's default")):
        value = getattr(data, key, None)
        if value is not None and value < low:
            raise ConfigError(f"data.{key}", value, f"must be >= {low}", f"set data.{key} to {fix}")
    check_fractions(getattr(data, "val_fraction", 0.0), getattr(data, "test_fraction", 0.0))
    std = getattr(data, "std", None)
    if std is not None and not all(value > 0 for value in std):
        raise ConfigError("data.std", list(std), "must all be positive (pixels are divided by "
                          "them)", "give each channel's standard deviation, e.g. 0.25, or null")
    if getattr(data, "weights", None) == []:
        raise ConfigError("data.weights", [], "needs one weight per input feature",
                          "use e.g. data.weights=[-2.0,3.4]")


def warn_unlikely(config: Config, plan: Plan, data: Any = None) -> None:
    """One warning line, with the reason, for each legal value that is most likely a slip."""
    for split, what, never in (("val", "validation", "evaluates"), ("test", "test", "tests")):
        node = getattr(config.data, split, None)
        if isinstance(node, dict) and data is not None and getattr(data, f"{split}_samples") == 0:
            log.warning("data.%s=%s: the %s dataset is empty (len 0), so the run never %s (no "
                        "%s/loss, no metrics); fix: check its arguments, or set data.%s=null for "
                        "a run without %s", split, node.get("_target_"), what, never, split,
                        split, what)
    optim = config.optim
    adam = hasattr(optim, "betas")
    limit, why, typical = ((1.0, "AdamW, which moves each weight by about lr per step", "1e-4 to 1e-2")
                           if adam else (10.0, "SGD: steps that large make the loss diverge on "
                                               "almost any model", "1e-3 to 1"))
    if plan.lr > limit:
        scaled = "" if plan.lr == optim.lr else f" (scaled to {plan.lr:g} by lr_scaling)"
        log.warning("optim.lr=%g%s: unusually large for %s (typical: %s)", optim.lr, scaled, why,
                    typical)
    if optim.weight_decay > 1:
        log.warning("optim.weight_decay=%g: unusually large (typical: %s): each step multiplies "
                    "every weight by 1 - lr x weight_decay = %.4g, pulling the weights to 0 "
                    "whatever the loss", optim.weight_decay, "0.01 to 0.1" if adam else "1e-5 to 1e-3",
                    1 - plan.lr * optim.weight_decay)
    monitor = config.trainer.monitor
    if monitor is not None and "acc" in monitor and config.trainer.monitor_mode == "min":
        log.warning("trainer.monitor=%s with trainer.monitor_mode=min: the lowest value is kept "
                    "as the best; add trainer.monitor_mode=max if higher is better", monitor)
    if getattr(config.data, "num_classes", None) == 1 and \
            getattr(config.data, "task", "classification") == "classification":
        log.warning("data.num_classes=1: every label is that class, so the cross-entropy loss is "
                    "0 whatever the weights and nothing is learned")
    for line in (*plan.warnings, *run_warnings(plan, knobs(config))):  # contract/advice.py
        log.warning(line)


def check_fast_path(trainer: Any) -> None:
    """`trainer.precision`, `trainer.compile`: what this machine cannot run is found now."""
    import shutil

    if trainer.precision != "bf16" and not trainer.compile:
        return  # nothing to ask torch (dry runs stay torch-free)
    on_cuda = trainer.device != "cpu" and _cuda_devices() > 0
    if trainer.precision == "bf16" and on_cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision", "bf16", f"{torch.cuda.get_device_name()} has "
                              "no bfloat16", "use trainer.precision=16-mixed or 32")
    if trainer.compile and not on_cuda and not shutil.which(os.environ.get("CXX", "g++")):
        raise ConfigError("trainer.compile", True, "torch.compile on CPU needs a C++ compiler "
                          "and none was found", "install one (apt-get install g++), or set "
                          "trainer.compile=false")


def visible_gpus(config: Config) -> int:
    """CUDA devices the world may use; torch is imported only for dp, ddp and fsdp off the CPU."""
    mode = config.parallel.mode
    if mode == "single" or (mode in ("ddp", "fsdp") and config.trainer.device == "cpu"):
        return 0
    return _cuda_devices()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_accum(config: Config, world_size: int) -> tuple[int, int]:
    """(data.batch_size, accum): `accum` as given or derived from `effective_batch_size` (both
    given must agree). With `data.batch_size=auto`: b = E / W and accum 1, until tried."""
    b, effective = config.data.batch_size, config.effective_batch_size
    if b == "auto":
        if effective is None:
            raise ConfigError("data.batch_size", "auto", "needs the effective batch to keep",
                              "set effective_batch_size (e.g. effective_batch_size=256)")
        if config.accum is not None:
            raise ConfigError("accum", config.accum, "is chosen by data.batch_size=auto",
                              "drop accum; effective_batch_size fixes the batch")
        if effective <= 0 or effective % world_size:
            raise ConfigError("effective_batch_size", effective, f"must be a positive multiple "
                              f"of world_size={world_size} for data.batch_size=auto",
                              f"use e.g. effective_batch_size={world_size * 32}")
        return effective // world_size, 1
    if isinstance(b, bool) or not isinstance(b, int):
        raise ConfigError("data.batch_size", b, "must be a positive integer or auto",
                          "set e.g. data.batch_size=32")
    if effective is None:
        return b, 1 if config.accum is None else config.accum
    derived = derive_accum(effective, b, world_size) if b > 0 else 0
    if config.accum is not None and config.accum != derived:
        raise ConfigError(
            "accum", config.accum,
            f"disagrees with effective_batch_size={effective} "
            f"(data.batch_size x world_size = {b} x {world_size} needs accum={derived})",
            "drop one of the two, or make them agree",
        )
    return b, derived


def check_adapt_betas(config: Config, plan: Plan) -> None:
    """`lr_scaling.adapt_betas` is the rest of the square-root rule, for Adam-type optimizers."""
    if not config.lr_scaling.adapt_betas:
        return
    if not hasattr(config.optim, "betas"):
        raise ConfigError("lr_scaling.adapt_betas", True, f"optim {type(config.optim).__name__} "
                          "has no betas to adapt", "use optim=adamw or adapt_betas=false")
    if config.lr_scaling.rule != "sqrt":
        raise ConfigError("lr_scaling.adapt_betas", True, f"belongs to the sqrt rule, not "
                          f"{config.lr_scaling.rule}", "use lr_scaling=sqrt or adapt_betas=false")
    adapted_optimizer_args(config, plan)  # raises if the betas leave [0, 1)


def _data_name(data_cfg: Any) -> str:
    """How error lines name the data: `digits`, or a user's dataset class."""
    train = getattr(data_cfg, "train", None)
    target = train.get("_target_", "?") if isinstance(train, dict) else data_cfg._target_
    return str(target).rsplit(".", 1)[-1]


def prepare(config: Config, run_dir: Path, start_dir: Path, env: DistEnv | None = None,
            sweep: SweepJob | None = None) -> Job:
    """Validate the config, load the data's arrays, compute the plan, and build the model and
    optimizer once (stepwise.run.probe), but in a dry run of vector data, which stays torch-free.

    Args:
        env: the launcher's environment (torchrun, SLURM) if any; it fixes the world size.
    """
    env = env or DistEnv()
    validate(config)
    # Every rank asks (they share the environment): a rank that stopped alone would leave the
    # others waiting for it in the process group.
    check_tracking(config.logger, start_dir, config.dry_run)
    world = resolve_world(config.parallel, config.trainer.device, env, visible_gpus(config))
    batch_size, accum = resolve_accum(config, world.size)
    data = build_data(dataclasses.asdict(config.data))
    check_model(config.model, data, _data_name(config.data))
    check_context(config.model, data)
    check_monitor(config.trainer, data, config.metrics, check_callbacks(config.callbacks))
    images = len(data.input_shape or ()) == 3
    if config.trainer.channels_last and not images:
        raise ConfigError("trainer.channels_last", True, f"data={_data_name(config.data)} gives "
                          "vectors, not images", "set trainer.channels_last=false")
    plan = plan_for(config, data, world.size, batch_size, accum)
    check_adapt_betas(config, plan)
    if not config.dry_run:
        from stepwise.run.probe import probe

        probe(config, data, _data_name(config.data), plan)
    elif images or not isinstance(data, ArrayData):  # torch is loaded already
        from stepwise.run.probe import dry_probe

        dry_probe(config, data, _data_name(config.data))
    if env.rank == 0:
        warn_unlikely(config, plan, data)
    from stepwise.run.resume import find_checkpoint

    return Job(config=config, data=data, plan=plan, run_dir=run_dir, start_dir=start_dir,
               world=world, items=item_plan(data, plan, config.seed),
               resume_from=find_checkpoint(config.trainer.resume, run_dir), sweep=sweep)


def plan_for(config: Config, data: Any, world_size: int, batch_size: int, accum: int) -> Plan:
    """The plan of this config for a factoring (b, accum) of its effective batch."""
    return advise(make_plan(
        train_samples=data.train_samples, per_device_batch_size=batch_size,
        accum=accum, world_size=world_size, drop_last=config.data.drop_last,
        partial_window=config.trainer.partial_window, max_steps=config.trainer.max_steps,
        max_epochs=config.trainer.max_epochs, max_samples=config.trainer.max_samples,
        base_lr=config.optim.lr, lr_rule=config.lr_scaling.rule,
        base_batch_size=config.lr_scaling.base_batch_size,
        schedule=dataclasses.asdict(config.schedule),
        val_samples=getattr(data, "val_samples", 0), test_samples=getattr(data, "test_samples", 0),
    ), knobs(config))


def run_params(job: Job) -> dict[str, Any]:
    """MLflow params: the flattened resolved config, then the plan's numbers (which win)."""
    from stepwise.tracking.tracker import flatten

    plan = job.plan
    params = flatten(job.config_dict())
    params.update(
        effective_batch_size=plan.effective_batch_size,
        per_device_batch_size=plan.per_device_batch_size, accum=plan.accum,
        world_size=plan.world_size, parallel=job.config.parallel.mode,
        train_samples=plan.train_samples, val_samples=plan.val_samples,
        test_samples=plan.test_samples, micro_steps_per_epoch=plan.micro_steps_per_epoch,
        optimizer_steps_per_epoch=plan.optimizer_steps_per_epoch,
        last_window_samples=plan.last_window_samples,
        samples_dropped_per_epoch=plan.samples_dropped_per_epoch,
        total_optimizer_steps=plan.total_optimizer_steps, total_samples=plan.total_samples,
        budget=plan.budget, lr_scale_factor=plan.lr_scale_factor, lr=plan.lr,
        warmup_steps=plan.warmup_steps, final_lr=plan.final_lr,
    )
    if plan.warnings:
        params.update(plan_warnings="\n".join(plan.warnings))
    if job.items is not None:
        params.update(total_items=job.items.total_items)
    if job.auto_batch_tried:
        params.update(auto_batch_sizes_tried=list(job.auto_batch_tried))
    adapted = adapted_optimizer_args(job.config, plan)
    if "betas" in adapted:
        params.update(betas_used=list(adapted["betas"]), eps_used=adapted["eps"])
    return params
