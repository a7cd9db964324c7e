"""`stepwise eval` and `stepwise predict`: their arguments (Hydra's override syntax), and a run's
saved config (`<run dir>/config.yaml`) as the typed Config again, with the data overrides given.

The model is rebuilt from the run's own config, never from the current defaults: only the data
keys may be overridden (another split, another dataset of the same shape), and the parallel
mode and device, which change where the numbers are computed, not what they are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from stepwise.config.parallel_schemas import DDPConfig, ParallelConfig
from stepwise.config.schemas import CONF_DIR, SCHEMAS, Config
from stepwise.contract.errors import ConfigError

COMMANDS = ("eval", "predict")
WHICH = ("last", "best")
PARALLEL = ("single", "ddp")
# The keys these commands take besides `data=<option>` and `data.<key>=<value>`.
KEYS = ("run", "ckpt", "which", "weights", "split", "name", "parallel", "parallel.nproc",
        "parallel.backend", "parallel.timeout_s", "trainer.device", "logger.tracking_uri")
# Typed like the training config's keys of the same name.
INTEGER_KEYS = ("parallel.nproc", "parallel.timeout_s")


@dataclass(frozen=True)
class OfflineArgs:
    """What `stepwise eval|predict <key=value>...` asks for.

    Attributes:
        run: an MLflow run id or a run directory (None with `ckpt`).
        ckpt: a checkpoint file (None with `run`).
        which: `last` or `best`, of the run's checkpoints/.
        weights: `model` (the checkpoint's model), or the averaged weights a callback keeps in
            it (`ema`: callbacks=ema's), named `<split>_ema` in the results.
        split: the evaluation split (`val`, `test`).
        name: what the metrics are logged under, `eval/<name>/*` (default: the split), so that
            an evaluation on other data does not add to the split's own.
        data_option: `data=<option>`: a dataset of the package's config groups instead of the
            run's, composed with `data_overrides`.
        data_overrides: `data.<key>=<value>` as typed, in order.
        device: `trainer.device`; None: the run's.
    """

    command: str
    run: str | None = None
    ckpt: str | None = None
    which: str = "last"
    weights: str = "model"
    split: str = "val"
    name: str | None = None
    parallel: str = "single"
    nproc: int | None = None
    backend: str = "auto"
    timeout_s: int = 300
    device: str | None = None
    tracking_uri: str | None = None
    data_option: str | None = None
    data_overrides: tuple[str, ...] = ()

    def parallel_config(self) -> ParallelConfig:
        if self.parallel == "ddp":
            return DDPConfig(nproc=self.nproc, backend=self.backend, timeout_s=self.timeout_s)
        return ParallelConfig()


def parse_args(command: str, argv: list[str]) -> OfflineArgs:
    """The command line, in Hydra's override syntax; ConfigError for a key this command does
    not take, or a value it cannot use."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    usage = (f"stepwise {command} run=<MLflow run id or run dir> [which=last|best] [weights=ema] "
             "[split=val|test] [data.<key>=<value>] [parallel=ddp], or ckpt=<path>")
    try:
        overrides = OverridesParser.create().parse_overrides(list(argv))
    except OverrideParseException as err:
        raise ConfigError(command, " ".join(argv), f"not key=value overrides ({err})",
                          f"use {usage}") from None
    values: dict[str, Any] = {}
    data: list[str] = []
    for override, text in zip(overrides, argv):
        key = override.key_or_group
        if override.is_sweep_override() or override.type.name != "CHANGE":
            raw_key, _, raw_value = text.partition("=")
            raise ConfigError(raw_key, raw_value, f"stepwise {command} takes plain key=value "
                              "arguments",
                              f"use {usage}")
        if key.startswith("data."):
            data.append(text)
        elif key in KEYS or key == "data":
            # run ids and paths as typed: Hydra would read a run id of digits as a number
            values[key] = text.split("=", 1)[1] if key in ("run", "ckpt") else override.value()
        else:
            raise ConfigError(key, override.value(), f"stepwise {command} takes no such key",
                              f"use {', '.join(KEYS)}, data=<option> or data.<key>=<value>")
    return _checked(command, values, tuple(data))


def _checked(command: str, values: dict[str, Any], data: tuple[str, ...]) -> OfflineArgs:
    run, ckpt = values.get("run"), values.get("ckpt")
    if (run is None) == (ckpt is None):
        raise ConfigError("run", run, "give the run (its MLflow run id or its run directory) "
                          "or ckpt=<checkpoint file>" + (", not both" if run else ""),
                          f"e.g. stepwise {command} run=<run id> which=best")
    if ckpt is not None and "which" in values:
        raise ConfigError("which", values["which"], "picks a checkpoint of run=..., and "
                          "ckpt= names one already", "drop which=, or give run= instead of ckpt=")
    for key, allowed in (("which", WHICH), ("parallel", PARALLEL)):
        if key in values and values[key] not in allowed:
            raise ConfigError(key, values[key], "unknown value", f"use one of {', '.join(allowed)}"
                              + ("; an FSDP run's checkpoint holds its whole model, evaluated "
                                 "by single or ddp" if key == "parallel" else ""))
    for key in INTEGER_KEYS:
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise ConfigError(key, values[key], "must be an integer", f"set e.g. {key}=2")
    weights = str(values.get("weights", "model"))
    if not re.fullmatch(r"[a-z][a-z0-9_]*", weights):
        raise ConfigError("weights", weights, "must be model, or the name of averaged weights a "
                          "callback keeps (ema)", "use weights=ema")
    name = values.get("name")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
        raise ConfigError("name", name, "must be letters, digits, _ . or - (it becomes the "
                          "metric names eval/<name>/*)", "use e.g. name=shifted")
    if "parallel" not in values and any(k.startswith("parallel.") for k in values):
        raise ConfigError(next(k for k in values if k.startswith("parallel.")), "?",
                          "is a key of parallel=ddp", "add parallel=ddp")
    return OfflineArgs(
        command=command, run=None if run is None else str(run),
        ckpt=None if ckpt is None else str(ckpt), which=str(values.get("which", "last")),
        weights=weights,
        split=str(values.get("split", "val")), name=None if name is None else str(name),
        parallel=str(values.get("parallel", "single")),
        nproc=values.get("parallel.nproc"), backend=str(values.get("parallel.backend", "auto")),
        timeout_s=values.get("parallel.timeout_s", 300), device=values.get("trainer.device"),
        tracking_uri=values.get("logger.tracking_uri"),
        data_option=None if values.get("data") is None else str(values["data"]),
        data_overrides=data)


def _schema(group: str, node: dict[str, Any]) -> type | None:
    """The stepwise schema of a saved group node (by its `_target_`, or `mode` for parallel);
    None for a user's component, whose target's signature is its schema."""
    for name, schema in SCHEMAS.get(group, {}).items():
        defaults = {f.name: f.default for f in dataclasses.fields(schema)}
        if group == "parallel":
            if defaults["mode"] == node.get("mode"):
                return schema
        elif node.get("_target_") in (defaults.get("_target_"), f"stepwise.data.{name}"):
            return schema
    return None


def _typed(group: str, node: Any):
    from omegaconf import OmegaConf

    if not isinstance(node, dict) or (schema := _schema(group, node)) is None:
        return node
    return OmegaConf.merge(OmegaConf.structured(schema), node)


def _with_overrides(node, overrides: tuple[str, ...]):
    """The saved data node with `data.<key>=<value>` set, checked against its schema."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    node = OmegaConf.create(node) if isinstance(node, dict) else node
    for override, text in zip(OverridesParser.create().parse_overrides(list(overrides)), overrides):
        key = override.key_or_group[len("data."):]
        try:
            OmegaConf.update(node, key, override.value(), merge=True)
        except OmegaConfBaseException as err:
            name = OmegaConf.get_type(node).__name__
            raise ConfigError(override.key_or_group, text.split("=", 1)[1],
                              f"the run's data ({name}) cannot take it: "
                              f"{str(err).splitlines()[0]}",
                              "override a key of the run's data option, or give data=<option>"
                              ) from None
    return node


def _composed_data(option: str, overrides: tuple[str, ...]):
    """`data=<option>` of the package's config groups, with `data.<key>=<value>`, as training
    would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from stepwise.config.cli_errors import one_line

    argv = [f"data={option}", *overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=argv).data
    except (HydraException, OmegaConfBaseException) as err:
        line = one_line(err, argv) or str(err).strip().splitlines()[0]
        raise ConfigError("data", option, f"cannot be composed: {line}",
                          "name an option of the data group, with its own keys") from None


def saved_config(tree: dict[str, Any], args: OfflineArgs) -> Config:
    """The run's config (`tree`, as config.yaml holds it) as the typed Config that trained it,
    with the data overrides of `args`, and its parallel mode and device."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    typed = {key: value for key, value in tree.items() if key not in ("defaults", "parallel")}
    for group in ("model", "optim", "loss"):
        typed[group] = _typed(group, tree.get(group))
    if args.data_option is not None:
        typed["data"] = _composed_data(args.data_option, args.data_overrides)
    else:
        typed["data"] = _with_overrides(_typed("data", tree["data"]), args.data_overrides)
    typed["parallel"] = OmegaConf.structured(args.parallel_config())
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), typed))
    except MissingMandatoryValue as err:
        raise ConfigError(err.full_key, "???", "has no value", f"set {err.full_key}=...") from None
    except OmegaConfBaseException as err:
        raise ConfigError(args.run or args.ckpt, "config.yaml", "the run's saved config does not "
                          f"fit this stepwise's schemas ({str(err).splitlines()[0]})",
                          "evaluate with the stepwise version that trained the run") from None
    if args.device is not None:
        config.trainer.device = args.device
    return config
