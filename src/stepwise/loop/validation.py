"""Validation (and test): exact metrics over an evaluation split, reduced over ranks as sums and
counts (and torchmetrics states), never as means of means. `val/loss` is the mean over the real
items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stepwise.data.batches import call_model, to_device
from stepwise.models.losses import item_mask, masked_sum, per_sample


@torch.no_grad()
def evaluate(model, loader, loss, metrics: dict[str, Any] | None, replica, precision,
             on_device: Callable, prefix: str = "val") -> dict[str, float]:
    """`val/loss`, and `val/<name>` of each torchmetrics metric, or, with `metrics` None, the
    loop's own `val/accuracy` (every real item's argmax).

    Args:
        on_device: puts an (inputs, target) pair where (and in the layout) the model takes it.
        prefix: the metrics' prefix in place of `val` (`test` for the test split).
    """
    model.eval()
    totals = torch.zeros(3, device=replica.device, dtype=torch.float64)  # loss, items, correct
    for inputs, target in loader:
        inputs, target = on_device(*to_device((inputs, target), replica.device))
        with precision.autocast():
            out = call_model(model, inputs)
            values = loss(out, target)
        mask = item_mask(loss, target)
        if mask is None:
            totals[0] += per_sample(values).sum()
            totals[1] += len(values)
        else:
            totals[0] += masked_sum(values, mask, len(values))
            totals[1] += mask.sum()
        if metrics is None:
            hits = out.argmax(1) == target
            totals[2] += (hits if mask is None else hits & mask).sum()
        for metric in (metrics or {}).values():
            metric.update(out.float() if out.is_floating_point() else out, target)
    model.train()
    loss_sum, count, correct = replica.sum(totals).tolist()
    results = {f"{prefix}/loss": loss_sum / max(count, 1)}
    if metrics is None:
        results[f"{prefix}/accuracy"] = correct / max(count, 1)
    for name, metric in (metrics or {}).items():
        value = metric.compute()  # torchmetrics sums the states over ranks first
        metric.reset()
        results.update(scalars(f"{prefix}/{name}", value))
    return results


def scalars(name: str, value: Any) -> dict[str, float]:
    """A metric's value as MLflow metrics: `name` for a scalar, `name/<i>` per element else."""
    value = torch.as_tensor(value).detach().double().cpu()
    if value.numel() == 1:
        return {name: value.item()}
    return {f"{name}/{i}": v for i, v in enumerate(value.flatten().tolist())}
