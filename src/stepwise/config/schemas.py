"""Structured-config schemas, registered in Hydra's ConfigStore so that typos and wrong types fail
at composition. Each YAML option under `conf/` (the package `stepwise.conf`) names its schema in its
defaults list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from stepwise.config.data_schemas import (  # noqa: F401 (imported from here by the code)
    DataConfig,
    DatasetConfig,
    DigitsConfig,
    FakeDataConfig,
    ImageDataConfig,
    ImageFolderConfig,
    LinRegConfig,
    SyntheticConfig,
    TorchvisionDataConfig,
)
from stepwise.config.parallel_schemas import DDPConfig, DPConfig, FSDPConfig, ParallelConfig

# The package stepwise.conf (the checkout's conf/, mapped by pyproject.toml; a wheel carries it).
CONF_DIR = Path(str(files("stepwise.conf")))

# -- model ------------------------------------------------------------------------------------
# Input and output sizes are not config: the data tells the model its shape when it is built.


@dataclass
class MLPConfig:
    _target_: str = "stepwise.models.MLP"
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 128])
    activation: str = "relu"


@dataclass
class LinearConfig:
    _target_: str = "stepwise.models.Linear"


@dataclass
class CNNConfig:
    _target_: str = "stepwise.models.CNN"
    widths: list[int] = field(default_factory=lambda: [32, 64])


@dataclass
class TorchvisionModelConfig:
    """A `torchvision.models` builder by name; classes and input channels follow the data."""

    _target_: str = "stepwise.models.torchvision_model"
    name: str = "resnet18"
    weights: str | None = None
    num_classes: int | None = None  # null: the data's; set: must agree with it
    in_channels: int | None = None


# -- loss -------------------------------------------------------------------------------------
@dataclass
class CrossEntropyConfig:
    _target_: str = "stepwise.models.CrossEntropy"
    ignore_index: int = -100
    label_smoothing: float = 0.0


@dataclass
class MSEConfig:
    _target_: str = "stepwise.models.MSE"


# -- parallelism (stepwise/config/parallel_schemas.py), optimisation, training --------------------
@dataclass
class OptimConfig:
    """A torch.optim class, built with `_partial_` and then given the parameters and scaled LR."""

    _target_: str = MISSING
    _partial_: bool = True
    lr: float = 0.1
    weight_decay: float = 0.0


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class AdamWConfig(OptimConfig):
    _target_: str = "torch.optim.AdamW"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01


@dataclass
class LRScalingConfig:
    rule: str = "none"
    base_batch_size: int = 32
    adapt_betas: bool = False


@dataclass
class ScheduleConfig:
    """A multiplier of the scaled LR; durations in `unit` (epochs, samples or steps)."""

    name: str = "constant"
    unit: str = "epochs"
    warmup: float = 0.0
    warmup_start_factor: float = 0.1
    total: float | None = None
    min_lr_factor: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int = -1
    max_samples: int = -1
    partial_window: str = "step"
    device: str = "auto"
    precision: str = "32"
    tf32: bool = True
    channels_last: bool = False
    compile: bool = False
    grad_clip_norm: float | None = None
    log_every_n_steps: int | None = None
    flush_every_n_steps: int = 50
    val_every_n_epochs: int = 1
    progress_bar: bool = True
    checkpoint_every_n_steps: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"
    on_nonfinite: str = "stop"
    monitor: str | None = None  # e.g. val/loss: keep checkpoints/best.pt by it
    monitor_mode: str = "min"  # min | max
    early_stopping_patience: int | None = None  # evaluations without improvement; null: off
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    # After fitting, evaluate the best (trainer.monitor) else final weights on the test split.
    test: bool = True


@dataclass
class LoggerConfig:
    backend: str = "mlflow"
    tracking_uri: str | None = None
    experiment_name: str = "stepwise"
    run_name: str | None = None
    system_metrics_interval_s: float = 5.0  # 0: no system/* metrics
    flush_timeout_s: float = 60.0
    log_model: bool = True  # the final (and best) model as an MLflow PyTorch model
    register_model: str | None = None  # register it (the best one when monitoring) by this name


@dataclass
class Config:
    defaults: list[Any] = field(default_factory=list)
    model: Any = MISSING
    data: Any = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: Any = MISSING
    # null: chosen by the data's task (cross_entropy and accuracy, or mse and no metric).
    loss: Any = None
    metrics: Any = None  # {name: {_target_: a torchmetrics Metric}}, logged as val/<name>
    callbacks: Any = None  # {name: {_target_: a stepwise.callbacks.Callback}} (loop/callbacks.py)
    lr_scaling: LRScalingConfig = field(default_factory=LRScalingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    accum: int | None = None
    effective_batch_size: int | None = None
    seed: int = 0
    dry_run: bool = False
    # The final metric `python train.py` returns to a Hydra sweeper that minimises or maximises
    # (hparams_search=optuna sets val/loss); null returns nothing.
    optimized_metric: str | None = None


SCHEMAS = {
    "model": {"mlp": MLPConfig, "linear": LinearConfig, "cnn": CNNConfig,
              "torchvision": TorchvisionModelConfig},
    "data": {"digits": DigitsConfig, "synthetic": SyntheticConfig, "linreg": LinRegConfig,
             "fake": FakeDataConfig, "imagefolder": ImageFolderConfig,
             "mnist": TorchvisionDataConfig, "cifar10": TorchvisionDataConfig,
             "dataset": DatasetConfig},
    "loss": {"cross_entropy": CrossEntropyConfig, "mse": MSEConfig},
    "parallel": {"single": ParallelConfig, "ddp": DDPConfig, "dp": DPConfig,
                 "fsdp": FSDPConfig},
    "optim": {"sgd": SGDConfig, "adamw": AdamWConfig},
    "lr_scaling": {"lr_scaling": LRScalingConfig},
    "schedule": {"schedule": ScheduleConfig},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"logger": LoggerConfig},
}


def register_configs() -> None:
    """Store the root schema and one schema per group option under `schema/<group>/<name>`."""
    from omegaconf import OmegaConf

    from stepwise.contract.world import submitit_tasks_per_node

    # conf/hydra/launcher/*.yaml: tasks_per_node follows parallel (one task per DDP rank).
    if not OmegaConf.has_resolver("stepwise.tasks_per_node"):
        OmegaConf.register_new_resolver("stepwise.tasks_per_node", submitit_tasks_per_node)
    cs = ConfigStore.instance()
    cs.store(name="stepwise_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def _unknown_keys(node: Any, prefix: str = "") -> list[tuple[str, Any, type]]:
    """(dotted key, value, schema) for each key of `node` that its dataclass schema lacks."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    found = []
    schema = OmegaConf.get_type(node)
    fields = ({f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema)
              else None)
    for key in node.keys():
        child = node._get_node(key)
        if fields is not None and key not in fields:
            found.append((f"{prefix}{key}", child._value(), schema))
        elif isinstance(child, DictConfig) and not child._is_none():
            found += _unknown_keys(child, f"{prefix}{key}.")
    return found


