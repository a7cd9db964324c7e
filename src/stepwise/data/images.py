"""Image datasets through torchvision: FakeData, ImageFolder, MNIST and CIFAR-10.

`prepare` only needs sizes and shapes (`ImageData`); each process builds its own torch datasets
from the same description (`train_set`, `val_set`, `test_set`). The test split: MNIST's and
CIFAR-10's own test sets (validation is then a seeded `val_fraction` of their training sets), an
ImageFolder's `test_root` or a seeded `test_fraction` of its `root`, FakeData's `test_samples`.

Transforms come from config: the configured list (resize, crop, flip, ...) between "to a tensor"
and "normalise with the dataset's mean and std"; validation and test share `val_transforms`.
Random augmentation is seeded per (seed, epoch, sample), so a sample is augmented the same way
whatever the number of loader workers or ranks, and again after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepwise.config.vision_import import torchvision
from stepwise.contract.errors import ConfigError
from stepwise.data.arrays import check_fractions, held_out_split

KINDS = ("fake", "imagefolder", "mnist", "cifar10")


@dataclass(frozen=True)
class ImageData:
    """What the plan and the model need to know of an image dataset, and how to build it."""

    kind: str
    input_shape: tuple[int, int, int]
    num_outputs: int
    train_samples: int
    val_samples: int
    options: dict[str, Any] = field(default_factory=dict)
    train_indices: tuple[int, ...] | None = None  # a seeded split of one folder or training set
    val_indices: tuple[int, ...] | None = None
    task: str = "classification"
    test_samples: int = 0
    test_indices: tuple[int, ...] | None = None

    def shape_keys(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, "num_outputs": self.num_outputs,
                "num_classes": self.num_outputs}

    def train_set(self, dtype, seed: int):
        return AugmentedImages(self._split("train"),
                               _pipeline(self.options, "train_transforms", dtype), seed)

    def val_set(self, dtype):
        return AugmentedImages(self._split("val"), _pipeline(self.options, "val_transforms", dtype),
                               seed=None)

    def test_set(self, dtype):
        """The test split, through the validation transforms (no augmentation)."""
        return AugmentedImages(self._split("test"), _pipeline(self.options, "val_transforms", dtype),
                               seed=None)

    def _split(self, split: str):
        base = _base(self.kind, self.options, split)
        indices = getattr(self, f"{split}_indices")
        return base if indices is None else _Subset(base, indices)


def _missing(kind: str, root: str, what: str) -> ConfigError:
    return ConfigError("data.root", root, f"no {what} there",
                       f"point data.root at the directory that holds it, or set "
                       f"data.download=true to fetch {kind} into it")


SPLITS = ("train", "val", "test")


def _base(kind: str, options: dict[str, Any], split: str):
    """The torchvision dataset (PIL images, int labels) that `split` is taken from."""
    datasets = torchvision().datasets

    if kind == "fake":
        return datasets.FakeData(size=options[f"{split}_samples"],
                                 image_size=tuple(options["image_shape"]),
                                 num_classes=options["num_classes"],
                                 random_offset=options["seed"] * 1_000_003 + SPLITS.index(split))
    if kind == "imagefolder":
        return datasets.ImageFolder(options.get(f"{split}_root") or options["root"])
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[kind]
    try:  # validation is a part of the training set; the test set is their own
        return cls(options["root"], train=split != "test", download=options.get("download", False))
    except RuntimeError as err:
        what = "MNIST files (MNIST/raw/*-ubyte)" if kind == "mnist" else \
            "CIFAR-10 files (cifar-10-batches-py/, checked against their md5 sums)"
        raise _missing(kind, options["root"], what) from err


class _Subset:
    def __init__(self, base, indices) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def _pipeline(options: dict[str, Any], key: str, dtype, normalize: bool = True):
    from hydra.utils import instantiate

    torchvision()  # before instantiate imports torchvision.transforms
    from torchvision.transforms import v2

    configured = [instantiate(t) for t in options.get(key) or []]
    mean, std = options.get("mean"), options.get("std")
    tail = [v2.Normalize(mean, std)] if normalize and mean and std else []
    return v2.Compose([v2.ToImage(), *configured, v2.ToDtype(dtype, scale=True), *tail])


class AugmentedImages:
    """(x, y) samples with the transform applied under a per-sample seed.

    Training keys are (epoch, index) pairs (the sampler passes the epoch along); the transform
    runs with torch's CPU generator seeded from (seed, epoch, index) and restored afterwards, so
    the main process's random stream (dropout, init) is untouched.
    """

    keys_with_epoch = True  # MicroBatchSampler(with_epoch=True) feeds it

    def __init__(self, base, transform, seed: int | None) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        import torch

        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.base[index]
        if self.seed is None:
            x = self.transform(image)
        else:
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(state[0]) << 32 | int(state[1]))
                x = self.transform(image)
        return x, torch.as_tensor(label)

    def __getitems__(self, keys):
        import torch

        samples = [self[key] for key in keys]
        return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])


# -- the data group's targets ---------------------------------------------------------------------
def _shape_after_val_transforms(base, options: dict[str, Any]) -> tuple[int, int, int]:
    """The shape of `base`'s first sample after the validation transforms; checks mean/std."""
    import torch

    probe = AugmentedImages(base,
                            _pipeline(options, "val_transforms", torch.float32, normalize=False),
                            seed=None)
    shape = tuple(probe[0][0].shape)
    for key in ("mean", "std"):
        values = options.get(key)
        if values and len(values) != shape[0]:
            raise ConfigError(f"data.{key}", list(values), f"has {len(values)} values for "
                              f"{shape[0]}-channel images", f"give data.{key} one value per channel")
    return shape


