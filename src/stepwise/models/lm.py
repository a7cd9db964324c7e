"""A small causal transformer language model (GPT-style, pre-LayerNorm) for token sequences."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t only."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (part.reshape(batch, length, self.heads, dim // self.heads).transpose(1, 2)
                   for part in self.qkv(x).split(dim, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training
                                             else 0.0, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) with a 4 x dim GELU hidden layer."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token and learned position embeddings, `layers` pre-LayerNorm blocks, a final LayerNorm and
    a linear head to the vocabulary.

    `forward(tokens)` takes ids (N, T), T <= `context`, and returns logits (N, vocab, T): the
    layout `F.cross_entropy` (and stepwise's `loss=cross_entropy`) takes against targets (N, T).

    Args:
        num_outputs: the vocabulary size (stepwise passes the data's `num_outputs`).
        dim: embedding width; a multiple of `heads`.
        layers: transformer blocks.
        heads: attention heads per block.
        context: the longest sequence the model takes (positions it has embeddings for).
        dropout: dropout on the embeddings, the attention weights and each block's outputs.
    """

    def __init__(self, num_outputs: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 context: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not a multiple of heads={heads}; "
                             f"set dim to a multiple of {heads}")
        self.context = context
        self.tokens = nn.Embedding(num_outputs, dim)
        self.positions = nn.Embedding(context, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.apply(_init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context "
                             f"of {self.context}; set model.context >= {length} (or shorten the "
                             f"data's sequences)")
        # No key-padding mask: padding is on the right and attention is causal, so a real token
        # never attends to a padding position, and the loss ignores the padding's own outputs.
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.tokens(tokens) + self.positions(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2)


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), biases 0 (LayerNorm keeps its ones and zeros)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
