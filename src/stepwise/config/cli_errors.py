"""Hydra's composition errors (a misspelt key, a wrong type, an unknown option) as one line.

Hydra prints these over several lines, and for a misspelt key suggests appending it with `+`;
stepwise names the key, the value and the likely fix instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
from collections.abc import Sequence

import yaml
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from stepwise.config.schemas import SCHEMAS, Config


def known_keys() -> list[str]:
    """Every dotted key the schemas define (all group options together)."""
    keys = [f.name for f in dataclasses.fields(Config) if f.name != "defaults"]
    for group, options in SCHEMAS.items():
        for schema in options.values():
            keys += option_keys(group, schema)
    return sorted(set(keys))


def option_keys(group: str, schema: type) -> list[str]:
    """The dotted keys of one group option (`parallel.timeout_s`, ... for DDPConfig)."""
    return [f"{group}.{f.name}" for f in dataclasses.fields(schema) if not f.name.startswith("_")]


def default_option(group: str) -> str | None:
    """The group's option in conf/config.yaml's defaults list (`single` for parallel)."""
    from stepwise.config.schemas import CONF_DIR

    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", [])
    return next((entry[group] for entry in defaults if isinstance(entry, dict) and group in entry),
                None)


def chosen_option(group: str, schema: type | None, argv: Sequence[str],
                  composed: str | None = None) -> str:
    """The option of `group` this run composed: `composed` (the choice of the config composed
    without the refused key), else the schema of the node Hydra could not find the key in (set
    by experiments too), named by the command line, else by conf/config.yaml."""
    if composed is not None and composed in SCHEMAS[group]:
        return composed
    typed = _value_of(group, argv)
    named = [name for name, node in SCHEMAS[group].items() if node is schema] if schema else []
    if not named:
        return typed if typed != "?" else default_option(group) or "?"
    if typed in named or len(named) == 1:
        return typed if typed in named else named[0]
    default = default_option(group)
    return default if default in named else "|".join(named)


# Keys of one option that another refuses on purpose: (key, option) -> (why, fix).
REFUSED = {("parallel.device_ids", "fsdp"): (
    "FSDP runs one process per device and shards the model over them; it cannot drive several "
    "devices from one process, as nn.DataParallel does",
    "drop parallel.device_ids; parallel.nproc sets the processes (one per GPU), "
    "CUDA_VISIBLE_DEVICES which GPUs")}
# MNIST's and CIFAR-10's test split is their own test set: no key chooses another.
REFUSED.update({(key, option): (
    f"data={option}'s test split is its own test set (read from data.root), not a part of its "
    "training set", "drop it (data.val_fraction sets the validation part of the training set), "
    "or use data=imagefolder for a split of your own") for key in ("data.test_fraction",
                                                                  "data.test_root")
    for option in ("mnist", "cifar10")})


def _option_key(key: str, schema: type | None, argv: Sequence[str],
                composed: str | None = None) -> str:
    """No such key in a group of several options: name the option that has it, if one does
    (`parallel.timeout_s` is parallel=ddp's), else the nearest key and whose it is."""
    group, value = key.partition(".")[0], _value_of(key, argv)
    options = SCHEMAS[group]
    chosen = chosen_option(group, schema, argv, composed)
    if (key, chosen) in REFUSED:
        why, fix = REFUSED[key, chosen]
        return f"{key}={value}: {why}; fix: {fix}"
    mine = schema if schema in options.values() else options.get(chosen)
    own = option_keys(group, mine) if mine else []
    others = {option: option_keys(group, node) for option, node in options.items() if node is not mine}
    theirs = sorted({k for keys in others.values() for k in keys} - set(own))
    # Names compared without the shared `group.` prefix, which would make any two keys look alike.
    near = [key] if key in theirs else [f"{group}.{name}" for name in difflib.get_close_matches(
        key.partition(".")[2], [k.partition(".")[2] for k in own + theirs], n=1, cutoff=0.6)]
    if near and near[0] in own:
        return f"{key}={value}: no such key for {group}={chosen}; fix: did you mean {near[0]}?"
    if not near:
        return (f"{key}={value}: no such key for {group}={chosen}; fix: check the key's spelling "
                f"({group}={chosen} has {', '.join(own) or 'no keys'})")
    holders = [option for option, keys in others.items() if near[0] in keys]
    where = f"{group}={'|'.join(holders)}"
    typed = _value_of(group, argv)
    switch = (f"replace {group}={typed} by" if typed != "?" else "add") + (
        f" {group}={holders[0]}" if len(holders) == 1 else f" one of {where}")
    if near[0] != key:
        return (f"{key}={value}: no such key for {group}={chosen}; fix: did you mean {near[0]}, "
                f"a key of {where}? ({switch})")
    return f"{key}={value}: no such key for {group}={chosen} (it is a key of {where}); fix: {switch}"


def no_such_key(key: str, schema: type | None, argv: Sequence[str]) -> str:
    """The line for a key that the composed config lacks; `schema`: the node's, from Hydra.

    A key of a user's option, or of a component node deeper down, is judged by the config
    composed without it (stepwise.config.composed); a key of a stepwise option by the schemas."""
    from stepwise.config.composed import choice, compose_without, refused_key_line

    group, _, name = key.partition(".")
    composed = compose_without(key, argv)
    if composed is not None and (line := refused_key_line(key, _value_of(key, argv), composed)):
        return line
    if group in SCHEMAS and len(SCHEMAS[group]) > 1 and name and "." not in name:
        return _option_key(key, schema, argv, choice(composed, group))
    keys = launcher_keys() if key.startswith("hydra.launcher.") else known_keys()
    close = difflib.get_close_matches(key, [k for k in keys if k != key], n=1, cutoff=0.6)
    fix = f"did you mean {close[0]}?" if close else "check the key's spelling"
    return f"{key}={_value_of(key, argv)}: no such key; fix: {fix}"


# Groups that Hydra applies to multirun (-m) only: without -m it runs the one job here, silently.
MULTIRUN_GROUPS = {"hydra/launcher": "a launcher", "hydra/sweeper": "a sweeper",
                   "hparams_search": "a hyperparameter search (a sweeper)"}


def check_launcher(argv: Sequence[str]) -> str | None:
    """The line for a launcher or sweeper chosen without -m, or None: Hydra would ignore it and
    train here (`hydra/launcher=slurm` would not reach SLURM)."""
    overrides = [arg.lstrip("+") for arg in argv]
    multirun = any(arg == "-m" or (len(arg) > 2 and "--multirun".startswith(arg)) for arg in argv)
    if multirun or any(arg.upper() == "HYDRA.MODE=MULTIRUN" for arg in overrides):
        return None
    for arg in overrides:
        group, sep, option = arg.partition("=")
        if sep and group in MULTIRUN_GROUPS and option not in ("", "null", "basic"):
            command = shlex.join(["python", "train.py", "-m", *argv])
            return (f"{group}={option}: {MULTIRUN_GROUPS[group]} runs multirun jobs only; "
                    f"fix: add -m ({command})")
    return None


def launcher_keys() -> list[str]:
    """The keys of hydra/launcher=slurm|local (submitit's queue configs)."""
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    return sorted({f"hydra.launcher.{f.name}" for conf in (SlurmQueueConf, LocalQueueConf)
                   for f in dataclasses.fields(conf) if not f.name.startswith("_")})


def missing_search_path(argv: Sequence[str]) -> str | None:
    """The line for an entry of `hydra.searchpath` that names nothing (Hydra skips it, and
    then finds no option of the user's), or None."""
    import importlib.util
    from pathlib import Path

    entries = _value_of("hydra.searchpath", argv).strip("[]")
    for entry in filter(None, (e.strip().strip("'\"") for e in entries.split(","))):
        scheme, _, where = entry.partition("://")
        if scheme == "pkg":
            try:
                found = importlib.util.find_spec(where) is not None
            except ModuleNotFoundError:
                found = False
            what = f"no package {where} is importable"
            fix = "install your package, or put it on the Python path (PYTHONPATH)"
        elif scheme == "file":
            found, what = Path(where).is_dir(), f"no directory {where}"
            fix = "give the directory of your config groups"
        else:
            continue
        if not found:
            return f"hydra.searchpath={entry}: {what}, so its config groups are not found; fix: {fix}"
    return None


def _value_of(key: str, argv: Sequence[str]) -> str:
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return "?"


def one_line(err: Exception, argv: Sequence[str]) -> str | None:
    """The one-line message for a composition error, or None if it is not one we know."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return (f"{mark.name}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({err.problem}); "
                "fix: correct the file")
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
        if not found:
            return None
        group, option = found.groups()
        if (missing := missing_search_path(argv)) is not None:
            return missing
        options = list(err.options or re.findall(r"^\t(\S+)$", str(err), flags=re.M))
        return (f"{group}={option}: no such {group} option; "
                f"fix: use one of {', '.join(options)}")
    if isinstance(err, OverrideParseException):
        reason = str(err).splitlines()[0]
        return f"{err.override}: not a valid override ({reason}); fix: write key=value"
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        return no_such_key(key, getattr(cause, "object_type", None), argv)
    if isinstance(cause, ValidationError) and key:
        reason = str(cause).splitlines()[0]
        return f"{key}={_value_of(key, argv)}: {reason}; fix: give a value of the key's type"
    return None
