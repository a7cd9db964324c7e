"""Components by `_target_` (a user's own or stepwise's): found, checked and built, each mistake one
ConfigError line naming the key.

Hydra's `instantiate` reports a wrong target or argument as a traceback, after importing and
perhaps half-building things; here the target is located first (the closest name is offered),
the keys are checked against its signature (a key it does not take is never dropped), and the
data's shape keys (`input_shape`, `num_outputs`, `num_classes`) are passed only to a callable
whose signature names them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

from stepwise.contract.errors import ConfigError

SHAPE_KEYS = ("input_shape", "num_outputs", "num_classes")


def _names(found: Any) -> list[str]:
    """The public attributes of an object, and the submodules of a package, imported or not."""
    names = [name for name in dir(found) if not name.startswith("_")]
    if hasattr(found, "__path__"):
        names += [info.name for info in pkgutil.iter_modules(found.__path__)]
    return names


def closest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return close[0] if close else ""


def locate(key: str, target: Any) -> Any:
    """The object a `_target_` names, or a ConfigError naming the closest existing name."""
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{key}._target_", target or None, "a component needs the dotted "
                          "import path of its class or function", "write e.g. _target_: "
                          f"mypkg.models.Net in the YAML of {key}'s option")
    parts = target.split(".")
    if parts[0] in ("torchvision", "torchmetrics"):  # torchmetrics imports torchvision
        from stepwise.config.vision_import import torchvision

        torchvision()
    for depth in range(len(parts), 0, -1):  # the longest prefix that imports
        module_name = ".".join(parts[:depth])
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and not module_name.startswith(err.name):
                raise ConfigError(f"{key}._target_", target, f"importing {module_name} failed: "
                                  f"no module named {err.name}", f"install {err.name}") from None
            continue
        except ImportError as err:
            raise ConfigError(f"{key}._target_", target, f"importing {module_name} failed "
                              f"({err})", "fix that import") from None
        for i, attribute in enumerate(parts[depth:], start=depth):
            if not hasattr(found, attribute):
                where = ".".join(parts[:i])
                close = closest(attribute, _names(found))
                fix = f"did you mean {where}.{close}?" if close else f"check the name in {where}"
                raise ConfigError(f"{key}._target_", target, f"{where} has no {attribute}", fix)
            found = getattr(found, attribute)
        if not callable(found):
            kind = "a module" if inspect.ismodule(found) else f"a {type(found).__name__}"
            names = [n for n in _names(found) if callable(getattr(found, n, None))][:5]
            raise ConfigError(f"{key}._target_", target, f"{target} is {kind}, not a class or "
                              "function", f"name one in it ({', '.join(names) or 'none found'})"
                              if inspect.ismodule(found) else "name a class or function")
        return found
    close = closest(parts[0], [m.name for m in pkgutil.iter_modules()])
    fix = (f"did you mean {close}?" if close else
           "install the package, or put it on the Python path (PYTHONPATH)")
    raise ConfigError(f"{key}._target_", target, f"no module named {parts[0]}", fix)


def reason(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def target_of(node: Any) -> str:
    """A component config's `_target_`, with a stepwise schema (a dataclass) or without (a dict)."""
    target = node.get("_target_") if isinstance(node, Mapping) else node._target_
    return "" if target is None else str(target)  # none: `locate` says what is missing


def accepted(target: Any) -> tuple[set[str], bool] | None:
    """(named parameters, whether it takes **kwargs), or None if it has no readable signature."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if inspect.isclass(target) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                       for p in signature.parameters.values()):
        # `__init__(self, *args, **kwargs)` that hands everything to its base: ask the base.
        for base in target.__mro__[1:]:
            if base is not object and "__init__" in vars(base):
                return accepted(base)
    names = {p.name for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def check_arguments(key: str, target: Any, node: Mapping[str, Any]) -> None:
    """A ConfigError for a key of `node` that `target`'s signature does not take."""
    parameters = accepted(target)
    if parameters is None or parameters[1]:
        return
    names, _ = parameters
    for name, value in node.items():
        if name.startswith("_") or name in names:
            continue
        close = closest(name, sorted(names))
        fix = (f"did you mean {key}.{close}?" if close else
               f"remove it; {qualified_name(target)} takes {', '.join(sorted(names)) or 'no arguments'}")
        raise ConfigError(f"{key}.{name}", value, f"{qualified_name(target)} takes no such argument, and it "
                          "would be ignored", fix)


