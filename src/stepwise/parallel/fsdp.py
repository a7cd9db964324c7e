"""`parallel=fsdp` through FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding the model, its
gradient sync on the last micro-step of a window only, and its checkpoints.

A checkpoint of an FSDP run is two things, written at the same step:
- `checkpoints/step-N.dcp/`: the sharded training state (model and optimizer) through
  torch.distributed.checkpoint (DCP), every rank writing its own shards, into a temp directory
  renamed when whole. DCP reshards on load, so it resumes on another world size, and as ddp or
  single (each rank then loads the whole tensors).
- `checkpoints/step-N.pt` (and `last.pt`): what every stepwise checkpoint holds, with the full,
  unsharded model of the bare module under "model" (DESIGN section 2) and "sharded" naming the
  DCP directory; its "optimizer" is None, the optimizer state being in the shards only.
The `.pt` is published last: a DCP directory without its `.pt` is never resumed from.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepwise.contract.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: checkpoint.py's imports stay torch-free
    import torch
    from torch import nn

SHARD_DIR = "step-{step:08d}.dcp"
FSDP2_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard and MixedPrecisionPolicy


def check_config(config) -> None:
    """What parallel=fsdp cannot run, found before any work (no torch import)."""
    from importlib.metadata import version

    installed = version("torch")
    if tuple(int(n) for n in re.findall(r"\d+", installed)[:2]) < FSDP2_TORCH:
        raise ConfigError("parallel", "fsdp", f"needs torch >= 2.6 (FSDP2's fully_shard), and "
                          f"this is torch {installed}", "upgrade torch, or use parallel=ddp")
    if config.trainer.precision == "16-mixed":
        raise ConfigError("trainer.precision", "16-mixed", "parallel=fsdp has no float16 loss "
                          "scaling (torch.amp's GradScaler looks for overflow in each rank's own "
                          "shards, so the ranks could disagree on skipping a step)",
                          "use trainer.precision=bf16 (or 32)")


# -- sharding the model ---------------------------------------------------------------------
def module_classes(model: nn.Module) -> list[str]:
    """The class names of `model`'s modules that can be sharded on their own, sorted (not
    ModuleList or ModuleDict: never called, they would never gather their parameters)."""
    from torch import nn

    return sorted({type(module).__name__ for module in model.modules()
                   if not isinstance(module, (nn.ModuleList, nn.ModuleDict))})


def check_shard_modules(model: nn.Module, names: list[str] | None) -> None:
    """ConfigError for a `parallel.shard_modules` name that is no class of `model`'s modules."""
    if names is None:
        return
    classes = module_classes(model)
    for name in names:
        if name not in classes:
            close = difflib.get_close_matches(str(name), classes, n=3, cutoff=0.5)
            fix = (f"did you mean {' or '.join(close)}?" if close else
                   f"use class names of its modules: {', '.join(classes)}")
            raise ConfigError("parallel.shard_modules", list(names), f"{type(model).__name__} has "
                              f"no module of class {name} to shard", fix)


def shard_units(model: nn.Module, names: list[str] | tuple[str, ...] | None) -> list[nn.Module]:
    """The modules that get their own `fully_shard`, innermost first (FSDP2 takes a module's
    parameters that no inner unit took): the instances of the classes `names`, else each direct
    child with parameters, a ModuleList's or ModuleDict's children in its place."""
    if names is None:
        return list(_children_with_parameters(model))
    wanted = set(names)
    return [m for m in model.modules() if type(m).__name__ in wanted and m is not model][::-1]


def _children_with_parameters(module: nn.Module):
    from torch import nn

    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # hold blocks, are never called
            yield from _children_with_parameters(child)
        elif any(True for _ in child.parameters()):
            yield child


