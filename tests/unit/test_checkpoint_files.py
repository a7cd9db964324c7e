"""A file given as a checkpoint is named for what it is, not for the error torch.load hit."""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path

import pytest
import torch

from stepwise.run.checkpoint import REQUIRED_KEYS, CheckpointError, read_valid


def _torch_bytes(payload, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
    return buffer.getvalue()


class Opaque:
    """Not a tensor or a plain container: weights_only=True refuses to unpickle it."""


WHOLE = {key: 0 for key in REQUIRED_KEYS}

CASES = [
    ("notes.txt", b"epoch 1 loss 0.5\nepoch 2 loss 0.4\n", "a text file, not a torch checkpoint "
                                                        "file (torch.save output)"),
    ("noise.bin", random.Random(0).randbytes(4096), "a binary file, not a torch checkpoint file"),
    ("empty.pt", b"", "an empty file, not a torch checkpoint file"),
    ("archive.pt", _zip_bytes(), "a zip archive, not a torch checkpoint file"),
    ("plain.pkl", pickle.dumps({"model": 1}), "a Python pickle, not a torch checkpoint file"),
    ("cut.pt", _torch_bytes(WHOLE)[:300], "a damaged or truncated torch checkpoint file"),
    ("other.pt", _torch_bytes({"weights": torch.zeros(2)}),
     "a torch file but not a stepwise checkpoint (missing model, optimizer"),
    ("opaque.pt", _torch_bytes({"model": Opaque()}), "a torch file holding Python objects "
                                                     "besides tensors"),
]


@pytest.mark.parametrize("name,content,expected", CASES, ids=[c[0] for c in CASES])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path: Path, name, content,
                                                              expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        read_valid(path)
    assert caught.value.problem.startswith(expected), caught.value.problem
    assert str(caught.value) == f"{path}: {caught.value.problem}"
    for internal in ("IndexError", "KeyError", "EOFError", "UnpicklingError", "list index"):
        assert internal not in caught.value.problem


@pytest.mark.parametrize("legacy", [False, True])
def test_a_whole_checkpoint_is_read_in_both_torch_formats(tmp_path: Path, legacy):
    path = tmp_path / "last.pt"
    path.write_bytes(_torch_bytes(dict(WHOLE, model={"w": torch.ones(3)}), legacy=legacy))
    assert torch.equal(read_valid(path)["model"]["w"], torch.ones(3))
