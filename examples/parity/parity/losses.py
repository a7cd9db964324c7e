"""Focal loss, one value per sample: stepwise does the reduction (exact across micro-steps and ranks)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


class FocalLoss:
    """Cross-entropy scaled by (1 - p_target) ** gamma (Lin et al., 2017); gamma=0 is cross-entropy.

    `loss(logits (N, C), target (N,))` returns shape (N,), never a mean: a loss that averaged
    itself would make stepwise weigh micro-batches of different sizes wrongly.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cross_entropy = F.cross_entropy(output.float(), target, reduction="none")
        p_target = torch.exp(-cross_entropy)
        return (1 - p_target).pow(self.gamma) * cross_entropy

    def __repr__(self) -> str:
        return f"FocalLoss(gamma={self.gamma})"
