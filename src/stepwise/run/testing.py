"""The test split after fitting (`trainer.test`): the weights `trainer.monitor` chose
(checkpoints/best.pt, with the callbacks' state it holds), else the final ones, evaluated on
every rank's shard of the test split with
validation's exact reductions (stepwise/loop/validation.py), and logged as `test/*` into the run's
own MLflow run at its final global_step, with the tag `stepwise.tested` saying which weights:
`best at global_step N (checkpoints/best.pt, <monitor>=<value>)` or `final at global_step N`.

A job stopped during the test evaluation (after its final checkpoint) and run again resumes from
that checkpoint, trains no further, and evaluates the test split again: the same numbers, at the
same step.
"""

from __future__ import annotations

import logging
from typing import Any

from stepwise.data.loaders import eval_loader, split_samples, worker_settings
from stepwise.run.checkpoint import BEST_FILE, load_checkpoint

log = logging.getLogger(__name__)

TESTED_TAG = "stepwise.tested"  # which weights the test/* metrics are of


def held_out_loader(job: Any, replica: Any):
    """This process's shard of the test split, in validation's batches (None: no test split)."""
    from stepwise.loop.precision import param_dtype

    workers = worker_settings(replica.device, job.config.data.num_workers,
                              job.config.data.prefetch_factor)
    return eval_loader(job.data, "test", job.plan.per_device_batch_size * replica.blocks_per_process,
                       replica, param_dtype(job.config.trainer.precision), **workers)


def best_state(job: Any, trainer: Any) -> dict[str, Any] | None:
    """checkpoints/best.pt when `trainer.monitor` chose an evaluation and the file holds it; None:
    test the final weights (a warning says why, when a monitor was set)."""
    if trainer.best is None:
        return None
    monitor = trainer.best.monitor
    if monitor.best_step is None:
        log.warning("no evaluation gave a finite %s: the final weights are tested", monitor.name)
        return None
    path = job.run_dir / "checkpoints" / BEST_FILE
    state = load_checkpoint(path) if path.exists() else None
    if state is None or state["global_step"] != monitor.best_step:
        log.warning("%s does not hold the best evaluation (%s at global_step %d): the final "
                    "weights are tested", path, monitor.name, monitor.best_step)
        return None
    return state


def evaluate_test_split(job: Any, trainer: Any, tracker: Any) -> dict[str, float]:
    """Evaluate the chosen weights on the test split and log `test/*` (collective: every rank
    calls it); the model holds its final weights again afterwards. {} without a test split or
    with `trainer.test=false`."""
    if not job.config.trainer.test or split_samples(job.data, "test") == 0:
        return {}
    replica, step = trainer.replica, trainer.counters.global_step
    loader = held_out_loader(job, replica)
    best = best_state(job, trainer)
    if best is None:
        tested = f"final at global_step {step}"
        metrics = trainer.evaluate_with_callbacks("test", loader)
    else:
        tested = (f"best at global_step {best['global_step']} (checkpoints/{BEST_FILE}, "
                  f"{best['monitor']}={best['best_value']:.6g})")
        final = replica.weights_copy(trainer.model)
        replica.load_model_state(trainer.model, best["model"])
        # the callbacks' state of that evaluation too: the EMA's weights then give test_ema/*
        trainer.callbacks.load_state_dict(best.get("callbacks"))
        try:
            metrics = trainer.evaluate_with_callbacks("test", loader)
        finally:
            replica.restore_weights(trainer.model, final)
    tracker.log_metrics(metrics, step=step)
    tracker.set_tags({TESTED_TAG: tested})
    tracker.flush()
    if replica.is_main:
        log.info("tested on the test split (%d samples), weights %s: %s",
                 split_samples(job.data, "test"), tested,
                 ", ".join(f"{key}={value:.6g}" for key, value in metrics.items()))
    return metrics
