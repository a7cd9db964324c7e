"""Loss items that the data states per sample (e.g. the target tokens of each sequence): every
window's item count from the plan and the seed, with no communication (DESIGN section 4).

Pure: numpy and the plan, no torch. A window of an epoch is a run of consecutive positions of
that epoch's permutation (stepwise/contract/sampler.py), so its count is the sum of its samples' counts.
Without stated counts, the loop counts the loaded window's items instead (trainer.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepwise.contract.errors import ConfigError
from stepwise.contract.plan import Plan
from stepwise.contract.sampler import epoch_permutation


class ItemPlan:
    """Per-window item counts of a plan, for per-sample `counts` and the run's `seed`.

    Args:
        counts: the loss items of each training sample (int, one per sample, >= 0).
        plan: the batch plan (its windows are cut from each epoch's permutation).
        seed: the run's seed (the permutation of epoch e is `epoch_permutation(N, seed, e)`).
    """

    def __init__(self, counts: Any, plan: Plan, seed: int) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.plan, self.seed = plan, seed
        self._epoch: tuple[int, np.ndarray] | None = None  # the last epoch's window counts
        self.total_items = self.items_after(plan.total_optimizer_steps)

    def windows(self, epoch: int) -> np.ndarray:
        """The item count of each optimizer-step window of `epoch`, in order."""
        if self._epoch is None or self._epoch[0] != epoch:
            plan = self.plan
            used = self.counts[self.permutation(epoch)[:plan.samples_per_epoch]]
            starts = np.arange(0, plan.samples_per_epoch, plan.effective_batch_size)
            self._epoch = epoch, np.add.reduceat(used, starts)
        return self._epoch[1]

    def window(self, epoch: int, step_in_epoch: int) -> int:
        return int(self.windows(epoch)[step_in_epoch])

    def permutation(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.plan.train_samples, self.seed, epoch)

    def samples_of(self, epoch: int, step_in_epoch: int) -> list[int]:
        """The dataset indices of a window's samples (for error messages)."""
        start = step_in_epoch * self.plan.effective_batch_size
        window = self.plan.window(step_in_epoch)
        return self.permutation(epoch)[start:start + window.samples].tolist()

    def items_after(self, steps: int) -> int:
        """`items_seen` once `steps` optimizer steps have run from the start of training."""
        per_epoch = self.plan.optimizer_steps_per_epoch
        epochs, rest = divmod(steps, per_epoch)
        if self.plan.samples_per_epoch == self.plan.train_samples:  # every sample, every epoch
            total = epochs * int(self.counts.sum())
        else:
            total = sum(int(self.windows(e).sum()) for e in range(epochs))
        return total + (int(self.windows(epochs)[:rest].sum()) if rest else 0)

    def rows(self) -> list[tuple[str, Any]]:
        """Lines for the plan's table."""
        counts = self.counts
        return [("items per sample", f"{int(counts.min())}..{int(counts.max())}, mean "
                                     f"{counts.mean():.1f} (the data's item_counts)"),
                ("total items", self.total_items)]


def item_plan(data: Any, plan: Plan, seed: int) -> ItemPlan | None:
    """The ItemPlan of data whose training set states `item_counts`, else None (counted)."""
    counts = getattr(data, "item_counts", None)
    if counts is None:
        return None
    counts = np.asarray(counts)
    if counts.shape != (plan.train_samples,) or not np.issubdtype(counts.dtype, np.integer) \
            or (counts < 0).any():
        raise ConfigError("data.train", "item_counts", f"must be one integer >= 0 per training "
                          f"sample ({plan.train_samples}); got shape {counts.shape} of "
                          f"{counts.dtype}", "give the dataset an item_counts array of its "
                          "samples' loss items (e.g. target tokens), or none to count them")
    return ItemPlan(counts, plan, seed)
