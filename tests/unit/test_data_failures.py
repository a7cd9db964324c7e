"""A user's dataset or collate function that raises: the note that names the key, the class and the
sample, read back in this process and from a DataLoader worker's re-raised text; the launcher's
reports of ranks whose data raised."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
from torch._utils import ExceptionWrapper

from stepwise.contract.errors import UserCodeFailed
from stepwise.data.failures import Failure, NamedDataset, failure_of, named_collate, naming_user_errors
from stepwise.run.launch import _user_code_failed


class Broken:
    """Samples 0..9 (by index, or by an (epoch, index) key); sample 3 raises."""

    item_counts = [1] * 10

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int | tuple[int, int]) -> int:
        index = index[1] if isinstance(index, tuple) else index
        if index == 3:
            raise KeyError(f"no sample {index}")
        return index


class Batched(Broken):
    def __getitems__(self, indices: list[int]) -> list[int]:
        return [self[i] for i in indices]


def _raised(call, *args) -> BaseException:
    with pytest.raises(Exception) as info:
        call(*args)
    return info.value


EXPECTED = Failure("data.train", f"{__name__}.Broken", "at sample index 3", "KeyError",
                   "'no sample 3'")


def test_a_sample_that_raises_keeps_its_error_and_says_which_it_was():
    dataset = NamedDataset(Broken(), "data.train")
    assert [dataset[i] for i in (0, 9)] == [0, 9] and len(dataset) == 10
    assert dataset.item_counts == [1] * 10  # the dataset's own attributes are still there
    err = _raised(dataset.__getitem__, 3)
    assert type(err) is KeyError and err.args == ("no sample 3",)
    assert failure_of(err) == EXPECTED
    assert EXPECTED.line("global_step 2, micro-step 5 of epoch 0, rank 1") == (
        f"data.train ({__name__}.Broken) raised KeyError at sample index 3 (global_step 2, "
        "micro-step 5 of epoch 0, rank 1): 'no sample 3'; the traceback above is from your code")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="notes are shown from Python 3.11")
def test_a_loader_workers_error_is_read_from_its_text():
    """torch re-raises a worker's error in the main process from its formatted traceback only."""
    try:
        NamedDataset(Broken(), "data.train")[(2, 3)]  # an (epoch, index) key
    except KeyError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    err = _raised(wrapped.reraise)
    assert not getattr(err, "__notes__", None) and "Original Traceback" in str(err)
    assert failure_of(err) == EXPECTED


def test_a_batch_fetch_names_its_samples_and_collate_its_batch():
    err = _raised(NamedDataset(Batched(), "data.val").__getitems__, [4, 3, 7])
    assert failure_of(err).at == "at sample indices 4, 3, 7 (one batch, fetched by its __getitems__)"
    assert not hasattr(NamedDataset(Broken(), "data.val"), "__getitems__")  # DataLoader: per sample
    err = _raised(named_collate, lambda samples: 1 / 0, [1, 2], "mypkg.collate")
    assert failure_of(err) == Failure("data.collate_fn", "mypkg.collate", "on a batch of 2 samples",
                                      "ZeroDivisionError", "division by zero")


def test_other_errors_pass_unchanged_and_noted_ones_become_one_line():
    assert failure_of(ValueError("stepwise: data.train (x.Y) at sample index 3")) is None
    with pytest.raises(ValueError, match="^plain$"):
        with naming_user_errors(lambda: "here"):
            raise ValueError("plain")
    with pytest.raises(UserCodeFailed) as info:
        with naming_user_errors(lambda: "global_step 0, rank 0"):
            NamedDataset(Broken(), "data.train")[3]
    assert str(info.value) == EXPECTED.line("global_step 0, rank 0")
    details = info.value.details
    assert details.startswith("Traceback (most recent call last)") and not details.endswith("\n\n")
    assert "KeyError: 'no sample 3'" in details and "raise KeyError" in details


def test_the_wrapper_pickles_for_loader_workers():
    copy = pickle.loads(pickle.dumps(NamedDataset(Broken(), "data.train")))
    assert (copy.key, len(copy), copy[9]) == ("data.train", 10, 9)


def test_the_launcher_reads_the_reports_of_the_ranks_whose_data_raised(tmp_path):
    assert _user_code_failed(tmp_path) is None
    for rank in (10, 2):
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps(
            {"line": f"data.train raised (rank {rank})", "details": f"Traceback {rank}\n"}))
    failed = _user_code_failed(tmp_path)
    assert str(failed) == "data.train raised (rank 2)\nerror: data.train raised (rank 10)"
    assert failed.details == "Traceback 2\nTraceback 10\n" and failed.exit_code == 1
