"""The digits data, read from scikit-learn's file without importing sklearn, is load_digits'; its
fixed train/val/test split; the generated data's test samples."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from stepwise.contract.errors import ConfigError
from stepwise.data.arrays import _digits_table, digits, held_out_split, linreg, synthetic


def test_digits_table_is_exactly_load_digits():
    from sklearn.datasets import load_digits

    pixels, labels = _digits_table()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(labels, bunch.target)
    assert (pixels.dtype, labels.dtype) == (bunch.data.dtype, bunch.target.dtype)


def test_digits_table_falls_back_to_load_digits_without_the_file(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    pixels, labels = _digits_table()
    assert pixels.shape == (1797, 64) and pixels.max() == 16
    assert labels[:10].tolist() == list(range(10))


def test_digits_split_is_fixed_disjoint_and_keeps_the_training_samples():
    train, val, test = held_out_split(1797, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (1438, 180, 179)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted([*train, *val, *test]) == list(range(1797))
    again = held_out_split(1797, 0.1, 0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    # The training samples are the ones the old 80/20 train/val split trained on: the test split
    # is taken out of what validation held.
    old_train, old_val, _ = held_out_split(1797, 0.2, 0.0, seed=0)
    assert np.array_equal(train, old_train) and set(val) | set(test) == set(old_val)
    assert not np.array_equal(held_out_split(1797, 0.1, 0.1, seed=1)[2], test)
    pixels, labels = _digits_table()
    data = digits()
    assert (data.train_samples, data.val_samples, data.test_samples) == (1438, 180, 179)
    np.testing.assert_array_equal(data.x_test, (pixels[test] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(data.y_test, labels[test])
    np.testing.assert_array_equal(data.y_val, labels[val])
    assert digits(test_fraction=0.0).test_samples == 0 and digits(test_fraction=0.0).x_test is None


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(test_fraction=1.0), "data.test_fraction=1.0: must be in [0, 1)"),
    (dict(val_fraction=0.5, test_fraction=0.5), "data.test_fraction=0.5: with "
     "data.val_fraction=0.5 it leaves no training sample (their sum must be below 1)"),
])
def test_digits_fractions_that_leave_no_training_sample_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        digits(**kwargs)


def test_generated_test_samples_leave_the_train_and_val_samples_as_they_were():
    for make in (synthetic, linreg):
        without, with_test = make(test_samples=0), make(test_samples=300)
        assert without.test_samples == 0 and with_test.test_samples == 300
        for key in ("x_train", "y_train", "x_val", "y_val"):
            np.testing.assert_array_equal(getattr(without, key), getattr(with_test, key))
        assert not np.array_equal(with_test.x_test[:10], with_test.x_val[:10])
