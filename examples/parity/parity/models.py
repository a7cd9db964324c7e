"""A bag-of-tokens classifier: it sees which tokens occur and how often, not their order."""

from __future__ import annotations

import torch
from torch import nn


class BagOfTokens(nn.Module):
    """Embedding, the mean over the real (unmasked) tokens, then a small MLP.

    Args:
        vocab_size: number of token ids, padding (0) included.
        dim: embedding and hidden width.
        num_outputs: logits per sequence (stepwise passes the data's `num_outputs`).
    """

    def __init__(self, vocab_size: int, dim: int, num_outputs: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_outputs))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(self.embedding.weight.dtype).unsqueeze(-1)
        summed = (self.embedding(tokens) * weights).sum(1)
        return self.head(summed / weights.sum(1).clamp(min=1))
