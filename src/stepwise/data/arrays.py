"""Datasets as arrays (no torch import: the plan and dry runs need only their sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepwise.contract.errors import ConfigError

TASKS = ("classification", "regression")
LOADER_KEYS = ("_target_", "batch_size", "drop_last", "num_workers", "persistent_workers",
               "prefetch_factor")


@dataclass(frozen=True)
class ArrayData:
    """Train and validation arrays plus the shape the model must take."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    task: str
    input_shape: tuple[int, ...]  # one sample: (features,), or (channels, height, width)
    num_outputs: int

    @property
    def train_samples(self) -> int:
        return len(self.x_train)

    @property
    def val_samples(self) -> int:
        return len(self.x_val)

    def shape_keys(self) -> dict[str, Any]:
        """What a model factory may take from the data (`components.build` passes what it names)."""
        return {"input_shape": self.input_shape, "num_outputs": self.num_outputs,
                "num_classes": self.num_outputs if self.task == "classification" else None}

    def train_set(self, dtype, seed: int):
        from stepwise.data.loaders import TensorPairDataset

        return TensorPairDataset(self.x_train, self.y_train, dtype)

    def val_set(self, dtype):
        from stepwise.data.loaders import TensorPairDataset

        return TensorPairDataset(self.x_val, self.y_val, dtype)


def build_data(data_cfg: Any) -> ArrayData:
    """Call the data group's `_target_` with its dataset keys (the loader keys stay behind)."""
    from hydra.utils import get_method

    kwargs = {k: v for k, v in dict(data_cfg).items() if k not in LOADER_KEYS}
    return get_method(data_cfg["_target_"])(**kwargs)


def _split(x: np.ndarray, y: np.ndarray, val: int, seed: int) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(x))
    val_idx, train_idx = order[:val], order[val:]
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """`load_digits()`'s (data, target): read from the CSV that scikit-learn ships, without
    importing sklearn (it imports scipy and pandas: longer than `import torch`, and most of a
    dry run). scikit-learn's own loader is the fallback, should the file ever move."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():  # parsed as load_digits parses it
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def digits(val_fraction: float = 0.2, split_seed: int = 0) -> ArrayData:
    """scikit-learn's 1797 handwritten digits (8x8, 10 classes), pixels scaled to [0, 1]."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "must be in [0, 1)",
                          "use e.g. data.val_fraction=0.2")
    pixels, labels = _digits_table()
    x = (pixels / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    val = int(round(val_fraction * len(x)))
    return ArrayData(*_split(x, y, val, split_seed), task="classification",
                     input_shape=(x.shape[1],), num_outputs=10)


def synthetic(task: str = "classification", train_samples: int = 1024, val_samples: int = 256,
              num_features: int = 32, num_classes: int = 10, noise_std: float = 0.1,
              seed: int = 0, image_shape: list[int] | None = None) -> ArrayData:
    """Gaussian inputs labelled by a random linear teacher (argmax for classification).

    `image_shape` (channels, height, width) makes each sample an image tensor of that shape
    (its pixels are the features; `num_features` is then ignored): image models on in-memory
    data, e.g. for benchmarks, with no decoding or transforms.
    """
    if task not in TASKS:
        raise ConfigError("data.task", task, "unknown task", f"use one of {', '.join(TASKS)}")
    for key, value in (("data.train_samples", train_samples), ("data.num_features", num_features),
                       ("data.num_classes", num_classes)):
        if value <= 0:
            raise ConfigError(key, value, "must be positive", f"set {key} to 1 or more")
    if val_samples < 0:
        raise ConfigError("data.val_samples", val_samples, "must be >= 0", "set it to 0 or more")
    if image_shape is not None:
        if len(image_shape) != 3 or min(image_shape) <= 0:
            raise ConfigError("data.image_shape", list(image_shape), "must be 3 positive sizes",
                              "use [channels, height, width], e.g. [3,32,32], or null")
        num_features = int(np.prod(image_shape))
    rng = np.random.default_rng(seed)
    n = train_samples + val_samples
    x = rng.standard_normal((n, num_features)).astype(np.float32)
    outputs = num_classes if task == "classification" else 1
    teacher = rng.standard_normal((num_features, outputs)) / np.sqrt(num_features)
    scores = x @ teacher + noise_std * rng.standard_normal((n, outputs))
    if task == "classification":
        y = scores.argmax(axis=1).astype(np.int64)
    else:
        y = scores.astype(np.float32)
    shape = tuple(image_shape) if image_shape is not None else (num_features,)
    x = x.reshape(n, *shape)
    return ArrayData(x[:train_samples], y[:train_samples], x[train_samples:], y[train_samples:],
                     task=task, input_shape=shape, num_outputs=outputs)


def linreg(weights: list[float] = (-2.0, 3.4), bias: float = 4.2, noise_std: float = 0.01,
           train_samples: int = 1000, val_samples: int = 1000, seed: int = 0) -> ArrayData:
    """y = x @ weights + bias + N(0, noise_std^2), x ~ N(0, 1): the textbook regression data."""
    if train_samples <= 0:
        raise ConfigError("data.train_samples", train_samples, "must be positive",
                          "set data.train_samples to 1 or more")
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=np.float64)
    x = rng.standard_normal((train_samples + val_samples, len(w)))
    y = (x @ w + bias + noise_std * rng.standard_normal(len(x)))[:, None]
    x, y = x.astype(np.float32), y.astype(np.float32)
    return ArrayData(x[:train_samples], y[:train_samples], x[train_samples:], y[train_samples:],
                     task="regression", input_shape=(len(w),), num_outputs=1)
