"""Runs a prepared job in this process: build, train, checkpoint, and close the MLflow run honestly."""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from hydra.utils import instantiate

from stepwise.checkpoint import save_checkpoint
from stepwise.distributed import Replica, resolve_device
from stepwise.job import Job, run_params
from stepwise.loaders import make_loaders
from stepwise.tracking import MlflowTracker, NullTracker, default_tracking_uri
from stepwise.trainer import Trainer

log = logging.getLogger(__name__)

DTYPES = {"32": torch.float32, "64": torch.float64}


def open_tracker(job: Job, replica: Replica):
    """The job's MLflow run on the main rank; a null tracker elsewhere or with `logger=none`."""
    cfg = job.config.logger
    if not replica.is_main or cfg.backend == "none":
        return NullTracker()
    uri = default_tracking_uri(cfg.tracking_uri, job.start_dir)
    tracker = MlflowTracker(uri, cfg.experiment_name, cfg.run_name,
                            tags={"stepwise.run_dir": str(job.run_dir)})
    log.info("MLflow run %s in %s (experiment %s)", tracker.run_id, uri, cfg.experiment_name)
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


def execute(job: Job) -> dict[str, float]:
    """Train the job in a single process and close its MLflow run as it really ended."""
    replica = Replica("single", 0, 1, resolve_device(job.config.trainer.device))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    tracker = open_tracker(job, replica)
    status = "FAILED"
    try:
        metrics = train(job, replica, tracker)
        status = "FINISHED"
        return metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)


def build_trainer(job: Job, replica: Replica, tracker) -> Trainer:
    """Build the model, optimizer, scheduler and loaders from the config, seeded by `seed`."""
    cfg, plan = job.config, job.plan
    dtype = DTYPES[cfg.trainer.precision]
    torch.manual_seed(cfg.seed)
    tree = job.config_dict()
    model = instantiate(tree["model"], in_features=job.data.num_features,
                        out_features=job.data.num_outputs).to(dtype)
    wrapped = replica.wrap(model)
    optimizer = instantiate(tree["optim"])(wrapped.parameters(), lr=plan.lr)
    # Constant for now; stepped once per optimizer step, so schedules slot in unchanged.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
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
    """Log the job's params and artifacts, fit, and write the final checkpoint."""
    tracker.log_params(run_params(job))
    for artifact in ("config.yaml", "plan.json"):
        tracker.log_artifact(job.run_dir / artifact)
    trainer = build_trainer(job, replica, tracker)
    try:
        metrics = trainer.fit()
    finally:
        trainer.progress.close()
    if replica.is_main:
        save_final_checkpoint(job, trainer)
    log.info("done: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
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
