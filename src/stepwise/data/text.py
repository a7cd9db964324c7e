"""Character-level text that needs nothing downloaded: the docstrings of Python's standard library.

The corpus is the docstrings of a fixed list of standard-library modules, of their public classes
and functions and of those classes' public methods, in sorted order: the same text on every run of
the same Python version (another version documents its library a little differently). A sample is
a contiguous slice of it, of a seeded random length, for next-character prediction; `pad_collate`
pads a batch to its longest sample, and the padded targets are no loss items (DESIGN section 4).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

# Modules whose documentation is the corpus, in this order (their own objects only: a name that
# a module re-exports, such as os's posix functions, is left out, so the text does not depend on
# the platform).
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math",
    "operator", "os", "pathlib", "pickle", "pprint", "random", "re", "shutil", "socket",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile",
)
SPLITS = ("train", "val", "test")
HELD_OUT_FRACTION = 0.1  # the corpus's last 10%: its first half validation, its second half test

PAD_ID = 0  # padding: never a character
UNK_ID = 1  # any character outside the vocabulary
CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))
VOCAB_SIZE = 2 + len(CHARACTERS)

_IDS = np.full(128, UNK_ID, dtype=np.int64)  # id of each ASCII code point
_IDS[[ord(c) for c in CHARACTERS]] = np.arange(2, VOCAB_SIZE)
_CHARS = {UNK_ID: "?", **{i: c for i, c in enumerate(CHARACTERS, start=2)}}  # PAD_ID: none


def _documented(module) -> list:
    """The module, its own public classes and functions, and those classes' public methods."""
    found = [module]
    for name in sorted(dir(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            found.append(obj)
            found += [getattr(obj, m) for m in sorted(vars(obj))
                      if not m.startswith("_") and inspect.isroutine(vars(obj)[m])]
        elif inspect.isroutine(obj):
            found.append(obj)
    return found


@functools.cache
def corpus() -> str:
    """The docstrings of `MODULES`, each once (inherited ones repeat), joined by blank lines."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():  # reading a deprecated name (typing.io) is no use of it
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            for obj in _documented(importlib.import_module(name)):
                doc = inspect.getdoc(obj)
                if doc:
                    seen.setdefault(doc, None)
    return "\n\n".join(seen)


def encode(text: str) -> torch.Tensor:
    """Character ids of `text` (int64, shape (len(text),)); a character outside the vocabulary is
    `UNK_ID`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.full(len(codes), UNK_ID, dtype=np.int64)
    ascii_ = codes < 128
    ids[ascii_] = _IDS[codes[ascii_]]
    return torch.from_numpy(ids)


def decode(ids) -> str:
    """The text of character ids (a tensor or a sequence); padding is dropped, unknown is '?'."""
    return "".join(_CHARS.get(int(i), "") for i in ids)


@functools.cache
def _encoded_corpus() -> torch.Tensor:
    return encode(corpus())


def _region(split: str) -> torch.Tensor:
    """The ids of a split's part of the corpus: the first 90% for train, then val, then test
    (the last `HELD_OUT_FRACTION` cut in two halves)."""
    ids = _encoded_corpus()
    boundary = len(ids) - int(len(ids) * HELD_OUT_FRACTION)
    middle = boundary + (len(ids) - boundary) // 2
    return {"train": ids[:boundary], "val": ids[boundary:middle], "test": ids[middle:]}[split]


class TinyText(Dataset):
    """`samples` slices of the corpus for next-character prediction, the same for the same seed.

    Sample i is a slice of L_i + 1 consecutive characters at a seeded random offset in the split's
    region, L_i uniform in [min_len, max_len]: `{"tokens": ids[:-1], "target": ids[1:]}`, both
    int64 of shape (L_i,). The train, val and test regions do not overlap.

    Args:
        split: "train" (the corpus's first 90%), "val" (the next 5%) or "test" (the last 5%).
        samples: number of slices (the dataset's length).
        min_len: fewest characters to predict in a sample.
        max_len: most characters to predict in a sample (the model's context must hold it).
        seed: seeds the lengths and offsets, together with the split.

    Attributes:
        item_counts: int64 array (samples,): L_i, the target tokens (loss items) of each sample.
        num_classes: the vocabulary size, which stepwise passes to the model as `num_outputs`.
        max_len: the longest sample.
    """

    num_classes = VOCAB_SIZE

    def __init__(self, split: str = "train", samples: int = 2048, min_len: int = 8,
                 max_len: int = 256, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not a split; use one of {', '.join(SPLITS)}")
        if samples < 1:
            raise ValueError(f"samples={samples}: a dataset needs at least one; set samples >= 1")
        if min_len < 1:
            raise ValueError(f"min_len={min_len}: a sample needs a target; set min_len >= 1")
        if max_len < min_len:
            raise ValueError(f"max_len={max_len} is below min_len={min_len}; "
                             f"set max_len >= {min_len}")
        self.region = _region(split)
        if len(self.region) <= max_len + 1:
            raise ValueError(f"max_len={max_len}: the {split} region holds only "
                             f"{len(self.region)} characters; set max_len < {len(self.region) - 1}")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        self.item_counts = rng.integers(min_len, max_len, size=samples, endpoint=True,
                                        dtype=np.int64)
        # offset + L + 1 <= len(region): every slice lies inside its split's region
        self.offsets = rng.integers(0, len(self.region) - self.item_counts, dtype=np.int64)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.item_counts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, length = int(self.offsets[index]), int(self.item_counts[index])
        ids = self.region[start: start + length + 1].clone()  # not a view of the whole region
        return {"tokens": ids[:-1], "target": ids[1:]}


def pad_collate(samples: list[dict[str, torch.Tensor]], ignore_index: int = -100
                ) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sample: tokens with `PAD_ID`, targets with `ignore_index` (the
    loss's, so that padding is no loss item).

    Returns:
        `{"tokens": (N, T) int64, "target": (N, T) int64}`, T the longest sample's length.
    """
    longest = max(len(s["tokens"]) for s in samples)
    tokens = torch.full((len(samples), longest), PAD_ID, dtype=torch.int64)
    target = torch.full((len(samples), longest), ignore_index, dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens[row, : len(sample["tokens"])] = sample["tokens"]
        target[row, : len(sample["target"])] = sample["target"]
    return {"tokens": tokens, "target": target}
