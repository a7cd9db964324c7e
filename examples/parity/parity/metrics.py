"""Balanced accuracy: the mean over classes of each class's recall."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class BalancedAccuracy(Metric):
    """Per-class counts are summed over batches and ranks, so the value is exact under DDP
    (never a mean of per-rank means). Classes absent from the targets are left out of the mean.

    Args:
        num_classes: stepwise passes the data's number of classes.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """`preds`: logits or probabilities (N, C), or class indices (N,); `target`: (N,)."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        target = target.long()
        self.total += torch.bincount(target, minlength=self.num_classes)
        self.correct += torch.bincount(target[preds == target], minlength=self.num_classes)

    def compute(self) -> torch.Tensor:
        present = self.total > 0
        return (self.correct[present].double() / self.total[present]).mean().float()
