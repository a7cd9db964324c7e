"""Each built-in component built once on the CPU before any work, its own refusal turned into one
ConfigError line: torch.optim's class on a dummy parameter, the model given 2 of the data's samples.

The component is the authority on what it accepts: nothing here re-types its rules, it only maps
the refusal to the key the user typed. torch is imported only by the probes (dry runs of vector
data skip them, see `job.prepare`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from stepwise.config.components import reason as _reason
from stepwise.config.components import target_of
from stepwise.config.schemas import SCHEMAS
from stepwise.contract.errors import ConfigError

IMAGE_MODELS = ("stepwise.models.CNN", "stepwise.models.torchvision_model")
# The built-in models of tensor inputs, probed with zeros of the data's shape (the schemas'
# targets); a user's own model may be costly to build, and TinyLM takes a mapping: not probed.
BUILT_IN_MODELS = ("stepwise.models.MLP", "stepwise.models.Linear", *IMAGE_MODELS)

# torch.optim's refusals (torch/optim/sgd.py, adam.py), by the start of their message.
OPTIM_REFUSALS = {
    "Invalid learning rate": ("optim.lr", "set optim.lr, e.g. optim.lr=0.1"),
    "Invalid momentum value": ("optim.momentum", "use e.g. optim.momentum=0.9, or 0 for none"),
    "Invalid weight_decay value": ("optim.weight_decay", "set optim.weight_decay to 0 or more"),
    "Invalid epsilon value": ("optim.eps", "use e.g. optim.eps=1e-8"),
    "Invalid beta parameter": ("optim.betas", "use e.g. optim.betas=[0.9,0.999]"),
    "Nesterov momentum requires": ("optim.nesterov", "set e.g. optim.momentum=0.9 "
                                   "optim.dampening=0, or optim.nesterov=false"),
}


def option_of(group: str, node: Any) -> str:
    """The group option whose schema `node` is (`mlp` for an MLPConfig), else its target's name."""
    names = [name for name, schema in SCHEMAS.get(group, {}).items() if type(node) is schema]
    return names[0] if names else str(getattr(node, "_target_", group)).rsplit(".", 1)[-1]


def _model_target(model_cfg: Any) -> str:
    """The model's `_target_` by its short path (`stepwise.models.MLP` for ...models.builtin.MLP)."""
    return target_of(model_cfg).replace("stepwise.models.builtin.", "stepwise.models.", 1)


def check_context(model_cfg: Any, data: Any) -> None:
    """A model with a `context` (the longest sequence it takes) against the longest sequence of
    each split, when the data states its samples' lengths (`item_counts`: one target per input
    token), before any work (a validation or test sequence would fail only after training)."""
    import numpy as np

    context = (model_cfg.get("context") if isinstance(model_cfg, dict)
               else getattr(model_cfg, "context", None))
    if not isinstance(context, int):
        return
    splits = {"train": getattr(data, "item_counts", None)}
    for split in ("val", "test"):
        if getattr(data, split, None) is not None and hasattr(data, f"{split}_set"):
            splits[split] = getattr(getattr(data, f"{split}_set")(), "item_counts", None)
    for split, counts in splits.items():
        if counts is None or not len(counts):
            continue
        longest = int(np.argmax(counts))
        if counts[longest] > context:
            raise ConfigError("model.context", context, f"sample {longest} of data.{split} has "
                              f"{int(counts[longest])} tokens, more than the model's context of "
                              f"{context}", f"set model.context={int(np.max(counts))}, or cap "
                              f"the data's lengths (e.g. data.{split}.max_len={context})")


def check_model(model_cfg: Any, data: Any, data_name: str) -> None:
    """What can be said of the model and the data without building the model: the classes and
    input channels agree, an image model gets images, a torchvision name exists."""
    shape, classes = tuple(data.input_shape or ()), data.num_outputs
    if _model_target(model_cfg) in BUILT_IN_MODELS and not shape:
        raise ConfigError("model", option_of("model", model_cfg), f"needs samples whose input is "
                          f"one tensor, and data={data_name}'s are not", "bring your own model "
                          "(a model group with _target_: mypkg.MyModel)")
    for key, value, wanted, what in (("num_classes", getattr(model_cfg, "num_classes", None),
                                      classes, "classes"),
                                     ("in_channels", getattr(model_cfg, "in_channels", None),
                                      shape[0] if shape else None, "input channels")):
        if value is not None and wanted is not None and value != wanted:
            raise ConfigError(f"model.{key}", value, f"data={data_name} has {wanted} {what}",
                              f"leave model.{key} null (it follows the data), or use data with "
                              f"{value} {what}")
    if _model_target(model_cfg) not in IMAGE_MODELS:
        return
    key, value = ("model.name", model_cfg.name) if hasattr(model_cfg, "name") else ("model", "cnn")
    if len(shape) != 3:
        raise ConfigError(key, value, f"needs images (channels, height, width); data={data_name} "
                          f"gives vectors of {shape[0]} features",
                          "use data=fake|imagefolder|mnist|cifar10, data.image_shape=[3,32,32] with "
                          "data=synthetic, or model=mlp")
    if hasattr(model_cfg, "name"):
        from stepwise.config.vision_import import torchvision

        names = torchvision().models.list_models()
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=3) or ["resnet18"]
            raise ConfigError(key, value, "not a torchvision.models builder",
                              f"use e.g. {', '.join(close)} (torchvision.models.list_models())")


