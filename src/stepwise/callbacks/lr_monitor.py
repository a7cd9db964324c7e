"""`callbacks=lr_monitor`: each parameter group's learning rate and momentum at the logged steps."""

from __future__ import annotations

from typing import Any

from stepwise.loop.callbacks import Callback, RunView


def group_values(optimizer: Any) -> dict[str, float]:
    """`lr/<group>` and, where the optimizer has one, `momentum/<group>` (SGD's momentum, or
    Adam's beta1), for each parameter group; a group is named by its `name` key, else its index."""
    values = {}
    for index, group in enumerate(optimizer.param_groups):
        name = group.get("name", str(index))
        values[f"lr/{name}"] = float(group["lr"])
        if "momentum" in group:
            values[f"momentum/{name}"] = float(group["momentum"])
        elif "betas" in group:
            values[f"momentum/{name}"] = float(group["betas"][0])
    return values


class LRMonitor(Callback):
    """Logs `group_values` at each logged step (`trainer.log_every_n_steps`): the values the
    optimizer step of that `global_step` applied, read from the host (no device sync)."""

    def __init__(self) -> None:
        self._applied: dict[str, float] = {}

    def on_fit_start(self, run: RunView) -> None:
        self._applied = group_values(run.optimizer)

    def on_step_end(self, run: RunView, logged: bool) -> None:
        # The scheduler has already set the next step's LR: the step taken used the one before.
        applied, self._applied = self._applied, group_values(run.optimizer)
        if logged:
            run.log_metrics(applied)
