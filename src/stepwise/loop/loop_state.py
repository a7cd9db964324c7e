"""The loop's state in a checkpoint: what an exact resume needs (counters, RNG, scheduler,
precision, the monitor's and the callbacks' state), and putting it back."""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from stepwise.loop.trainer_parts import Counters
from stepwise.parallel.replica import Replica

log = logging.getLogger("stepwise.loop.trainer")


def loop_state(trainer) -> dict:
    """Everything an exact resume needs from the loop (collective in DDP: call on every rank)."""
    replica = trainer.replica
    real_total = int(replica.sum(torch.tensor(float(trainer.real_samples), dtype=torch.float64,
                                              device=replica.device)).item())
    rng = {"cpu": torch.get_rng_state()}
    if trainer.replica.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.replica.device)
    return {
        "model": trainer.replica.model_state(trainer.model),
        "optimizer": trainer.replica.optimizer_state(trainer.optimizer),  # FSDP: in the shards
        "scheduler": trainer.scheduler.state_dict(),
        "global_step": trainer.counters.global_step,
        "counters": {**asdict(trainer.counters), "real_samples": real_total},
        "rng": trainer.replica.all_gather_object(rng),  # one entry per rank
        "world_size": trainer.replica.world_size,
        "last_lr": trainer.last_lr,
        "precision": trainer.precision.state_dict(),
        "monitor": trainer.best.monitor.state_dict() if trainer.best else None,
        "callbacks": trainer.callbacks.state_dict(),  # {name: its state}
    }


def load_loop_state(trainer, state: dict) -> None:
    """Continue exactly where `state` stopped (the RNG too, when the world size is the same)."""
    if state.get("sharded"):  # an FSDP checkpoint: its DCP directory (stepwise.parallel.fsdp)
        from stepwise.parallel.fsdp import load_shards

        load_shards(Replica.unwrap(trainer.model), trainer.optimizer, state["sharded"])
    else:
        trainer.replica.load_full_state(trainer.model, trainer.optimizer, state)
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.precision.load_state_dict(state.get("precision", {}))
    counters = dict(state["counters"])
    real = counters.pop("real_samples")
    trainer.counters = Counters(**counters)
    saved = state["plan"]
    if (saved["accum"], saved["world_size"]) != (trainer.plan.accum, trainer.plan.world_size):
        # An elastic resume: the same windows, cut into other micro-steps.
        trainer.counters.micro_steps = trainer.plan.micro_steps_after(trainer.counters.global_step)
    trainer.real_samples = real if trainer.replica.is_main else 0
    trainer.last_lr = state["last_lr"]
    if trainer.best is not None and not trainer.best.monitor.load_state_dict(state.get("monitor")):
        log.info("the checkpoint has no state for trainer.monitor=%s: its best starts afresh",
                 trainer.best.monitor.name)
    for name in trainer.callbacks.load_state_dict(state.get("callbacks")):
        log.info("the checkpoint has no state for callback %s: it starts afresh", name)
    if state.get("world_size") == trainer.replica.world_size:
        rng = state["rng"][trainer.replica.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and trainer.replica.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], trainer.replica.device)