def fake(image_shape: list[int] = (3, 32, 32), num_classes: int = 10, train_samples: int = 512,
         val_samples: int = 128, test_samples: int = 128, seed: int = 0,
         **transforms: Any) -> ImageData:
    """torchvision's FakeData: random images, deterministic per index, split and seed."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError("data.image_shape", list(image_shape), "must be [channels, height, width]",
                          "e.g. data.image_shape=[3,32,32]")
    options = dict(transforms, image_shape=list(image_shape), num_classes=num_classes,
                   train_samples=train_samples, val_samples=val_samples,
                   test_samples=test_samples, seed=seed)
    shape = _shape_after_val_transforms(_base("fake", options, "train"), options)
    return ImageData("fake", shape, num_classes, train_samples, val_samples, options,
                     test_samples=test_samples)


def _image_folder(key: str, path: str | None):
    if not path or not Path(path).is_dir():
        raise ConfigError(key, path, "not a directory", f"set {key}=<a folder of class folders>")
    try:
        return torchvision().datasets.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(key, path, f"no images in class folders there ({err})",
                          "put images in <root>/<class name>/ (png, jpg, ...)") from None


def imagefolder(root: str | None = None, val_root: str | None = None,
                test_root: str | None = None, val_fraction: float = 0.1,
                test_fraction: float = 0.1, split_seed: int = 0, **transforms: Any) -> ImageData:
    """A folder of class sub-folders of images (torchvision's ImageFolder). Validation from
    `val_root` and the test split from `test_root` (the same class names); a split without its
    folder is a seeded fraction of `root` (`arrays.held_out_split`), the rest is for training."""
    train = _image_folder("data.root", root)
    roots = {"val": val_root, "test": test_root}
    sizes = {}
    for split, path in roots.items():
        if path:
            found = _image_folder(f"data.{split}_root", path)
            if found.classes != train.classes:
                raise ConfigError(f"data.{split}_root", path, f"its classes differ from "
                                  f"data.root's ({found.classes} != {train.classes})",
                                  "use the same class folders in both")
            sizes[split] = len(found)
    fractions = {"val": 0.0 if val_root else val_fraction,
                 "test": 0.0 if test_root else test_fraction}
    check_fractions(fractions["val"], fractions["test"])
    options = dict(transforms, root=str(Path(root).resolve()),
                   **{f"{split}_root": str(Path(path).resolve()) if path else None
                      for split, path in roots.items()})
    shape = _shape_after_val_transforms(train, options)
    indices = dict(zip(SPLITS, held_out_split(len(train), fractions["val"], fractions["test"],
                                              split_seed)))
    kept = {split: None if roots.get(split) else tuple(int(i) for i in indices[split])
            for split in SPLITS}
    if len(kept["train"]) == len(train):
        kept["train"] = None  # nothing taken from root: all of it, in its own order
    return ImageData("imagefolder", shape, len(train.classes), len(indices["train"]),
                     sizes.get("val", len(indices["val"])), options,
                     train_indices=kept["train"], val_indices=kept["val"],
                     test_samples=sizes.get("test", len(indices["test"])),
                     test_indices=kept["test"])


def _torchvision_split(kind: str, root: str | None, download: bool, val_fraction: float,
                       split_seed: int, transforms) -> ImageData:
    """Training and validation from the dataset's training set (a seeded `val_fraction` of it
    for validation), the test split its own test set."""
    if not root:
        raise ConfigError("data.root", root, "not set",
                          f"set data.root=<directory for {kind}> (and data.download=true to fetch)")
    check_fractions(val_fraction, 0.0)
    options = dict(transforms, root=str(Path(root).resolve()), download=download)
    train, test = _base(kind, options, "train"), _base(kind, options, "test")
    shape = _shape_after_val_transforms(train, options)
    train_idx, val_idx, _ = held_out_split(len(train), val_fraction, 0.0, split_seed)
    return ImageData(kind, shape, len(train.classes), len(train_idx), len(val_idx), options,
                     train_indices=tuple(int(i) for i in train_idx),
                     val_indices=tuple(int(i) for i in val_idx), test_samples=len(test))


def mnist(root: str | None = None, download: bool = False, val_fraction: float = 0.1,
          split_seed: int = 0, **transforms: Any) -> ImageData:
    """torchvision's MNIST under `root`/MNIST/raw: its 60000 training images split into 54000
    for training and 6000 for validation (`val_fraction` 0.1), its 10000 test images the test
    split."""
    return _torchvision_split("mnist", root, download, val_fraction, split_seed, transforms)


def cifar10(root: str | None = None, download: bool = False, val_fraction: float = 0.1,
            split_seed: int = 0, **transforms: Any) -> ImageData:
    """torchvision's CIFAR-10 under `root`: its 50000 training images split into 45000 for
    training and 5000 for validation (`val_fraction` 0.1), its 10000 test images the test
    split."""
    return _torchvision_split("cifar10", root, download, val_fraction, split_seed, transforms)
