"""Torch DataLoaders over the arrays: training through the plan's sampler, validation sharded."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stepwise.data import MicroBatchSampler
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


def make_loaders(data, plan: Plan, replica: Replica, *, seed: int, dtype: torch.dtype,
                 num_workers: int = 0, persistent_workers: bool = False,
                 prefetch_factor: int | None = None) -> tuple[DataLoader, DataLoader | None]:
    """The training loader (this process's micro-batches) and its shard of the validation set.

    `data` is an ArrayData or ImageData: its `train_set`/`val_set` give datasets whose
    `__getitems__` returns a whole (x, y) batch.
    """
    workers = {"num_workers": num_workers, "pin_memory": replica.device.type == "cuda"}
    if num_workers > 0:
        workers.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
    train_set = data.train_set(dtype, seed)
    sampler = MicroBatchSampler(plan, replica.rank, seed, replica.blocks_per_process,
                                with_epoch=getattr(train_set, "keys_with_epoch", False))
    train = DataLoader(train_set, batch_sampler=sampler, collate_fn=_as_is, **workers)
    if data.val_samples == 0:
        return train, None
    # Contiguous, disjoint shards: every validation sample is counted once over all ranks.
    shard = np.array_split(np.arange(data.val_samples), replica.loader_ranks)[replica.rank]
    batch = plan.per_device_batch_size * replica.blocks_per_process
    batches = [shard[i:i + batch].tolist() for i in range(0, len(shard), batch)]
    val = DataLoader(data.val_set(dtype), batch_sampler=batches, collate_fn=_as_is, **workers)
    return train, val
