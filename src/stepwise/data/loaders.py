"""Torch DataLoaders over the arrays: training through the plan's sampler, validation sharded."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stepwise.contract.plan import Plan
from stepwise.contract.sampler import MicroBatchSampler
from stepwise.parallel.replica import Replica


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

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(torch.as_tensor(indices))

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def to(self, device: torch.device) -> TensorPairDataset:
        """The same samples, held on `device` (gathers then run there)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def gather(self, index: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `index` (in page-locked memory when `pin`, ready for an asynchronous
        copy to the GPU)."""
        if index.device != self.x.device:
            index = index.to(self.x.device, non_blocking=True)
        x, y = self.x[index], self.y[index]
        return (x.pin_memory(), y.pin_memory()) if pin else (x, y)


class InMemoryLoader:
    """The training loader for in-memory tensors with `data.num_workers=0`: what DataLoader does
    for them, without its per-batch machinery: one gather per micro-batch from the sampler's
    index array (on the GPU when the data was moved there, else pinned for the copy)."""

    def __init__(self, dataset: TensorPairDataset, batch_sampler: MicroBatchSampler,
                 pin: bool) -> None:
        self.dataset, self.batch_sampler, self.pin = dataset, batch_sampler, pin

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            yield self.dataset.gather(torch.from_numpy(indices), self.pin)


# In-memory training data on a GPU is copied there once, if it takes at most this share of the
# free GPU memory: micro-batches are then gathered on the GPU, with no copy per micro-step.
DEVICE_DATA_SHARE = 0.25


def _fits_on_device(dataset: TensorPairDataset, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return dataset.nbytes <= DEVICE_DATA_SHARE * free


def _as_is(batch):
    return batch


def worker_settings(device: torch.device, num_workers: int, prefetch_factor: int | None,
                    persistent_workers: bool = False) -> dict:
    """A DataLoader's keyword arguments for its worker processes and pinned memory (every
    loader of a run takes the same ones: training, validation, test, eval and predict)."""
    workers = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        workers.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
    return workers


def make_loaders(data, plan: Plan, replica: Replica, *, seed: int, dtype: torch.dtype,
                 num_workers: int = 0, persistent_workers: bool = False,
                 prefetch_factor: int | None = None
                 ) -> tuple[DataLoader | InMemoryLoader, DataLoader | None]:
    """The training loader (this process's micro-batches) and its shard of the validation set.

    `data` is an ArrayData or ImageData, whose `train_set`/`val_set` give datasets whose
    `__getitems__` returns a whole (x, y) batch, or a DatasetData, whose `collate` turns a list
    of samples into (inputs, target).
    """
    workers = worker_settings(replica.device, num_workers, prefetch_factor, persistent_workers)
    train_set = data.train_set(dtype, seed)
    # Built-in data fetches whole (x, y) batches (`__getitems__`); a user's is collated.
    collate = data.collate(dtype) if hasattr(data, "collate") else _as_is
    in_memory = isinstance(train_set, TensorPairDataset) and num_workers == 0
    sampler = MicroBatchSampler(plan, replica.rank, seed, replica.blocks_per_process,
                                with_epoch=getattr(train_set, "keys_with_epoch", False),
                                arrays=in_memory)
    if in_memory and _fits_on_device(train_set, replica.device):
        train = InMemoryLoader(train_set.to(replica.device), sampler, pin=False)
    elif in_memory:
        train = InMemoryLoader(train_set, sampler, pin=workers["pin_memory"])
    else:
        train = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, **workers)
    val = eval_loader(data, "val", plan.per_device_batch_size * replica.blocks_per_process,
                      replica, dtype, collate=collate, **workers)
    return train, val


# The splits a model is evaluated on. A data object has `<split>_samples` and `<split>_set(dtype)`
# for each it holds (none: 0 samples): the validation set, and the held-out test set.
EVAL_SPLITS = ("val", "test")


def split_samples(data, split: str) -> int:
    """How many samples `data` has in `split` (0 when it has no such split)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {EVAL_SPLITS}")
    return int(getattr(data, f"{split}_samples", 0) or 0)


def shard_batches(samples: int, batch: int, replica: Replica) -> list[list[int]]:
    """This process's batches of an evaluation split: contiguous, disjoint shards, so that every
    sample is counted once over all ranks, in sample order within each shard."""
    shard = np.array_split(np.arange(samples), replica.loader_ranks)[replica.rank]
    return [shard[i:i + batch].tolist() for i in range(0, len(shard), batch)]


def eval_loader(data, split: str, batch: int, replica: Replica, dtype: torch.dtype, *,
                collate=None, **workers) -> DataLoader | None:
    """This process's shard of `split` ("val", "test") in batches of `batch` (no augmentation,
    no shuffling), or None when `data` has no samples there."""
    samples = split_samples(data, split)
    if samples == 0:
        return None
    if collate is None:
        collate = data.collate(dtype) if hasattr(data, "collate") else _as_is
    return DataLoader(getattr(data, f"{split}_set")(dtype),
                      batch_sampler=shard_batches(samples, batch, replica), collate_fn=collate,
                      **workers)


def fetch_split(data, split: str, dtype: torch.dtype, indices: list[int]) -> tuple:
    """The samples at `indices` of an evaluation split ("val", "test") as one (inputs, target)
    batch, as its loader gives it."""
    dataset = getattr(data, f"{split}_set")(dtype)
    if hasattr(data, "collate"):
        return data.collate(dtype)([dataset[i] for i in indices])
    return dataset.__getitems__(indices)


def fetch(data, dtype: torch.dtype, seed: int, indices: list[int]) -> tuple:
    """The training samples at `indices` as one (inputs, target) batch, as the loader gives it."""
    dataset = data.train_set(dtype, seed)
    if getattr(dataset, "keys_with_epoch", False):
        indices = [(0, i) for i in indices]
    if hasattr(data, "collate"):
        return data.collate(dtype)([dataset[i] for i in indices])
    return dataset.__getitems__(indices)
