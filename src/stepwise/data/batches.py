"""What a batch is to the loop: (inputs, target), however the data delivered it.

- a mapping: its `target_key` entry is the target, the other entries are `model(**inputs)`;
- a tuple or list: the last element is the target, the rest are `model(*inputs)`;
- a tensor: `model(x)`, and the loss gets `x` as its target (next-token or reconstruction).
Floating tensors take the run's parameter dtype (`trainer.precision=64`); integer tensors (token
ids, class indices) stay integer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stepwise.contract.errors import ConfigError


def cast_floats(batch: Any, dtype) -> Any:
    """Floating tensors in `dtype`, everything else as it is, through tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


def split_batch(batch: Any, target_key: str = "target") -> tuple[Any, Any]:
    """(inputs, target): see the module docstring. `inputs` is a dict, a tuple or one tensor."""
    if isinstance(batch, Mapping):
        if target_key not in batch:
            raise ConfigError("data.target_key", target_key, f"the batch has no such key (it has "
                              f"{', '.join(map(str, batch))})", "name the key that holds the target")
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ConfigError("data.collate_fn", "?", f"a batch is a {type(batch).__name__} of "
                              f"{len(batch)}, so it has no target", "return (inputs..., target)")
        inputs = tuple(batch[:-1])
        return inputs[0] if len(inputs) == 1 else inputs, batch[-1]
    return batch, batch


def call_model(model, inputs: Any):
    """`model(**inputs)` for a dict, `model(*inputs)` for a tuple, else `model(inputs)`."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def batch_size(target: Any) -> int:
    """The number of samples in a batch: the first dimension of its target."""
    return int(target.shape[0])


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on `device`, copied asynchronously."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
