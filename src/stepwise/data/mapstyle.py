"""A user's own data: any map-style `torch.utils.data.Dataset` for training, validation and test,
by `_target_`, with an optional collate function (DESIGN section 5).

The datasets are described, not held: every process (each DDP rank, each loader worker) builds
its own from the same config, as it would with torchvision's. Within a process each is built
once (`prepare` learns its size and a sample's shape, then the probe, `data.batch_size=auto`
and the loaders reuse it), since a user's dataset may take seconds to read.

The loader's collate function splits each batch into the model's inputs and the loss's target
(stepwise/data/batches.py says how).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stepwise.contract.errors import ConfigError
from stepwise.data.batches import cast_floats, split_batch
from stepwise.data.failures import NamedDataset, named_collate

TASKS = ("classification", "regression")


@dataclass(frozen=True)
class DatasetData:
    """Train, validation and test datasets by config, with what the plan and the model need of
    them."""

    train: dict[str, Any]
    val: dict[str, Any] | None
    collate_fn: dict[str, Any] | None
    target_key: str
    task: str
    train_samples: int
    val_samples: int
    num_outputs: int | None
    input_shape: tuple[int, ...] | None = None  # one sample's input, when it is one tensor
    # The training set's `item_counts`: loss items per sample (stepwise/contract/items.py); None: counted.
    item_counts: Any = field(default=None, compare=False)
    test: dict[str, Any] | None = None
    test_samples: int = 0

    def train_set(self, dtype=None, seed: int = 0):
        return NamedDataset(_built("data.train", self.train), "data.train")

    def val_set(self, dtype=None):
        return NamedDataset(_built("data.val", self.val), "data.val") if self.val is not None else None

    def test_set(self, dtype=None):
        return NamedDataset(_built("data.test", self.test), "data.test") if self.test else None

    def collate(self, dtype) -> Callable[[list], tuple[Any, Any]]:
        """The loader's collate function: the user's (or torch's default), then split and cast."""
        from stepwise.config.components import build, target_of

        if self.collate_fn is None:
            return Collate(None, self.target_key, dtype)
        return Collate(build("data.collate_fn", self.collate_fn), self.target_key, dtype,
                       target_of(self.collate_fn))

    def shape_keys(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, "num_outputs": self.num_outputs,
                "num_classes": self.num_outputs if self.task == "classification" else None}


class Collate:
    """Picklable (loader workers): collate samples, cast floats, split into (inputs, target)."""

    def __init__(self, user: Callable | None, target_key: str, dtype,
                 name: str = "torch.utils.data.default_collate") -> None:
        self.user, self.target_key, self.dtype, self.name = user, target_key, dtype, name

    def __call__(self, samples: list) -> tuple[Any, Any]:
        if self.user is not None:
            batch = named_collate(self.user, samples, self.name)
        else:
            from torch.utils.data import default_collate

            batch = named_collate(default_collate, samples, self.name)
        return split_batch(cast_floats(batch, self.dtype), self.target_key)


def datasets(train: Mapping[str, Any], val: Mapping[str, Any] | None = None,
             collate_fn: Mapping[str, Any] | None = None, num_outputs: int | None = None,
             task: str = "classification", target_key: str = "target",
             test: Mapping[str, Any] | None = None) -> DatasetData:
    """Build the datasets once, to learn their sizes and a sample's shape (the `data` group's
    generic option, and a user's data group without a stepwise schema)."""
    if task not in TASKS:
        raise ConfigError("data.task", task, "unknown task", f"use one of {', '.join(TASKS)}")
    described = DatasetData(train=dict(train), val=dict(val) if val else None,
                            collate_fn=dict(collate_fn) if collate_fn else None,
                            target_key=target_key, task=task, train_samples=0, val_samples=0,
                            num_outputs=num_outputs, test=dict(test) if test else None)
    train_set = described.train_set()
    sizes = {"data.train": _length("data.train", train, train_set)}
    for key, node, dataset in (("data.val", val, described.val_set()),
                               ("data.test", test, described.test_set())):
        if dataset is not None:
            sizes[key] = _length(key, node, dataset)
    if sizes["data.train"] == 0:
        raise ConfigError("data.train", train.get("_target_"), "the training dataset is empty "
                          "(len 0)", "check its arguments")
    outputs = num_outputs if num_outputs is not None else getattr(train_set, "num_classes", None)
    import dataclasses

    return dataclasses.replace(described, train_samples=sizes["data.train"],
                               val_samples=sizes.get("data.val", 0),
                               test_samples=sizes.get("data.test", 0), num_outputs=outputs,
                               input_shape=_input_shape(train_set),
                               item_counts=getattr(train_set, "item_counts", None))


_BUILT: dict[str, Any] = {}  # this process's datasets, by their config


def _built(key: str, node: Mapping[str, Any]) -> Any:
    import json

    from stepwise.config.components import build

    name = json.dumps([key, node], sort_keys=True, default=repr)
    if name not in _BUILT:
        _BUILT[name] = build(key, node)
    return _BUILT[name]


def _length(key: str, node: Mapping[str, Any], dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise ConfigError(key, node.get("_target_"), f"{type(dataset.dataset).__name__} has no len(): "
                          "stepwise plans over a map-style Dataset", "give the class __len__ and "
                          "__getitem__ (an IterableDataset cannot be cut into exact windows)"
                          ) from None


def _input_shape(dataset: Any) -> tuple[int, ...] | None:
    """One sample's input shape, when a sample is (tensor, target) or a tensor."""
    import torch

    sample = dataset[0]
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        sample = sample[0]
    return tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
