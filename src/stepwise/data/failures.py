"""A user's Dataset or collate function that raises: its error is noted with the config key, the
class and the sample index, and the loop adds the step and the rank (DESIGN section 5)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from stepwise.contract.errors import UserCodeFailed

# A PEP 678 note, not an attribute: a DataLoader worker's error reaches the main process as the
# text of its traceback only (torch._utils.ExceptionWrapper), which shows the notes.
NOTE = re.compile(r"^stepwise: (?P<key>data\.\w+) \((?P<name>[^()\s]+)\) "
                  r"(?P<at>at sample (?:index|indices) .+|on a batch of \d+ samples)$", re.M)


def _note(err: BaseException, text: str) -> None:
    if hasattr(err, "add_note"):
        err.add_note(text)
    else:  # Python 3.10: kept for this process, not shown (nor sent by a loader worker)
        err.__notes__ = [*getattr(err, "__notes__", []), text]


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _sample(index: Any) -> Any:
    """A sample's index in its dataset (the sampler's key may be (epoch, index))."""
    return index[1] if isinstance(index, tuple) and len(index) == 2 else index


class NamedDataset:
    """A user's map-style dataset, whose errors say which sample of which `data.*` key raised.

    The cost is one call and a `try` per sample; every other attribute is the dataset's.
    """

    def __init__(self, dataset: Any, key: str) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except Exception as err:
            _note(err, f"stepwise: {self.key} ({_class_name(self.dataset)}) at sample index "
                       f"{_sample(index)}")
            raise

    def _getitems(self, getitems: Callable, indices: list) -> Any:
        try:
            return getitems(indices)
        except Exception as err:  # one of the batch's samples: the dataset's own method says which
            shown = ", ".join(str(_sample(i)) for i in indices)
            _note(err, f"stepwise: {self.key} ({_class_name(self.dataset)}) at sample indices "
                       f"{shown} (one batch, fetched by its __getitems__)")
            raise

    def __getattr__(self, name: str) -> Any:
        # Dunders stay the wrapper's (pickling), but for the batch fetch DataLoader looks up.
        if name == "dataset" or (name.startswith("__") and name != "__getitems__"):
            raise AttributeError(name)
        value = getattr(self.dataset, name)
        if name == "__getitems__" and value:
            return lambda indices: self._getitems(value, indices)
        return value


def named_collate(collate: Callable, samples: list, name: str) -> Any:
    """`collate(samples)`, its error noted as `data.collate_fn`'s (`name`: its `_target_`)."""
    try:
        return collate(samples)
    except Exception as err:
        _note(err, f"stepwise: data.collate_fn ({name}) on a batch of {len(samples)} samples")
        raise


@dataclass(frozen=True)
class Failure:
    """What a noted error says: the key, the class (or function), the sample, the error."""

    key: str
    name: str
    at: str
    error: str
    message: str

    def line(self, where: str) -> str:
        """One line for the end of the output: `where` is the step and the rank."""
        message = f": {self.message}" if self.message else ""
        return (f"{self.key} ({self.name}) raised {self.error} {self.at} ({where}){message}; "
                "the traceback above is from your code")


def failure_of(err: BaseException) -> Failure | None:
    """The failure `err` was noted with, in this process or in a DataLoader worker (whose error
    torch re-raises with the worker's traceback as its message); None for any other error."""
    for note in reversed(getattr(err, "__notes__", None) or []):
        if (found := NOTE.fullmatch(note)) is not None:
            message = str(err).strip().split("\n")[0]
            return Failure(found["key"], found["name"], found["at"], type(err).__name__, message)
    text = str(err)
    notes = list(NOTE.finditer(text))
    if not notes:
        return None
    found = notes[-1]  # the innermost error's
    # The error's own lines come between the last frame (indented) and the note.
    lines = text[:found.start()].rstrip("\n").split("\n")
    frames = [i for i, line in enumerate(lines) if line.startswith(" ")]
    if not frames:
        return None  # no traceback before it: not a worker's error
    error, _, message = "\n".join(lines[frames[-1] + 1:]).partition(": ")
    return Failure(found["key"], found["name"], found["at"], error.rpartition(".")[2] or
                   type(err).__name__, message.split("\n")[0])


@contextmanager
def naming_user_errors(where: Callable[[], str]) -> Iterator[None]:
    """Turn a noted error of the user's data into UserCodeFailed: one line naming the key, the
    sample and `where()` (the step and the rank), the user's error as its cause."""
    try:
        yield
    except Exception as err:
        if (failure := failure_of(err)) is None:
            raise
        raise UserCodeFailed(failure.line(where())) from err
