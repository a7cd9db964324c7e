"""Runs a prepared job in this process: build, train, checkpoint, and close the MLflow run honestly.

Who owns the MLflow run: the process the user started (single, dp, or the parent that spawns DDP
workers), or rank 0 when torchrun or SLURM started every rank. Exactly one process opens it,
logs params and artifacts, and sets its final status.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from hydra.utils import instantiate

from stepwise.checkpoint import save_checkpoint
from stepwise.distributed import Replica, start_replica, stop_replica
from stepwise.job import Job, adapted_optimizer_args, run_params
from stepwise.loaders import make_loaders
from stepwise.tracking import MlflowTracker, NullTracker, default_tracking_uri
from stepwise.trainer import Trainer

log = logging.getLogger(__name__)

DTYPES = {"32": torch.float32, "64": torch.float64}


def open_run(job: Job):
    """Create the job's MLflow run (params and artifacts logged), or a null tracker."""
    cfg = job.config.logger
    if cfg.backend == "none":
        return NullTracker()
    uri = default_tracking_uri(cfg.tracking_uri, job.start_dir)
    tracker = MlflowTracker(uri, cfg.experiment_name, cfg.run_name,
                            tags={"stepwise.run_dir": str(job.run_dir)})
    log.info("MLflow run %s in %s (experiment %s)", tracker.run_id, uri, cfg.experiment_name)
    tracker.log_params(run_params(job))
    for artifact in ("config.yaml", "plan.json"):
        tracker.log_artifact(job.run_dir / artifact)
    return tracker


class _Progress:
    """A null progress bar for ranks other than 0 and for `trainer.progress_bar=false`."""

    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _progress(job: Job, replica: Replica):
    if not (replica.is_main and job.config.trainer.progress_bar):
        return _Progress()
    from tqdm import tqdm

    return tqdm(total=job.plan.total_optimizer_steps, desc="optimizer steps", unit="step",
                disable=None)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def owning_run(job: Job, body) -> Any:
    """Open the MLflow run, call `body(tracker)`, and close the run as it really ended."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    tracker = open_run(job)
    status = "FAILED"
    try:
        result = body(tracker)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def execute(job: Job, log_file: str | None = None) -> dict[str, float]:
    """Run the job: spawn DDP workers if nobody launched us, else train as this process's rank."""
    if job.config.parallel.mode == "ddp" and not job.env.launched:
        from stepwise.launch import spawn

        return owning_run(job, lambda tracker: spawn(job, tracker, log_file))
    replica = start_replica(job.config.parallel, job.config.trainer.device, job.env)
    try:
        if replica.is_main:
            return owning_run(job, lambda tracker: train(job, replica, tracker))
        return train(job, replica, NullTracker())
    finally:
        stop_replica(replica)


def build_trainer(job: Job, replica: Replica, tracker) -> Trainer:
    """Build the model, optimizer, scheduler and loaders from the config, seeded by `seed`."""
    cfg, plan = job.config, job.plan
    dtype = DTYPES[cfg.trainer.precision]
    torch.manual_seed(cfg.seed)
    tree = job.config_dict()
    model = instantiate(tree["model"], in_features=job.data.num_features,
                        out_features=job.data.num_outputs).to(dtype)
    wrapped = replica.wrap(model)
    optimizer = instantiate(tree["optim"])(wrapped.parameters(),
                                           **adapted_optimizer_args(cfg, plan))
    # Stepped once per optimizer step; the factor is a function of the samples seen before it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: plan.schedule.factor(plan.samples_after(step)))
    train_loader, val_loader = make_loaders(job.data, plan, replica, seed=cfg.seed,
                                            num_workers=cfg.data.num_workers, dtype=dtype)
    return Trainer(
        model=wrapped, optimizer=optimizer, scheduler=scheduler, plan=plan, task=job.data.task,
        train_loader=train_loader, val_loader=val_loader, replica=replica, tracker=tracker,
        progress=_progress(job, replica), grad_clip_norm=cfg.trainer.grad_clip_norm,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        val_every_n_epochs=cfg.trainer.val_every_n_epochs,
    )


def train(job: Job, replica: Replica, tracker) -> dict[str, float]:
    """Fit, and write the final checkpoint on the main rank."""
    trainer = build_trainer(job, replica, tracker)
    try:
        metrics = trainer.fit()
    finally:
        trainer.progress.close()
        tracker.flush()
    if replica.is_main:
        save_final_checkpoint(job, trainer)
        log.info("done: %s", ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return metrics


def save_final_checkpoint(job: Job, trainer: Trainer) -> None:
    """`checkpoints/last.pt`: the unwrapped model and what a resume needs (DESIGN section 2)."""
    path = save_checkpoint(job.run_dir / "checkpoints" / "last.pt", {
        "model": Replica.unwrap(trainer.model).state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "global_step": trainer.counters.global_step,
        "epoch": trainer.counters.epoch,
        "samples_seen": trainer.counters.samples_seen,
        "plan": job.plan.to_dict(),
        "config": job.config_dict(),
    })
    log.info("checkpoint: %s", path)