def probe(config: Any, data: Any, data_name: str, plan: Any) -> None:
    """Build the model and the optimizer once, and put 2 training samples through the model,
    the loss and the metrics; the global RNG is left as it was."""
    import torch

    from stepwise.callbacks.building import build_callbacks
    from stepwise.loop.precision import param_dtype
    from stepwise.run.build import build_model
    from stepwise.run.probe_batch import probe_batch

    with torch.random.fork_rng(devices=[]):
        model = probe_model(config.model, data, data_name) or build_model(config, data)
        if config.parallel.mode == "fsdp":
            from stepwise.parallel.fsdp import check_shard_modules

            check_shard_modules(model, config.parallel.shard_modules)
        probe_optimizer(config, plan)
        build_callbacks(config.callbacks)  # a constructor that refuses its arguments: one line
        probe_batch(config, data, data_name, model.to(param_dtype(config.trainer.precision)))


def dry_probe(config: Any, data: Any, data_name: str) -> None:
    """What a dry run checks of the components once torch is loaded (the data needed it), and
    builds nothing of the user's: a built-in model is built and given 2 samples of zeros; a
    user's model and loss have their keys checked against their signatures (a key they do not
    take, a required one not set). Metrics are not: importing torchmetrics costs ~1.6 s."""
    from stepwise.config.components import check
    from stepwise.run.build import loss_spec, node

    if probe_model(config.model, data, data_name) is None:
        check("model", node(config.model), data.shape_keys())
    check("loss", loss_spec(config, data))


def probe_optimizer(config: Any, plan: Any) -> None:
    """The configured torch.optim class, built on one dummy parameter with the plan's LR."""
    import torch
    from hydra.utils import instantiate

    from stepwise.contract.schedule import adapted_optimizer_args

    optim = config.optim
    build = instantiate(dataclasses.asdict(optim))
    try:
        build([torch.nn.Parameter(torch.zeros(1))], **adapted_optimizer_args(config, plan))
    except (ValueError, TypeError) as err:
        reason, target = _reason(err), optim._target_
        for start, (key, fix) in OPTIM_REFUSALS.items():
            if reason.startswith(start):
                value = getattr(optim, key.split(".", 1)[1], None)
                raise ConfigError(key, value, f"{target} refuses it ({reason})", fix) from None
        raise ConfigError("optim", option_of("optim", optim), f"{target} refuses the optim.* "
                          f"values ({reason})", f"change them as {target}'s documentation "
                          "says") from None


def probe_model(model_cfg: Any, data: Any, data_name: str):
    """A built-in model, built for the data's input shape and outputs and given 2 samples of
    zeros (its refusals named by key); None for a user's model."""
    if _model_target(model_cfg) not in BUILT_IN_MODELS:
        return None
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    shape = tuple(data.input_shape)
    try:
        model = instantiate(dataclasses.asdict(model_cfg), input_shape=shape,
                            num_outputs=data.num_outputs)
    except InstantiationException as err:
        key, value = _suspect(model_cfg)
        what = "it" if key != "model" else "these model.* values"
        raise ConfigError(key, value, f"{model_cfg._target_} cannot be built with {what} "
                          f"({_reason(err.__cause__ or err)})",
                          f"change {key if key != 'model' else 'them'}, or choose another model"
                          ) from None
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except (RuntimeError, ValueError) as err:
        key, value = ("model.name", model_cfg.name) if hasattr(model_cfg, "name") else \
            ("model", option_of("model", model_cfg))
        if len(shape) == 3:
            raise ConfigError(key, value, f"cannot take data={data_name}'s {shape[1]}x{shape[2]} "
                              f"images with {shape[0]} channels ({_reason(err)})",
                              "resize the images in data.train_transforms and "
                              "data.val_transforms, or choose another model") from None
        raise ConfigError(key, value, f"cannot take data={data_name}'s samples of shape "
                          f"{list(shape)} ({_reason(err)})", "choose another model") from None
    return model.train()


def _suspect(model_cfg: Any) -> tuple[str, Any]:
    """The model key to blame for a constructor's refusal: the one key that differs from the
    schema's default, else the option itself."""
    fields = [f.name for f in dataclasses.fields(model_cfg) if not f.name.startswith("_")]
    default = type(model_cfg)()
    changed = [name for name in fields if getattr(model_cfg, name) != getattr(default, name)]
    if len(changed) == 1:
        return f"model.{changed[0]}", getattr(model_cfg, changed[0])
    return "model", option_of("model", model_cfg)
