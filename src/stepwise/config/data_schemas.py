"""Schemas of the `data` group (digits, synthetic, linreg, the image options, and `dataset`: a
user's own Datasets), registered by stepwise.config.schemas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


# -------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Loader settings shared by every dataset; the `_target_` builds the arrays."""

    _target_: str = MISSING
    batch_size: Any = 32  # samples per replica per micro-step, or "auto" (see autobatch.py)
    drop_last: bool = False
    num_workers: int = 0
    persistent_workers: bool = False  # only with num_workers > 0
    prefetch_factor: int | None = None  # batches each worker loads ahead (null: torch's 2)


@dataclass
class DigitsConfig(DataConfig):
    _target_: str = "stepwise.data.digits"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class SyntheticConfig(DataConfig):
    _target_: str = "stepwise.data.synthetic"
    task: str = "classification"
    train_samples: int = 1024
    val_samples: int = 256
    test_samples: int = 256
    num_features: int = 32
    num_classes: int = 10
    noise_std: float = 0.1
    seed: int = 0
    image_shape: list[int] | None = None


@dataclass
class LinRegConfig(DataConfig):
    _target_: str = "stepwise.data.linreg"
    weights: list[float] = field(default_factory=lambda: [-2.0, 3.4])
    bias: float = 4.2
    noise_std: float = 0.01
    train_samples: int = 1000
    val_samples: int = 1000
    test_samples: int = 1000
    seed: int = 0


@dataclass
class ImageDataConfig(DataConfig):
    """Images through torchvision. The transforms (`_target_` lists, e.g. v2.RandomCrop) run
    between "to a float tensor in [0, 1]" and "normalise with mean and std"; `val_transforms`
    serve validation and test."""

    train_transforms: list[Any] = field(default_factory=list)
    val_transforms: list[Any] = field(default_factory=list)
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class FakeDataConfig(ImageDataConfig):
    _target_: str = "stepwise.data.fake"
    image_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    train_samples: int = 512
    val_samples: int = 128
    test_samples: int = 128
    seed: int = 0


@dataclass
class ImageFolderConfig(ImageDataConfig):
    _target_: str = "stepwise.data.imagefolder"
    root: str | None = None
    val_root: str | None = None  # null: a seeded val_fraction of root
    test_root: str | None = None  # null: a seeded test_fraction of root
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class TorchvisionDataConfig(ImageDataConfig):
    """MNIST, CIFAR-10: validation a seeded `val_fraction` of their training set, the test split
    their own test set."""

    _target_: str = MISSING
    root: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class DatasetConfig(DataConfig):
    """Any map-style torch Datasets by `_target_` (see stepwise/data/mapstyle.py); also the schema
    a user's own data group gets when it names none."""

    _target_: str = "stepwise.data.datasets"
    train: Any = MISSING  # {_target_: mypkg.data.MyDataset, ...}
    val: Any = None
    test: Any = None  # the held-out test set, evaluated after fitting (trainer.test)
    collate_fn: Any = None  # {_target_: mypkg.data.collate, _partial_: true}
    num_outputs: int | None = None  # null: the train dataset's `num_classes` attribute, if any
    task: str = "classification"  # chooses the default loss and metrics
    target_key: str = "target"  # the target's key in a mapping batch
