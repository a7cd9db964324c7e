"""The end-of-run check: what the loop executed against what the plan says it would (pure: no
torch). After an early stop (`trainer.early_stopping_patience`), against the plan cut at the
step the run stopped at, which is said in every line it writes."""

from __future__ import annotations

import math
from typing import Any

from stepwise.contract.plan import Plan


def planned_counts(plan: Plan, items: Any, steps: int) -> dict[str, float]:
    """The counts after `steps` optimizer steps of `plan` (its total: its own final counts);
    `items_seen` only with an ItemPlan `items`."""
    if steps == plan.total_optimizer_steps:
        counts = {"global_step": steps, "micro_steps": plan.total_micro_steps,
                  "samples_seen": plan.total_samples, "final lr": plan.final_lr}
    else:
        counts = {"global_step": steps, "micro_steps": plan.micro_steps_after(steps),
                  "samples_seen": plan.samples_after(steps), "final lr": plan.lr_at(steps - 1)}
    counts["real samples processed"] = counts["samples_seen"]
    if items is not None:
        counts["items_seen"] = items.total_items if steps == plan.total_optimizer_steps else \
            items.items_after(steps)
    return counts


def mismatches(executed: dict[str, float], planned: dict[str, float]) -> list[str]:
    """'name: executed x, planned y' for each count of `planned` that `executed` differs in (the
    final LR up to float rounding, the counts exactly)."""
    wrong = []
    for name, want in planned.items():
        got = executed[name]
        same = (math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15) if name == "final lr"
                else got == want)
        if not same:
            wrong.append(f"{name}: executed {got!r}, planned {want!r}" if name == "final lr"
                         else f"{name}: executed {got}, planned {want}")
    return wrong
