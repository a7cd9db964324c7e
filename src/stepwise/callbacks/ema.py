"""`callbacks=ema`: an exponential moving average of the weights, exact under every factoring.

It is updated after each optimizer step, never per micro-step, so that it is a function of the
optimizer steps only: runs that factor the same effective batch differently (b, k, W, mode) end
with the same average, as they end with the same weights (DESIGN section 1, rule 6). Each process
averages the weights it holds, in place and without communication: the whole model under single,
DP and DDP (every rank's copy is the same), its own shards under FSDP (no gather per step).

At each evaluation the average is swapped into the model, evaluated (`val_ema/*`, and `test_ema/*`
after fitting) and swapped out. In checkpoints its state is the average as the bare model's full
state dict (`weights`), the format of the checkpoint's `model`: it loads into the model of any
parallel mode and world size, and is what MLflow logs as the best model when `trainer.monitor`
names a `val_ema/` metric. Under FSDP that state is gathered to rank 0 at each checkpoint, as the
model's full state is for logging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from stepwise.loop.callbacks import Callback, RunView


class EMA(Callback):
    """`ema = decay * ema + (1 - decay) * weights` (as `torch.lerp`) after the optimizer steps that
    are multiples of `every_n_steps`; up to `start_step` the average is the weights themselves.

    Floating-point buffers (BatchNorm's running statistics) are averaged as the parameters are;
    other buffers (counts) are copied.

    Args:
        decay: in [0, 1); the weight of the old average.
        start_step: the optimizer step from which the average moves on its own.
        every_n_steps: update at every n-th optimizer step (by `global_step`).
    """

    evaluates = "ema"  # val_ema/*, test_ema/*

    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay}: must be in [0, 1), e.g. 0.999")
        if start_step < 0:
            raise ValueError(f"start_step={start_step}: must be >= 0 (an optimizer step)")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1")
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self.updates = 0  # the averaging updates made (not the copies before start_step)
        self._run: RunView | None = None
        self._live: dict[str, Any] = {}  # the model's own tensors (this process's shards)
        self._average: dict[str, Any] = {}  # their average, the same shapes and dtypes
        self._pairs: list[tuple[list, list]] = [([], []), ([], [])]  # floats, others
        self._loaded: dict[str, Any] | None = None  # a checkpoint's state, until on_fit_start

    # -- the average -------------------------------------------------------------------------------
    def on_fit_start(self, run: RunView) -> None:
        self._run = run
        self._live = run.replica.local_weights(run.model)
        self._average = {key: value.detach().clone() for key, value in self._live.items()}
        floats = [key for key, value in self._live.items() if value.is_floating_point()]
        others = [key for key in self._live if key not in floats]
        # the lists each update works on, made once: per step, two fused kernels and no Python
        # loop over the tensors
        self._pairs = [([self._average[k] for k in keys], [self._live[k] for k in keys])
                       for keys in (floats, others)]
        if self._loaded is not None:
            self._load(self._loaded)
            self._loaded = None

    def on_step_end(self, run: RunView, logged: bool) -> None:
        import torch

        step = run.global_step
        (average, live), (average_others, live_others) = self._pairs
        if step <= self.start_step:
            torch._foreach_copy_(average + average_others, live + live_others)
        elif step % self.every_n_steps == 0:
            # ema + (1 - decay) * (weights - ema): one pass over each tensor
            torch._foreach_lerp_(average, live, 1 - self.decay)
            if average_others:
                torch._foreach_copy_(average_others, live_others)
            self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the model's place while inside (every rank: it is collective only as
        what runs inside is)."""
        import torch

        keys = list(self._live)
        live = [self._live[k] for k in keys]
        saved = [value.clone() for value in live]
        torch._foreach_copy_(live, [self._average[k] for k in keys])
        try:
            yield
        finally:
            torch._foreach_copy_(live, saved)

    def on_evaluation_end(self, run: RunView, split: str, metrics: dict[str, float]
                          ) -> dict[str, float]:
        with self.swapped():
            averaged = run.evaluate(split)
        prefix = f"{split}/"
        return {f"{split}_{self.evaluates}/{key[len(prefix):]}": value
                for key, value in averaged.items() if key.startswith(prefix)}

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"weights": the average as the bare model's full state dict (on rank 0 under FSDP,
        gathered: collective), "updates", and the keys it was made with}."""
        if self._run is None:  # not started: what it was given, if anything
            return dict(self._loaded or {})
        with self.swapped():  # copied inside: a state dict's tensors may be the model's own
            weights = {key: value.detach().cpu().clone()
                       for key, value in self._run.replica.model_state(self._run.model).items()}
        return {"weights": weights,
                "evaluates": self.evaluates, "updates": self.updates, "decay": self.decay,
                "start_step": self.start_step, "every_n_steps": self.every_n_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._run is None:
            self._loaded = state  # the model is not built yet: at on_fit_start
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        """The saved average into this process's tensors: loaded into the model as a checkpoint's
        `model` is (sharded under FSDP), copied out, and the model's weights put back."""
        import torch

        run = self._run
        self.updates = state["updates"]
        with self.swapped():  # the model's weights are restored on the way out
            run.replica.load_model_state(run.model, state["weights"])
            torch._foreach_copy_(list(self._average.values()), list(self._live.values()))
