"""Two real training samples through the collate function, the model, the loss and the metrics,
before any work: a component that does not fit the next one is named in one line (key, value,
fix), instead of a traceback from inside the first micro-step (or the first validation, an epoch
later).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from stepwise.config.components import reason as _reason
from stepwise.config.components import target_of
from stepwise.contract.errors import ConfigError

log = logging.getLogger("stepwise")


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    return type(value).__name__


def _batch(config: Any, data: Any, data_name: str):
    from stepwise.data.loaders import fetch
    from stepwise.loop.precision import param_dtype

    count = min(2, data.train_samples)
    try:
        return fetch(data, param_dtype(config.trainer.precision), config.seed, list(range(count)))
    except ConfigError:
        raise
    except Exception as err:
        key, value = (("data.collate_fn", target_of(data.collate_fn))
                      if getattr(data, "collate_fn", None) else ("data", data_name))
        raise ConfigError(key, value, f"cannot make a batch of {count} training samples "
                          f"({_reason(err)})", "make the dataset's samples and the collate "
                          "function fit each other") from None


def probe_batch(config: Any, data: Any, data_name: str, model: torch.nn.Module) -> None:
    """Raise a ConfigError for the first component that cannot take what the one before gives."""
    from stepwise.data.batches import call_model
    from stepwise.run.build import build_loss, build_metrics, loss_node, metrics_nodes

    inputs, target = _batch(config, data, data_name)
    model_name = target_of(config.model)
    try:
        with torch.no_grad():
            output = call_model(model.eval(), inputs)
    except Exception as err:
        raise ConfigError("model", model_name, f"cannot take a batch of data={data_name}, "
                          f"{_shape(inputs)} ({_reason(err)})", "make the model's forward take "
                          "what the data gives (a mapping goes to model(**inputs)), or change "
                          "data.collate_fn") from None
    finally:
        model.train()
    loss = build_loss(config, data)
    _check_loss(loss_node(config, data)["_target_"], loss, output, target)
    _check_items(loss, target, data, list(range(len(target))))
    for name, metric in (build_metrics(config, data) or {}).items():
        try:
            metric.update(output.float() if output.is_floating_point() else output, target)
        except Exception as err:
            raise ConfigError(f"metrics.{name}", target_of(metrics_nodes(config, data)[name]),
                              f"cannot take the model's output {_shape(output)} and the target "
                              f"{_shape(target)} ({_reason(err)})", "configure the metric for "
                              "this output (e.g. num_classes, task), or remove it") from None


def _check_items(loss: Any, target: Any, data: Any, samples: list[int]) -> None:
    """The items the loss keeps (its mask) in the probe batch against the data's stated counts:
    a padding value the loss does not ignore, or counts of something else, is found now."""
    from stepwise.models.losses import item_mask

    counts = getattr(data, "item_counts", None)
    mask = item_mask(loss, target) if isinstance(target, torch.Tensor) else None
    if mask is None:
        return
    if counts is None:
        if bool(mask.all()) and len(set(_target_lengths(data, samples))) > 1:
            log.warning("loss.ignore_index=%s matches no target of training samples %s, whose "
                        "targets have different lengths: nothing is ignored, so the padding "
                        "counts as loss items; set it to the value the collate function pads "
                        "targets with", getattr(loss, "ignore_index", "?"), samples)
        return
    kept, stated = int(mask.sum()), sum(int(counts[i]) for i in samples)
    if kept == stated:
        return
    ignore_index = getattr(loss, "ignore_index", None)
    if bool(mask.all()) and ignore_index is not None:
        raise ConfigError("loss.ignore_index", ignore_index, f"matches no target of training "
                          f"samples {samples}, so nothing is ignored: the loss keeps {kept} "
                          f"items where the data's item_counts state {stated}", "set it to the "
                          "value the collate function pads targets with")
    raise ConfigError("data.train", "item_counts", f"state {stated} loss items for training "
                      f"samples {samples}, where the loss's item_mask keeps {kept}",
                      "count the targets the loss keeps (e.g. target tokens, not input tokens)")


def _target_lengths(data: Any, samples: list[int]) -> list[int]:
    """The length of each sample's own target, before collation (empty if not a sequence)."""
    from stepwise.data.batches import split_batch

    dataset = data.train_set()
    lengths = []
    for i in samples:
        _, target = split_batch(dataset[i], getattr(data, "target_key", "target"))
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            return []
        lengths.append(len(target))
    return lengths


def _check_loss(name: str, loss: Any, output: Any, target: Any) -> None:
    try:
        values = loss(output, target)
    except Exception as err:
        raise ConfigError("loss", name, f"cannot take the model's output {_shape(output)} and "
                          f"the target {_shape(target)} ({_reason(err)})", "choose a loss for "
                          "this output, or make the model's output fit it") from None
    if not isinstance(values, torch.Tensor):
        raise ConfigError("loss._target_", name, f"returned a {type(values).__name__}, not a "
                          "tensor of losses", "return one loss value per sample or per item")
    samples = len(target) if isinstance(target, torch.Tensor) and target.dim() else None
    if values.dim() == 0 or (samples is not None and values.shape[0] != samples):
        raise ConfigError("loss._target_", name, f"returned shape {list(values.shape)} for a "
                          f"batch of {samples} samples: one value for the whole batch (a mean?), "
                          "which stepwise would have to average again, weighting windows "
                          "wrongly", "return the losses unreduced, one per sample or per item "
                          "(e.g. reduction='none'); stepwise takes the exact mean")
