"""The order-preserving sampler that turns the plan into per-rank micro-batches (DESIGN rule 1):
numpy only, no torch."""

from __future__ import annotations

from typing import Any

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of the n training indices: a function of (seed, epoch) and n only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class MicroBatchSampler:
    """Yields, for one rank, the index list of each micro-step of an epoch, in plan order.

    Global micro-step j covers permutation[j*b*W : (j+1)*b*W]; this rank takes its block
    (`Plan.shard`). Micro-steps of a dropped partial window are not yielded. An empty block
    yields one padding index, which the loop gives zero weight (see `Plan.shard`).
    Usable as a DataLoader `batch_sampler`; call `set_epoch` before each epoch.
    """

    def __init__(self, plan: Any, rank: int, seed: int, blocks: int = 1,
                 with_epoch: bool = False, arrays: bool = False) -> None:
        self.plan, self.rank, self.seed, self.epoch, self.start = plan, rank, seed, 0, 0
        # DataParallel loads the whole b x W slice in one process: one "rank" spanning W blocks.
        self.blocks = blocks
        # Yield (epoch, index) pairs: datasets that seed augmentation per epoch and sample.
        self.with_epoch = with_epoch
        # Yield int64 arrays (views of the permutation) instead of lists: in-memory tensors.
        self.arrays = arrays

    def set_epoch(self, epoch: int, first_micro_step: int = 0) -> None:
        """Select the epoch, and where in it to start (a resume skips without loading)."""
        self.epoch, self.start = epoch, first_micro_step

    def __len__(self) -> int:
        return self.plan.used_micro_steps_per_epoch() - self.start

    def __iter__(self):
        perm = epoch_permutation(self.plan.train_samples, self.seed, self.epoch)
        for j in range(self.start, self.plan.used_micro_steps_per_epoch()):
            start, stop = self.plan.shard(j, self.rank, self.blocks)
            indices = perm[start:stop] if stop > start else perm[:1]
            if self.arrays:
                yield indices
            elif self.with_epoch:
                yield [(self.epoch, i) for i in indices.tolist()]
            else:
                yield indices.tolist()