def check_required(key: str, target: Any, node: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """A ConfigError for a parameter of `target` without a default that neither the config
    (`node`) nor stepwise (`given`: the data's shape keys, an optimizer's parameters) sets."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    for p in signature.parameters.values():
        if (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                and p.name not in node and p.name not in given):
            where = ("; data.num_outputs gives it from the data, when the data sets it"
                     if p.name in SHAPE_KEYS else "")
            fix = (f"set it in the option's YAML, or add +{key}.{p.name}=... to the command"
                   if not key.endswith("collate_fn") else f"add _partial_: true to {key}'s "
                   "YAML: stepwise calls it with each batch's samples")
            raise ConfigError(f"{key}.{p.name}", "???", f"{qualified_name(target)} needs "
                              f"{p.name} (it has no default), and the config does not set it"
                              f"{where}", fix)


def construction_error(key: str, target: Any, node: Mapping[str, Any], err: Exception) -> ConfigError:
    """The line for a component whose constructor raised: the call, the error, and where."""
    import traceback

    cause = err.__cause__ if err.__cause__ is not None and "hydra" in type(err).__module__ else err
    frames = traceback.extract_tb(cause.__traceback__)
    ours = [f for f in frames if not any(part in f.filename for part in ("/hydra/", "/omegaconf/"))]
    where = f" at {_short_path(ours[-1].filename)}:{ours[-1].lineno}" if ours else ""
    call = ", ".join(f"{k}={v!r}" for k, v in node.items() if not k.startswith("_"))
    return ConfigError(key, f"{qualified_name(target)}({call})",
                       f"building it raised {type(cause).__name__}{where}: {reason(cause)}",
                       f"check the values of {key}.* (HYDRA_FULL_ERROR=1 shows the traceback)")


def _short_path(filename: str) -> str:
    """A source file as a user finds it: inside an installed package from its package folder."""
    marker = "site-packages/"
    return filename.split(marker, 1)[1] if marker in filename else filename


def qualified_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def shape_arguments(target: Any, node: Mapping[str, Any], shapes: Mapping[str, Any]) -> dict:
    """The data's shape keys that `target` names in its signature and the config leaves unset."""
    parameters = accepted(target)
    if parameters is None:
        return {}
    names, _ = parameters
    return {name: value for name, value in shapes.items()
            if name in names and value is not None and node.get(name) is None}


def check(key: str, node: Mapping[str, Any], shapes: Mapping[str, Any] | None = None,
          given: Mapping[str, Any] | None = None) -> Any:
    """Locate `node`'s `_target_` and check the keys against its signature (none it does not
    take, every required one set, by the config, the data's `shapes` or `given` by stepwise),
    without calling it (a dry run stops here). Returns the target."""
    node = dict(node)
    target = locate(key, node.get("_target_"))
    check_arguments(key, target, node)
    if not node.get("_partial_") and "_args_" not in node:
        extra = {**shape_arguments(target, node, shapes or {}), **(given or {})}
        check_required(key, target, {k: v for k, v in node.items()
                                     if not (k in extra and v is None)}, extra)
    return target


def build(key: str, node: Mapping[str, Any], shapes: Mapping[str, Any] | None = None,
          **arguments: Any) -> Any:
    """Locate, check and call `node`'s `_target_` (with `_partial_`: a functools.partial).

    Args:
        key: the config key of the node (`model`, `loss`, `metrics.f1`), for error lines.
        shapes: the data's shape keys, passed when the target's signature names them.
        arguments: passed as they are (e.g. the parameters of an optimizer).

    A required argument that is not set, or a constructor that raises, is a ConfigError naming
    the key (its cause chained, for HYDRA_FULL_ERROR=1).
    """
    node = dict(node)
    target = check(key, node, shapes, given=arguments)
    extra = {**shape_arguments(target, node, shapes or {}), **arguments}
    node = {k: v for k, v in node.items() if not (k in extra and v is None)}
    try:
        return _call(target, node, extra)
    except ConfigError:
        raise
    except Exception as err:
        if isinstance(err.__cause__, ConfigError):  # raised by a stepwise component, in Hydra
            raise err.__cause__ from None
        shown = {**node, **shape_arguments(target, node, shapes or {})}
        raise construction_error(key, target, shown, err) from err


def _call(target: Any, node: dict[str, Any], extra: dict[str, Any]) -> Any:
    from hydra.utils import instantiate

    if node.get("_partial_") and "_args_" not in node:
        # Hydra 1.3.8 wraps a partial in a _DeferredTarget that re-checks its target policy on
        # every call, scanning sys.modules: 1.3 ms per call of a collate function, 2% of a
        # tiny_lm step (W5). The target was located and checked above; its keys are built by
        # Hydra (nested _target_ nodes included), and the partial is a plain functools.partial.
        import functools

        keys = {k: v for k, v in node.items() if not k.startswith("_")}
        built = instantiate(keys, _convert_="all") if keys else {}
        return functools.partial(target, **built, **extra)
    return instantiate(node, **extra)
