"""Callbacks: a user's own behaviour at the loop's hook points, without a fork of the loop.

A callback is a `Callback` subclass named by `_target_` in the `callbacks` group (built-ins in
`stepwise.callbacks`). Each hook is called on every rank, in the order of the config, with a
`RunView`: what the callback may read of the run. A callback must not change the batch, the
counters, the LR or the weights (one that evaluates other weights, as the EMA does, puts the
model's back before it returns), and must not step the optimizer: the batch arithmetic is exact
only if the loop alone does those. Stepping the optimizer inside a hook is refused, naming the
callback; the batch and the counters are out of a callback's reach.

Torch-free at import: a dry run of vector data imports no torch (DESIGN rule "dry_run").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Callback:
    """Override the hooks you need; each is called on every rank.

    `state_dict` / `load_state_dict` are the callback's own state: saved in every checkpoint
    (and best.pt), loaded on resume before `on_fit_start`, so that a resumed run continues
    exactly. Keep it to tensors, numbers, strings and lists/dicts of them: checkpoints are read
    with `torch.load(weights_only=True)`.

    `evaluates`: a callback that evaluates other weights at each evaluation (the EMA) names the
    suffix of their metrics here (`ema`: `val_ema/*`, `test_ema/*`), so that `trainer.monitor`
    may name them before any work. Its `state_dict` then holds `evaluates` and `weights` (the
    bare model's full state dict): with `trainer.monitor=val_<suffix>/...`, those weights in
    best.pt are the best model that MLflow logs.
    """

    evaluates: str | None = None

    def on_fit_start(self, run: RunView) -> None:
        """Before the first optimizer step (or the first one after a resume)."""

    def on_step_end(self, run: RunView, logged: bool) -> None:
        """After each optimizer step (never per micro-step), its `global_step` counted.

        `logged`: this step's train metrics are logged (`trainer.log_every_n_steps`): the place to
        read the device (`.item()`) and log, which costs a host sync at any other step.
        """

    def on_evaluation_end(self, run: RunView, split: str, metrics: dict[str, float]
                          ) -> dict[str, float] | None:
        """After each evaluation of `split` (`val`, or `test` after fitting), with its metrics
        (reduced over ranks). Returns metrics to add to them (logged with them, seen by
        `trainer.monitor`), or None."""
        return None

    def on_fit_end(self, run: RunView, metrics: dict[str, float]) -> None:
        """After the last step, its evaluation and the check against the plan."""

    def on_exception(self, run: RunView, error: BaseException) -> None:
        """The run failed or was stopped by a signal (`error`); it is raised on after the hooks."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called on resume, before `on_fit_start`, with what `state_dict` returned."""


class CallbackMisuse(RuntimeError):
    """A callback did what the loop alone may do (step the optimizer)."""


class RunView:
    """What a callback reads of the run: the plan, the counters, the LR, the model, the tracker
    and the replica. Attributes are read-only; the objects behind them are the run's own.

    Args:
        trainer: the loop (stepwise/loop/trainer.py).
        run_dir: the run directory (None: a run without one, as in some tests).
        batch: `(split, indices) -> (inputs, target)`, the samples of an evaluation split as
            its loader gives them (on the CPU).
    """

    def __init__(self, trainer: Any, run_dir: Any = None,
                 batch: Callable[[str, list[int]], tuple[Any, Any]] | None = None) -> None:
        self._trainer, self._run_dir, self._batch = trainer, run_dir, batch
        self._loaders: dict[str, Any] = {}

    plan = property(lambda self: self._trainer.plan, doc="the batch plan (contract/plan.py)")
    global_step = property(lambda self: self._trainer.counters.global_step)
    epoch = property(lambda self: self._trainer.counters.epoch)
    samples_seen = property(lambda self: self._trainer.counters.samples_seen)
    items_seen = property(lambda self: self._trainer.counters.items_seen)
    micro_steps = property(lambda self: self._trainer.counters.micro_steps)
    lr = property(lambda self: self._trainer.last_lr, doc="the LR of the last optimizer step")
    model = property(lambda self: self._trainer.model, doc="the model, wrapped for the mode")
    optimizer = property(lambda self: self._trainer.optimizer, doc="read it; never step it")
    tracker = property(lambda self: self._trainer.tracker, doc="MLflow on rank 0, else null")
    replica = property(lambda self: self._trainer.replica, doc="rank, world size, reductions")
    is_main = property(lambda self: self._trainer.replica.is_main)
    run_dir = property(lambda self: self._run_dir)

    @property
    def module(self) -> Any:
        """The bare model (unwrapped from DP, DDP or torch.compile; FSDP's is sharded)."""
        return self._trainer.replica.unwrap(self._trainer.model)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log through the run's outbox (rank 0; a no-op elsewhere), at `global_step` by default."""
        self._trainer.tracker.log_metrics(metrics, step=self.global_step if step is None else step)

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        """Log a file (rank 0): it is sent later, so keep it in place (the run dir)."""
        self._trainer.tracker.log_artifact(path, artifact_path)

    def evaluate(self, split: str = "val") -> dict[str, float]:
        """`<split>/*` of the model's current weights on `split` (collective: every rank): `val`
        at any time, `test` inside the test split's `on_evaluation_end`."""
        loader = self._loaders.get(split, self._trainer.val_loader if split == "val" else None)
        if loader is None:
            raise ValueError(f"no {split} split to evaluate here (the val split when the data has "
                             "one; the test split only in its on_evaluation_end, after fitting)")
        return self._trainer.evaluate(split, loader)

    def batch(self, split: str, indices: list[int]) -> tuple[Any, Any]:
        """The samples `indices` of `split` as one (inputs, target) batch on the device."""
        from stepwise.data.batches import to_device

        if self._batch is None:
            raise RuntimeError("this run gives callbacks no samples")
        device = self._trainer.replica.device
        return self._trainer._on_device(*to_device(self._batch(split, indices), device))


class Callbacks:
    """The configured callbacks, called in order at each hook; an empty one costs the loop
    nothing (it checks `if trainer.callbacks` before each call).

    Args:
        callbacks: {name: Callback}, in the order of the config.
        run_dir, batch: what their `RunView` gives besides the trainer's own (see RunView).
    """

    def __init__(self, callbacks: dict[str, Callback], run_dir: Any = None,
                 batch: Callable[[str, list[int]], tuple[Any, Any]] | None = None) -> None:
        self.callbacks, self.run_dir, self.batch = dict(callbacks), run_dir, batch
        self.view: RunView | None = None
        self._running: str | None = None  # "name.hook" while a hook runs

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def attach(self, trainer: Any) -> None:
        """Give them a view of `trainer`, and refuse an optimizer step taken inside a hook."""
        self.view = RunView(trainer, self.run_dir, self.batch)
        if self.callbacks:
            trainer.optimizer.register_step_pre_hook(self._refuse_step)

    def _refuse_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._running is not None:
            raise CallbackMisuse(f"callback {self._running} stepped the optimizer: the loop alone "
                                 "steps it, once per window (DESIGN section 1); fix: leave the "
                                 "weights to the loop, or keep your own copy of them")

    @contextlib.contextmanager
    def _in(self, name: str, hook: str) -> Iterator[None]:
        self._running = f"{name}.{hook}"
        try:
            yield
        except Exception as err:
            err.add_note(f"in callback {name} ({type(self.callbacks[name]).__name__}.{hook})")
            raise
        finally:
            self._running = None

    def fit_start(self) -> None:
        for name, callback in self.callbacks.items():
            with self._in(name, "on_fit_start"):
                callback.on_fit_start(self.view)

    def step_end(self, logged: bool) -> None:
        for name, callback in self.callbacks.items():
            with self._in(name, "on_step_end"):
                callback.on_step_end(self.view, logged)

    def evaluation_end(self, split: str, metrics: dict[str, float], loader: Any = None
                       ) -> dict[str, float]:
        """The metrics the callbacks add to the evaluation of `split` (whose loader is `loader`)."""
        added: dict[str, float] = {}
        self.view._loaders[split] = loader
        for name, callback in self.callbacks.items():
            with self._in(name, "on_evaluation_end"):
                added.update(callback.on_evaluation_end(self.view, split, {**metrics, **added})
                             or {})
        return added

    def fit_end(self, metrics: dict[str, float]) -> None:
        for name, callback in self.callbacks.items():
            with self._in(name, "on_fit_end"):
                callback.on_fit_end(self.view, metrics)

    def exception(self, error: BaseException) -> None:
        """Every callback hears of it; one that fails here does not hide `error`."""
        for name, callback in self.callbacks.items():
            try:
                with self._in(name, "on_exception"):
                    callback.on_exception(self.view, error)
            except Exception as err:  # the run's own error is the one to raise
                error.add_note(f"callback {name}.on_exception raised {type(err).__name__}: {err}")

    def state_dict(self) -> dict[str, Any]:
        """{name: its state} (collective where a callback's is: called on every rank)."""
        return {name: callback.state_dict() for name, callback in self.callbacks.items()}

    def load_state_dict(self, states: dict[str, Any] | None) -> list[str]:
        """Load each callback's saved state; returns the names the checkpoint had no state for."""
        states = states or {}
        for name, callback in self.callbacks.items():
            if name in states:
                callback.load_state_dict(states[name])
        return [name for name in self.callbacks if name not in states]
