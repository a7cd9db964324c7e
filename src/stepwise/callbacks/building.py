"""The `callbacks` group, read and built: each entry a `Callback` by `_target_`, checked before any
work (a key its class does not take, a target that is no Callback, two callbacks that would log
the same evaluation metrics: one line each). Torch-free: dry runs check them too."""

from __future__ import annotations

import dataclasses
from typing import Any

from stepwise.config.components import build, check, locate
from stepwise.contract.errors import ConfigError
from stepwise.loop.callbacks import Callback


def callback_nodes(callbacks: Any) -> dict[str, dict[str, Any]]:
    """{name: its config} in the config's order; ConfigError for an entry without `_target_`."""
    if not callbacks:
        return {}
    if not isinstance(callbacks, dict):
        raise ConfigError("callbacks", callbacks, "must map names to callback configs",
                          "write callbacks=ema, or +callbacks.mine._target_=mypkg.Mine")
    nodes = {}
    for name, value in callbacks.items():
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if not isinstance(value, dict) or "_target_" not in value:
            raise ConfigError(f"callbacks.{name}", value, "needs a _target_ (a subclass of "
                              "stepwise.callbacks.Callback)",
                              f"write +callbacks.{name}._target_=mypkg.MyCallback")
        nodes[name] = dict(value)
    return nodes


def check_callbacks(callbacks: Any) -> tuple[str, ...]:
    """Check every callback's target and keys without building it; return the suffixes of the
    evaluation metrics they add (`ema` for `val_ema/*`), for `trainer.monitor`'s check."""
    evaluated: dict[str, str] = {}
    for name, node in callback_nodes(callbacks).items():
        key = f"callbacks.{name}._target_"
        target = locate(f"callbacks.{name}", node["_target_"])
        if not (isinstance(target, type) and issubclass(target, Callback)):
            raise ConfigError(key, node["_target_"], "is not a subclass of "
                              "stepwise.callbacks.Callback, whose hooks the loop calls",
                              "subclass stepwise.callbacks.Callback (docs/callbacks.md)")
        check(f"callbacks.{name}", node)
        suffix = target.evaluates
        if suffix is not None and suffix in evaluated:
            raise ConfigError(f"callbacks.{name}", node["_target_"], f"would log "
                              f"val_{suffix}/* as callbacks.{evaluated[suffix]} does",
                              f"keep one of them (one {target.__name__} per run)")
        if suffix is not None:
            evaluated[suffix] = name
    return tuple(evaluated)


def build_callbacks(callbacks: Any) -> dict[str, Callback]:
    """{name: the built Callback}, in the config's order (its constructor's errors are one line)."""
    check_callbacks(callbacks)
    return {name: build(f"callbacks.{name}", node)
            for name, node in callback_nodes(callbacks).items()}
