"""One replica's training: build the parts, resume if asked, fit, write the final checkpoint,
evaluate the test split."""

from __future__ import annotations

import logging
from typing import Any

from stepwise.loop.signals import STOP
from stepwise.loop.trainer_parts import NullProgress
from stepwise.parallel.replica import Replica
from stepwise.run.build import build_trainer
from stepwise.run.model_log import log_run_models
from stepwise.run.testing import evaluate_test_split

log = logging.getLogger("stepwise.run.runner")


def _progress(job, replica: Replica, done: int):
    if not (replica.is_main and job.config.trainer.progress_bar):
        return NullProgress()
    from tqdm import tqdm

    return tqdm(total=job.plan.total_optimizer_steps, initial=done, desc="optimizer steps",
                unit="step", disable=None)


def _model_to_log(job, replica: Replica, model):
    """The trained model as one process can log it: the bare module, or under FSDP an unsharded
    copy built on rank 0 from the full state dict that every rank gathers (rank 0 alone cannot
    run a sharded module: its forward all-gathers, and the run hung until the others left)."""
    if replica.mode != "fsdp":
        return Replica.unwrap(model)
    if not (job.config.logger.backend == "mlflow" and job.config.logger.log_model):
        return None
    from stepwise.loop.precision import param_dtype
    from stepwise.parallel.fsdp import full_model_state
    from stepwise.run.build import build_model

    state = full_model_state(model)
    if not replica.is_main:
        return None
    plain = build_model(job.config, job.data).to(param_dtype(job.config.trainer.precision))
    plain.load_state_dict(state)
    return plain


def train(job, replica: Replica, tracker, resumed: dict[str, Any] | None = None
          ) -> dict[str, float]:
    """Fit from scratch or from `resumed`, write the final checkpoint, and evaluate the test
    split (`trainer.test`). Returns the final metrics: the last evaluation's, `best/*`, `test/*`
    and `global_step`.

    From the first step on, a stop signal is recorded and honoured after the step it arrives in;
    one that arrives after the last step changes nothing (the run is complete).
    """
    STOP.install()
    trainer = build_trainer(job, replica, tracker)
    if resumed is not None:
        trainer.load_state_dict(resumed)
        log.info("resumed from %s at global_step %d (epoch %d, step %d of it)", job.resume_from,
                 trainer.counters.global_step, trainer.counters.epoch,
                 trainer.counters.step_in_epoch)
    trainer.progress = _progress(job, replica, trainer.counters.global_step)
    with STOP.deferred():
        try:
            metrics = trainer.fit()
        finally:
            trainer.progress.close()
            tracker.flush()
        trainer.save(trainer)
        tested = evaluate_test_split(job, trainer, tracker)
        metrics = {**{k: v for k, v in metrics.items() if k != "global_step"}, **tested,
                   "global_step": metrics["global_step"]}
        model = _model_to_log(job, replica, trainer.model)
        if replica.is_main:
            log_run_models(job, model, tracker, trainer.counters.global_step)
    if replica.is_main:
        log.info("done: %s", ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return metrics
