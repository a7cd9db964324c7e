"""The digits data, read from scikit-learn's file without importing sklearn, is load_digits'."""

from __future__ import annotations

import importlib.util

import numpy as np

from stepwise.data.arrays import _digits_table


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
