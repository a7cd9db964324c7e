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
    """Train, validation and test arrays plus the shape the model must take (no test arrays:
    no test split)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    task: str
    input_shape: tuple[int, ...]  # one sample: (features,), or (channels, height, width)
    num_outputs: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def train_samples(self) -> int:
        return len(self.x_train)

    @property
    def val_samples(self) -> int:
        return len(self.x_val)

    @property
    def test_samples(self) -> int:
        return 0 if self.x_test is None else len(self.x_test)

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

    def test_set(self, dtype):
        from stepwise.data.loaders import TensorPairDataset

        return TensorPairDataset(self.x_test, self.y_test, dtype)


def build_data(data_cfg: Any) -> ArrayData:
    """Call the data group's `_target_` with its dataset keys (the loader keys stay behind)."""
    from hydra.utils import get_method

    kwargs = {k: v for k, v in dict(data_cfg).items() if k not in LOADER_KEYS}
    return get_method(data_cfg["_target_"])(**kwargs)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """`data.val_fraction` and `data.test_fraction`: each in [0, 1), leaving training samples."""
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(key, value, "must be in [0, 1)", f"use e.g. {key}=0.1")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError("data.test_fraction", test_fraction, f"with data.val_fraction="
                          f"{val_fraction} it leaves no training sample (their sum must be "
                          "below 1)", "use e.g. data.val_fraction=0.1 data.test_fraction=0.1")


def held_out_split(n: int, val_fraction: float, test_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices of `n` samples: one seeded permutation, of which the first
    round((val_fraction + test_fraction) x n) are held out, round(val_fraction x n) of them for
    validation and the rest for testing. Training keeps the same samples for the same held-out
    total, however it is shared between validation and test."""
    order = np.random.default_rng(seed).permutation(n)
    held = int(round((val_fraction + test_fraction) * n))
    val = min(int(round(val_fraction * n)), held)
    return order[held:], order[:val], order[val:held]


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


def digits(val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0
           ) -> ArrayData:
    """scikit-learn's 1797 handwritten digits (8x8, 10 classes), pixels scaled to [0, 1], split
    by `held_out_split`: with the defaults 1438 train, 180 validation and 179 test samples."""
    check_fractions(val_fraction, test_fraction)
    pixels, labels = _digits_table()
    x = (pixels / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    train, val, test = held_out_split(len(x), val_fraction, test_fraction, split_seed)
    return ArrayData(x[train], y[train], x[val], y[val], task="classification",
                     input_shape=(x.shape[1],), num_outputs=10,
                     x_test=x[test] if len(test) else None, y_test=y[test] if len(test) else None)


def synthetic(task: str = "classification", train_samples: int = 1024, val_samples: int = 256,
              test_samples: int = 256, num_features: int = 32, num_classes: int = 10,
              noise_std: float = 0.1, seed: int = 0, image_shape: list[int] | None = None
              ) -> ArrayData:
    """Gaussian inputs labelled by a random linear teacher (argmax for classification).

    `image_shape` (channels, height, width) makes each sample an image tensor of that shape
    (its pixels are the features; `num_features` is then ignored): image models on in-memory
    data, e.g. for benchmarks, with no decoding or transforms. The test samples are drawn after
    everything else, so that the training and validation samples do not depend on their number.
    """
    if task not in TASKS:
        raise ConfigError("data.task", task, "unknown task", f"use one of {', '.join(TASKS)}")
    for key, value in (("data.train_samples", train_samples), ("data.num_features", num_features),
                       ("data.num_classes", num_classes)):
        if value <= 0:
            raise ConfigError(key, value, "must be positive", f"set {key} to 1 or more")
    for key, value in (("data.val_samples", val_samples), ("data.test_samples", test_samples)):
        if value < 0:
            raise ConfigError(key, value, "must be >= 0", "set it to 0 or more")
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

    def label(x: np.ndarray) -> np.ndarray:
        scores = x @ teacher + noise_std * rng.standard_normal((len(x), outputs))
        return scores.argmax(axis=1).astype(np.int64) if task == "classification" else \
            scores.astype(np.float32)

    y = label(x)
    x_test = rng.standard_normal((test_samples, num_features)).astype(np.float32)
    y_test = label(x_test)
    shape = tuple(image_shape) if image_shape is not None else (num_features,)
    x, x_test = x.reshape(n, *shape), x_test.reshape(test_samples, *shape)
    return ArrayData(x[:train_samples], y[:train_samples], x[train_samples:], y[train_samples:],
                     task=task, input_shape=shape, num_outputs=outputs,
                     x_test=x_test if test_samples else None, y_test=y_test if test_samples else None)


def linreg(weights: list[float] = (-2.0, 3.4), bias: float = 4.2, noise_std: float = 0.01,
           train_samples: int = 1000, val_samples: int = 1000, test_samples: int = 1000,
           seed: int = 0) -> ArrayData:
    """y = x @ weights + bias + N(0, noise_std^2), x ~ N(0, 1): the textbook regression data (the
    test samples drawn after the others, which do not depend on their number)."""
    if train_samples <= 0:
        raise ConfigError("data.train_samples", train_samples, "must be positive",
                          "set data.train_samples to 1 or more")
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=np.float64)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, len(w)))
        y = (x @ w + bias + noise_std * rng.standard_normal(len(x)))[:, None]
        return x.astype(np.float32), y.astype(np.float32)

    x, y = draw(train_samples + val_samples)
    x_test, y_test = draw(test_samples)
    return ArrayData(x[:train_samples], y[:train_samples], x[train_samples:], y[train_samples:],
                     task="regression", input_shape=(len(w),), num_outputs=1,
                     x_test=x_test if test_samples else None, y_test=y_test if test_samples else None)
