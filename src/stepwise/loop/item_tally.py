"""The loss items the loop counts, for a loss that masks them (e.g. padding tokens).

Each window's count over all ranks is needed before its first backward (the mean is over the
window's items). When the data states per-sample counts, the plan knows it (stepwise/contract/items.py)
and nothing is communicated; the counted items are then checked against it. Otherwise each rank
counts its loaded micro-batches and one small all-reduce sums them. Either way this rank's counts
are summed over ranks again only at the loop's checking points (logging, checkpoints, the end).
"""

from __future__ import annotations

import torch

from stepwise.contract.errors import EmptyWindow, PlanMismatch


class ItemTally:
    """Counted items per optimizer step, settled into `Counters.items_seen` at checking points."""

    def __init__(self, replica, loss) -> None:
        self.replica, self.loss = replica, loss
        self.active = False  # the loss masks items: they are not the samples
        # (step, this rank's counted items, the data's count or None) of steps not yet settled
        self.pending: list[tuple[int, torch.Tensor, int | None]] = []

    def window(self, step: int, masks: list[torch.Tensor], planned: int | None):
        """The window's items over all ranks: `planned` (the data's count), or the items of this
        rank's `masks` (of its real samples) summed over ranks, at least 1 (so that a window
        without items has a zero loss, not 0/0; `settle` then fails the run)."""
        self.active = True
        local = sum(mask.sum() for mask in masks).to(torch.float64)
        self.pending.append((step, local, planned))
        return planned if planned is not None else self.replica.sum(local).clamp_min(1)

    def settle(self, counters, plan) -> dict[int, int]:
        """Sum the pending steps' counts over ranks (one all-reduce); add them to `items_seen`,
        or check them against the data's. Returns `items_seen` after each counted step."""
        if not self.pending:
            return {}
        steps, counted, planned = zip(*self.pending)
        self.pending = []
        seen = {}
        for step, got, want in zip(steps, self.replica.sum(torch.stack(counted)).tolist(), planned):
            if want is not None and int(got) != want:
                raise PlanMismatch(f"optimizer step {step}: the loss's item_mask counted {int(got)} "
                                   f"items, the data's item_counts {want}; they must agree (e.g. "
                                   "count the target tokens, not the input tokens)")
            if want is None and got == 0:
                raise EmptyWindow(f"optimizer step {step} (samples {plan.samples_after(step - 1)}.. "
                                  f"of the run) has no loss items: every target of its window is "
                                  f"padding ({self.loss!r})")
            if want is None:
                counters.items_seen += int(got)
                seen[step] = counters.items_seen
        return seen