def mixed_precision(precision: str):
    """FSDP2's policy for `trainer.precision`: bf16 gathers bfloat16 parameters and reduces the
    gradients in float32; 32 and 64 keep the parameters' dtype throughout."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: nn.Module, device: torch.device, world_size: int,
          names: tuple[str, ...] | None, reshard_after_forward: bool, precision: str) -> nn.Module:
    """`fully_shard` each unit (see shard_units) and then the root, on a 1-D mesh of the ranks.

    The mesh is made for `device` (FSDP2's default would be CUDA whenever a GPU is visible,
    also under `trainer.device=cpu`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
               "mp_policy": mixed_precision(precision)}
    for unit in shard_units(model, names):
        fully_shard(unit, **options)
    return fully_shard(model, **options)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Reduce-scatter the gradients in the next backward only when `sync` (the last micro-step
    of a window); the others accumulate unsharded gradients locally. FSDP2's switch walks every
    module, so it is flipped only when it changes."""
    if getattr(model, "_stepwise_gradient_sync", True) != sync:
        model.set_requires_gradient_sync(sync)
        model._stepwise_gradient_sync = sync
    return contextlib.nullcontext()


# -- state ----------------------------------------------------------------------------------
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of the bare module on rank 0's CPU ({} on the other ranks);
    collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optim"}: this rank's shards under FSDP, whole tensors otherwise (keyed by
    parameter name, so that any parallel mode reads what another wrote)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer)}


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full checkpoint (single or ddp wrote it) into an FSDP model: every rank keeps
    its shards of the whole tensors it read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    load_full_model(model, state["model"])
    set_optimizer_state_dict(model, optimizer, _by_name(model, state["optimizer"]),
                             options=StateDictOptions(full_state_dict=True))


def load_full_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full model state dict (every rank holds all of it) into an FSDP model: every rank
    keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def sharded_model_state(model: nn.Module) -> dict[str, Any]:
    """This rank's shards of the model's state (DTensors), as `load_sharded_model` takes them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def load_sharded_model(model: nn.Module, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state)


def _by_name(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters by index) with the parameters named instead."""
    names = [name for name, _ in model.named_parameters()]
    return {"state": {names[i]: value for i, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


# -- checkpoints ----------------------------------------------------------------------------
def write_shards(trainer, directory: Path, state: dict[str, Any]) -> None:
    """Under FSDP, every rank writes its shards to `directory/step-N.dcp/` (through a temp
    directory that rank 0 renames when DCP has finished), and `state` names the directory for
    the `.pt` that rank 0 publishes next. Nothing to do in other modes."""
    if trainer.replica.mode != "fsdp":
        return
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    name = SHARD_DIR.format(step=state["global_step"])
    final, tmp = directory / name, directory / f".{name}.tmp"
    if trainer.replica.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    dist.barrier()  # nobody writes into the temp directory before it is empty
    dcp.save(training_state(trainer.model, trainer.optimizer), checkpoint_id=tmp)
    if trainer.replica.is_main:  # DCP's coordinator returns after every rank's files are written
        _replace_dir(tmp, final)
    state["sharded"] = name


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`, moving an older `target` (the same step saved again) aside."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def remove_shards(step_file: Path) -> None:
    """Remove the DCP directory of a step checkpoint that is being dropped."""
    shutil.rmtree(step_file.with_suffix(".dcp"), ignore_errors=True)


def shard_dir_problem(directory: Path) -> str | None:
    """Why the DCP directory cannot be resumed from (missing, or a file it lists is), or None."""
    try:
        metadata = _metadata(directory)
    except Exception as err:  # no .metadata, or a damaged one
        return f"its shards {directory.name}/ cannot be read ({type(err).__name__}: {err})"[:300]
    files = {item.relative_path for item in metadata.storage_data.values()}
    missing = sorted(f for f in files if not (directory / f).is_file())
    if missing:
        return f"its shards {directory.name}/ lack {', '.join(missing)}"
    return None


def _metadata(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(directory)).read_metadata()


def shard_mismatches(directory: Path, model: nn.Module) -> list[str]:
    """How the model's tensors in the DCP directory differ from `model`'s ([] when they fit)."""
    saved = {key[len("model."):]: list(item.size)
             for key, item in _metadata(directory).state_dict_metadata.items()
             if key.startswith("model.") and hasattr(item, "size")}
    wanted = {key: list(value.shape) for key, value in model.state_dict().items()}
    wrong = [f"{key}: {saved[key]} in the shards, {shape} in the model"
             for key, shape in wanted.items() if key in saved and saved[key] != shape]
    wrong += [f"{key} is not in the shards" for key in wanted if key not in saved]
    wrong += [f"{key} is not in the model" for key in saved if key not in wanted]
    return wrong


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load the DCP training state into `model` and `optimizer`, whatever the parallel mode
    and world size that wrote it and that reads it (collective in ddp and fsdp)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = training_state(model, optimizer)  # the layout to fill: this world's shards
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def check_shards(path: Path, state: dict[str, Any], build_model) -> None:
    """ConfigError when the shards of the checkpoint at `path` do not fit the model that
    `build_model()` builds; `state["sharded"]` becomes the DCP directory's full path."""
    import torch

    directory = path.parent / state["sharded"]
    state["sharded"] = str(directory)
    with torch.random.fork_rng(devices=[]):
        model = build_model()
    wrong = shard_mismatches(directory, model)
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ConfigError("trainer.resume", str(path), f"its shards ({directory.name}/) do not "
                          f"match the model ({shown})",
                          "resume with the model that wrote them, or trainer.resume=none")
