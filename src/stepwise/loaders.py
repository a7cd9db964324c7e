"""Torch DataLoaders over the arrays: training through the plan's sampler, validation sharded."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stepwise.data import ArrayData, MicroBatchSampler
from stepwise.distributed import Replica
from stepwise.plan import Plan


class TensorPairDataset(Dataset):
    """(x, y) tensors; `__getitems__` fetches a whole micro-batch with one indexing operation."""

    def __init__(self, x: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> None:
        self.x = torch.as_tensor(x).to(dtype)
        y = torch.as_tensor(y)
        self.y = y.to(dtype) if y.is_floating_point() else y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.x[index], self.y[index]


def _as_is(batch):
    return batch


def make_loaders(data: ArrayData, plan: Plan, replica: Replica, *, seed: int, num_workers: int,
                 dtype: torch.dtype) -> tuple[DataLoader, DataLoader | None]:
    """The training loader (this process's micro-batches) and its shard of the validation set."""
    pin = replica.device.type == "cuda"
    train = DataLoader(
        TensorPairDataset(data.x_train, data.y_train, dtype),
        batch_sampler=MicroBatchSampler(plan, replica.rank, seed, replica.blocks_per_process),
        num_workers=num_workers, collate_fn=_as_is, pin_memory=pin,
    )
    if len(data.x_val) == 0:
        return train, None
    # Contiguous, disjoint shards: every validation sample is counted once over all ranks.
    shard = np.array_split(np.arange(len(data.x_val)), replica.loader_ranks)[replica.rank]
    val_set = TensorPairDataset(data.x_val[shard], data.y_val[shard], dtype)
    batch = plan.per_device_batch_size * replica.blocks_per_process
    val = DataLoader(val_set, batch_size=batch, shuffle=False, num_workers=num_workers,
                     collate_fn=_as_is, pin_memory=pin)
    return train, val
