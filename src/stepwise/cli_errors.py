"""Hydra's composition errors (a misspelt key, a wrong type, an unknown option) as one line.

Hydra prints these over several lines, and for a misspelt key suggests appending it with `+`;
stepwise names the key, the value and the likely fix instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from stepwise.config import SCHEMAS, Config


def known_keys() -> list[str]:
    """Every dotted key the schemas define (all group options together)."""
    keys = [f.name for f in dataclasses.fields(Config) if f.name != "defaults"]
    for group, options in SCHEMAS.items():
        for schema in options.values():
            keys += [f"{group}.{f.name}" for f in dataclasses.fields(schema)
                     if not f.name.startswith("_")]
    return sorted(set(keys))


def launcher_keys() -> list[str]:
    """The keys of hydra/launcher=slurm|local (submitit's queue configs)."""
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    return sorted({f"hydra.launcher.{f.name}" for conf in (SlurmQueueConf, LocalQueueConf)
                   for f in dataclasses.fields(conf) if not f.name.startswith("_")})


def _value_of(key: str, argv: Sequence[str]) -> str:
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return "?"


def one_line(err: Exception, argv: Sequence[str]) -> str | None:
    """The one-line message for a composition error, or None if it is not one we know."""
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
        if not found:
            return None
        group, option = found.groups()
        options = list(err.options or re.findall(r"^\t(\S+)$", str(err), flags=re.M))
        return (f"{group}={option}: no such option in conf/{group}/; "
                f"fix: use one of {', '.join(options)}")
    if isinstance(err, OverrideParseException):
        reason = str(err).splitlines()[0]
        return f"{err.override}: not a valid override ({reason}); fix: write key=value"
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        keys = launcher_keys() if key.startswith("hydra.launcher.") else known_keys()
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        fix = f"did you mean {close[0]}?" if close else "check the key's spelling"
        return f"{key}={_value_of(key, argv)}: no such key; fix: {fix}"
    if isinstance(cause, ValidationError) and key:
        reason = str(cause).splitlines()[0]
        return f"{key}={_value_of(key, argv)}: {reason}; fix: give a value of the key's type"
    return None
