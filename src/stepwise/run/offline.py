"""Running `stepwise eval` and `stepwise predict` on a selection: the checkpoint's model and this
process's shard of the split, built as training built them (stepwise/run/build.py), in one
process or in the spawned ranks of `parallel=ddp`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from stepwise.parallel.replica import Replica, start_replica, stop_replica
from stepwise.run.launch import spawn_ranks, start_worker
from stepwise.run.selection import Selection, checkpoint_weights

log = logging.getLogger("stepwise")


def run(selection: Selection, body: Callable[[Selection, Replica], Any]) -> Any:
    """`body(selection, replica)` on every rank of the selection's world; rank 0's result (None
    on the other ranks, when torchrun or SLURM started them all: rank 0 speaks for the job).
    A prepared `Job` serves as well as a `Selection` (`stepwise verify`'s runs): both give the
    `world` and the `config` (its parallel mode and device).

    `body` must be a module-level function: under `parallel=ddp`, stepwise spawns the ranks
    (torch's elastic launcher), unless torchrun or SLURM started them.
    """
    world = selection.world
    if world.spawns:
        log.info("spawning %d DDP workers", world.nproc)
        results = spawn_ranks(world.nproc, selection.config.parallel.timeout_s, _worker,
                              selection, body)
        return results[0]
    return _on_rank(selection, body, world)


@record
def _worker(selection: Selection, body: Callable[[Selection, Replica], Any]) -> Any:
    """One spawned rank: set up as training's workers do, then run `body`."""
    return _on_rank(selection, body, start_worker(selection.world,
                                                  selection.config.trainer.device))


def _on_rank(selection: Selection, body: Callable[[Selection, Replica], Any], world) -> Any:
    """Join the group (ddp), run `body`, leave together (or alone, after a failure)."""
    replica = start_replica(world, selection.config.parallel, selection.config.trainer.device)
    try:
        result = body(selection, replica)
    except BaseException:
        stop_replica(replica, failed=True)
        raise
    stop_replica(replica)
    return result if replica.is_main else None


def checkpoint_model(selection: Selection, replica: Replica) -> nn.Module:
    """The run's model with the checkpoint's weights, in the run's precision and memory format,
    on this rank's device, in eval mode (not wrapped: nothing is trained)."""
    from stepwise.loop.precision import param_dtype, set_tf32, to_memory_format
    from stepwise.run.build import build_model
    from stepwise.run.checkpoint import load_checkpoint

    trainer = selection.config.trainer
    set_tf32(trainer.tf32, replica.device)
    model = build_model(selection.config, selection.data).to(param_dtype(trainer.precision))
    model.load_state_dict(checkpoint_weights(load_checkpoint(selection.checkpoint),
                                             selection.args, selection.checkpoint))
    model = to_memory_format(model, trainer.channels_last).to(replica.device)
    return model.eval()


def shard(selection: Selection, replica: Replica) -> tuple[Any, list[list[int]]]:
    """This rank's loader over its contiguous shard of the split, and the sample indices of each
    of its batches (stepwise/data/loaders.py: the shards are disjoint, in sample order)."""
    from stepwise.data.loaders import eval_loader, shard_batches, worker_settings
    from stepwise.loop.precision import param_dtype

    cfg = selection.config.data
    workers = worker_settings(replica.device, cfg.num_workers, cfg.prefetch_factor)
    loader = eval_loader(selection.data, selection.split, selection.batch_size, replica,
                         param_dtype(selection.config.trainer.precision), **workers)
    return loader, shard_batches(selection.samples, selection.batch_size, replica)


def on_device(selection: Selection, replica: Replica) -> Callable:
    """(inputs, target) -> where and in the layout the model takes them (as the Trainer does)."""
    from stepwise.data.batches import to_device
    from stepwise.loop.precision import inputs_memory_format

    channels_last = selection.config.trainer.channels_last

    def put(inputs: Any, target: torch.Tensor) -> tuple[Any, torch.Tensor]:
        inputs, target = to_device((inputs, target), replica.device)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs_memory_format(inputs, channels_last)
        return inputs, target

    return put
