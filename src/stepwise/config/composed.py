"""A key Hydra refused, judged against the config the command line composes without it.

Hydra refuses `model.dimm=32` before anything is composed, and its error names neither the
option the run chose (an experiment of the user's may have chosen it) nor what that option
takes. Composing the same command line without the refused override gives both: the node the
key would go into, its `_target_` (whose signature is a user component's schema), and the group
choices. This runs only on that error path (about 0.3 s).
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from stepwise.config.components import accepted, closest, locate, qualified_name
from stepwise.config.schemas import DatasetConfig
from stepwise.contract.errors import ConfigError


def compose_without(key: str, argv: Sequence[str]) -> DictConfig | None:
    """The config (with Hydra's part: `hydra.runtime.choices`) that `argv` composes without its
    override of `key`, or None if that does not compose either (e.g. a sweep's `a=1,2`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stepwise.config.schemas import CONF_DIR

    overrides = [arg for arg in argv
                 if not arg.startswith("-") and arg.lstrip("+~").partition("=")[0] != key]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    except Exception:  # the hint is a courtesy: without it, the generic line
        return None


def choice(cfg: DictConfig | None, group: str) -> str | None:
    """The option of `group` that `cfg` composed (an experiment's choice included)."""
    if cfg is None:
        return None
    found = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}")
    return str(found) if found is not None else None


def user_option(cfg: DictConfig, group: str) -> str | None:
    """The group's option when it is the user's own (not in stepwise's conf/), else None."""
    from stepwise.config.schemas import CONF_DIR

    option = choice(cfg, group)
    if option is None or option == "null" or (CONF_DIR / group / f"{option}.yaml").is_file():
        return None
    return option


def refused_key_line(key: str, value: str, cfg: DictConfig) -> str | None:
    """The line for `key=value`, which the composed `cfg` has no place for; None where the
    generic line (by stepwise's schemas) is the right one: a key of a stepwise option."""
    parent, _, name = key.rpartition(".")
    group = key.partition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else None
    if not isinstance(node, DictConfig):
        return None
    option = user_option(cfg, group)
    if "_target_" in node and (option is not None or parent.count(".") >= 1):
        return _argument_line(key, value, parent, name, node)
    if option is not None and parent == group:
        return _group_key_line(key, value, group, option, node)
    return None


def _argument_line(key: str, value: str, parent: str, name: str, node: DictConfig) -> str | None:
    """A key of a component node: judged by its `_target_`'s signature."""
    try:
        target = locate(parent, node["_target_"])
    except ConfigError:
        return None  # the wrong _target_ is the error to report: building it will
    own = [str(k) for k in node.keys() if not str(k).startswith("_")]
    names, any_key = accepted(target) or (set(own), True)
    label = qualified_name(target)
    if name in names:
        return (f"{key}={value}: {label} takes {name}, but the config does not set it, so "
                f"Hydra has no such key to override; fix: +{key}={value} adds it")
    close = closest(name, sorted(set(names) | set(own)))
    if any_key:  # **kwargs: any name may be meant
        fix = (f"did you mean {parent}.{close}? (+{key}={value} passes a new argument)" if close
               else f"+{key}={value} passes it as a new argument")
        return f"{key}={value}: no such key in {parent} ({label}); fix: {fix}"
    fix = (f"did you mean {parent}.{close}?" if close else
           f"remove it; {label} takes {', '.join(sorted(names)) or 'no arguments'}")
    return f"{key}={value}: {label} takes no such argument; fix: {fix}"


def _group_key_line(key: str, value: str, group: str, option: str, node: DictConfig) -> str:
    """A key of a user's option that has no `_target_` (a data group: read as data=dataset)."""
    import dataclasses

    own = [str(k) for k in node.keys()]
    schema = [f.name for f in dataclasses.fields(DatasetConfig)] if group == "data" else []
    name = key.partition(".")[2]
    if name in schema:
        return (f"{key}={value}: {group}={option} does not set {name}, so Hydra has no such key "
                f"to override (a data group of yours takes it); fix: +{key}={value} adds it")
    close = closest(name, sorted(set(own) | set(schema)))
    fix = f"did you mean {group}.{close}?" if close else \
        f"check the key's spelling ({group}={option} has {', '.join(own) or 'no keys'})"
    return f"{key}={value}: no such key for {group}={option}; fix: {fix}"