def _option_name(group: str, schema: type) -> str:
    names = [name for name, node in SCHEMAS.get(group, {}).items() if node is schema]
    return f"{group}={names[0]}" if names else group or "the config"


def check_known_keys(cfg: Any) -> None:
    """Raise a ConfigError for a key that no schema declares (added with `+key=...` or in a YAML
    file): turning the config into its dataclasses would drop it without a word."""
    import dataclasses
    import difflib

    from stepwise.contract.errors import ConfigError

    unknown = _unknown_keys(cfg)
    if not unknown:
        return
    key, value, schema = unknown[0]
    group, _, name = key.rpartition(".")
    known = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")
             and f.name != "defaults"]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    fix = (f"did you mean {group + '.' if group else ''}{close[0]}?" if close else
           f"remove it; {_option_name(group, schema)} takes {', '.join(known) or 'no keys'}")
    raise ConfigError(key, value, f"{_option_name(group, schema)} has no such key, and it would "
                      "be ignored", fix)


def give_user_groups_schemas(cfg: Any) -> None:
    """A user's own `data` group without a stepwise schema gets the generic one (DatasetConfig),
    so that its loader keys are typed and a key it cannot have is named now. Model, loss and
    metrics nodes without a schema stay as they are: their target's signature is their schema
    (stepwise/config/components.py)."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf, open_dict

    from stepwise.contract.errors import ConfigError

    node = cfg.get("data")
    if not isinstance(node, DictConfig) or OmegaConf.get_type(node) is not dict:
        return
    known = [f.name for f in dataclasses.fields(DatasetConfig)]
    for key in node.keys():
        if key not in known:
            close = difflib_close(str(key), known)
            fix = f"did you mean data.{close}?" if close else \
                f"remove it; a data group without a schema takes {', '.join(known[1:])}"
            raise ConfigError(f"data.{key}", node._get_node(key)._value(), "a data group "
                              "without a stepwise schema is read as data=dataset, which has no "
                              "such key", fix)
    if "train" not in node:
        raise ConfigError("data.train", None, "a data group without a stepwise schema is read "
                          "as data=dataset, which needs a training dataset",
                          "set data.train={_target_: mypkg.MyDataset, ...}")
    with open_dict(cfg):
        cfg.data = OmegaConf.merge(OmegaConf.structured(DatasetConfig), node)


def difflib_close(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else ""
