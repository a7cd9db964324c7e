"""Losses give one value per loss item; the reduction is the loop's (DESIGN section 4).

A loss is any callable `loss(output, target)` that returns a tensor whose first dimension is the
batch: shape (N,) is one value per sample, shape (N, ...) one value per item (e.g. a token).
The loop takes the mean over the real items of a whole optimizer-step window, across
micro-steps and ranks; a loss that averaged itself would be averaged twice, and a micro-batch's
own mean is exactly the wrong weighting when micro-batches hold different numbers of items.

Which items count: a loss may define `item_mask(target)` (True where an item is real, e.g. not a
padding token; None: all of them). Without it, per-item values of shape (N, ...) are averaged
per sample, and every sample weighs the same. A loss may define `mean(output, target)`, the mean
over one micro-batch of its per-sample values in one fused operation, used when no sample of
the micro-batch is padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

NO_CLASS = -(2**63)  # an ignore_index no target can hold: 1-D targets are all samples


class CrossEntropy:
    """Cross-entropy of logits (N, C) or (N, C, d1, ...) against class indices (N) or (N, d1, ...).

    Targets with more than one dimension (tokens) are loss items, and `ignore_index` marks the
    padding among them. Targets of one dimension make each sample one item, counted by the plan;
    they must all be class indices: `ignore_index` does not apply to them (a sample left out
    would change the window's count, which the plan fixed), so a target of -100 is an IndexError
    ("Target -100 is out of bounds") rather than a sample weighted one way in a full micro-batch
    and another in a partial one.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, reduction="none", ignore_index=self._ignored(target),
                               label_smoothing=self.label_smoothing)

    def _ignored(self, target: torch.Tensor) -> int:
        return self.ignore_index if target.dim() > 1 else NO_CLASS

    def item_mask(self, target: torch.Tensor) -> torch.Tensor | None:
        return target != self.ignore_index if target.dim() > 1 else None

    def mean(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, ignore_index=self._ignored(target),
                               label_smoothing=self.label_smoothing)

    def __repr__(self) -> str:
        return f"CrossEntropy(ignore_index={self.ignore_index})"


class MSE:
    """Squared error, one value per sample: the mean over that sample's outputs."""

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target, reduction="none").reshape(len(output), -1).mean(1)

    def mean(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)  # all samples have the same number of outputs

    def __repr__(self) -> str:
        return "MSE()"


def item_mask(loss, target: torch.Tensor) -> torch.Tensor | None:
    """Which of the loss's per-item values are real items; None: one item per sample."""
    mask = getattr(loss, "item_mask", None)
    return None if mask is None else mask(target)


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """A loss's values as one per sample: the mean over each sample's values (shape (N,))."""
    return values if values.dim() == 1 else values.reshape(len(values), -1).mean(1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, real: int) -> torch.Tensor:
    """The sum of the real items of the first `real` samples (where never reads a masked NaN)."""
    return torch.where(mask[:real], values[:real], 0).sum()


def mean_loss(loss, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of the per-sample values over a micro-batch that is all real samples."""
    return mean_of(loss)(output, target)


def mean_of(loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`loss.mean` if it has one (fused), else the mean of its per-sample values (looked up once:
    the loop calls it every micro-step)."""
    fused = getattr(loss, "mean", None)
    return fused if fused is not None else lambda output, target: per_sample(
        loss(output, target)).mean()
