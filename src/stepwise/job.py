"""From a composed config to a validated job: every user mistake is found here, before any work.

No torch, mlflow or scikit-learn import on this path for vector data, so that `dry_run=true`
takes a fraction of `import torch` (tests/integration/test_startup.py holds it to that).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepwise.config import Config
from stepwise.data import ArrayData, build_data
from stepwise.dist_env import DistEnv, ddp_world
from stepwise.errors import ConfigError
from stepwise.plan import Plan, derive_accum, make_plan

if TYPE_CHECKING:
    from stepwise.sweep import SweepJob

PARALLEL_MODES = ("single", "dp", "ddp")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("32", "64", "bf16", "16-mixed")  # see stepwise/precision.py
LOGGER_BACKENDS = ("mlflow", "none")
NONFINITE_POLICIES = ("stop", "skip")
ACTIVATIONS = ("relu", "gelu", "tanh")


@dataclass(frozen=True)
class Job:
    """Everything a run needs, fixed before it starts (derived values live in `plan` only)."""

    config: Config
    data: ArrayData
    plan: Plan
    run_dir: Path
    start_dir: Path
    env: DistEnv = DistEnv()
    nproc: int = 1  # processes per node (ddp); 1 otherwise
    resume_from: Path | None = None  # the checkpoint this run continues, if any
    sweep: SweepJob | None = None  # set for a job of a multirun: its parent run
    auto_batch_tried: tuple[int, ...] = ()  # data.batch_size=auto: the sizes tried, last fitted

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
    _one_of("logger.backend", config.logger.backend, LOGGER_BACKENDS)
    _one_of("trainer.on_nonfinite", trainer.on_nonfinite, NONFINITE_POLICIES)
    if config.logger.backend == "mlflow" and config.logger.tracking_uri:
        from stepwise.tracking import check_scheme

        check_scheme(config.logger.tracking_uri)
    if trainer.checkpoint_every_n_steps < 0:
        raise ConfigError("trainer.checkpoint_every_n_steps", trainer.checkpoint_every_n_steps,
                          "must be >= 0", "use 0 to checkpoint only at the end and on signals")
    if trainer.keep_checkpoints < 1:
        raise ConfigError("trainer.keep_checkpoints", trainer.keep_checkpoints, "must be >= 1",
                          "keep at least one, e.g. trainer.keep_checkpoints=2")
    for key, value in (("trainer.log_every_n_steps", trainer.log_every_n_steps),
                       ("trainer.val_every_n_epochs", trainer.val_every_n_epochs)):
        if value < 1:
            raise ConfigError(key, value, "must be at least 1", f"set {key}=1 or more")
    if trainer.grad_clip_norm is not None and not trainer.grad_clip_norm > 0:
        raise ConfigError("trainer.grad_clip_norm", trainer.grad_clip_norm, "must be positive",
                          "set a positive max norm, or null for no clipping")
    if config.data.num_workers < 0:
        raise ConfigError("data.num_workers", config.data.num_workers, "must be >= 0",
                          "use 0 to load in the main process")
    if hasattr(config.model, "activation"):
        _one_of("model.activation", config.model.activation, ACTIVATIONS)
    for key in ("momentum", "weight_decay", "eps"):
        value = getattr(config.optim, key, 0.0)
        if value < 0:
            raise ConfigError(f"optim.{key}", value, "must be >= 0", f"set optim.{key} to 0 or more")
    if trainer.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "cuda", "no CUDA device is visible",
                              "use trainer.device=auto or cpu")
    check_fast_path(trainer)


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


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_world(config: Config, env: DistEnv) -> tuple[int, int]:
    """(processes per node, data-parallel world size W) for the parallel mode, checked."""
    mode, parallel = config.parallel.mode, config.parallel
    if mode == "single":
        if env.launched and env.world_size > 1:
            raise ConfigError("parallel", "single", f"{env.source} started {env.world_size} "
                              "processes, which would all train the same model alone",
                              "use parallel=ddp, or start one process")
        return 1, 1
    if mode == "dp":
        gpus = _cuda_devices()
        if gpus == 0:
            raise ConfigError("parallel", "dp", "nn.DataParallel needs CUDA devices and none is "
                              "visible", "use parallel=ddp (gloo on CPU) or parallel=single")
        ids = parallel.device_ids if parallel.device_ids is not None else list(range(gpus))
        if not ids or any(not 0 <= i < gpus for i in ids) or len(set(ids)) != len(ids):
            raise ConfigError("parallel.device_ids", ids, f"must be distinct ids in 0..{gpus - 1}",
                              "list visible GPUs, or null for all of them")
        return 1, len(ids)
    _one_of("parallel.backend", parallel.backend, BACKENDS)
    if parallel.timeout_s <= 0:
        raise ConfigError("parallel.timeout_s", parallel.timeout_s, "must be positive",
                          "set a number of seconds, e.g. parallel.timeout_s=300")
    gpus = _cuda_devices() if config.trainer.device != "cpu" else 0
    if parallel.backend == "nccl" and gpus == 0:
        raise ConfigError("parallel.backend", "nccl", "NCCL needs CUDA devices and none is "
                          "visible", "use parallel.backend=gloo or auto")
    if not env.launched and parallel.nnodes > 1:
        raise ConfigError("parallel.nnodes", parallel.nnodes, "stepwise spawns processes on one "
                          "node only", "start each node with torchrun (see launch/README.md)")
    nproc, world = ddp_world(parallel.nproc, parallel.nnodes, env, gpus)
    if env.launched and world != nproc * parallel.nnodes:
        raise ConfigError("parallel.nnodes", parallel.nnodes, f"the launcher started {world} "
                          f"processes, {nproc} per node", f"set parallel.nnodes={world // nproc}")
    if gpus and nproc > gpus and config.trainer.device != "cpu":
        raise ConfigError("parallel.nproc", nproc, f"only {gpus} GPUs are visible",
                          f"set parallel.nproc={gpus} or fewer, or trainer.device=cpu")
    return nproc, world


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


def adapted_optimizer_args(config: Config, plan: Plan) -> dict[str, Any]:
    """Optimizer keyword arguments that the LR rule changes: lr, and betas/eps under adapt_betas."""
    args: dict[str, Any] = {"lr": plan.lr}
    if config.lr_scaling.adapt_betas:
        from stepwise.schedule import adapt_adam

        kappa = plan.effective_batch_size / plan.base_batch_size
        betas, eps = adapt_adam(tuple(config.optim.betas), config.optim.eps, kappa)
        args.update(betas=betas, eps=eps)
    return args


def _data_name(data_cfg: Any) -> str:
    return str(data_cfg._target_).rsplit(".", 1)[-1]


IMAGE_MODELS = ("stepwise.models.CNN", "stepwise.models.torchvision_model")


def check_model(model_cfg: Any, data: Any, data_name: str) -> None:
    """The model must take the data's samples and give its outputs; else a ConfigError naming
    the model key and the data. Image models are built once on the CPU and given 2 samples."""
    shape, classes = tuple(data.input_shape), data.num_outputs
    target = model_cfg._target_
    for key, value, wanted, what in (("num_classes", getattr(model_cfg, "num_classes", None),
                                      classes, "classes"),
                                     ("in_channels", getattr(model_cfg, "in_channels", None),
                                      shape[0], "input channels")):
        if value is not None and value != wanted:
            raise ConfigError(f"model.{key}", value, f"data={data_name} has {wanted} {what}",
                              f"leave model.{key} null (it follows the data), or use data with "
                              f"{value} {what}")
    if target not in IMAGE_MODELS:
        return
    key, value = ("model.name", model_cfg.name) if hasattr(model_cfg, "name") else ("model", "cnn")
    if len(shape) != 3:
        raise ConfigError(key, value, f"needs images (channels, height, width); data={data_name} "
                          f"gives vectors of {shape[0]} features",
                          "use data=fake|imagefolder|mnist|cifar10, data.image_shape=[3,32,32] with "
                          "data=synthetic, or model=mlp")
    import torch
    from hydra.utils import instantiate

    if hasattr(model_cfg, "name"):
        from stepwise.vision import torchvision

        names = torchvision().models.list_models()
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=3) or ["resnet18"]
            raise ConfigError(key, value, "not a torchvision.models builder",
                              f"use e.g. {', '.join(close)} (torchvision.models.list_models())")
    model = instantiate(dataclasses.asdict(model_cfg), input_shape=shape, num_outputs=classes)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:160]
        raise ConfigError(key, value, f"cannot take data={data_name}'s {shape[1]}x{shape[2]} "
                          f"images with {shape[0]} channels ({reason})",
                          "resize the images in data.train_transforms and data.val_transforms, "
                          "or choose another model") from None


def prepare(config: Config, run_dir: Path, start_dir: Path, env: DistEnv | None = None,
            sweep: SweepJob | None = None) -> Job:
    """Validate the config, load the data's arrays and compute the plan.

    Args:
        env: the launcher's environment (torchrun, SLURM) if any; it fixes the world size.
    """
    env = env or DistEnv()
    validate(config)
    nproc, world_size = resolve_world(config, env)
    batch_size, accum = resolve_accum(config, world_size)
    data = build_data(dataclasses.asdict(config.data))
    check_model(config.model, data, _data_name(config.data))
    if config.trainer.channels_last and len(data.input_shape) != 3:
        raise ConfigError("trainer.channels_last", True, f"data={_data_name(config.data)} gives "
                          "vectors, not images", "set trainer.channels_last=false")
    plan = plan_for(config, data, world_size, batch_size, accum)
    check_adapt_betas(config, plan)
    from stepwise.resume import find_checkpoint

    return Job(config=config, data=data, plan=plan, run_dir=run_dir, start_dir=start_dir,
               env=env, nproc=nproc, resume_from=find_checkpoint(config.trainer.resume, run_dir),
               sweep=sweep)


def plan_for(config: Config, data: Any, world_size: int, batch_size: int, accum: int) -> Plan:
    """The plan of this config for a factoring (b, accum) of its effective batch."""
    return make_plan(
        train_samples=data.train_samples, per_device_batch_size=batch_size,
        accum=accum, world_size=world_size, drop_last=config.data.drop_last,
        partial_window=config.trainer.partial_window, max_steps=config.trainer.max_steps,
        max_epochs=config.trainer.max_epochs, max_samples=config.trainer.max_samples,
        base_lr=config.optim.lr, lr_rule=config.lr_scaling.rule,
        base_batch_size=config.lr_scaling.base_batch_size,
        schedule=dataclasses.asdict(config.schedule),
    )


def run_params(job: Job) -> dict[str, Any]:
    """MLflow params: the flattened resolved config, then the plan's numbers (which win)."""
    from stepwise.tracking import flatten

    plan = job.plan
    params = flatten(job.config_dict())
    params.update(
        effective_batch_size=plan.effective_batch_size,
        per_device_batch_size=plan.per_device_batch_size, accum=plan.accum,
        world_size=plan.world_size, parallel=job.config.parallel.mode,
        train_samples=plan.train_samples, micro_steps_per_epoch=plan.micro_steps_per_epoch,
        optimizer_steps_per_epoch=plan.optimizer_steps_per_epoch,
        last_window_samples=plan.last_window_samples,
        samples_dropped_per_epoch=plan.samples_dropped_per_epoch,
        total_optimizer_steps=plan.total_optimizer_steps, total_samples=plan.total_samples,
        budget=plan.budget, lr_scale_factor=plan.lr_scale_factor, lr=plan.lr,
        warmup_steps=plan.warmup_steps, final_lr=plan.final_lr,
    )
    if job.auto_batch_tried:
        params.update(auto_batch_sizes_tried=list(job.auto_batch_tried))
    adapted = adapted_optimizer_args(job.config, plan)
    if "betas" in adapted:
        params.update(betas_used=list(adapted["betas"]), eps_used=adapted["eps"])
    return params
