"""Runs a prepared job in this process: build, resume, train, checkpoint, and close the MLflow run
as it really ended.

Who owns the MLflow run: the process the user started (single, dp, or the parent that spawns DDP
workers), or rank 0 when torchrun or SLURM started every rank. Exactly one process opens it (or
reopens the checkpoint's run on resume), logs params and artifacts, and sets its final status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from stepwise.loop.signals import STOP, stop_in
from stepwise.parallel.replica import resolve_device, start_replica, stop_replica
from stepwise.run.fit import train
from stepwise.run.job import Job, run_params
from stepwise.run.resume import resume_state
from stepwise.tracking import provenance
from stepwise.tracking.outbox import UNSENT_DIR
from stepwise.tracking.tracker import MlflowTracker, NullTracker, default_tracking_uri

log = logging.getLogger(__name__)


def open_run(job: Job, resumed: dict[str, Any] | None = None):
    """Create the job's MLflow run (named, with its provenance tags, params and artifacts),
    reopen the run of the checkpoint it resumes, or return a null tracker with `logger=none`."""
    cfg = job.config.logger
    if cfg.backend == "none":
        return NullTracker()
    uri = default_tracking_uri(cfg.tracking_uri, job.start_dir)
    run_id = (resumed or {}).get("mlflow_run_id") or _unfinished_run(job)
    overrides = _overrides(job)
    tags = {"stepwise.run_dir": str(job.run_dir)}
    run_name = cfg.run_name
    if job.sweep is not None and job.sweep.tracking_uri == uri:  # a child of the sweep's run
        tags.update(job.sweep.tags())
    elif job.sweep is not None:
        log.warning("this job logs to %s, its sweep's parent run is in %s: not linked to it",
                    uri, job.sweep.tracking_uri)
    if run_id is None:  # the tags of a new run; a reopened one has them
        tags.update(provenance.run_tags(job.plan.summary(), overrides, job.start_dir))
        run_name = run_name or provenance.run_name(cfg.experiment_name, overrides, time.time())
    tracker = MlflowTracker(uri, cfg.experiment_name, run_name, run_id=run_id, tags=tags,
                            spool_dir=job.run_dir / UNSENT_DIR,
                            flush_timeout_s=cfg.flush_timeout_s)
    tracker.start_system_metrics(cfg.system_metrics_interval_s)
    if tracker.resumed and resumed is not None:
        log.info("MLflow run %s reopened in %s at global_step %d", tracker.run_id, uri,
                 resumed["global_step"])
        return tracker
    if tracker.resumed:
        log.info("MLflow run %s reopened in %s: stopped before its first checkpoint, it starts "
                 "again from step 0", tracker.run_id, uri)
    else:
        log.info("MLflow run %s in %s (experiment %s); in the UI: %s", tracker.run_id, uri,
                 cfg.experiment_name, tracker.ui_link())
        (job.run_dir / RUN_ID_FILE).write_text(tracker.run_id)
    tracker.log_params(run_params(job))
    for artifact in ("config.yaml", "plan.json"):
        tracker.log_artifact(job.run_dir / artifact)
    return tracker


def _overrides(job: Job) -> list[str]:
    """The job's own command-line overrides (a sweep's job: its share of the sweep)."""
    if job.sweep is not None:
        return list(job.sweep.overrides)
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


RUN_ID_FILE = ".mlflow_run_id"  # the run dir's MLflow run, before it has a checkpoint


def _unfinished_run(job: Job) -> str | None:
    """The MLflow run this run directory opened and left without a checkpoint (a job stopped or
    requeued during start-up, e.g. by a SLURM signal, which may come up to a minute early): its
    requeued job logs into the same run instead of leaving a KILLED one beside a new one."""
    path = job.run_dir / RUN_ID_FILE
    if job.config.trainer.resume != "auto" or not path.exists():
        return None
    return path.read_text().strip() or None


def owning_run(job: Job, body: Callable[[Any], Any], resumed: dict[str, Any] | None,
               log_file: str | None = None):
    """Open (or reopen) the MLflow run, call `body(tracker)`, and close the run as it ended,
    with the job's log attached.

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
            if log_file is not None:
                tracker.log_artifact(log_file)
            tracker.finish(status)


def execute(job: Job, log_file: str | None = None) -> dict[str, float]:
    """Run the job: spawn DDP workers if nobody launched us, else train as this process's rank."""
    from stepwise.run.autobatch import fit_batch_size

    if job.world.spawns:
        from stepwise.run.launch import spawn

        # Tried once, here, on the device of local rank 0; the workers get the job as decided.
        job = fit_batch_size(job, resolve_device(job.config.trainer.device))
        resumed = resume_state(job)
        return owning_run(job, lambda tracker: spawn(job, tracker, log_file), resumed, log_file)
    replica = start_replica(job.world, job.config.parallel, job.config.trainer.device)
    try:
        job = fit_batch_size(job, replica.device, replica)
        resumed = resume_state(job)
        if replica.is_main:
            result = owning_run(job, lambda tracker: train(job, replica, tracker, resumed),
                                resumed, log_file)
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
