"""The built-in losses: per-item values, and the fused mean equal to the per-sample path."""

from __future__ import annotations

import pytest
import torch

from stepwise.models.losses import CrossEntropy, item_mask, mean_loss, per_sample


def test_sample_targets_are_all_items_in_the_fused_and_the_per_sample_path():
    """A 1-D target of ignore_index would be dropped from F.cross_entropy's own mean but counted
    (as 0) by the per-sample path: the two weightings of one window disagree. It is an error."""
    loss, logits = CrossEntropy(), torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1])
    assert item_mask(loss, target) is None
    assert abs(mean_loss(loss, logits, target) - per_sample(loss(logits, target)).mean()) < 1e-15
    ignored = torch.tensor([0, 1, -100, 1])
    for path in (lambda: mean_loss(loss, logits, ignored), lambda: loss(logits, ignored)):
        with pytest.raises(IndexError, match="out of bounds"):
            path()


def test_token_targets_mask_the_ignored_ones():
    loss, logits = CrossEntropy(), torch.randn(2, 3, 4, dtype=torch.float64)  # (N, C, T)
    target = torch.tensor([[0, 1, 2, -100], [2, -100, -100, -100]])
    mask = item_mask(loss, target)
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    values = loss(logits, target)
    assert values.shape == (2, 4) and values[~mask].abs().max() == 0
    expected = torch.nn.functional.cross_entropy(logits, target)  # the mean over the 4 tokens
    assert abs(values[mask].sum() / 4 - expected) < 1e-15
