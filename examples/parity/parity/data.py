"""Token sequences of variable length whose label is the parity most of their tokens have.

Token 0 is padding; real tokens are 1..vocab_size-1. The label is 1 when more tokens are even
than odd, else 0 (a tie is 0). Each sequence leans towards one parity (3 of 4 tokens on
average), so the rule is clear in most samples, and a bag-of-tokens model (which sees token
frequencies) can learn it in a few epochs.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

PAD_ID = 0


class ParitySequences(Dataset):
    """`size` sequences of `min_len`..`max_len` tokens, the same for the same `seed`.

    Item i is `{"tokens": LongTensor (L_i,), "target": LongTensor ()}`.
    """

    num_classes = 2

    def __init__(self, size: int, seed: int, min_len: int = 3, max_len: int = 40,
                 vocab_size: int = 16, lean: float = 0.75) -> None:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be at least 3 (padding, one odd, one even), got {vocab_size}")
        generator = torch.Generator().manual_seed(seed)
        real = torch.arange(1, vocab_size)
        by_parity = (real[real % 2 == 1], real[real % 2 == 0])  # (odd, even)
        self.sequences: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        for _ in range(size):
            length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
            leaning = int(torch.randint(0, 2, (), generator=generator))
            from_lean = torch.rand(length, generator=generator) < lean
            tokens = torch.empty(length, dtype=torch.int64)
            for parity, chosen in ((leaning, from_lean), (1 - leaning, ~from_lean)):
                pool = by_parity[parity]
                picks = torch.randint(0, len(pool), (int(chosen.sum()),), generator=generator)
                tokens[chosen] = pool[picks]
            even = int((tokens % 2 == 0).sum())
            self.sequences.append(tokens)
            self.targets.append(torch.tensor(int(even > length - even)))

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.sequences[index], "target": self.targets[index]}


def pad_collate(samples: list[dict[str, torch.Tensor]], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch.

    Returns:
        `{"tokens": (N, Lmax) int64, "mask": (N, Lmax) bool (True on real tokens), "target": (N,) int64}`.
    """
    lengths = torch.tensor([len(s["tokens"]) for s in samples])
    tokens = torch.full((len(samples), int(lengths.max())), pad_id, dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens[row, : len(sample["tokens"])] = sample["tokens"]
    mask = torch.arange(tokens.shape[1]) < lengths[:, None]
    target = torch.stack([s["target"] for s in samples]).to(torch.int64)
    return {"tokens": tokens, "mask": mask, "target": target}
