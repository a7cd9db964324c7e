"""Runs a prepared job in this process: build, resume, train, checkpoint, and close the MLflow run
as it really ended.

Who owns the MLflow run: the process the user started (single, dp, or the parent that spawns DDP
workers), or rank 0 when torchrun or SLURM started every rank. Exactly one process opens it (or
reopens the checkpoint's run on resume), logs params and artifacts, and sets its final status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from stepwise.build import build_trainer
from stepwise.checkpoint import load_checkpoint
from stepwise.distributed import Replica, resolve_device, start_replica, stop_replica
from stepwise.job import Job, run_params
from stepwise.signals import STOP, stop_in
from stepwise.tracking import MlflowTracker, NullTracker, default_tracking_uri
from stepwise.trainer import NullProgress

log = logging.getLogger(__name__)


def resume_state(job: Job) -> dict[str, Any] | None:
    """The checkpoint this job continues, checked against its config (ConfigError if foreign)."""
    if job.resume_from is None:
        return None
    from stepwise.resume import check_compatible

    state = load_checkpoint(job.resume_from)
    check_compatible(job.resume_from, state, job.config_dict(), job.plan.to_dict())
    return state


def open_run(job: Job, resumed: dict[str, Any] | None = None):
    """Create the job's MLflow run (params and artifacts logged), reopen the run of the checkpoint
    it resumes, or return a null tracker with `logger=none`."""
    cfg = job.config.logger
    if cfg.backend == "none":
        return NullTracker()
    uri = default_tracking_uri(cfg.tracking_uri, job.start_dir)
    run_id = (resumed or {}).get("mlflow_run_id")
    tags, run_name = {"stepwise.run_dir": str(job.run_dir)}, cfg.run_name
    if job.sweep is not None and job.sweep.tracking_uri == uri:  # a child of the sweep's run
        tags.update(job.sweep.tags())
        run_name = run_name or job.sweep.run_name
    elif job.sweep is not None:
        log.warning("this job logs to %s, its sweep's parent run is in %s: not linked to it",
                    uri, job.sweep.tracking_uri)
    tracker = MlflowTracker(uri, cfg.experiment_name, run_name, run_id=run_id, tags=tags)
    if tracker.resumed:
        log.info("MLflow run %s reopened in %s at global_step %d", tracker.run_id, uri,
                 resumed["global_step"])
        return tracker
    log.info("MLflow run %s in %s (experiment %s)", tracker.run_id, uri, cfg.experiment_name)
    tracker.log_params(run_params(job))
    for artifact in ("config.yaml", "plan.json"):
        tracker.log_artifact(job.run_dir / artifact)
    return tracker


def _progress(job: Job, replica: Replica, done: int):
    if not (replica.is_main and job.config.trainer.progress_bar):
        return NullProgress()
    from tqdm import tqdm

    return tqdm(total=job.plan.total_optimizer_steps, initial=done, desc="optimizer steps",
                unit="step", disable=None)


def owning_run(job: Job, body: Callable[[Any], Any], resumed: dict[str, Any] | None):
    """Open (or reopen) the MLflow run, call `body(tracker)`, and close the run as it ended.

    A stop signal that arrives while the run is being opened or closed is honoured once it is
    open (KILLED), or ignored once it is closed (the job is over): never a run left RUNNING.
    """
    with STOP.deferred():
        tracker = open_run(job, resumed)
    status = "FAILED"
    try:
        STOP.raise_pending()
        result = body(tracker)
        status = "FINISHED"
        return result
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or stop_in(err) is not None:
            status = "KILLED"
        raise
    finally:
        with STOP.deferred():
            tracker.finish(status)


def execute(job: Job, log_file: str | None = None) -> dict[str, float]:
    """Run the job: spawn DDP workers if nobody launched us, else train as this process's rank."""
    from stepwise.autobatch import fit_batch_size

    if job.config.parallel.mode == "ddp" and not job.env.launched:
        from stepwise.launch import spawn

        # Tried once, here, on the device of local rank 0; the workers get the job as decided.
        job = fit_batch_size(job, resolve_device(job.config.trainer.device))
        resumed = resume_state(job)
        return owning_run(job, lambda tracker: spawn(job, tracker, log_file), resumed)
    replica = start_replica(job.config.parallel, job.config.trainer.device, job.env)
    try:
        job = fit_batch_size(job, replica.device, replica)
        resumed = resume_state(job)
        if replica.is_main:
            result = owning_run(job, lambda tracker: train(job, replica, tracker, resumed),
                                resumed)
        else:
            result = train(job, replica, NullTracker(), resumed)
    except BaseException as err:
        # After a checkpoint every rank stopped at the same step and they leave together; after
        # a failure, or a signal during start-up, each rank is somewhere else: leave without a
        # collective.
        stop = stop_in(err)
        stop_replica(replica, failed=stop is None or not stop.checkpointed)
        raise
    stop_replica(replica)
    return result


def train(job: Job, replica: Replica, tracker, resumed: dict[str, Any] | None = None
          ) -> dict[str, float]:
    """Fit from scratch or from `resumed`, and write the final checkpoint.

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
    if replica.is_main:
        log.info("done: %s", ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return metrics
