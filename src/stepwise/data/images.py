"""Image datasets through torchvision: FakeData, ImageFolder, MNIST and CIFAR-10.

`prepare` only needs sizes and shapes (`ImageData`); each process builds its own torch datasets
from the same description (`train_set`, `val_set`). Transforms come from config: the configured
list (resize, crop, flip, ...) between "to a tensor" and "normalise with the dataset's mean and
std". Random augmentation is seeded per (seed, epoch, sample), so a sample is augmented the same
way whatever the number of loader workers or ranks, and again after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepwise.config.vision_import import torchvision
from stepwise.contract.errors import ConfigError

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
    train_indices: tuple[int, ...] | None = None  # a seeded split of one folder
    val_indices: tuple[int, ...] | None = None
    task: str = "classification"

    def shape_keys(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, "num_outputs": self.num_outputs,
                "num_classes": self.num_outputs}

    def train_set(self, dtype, seed: int):
        base = _base(self.kind, self.options, train=True)
        if self.train_indices is not None:
            base = _Subset(base, self.train_indices)
        return AugmentedImages(base, _pipeline(self.options, "train_transforms", dtype), seed)

    def val_set(self, dtype):
        base = _base(self.kind, self.options, train=False)
        if self.val_indices is not None:
            base = _Subset(base, self.val_indices)
        return AugmentedImages(base, _pipeline(self.options, "val_transforms", dtype), seed=None)


def _missing(kind: str, root: str, what: str) -> ConfigError:
    return ConfigError("data.root", root, f"no {what} there",
                       f"point data.root at the directory that holds it, or set "
                       f"data.download=true to fetch {kind} into it")


def _base(kind: str, options: dict[str, Any], train: bool):
    """The torchvision dataset (PIL images, int labels) of one split."""
    datasets = torchvision().datasets

    if kind == "fake":
        size = options["train_samples"] if train else options["val_samples"]
        return datasets.FakeData(size=size, image_size=tuple(options["image_shape"]),
                                 num_classes=options["num_classes"],
                                 random_offset=options["seed"] * 1_000_003 + (0 if train else 1))
    if kind == "imagefolder":
        root = options["val_root"] if (not train and options.get("val_root")) else options["root"]
        return datasets.ImageFolder(root)
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[kind]
    try:
        return cls(options["root"], train=train, download=options.get("download", False))
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
         val_samples: int = 128, seed: int = 0, **transforms: Any) -> ImageData:
    """torchvision's FakeData: random images, deterministic per index and seed."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError("data.image_shape", list(image_shape), "must be [channels, height, width]",
                          "e.g. data.image_shape=[3,32,32]")
    options = dict(transforms, image_shape=list(image_shape), num_classes=num_classes,
                   train_samples=train_samples, val_samples=val_samples, seed=seed)
    shape = _shape_after_val_transforms(_base("fake", options, train=True), options)
    return ImageData("fake", shape, num_classes, train_samples, val_samples, options)


def imagefolder(root: str | None = None, val_root: str | None = None, val_fraction: float = 0.2,
                split_seed: int = 0, **transforms: Any) -> ImageData:
    """A folder of class sub-folders of images (torchvision's ImageFolder); validation from
    `val_root` (the same class names), or a seeded `val_fraction` of `root`."""
    ImageFolder = torchvision().datasets.ImageFolder  # noqa: N806

    folders = {"data.root": root, **({"data.val_root": val_root} if val_root else {})}
    sets = {}
    for key, path in folders.items():
        if not path or not Path(path).is_dir():
            raise ConfigError(key, path, "not a directory", f"set {key}=<a folder of class folders>")
        try:
            sets[key] = ImageFolder(path)
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(key, path, f"no images in class folders there ({err})",
                              "put images in <root>/<class name>/ (png, jpg, ...)") from None
    train = sets["data.root"]
    options = dict(transforms, root=str(Path(root).resolve()),
                   val_root=str(Path(val_root).resolve()) if val_root else None)
    shape = _shape_after_val_transforms(train, options)
    if val_root:
        if sets["data.val_root"].classes != train.classes:
            raise ConfigError("data.val_root", val_root, f"its classes differ from data.root's "
                              f"({sets['data.val_root'].classes} != {train.classes})",
                              "use the same class folders in both")
        return ImageData("imagefolder", shape, len(train.classes), len(train),
                         len(sets["data.val_root"]), options)
    order = np.random.default_rng(split_seed).permutation(len(train))
    val = int(round(val_fraction * len(train)))
    return ImageData("imagefolder", shape, len(train.classes), len(train) - val, val, options,
                     train_indices=tuple(int(i) for i in order[val:]),
                     val_indices=tuple(int(i) for i in order[:val]))


def _torchvision_split(kind: str, root: str | None, download: bool, transforms) -> ImageData:
    if not root:
        raise ConfigError("data.root", root, "not set",
                          f"set data.root=<directory for {kind}> (and data.download=true to fetch)")
    options = dict(transforms, root=str(Path(root).resolve()), download=download)
    train, val = _base(kind, options, train=True), _base(kind, options, train=False)
    shape = _shape_after_val_transforms(train, options)
    return ImageData(kind, shape, len(train.classes), len(train), len(val), options)


def mnist(root: str | None = None, download: bool = False, **transforms: Any) -> ImageData:
    """torchvision's MNIST (train 60000 / test 10000 as validation) under `root`/MNIST/raw."""
    return _torchvision_split("mnist", root, download, transforms)


def cifar10(root: str | None = None, download: bool = False, **transforms: Any) -> ImageData:
    """torchvision's CIFAR-10 (train 50000 / test 10000 as validation) under `root`."""
    return _torchvision_split("cifar10", root, download, transforms)
