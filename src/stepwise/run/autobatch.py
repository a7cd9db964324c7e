"""`data.batch_size=auto`: the largest per-device batch b that fits, with the effective batch fixed.

Before training, one optimizer step of the real model (forward, backward, step, in the run's
precision) is tried on real samples at b = E / W (accum 1). On out-of-memory, b is halved and
accum doubled, so E = b x accum x W and therefore every window of samples, every step, and the
trained weights stay what they would be with any other factoring (DESIGN rule 1). In DDP every
rank tries its own device and all take the smallest b that fitted anywhere.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable

import torch

from stepwise.contract.errors import ConfigError
from stepwise.contract.items import item_plan
from stepwise.run.job import Job, plan_for

log = logging.getLogger(__name__)


def halvings(effective_batch_size: int, world_size: int) -> list[int]:
    """The per-device batches to try, largest first: E/W, E/2W, ... while the halving is exact."""
    sizes = [effective_batch_size // world_size]
    while sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def largest_fitting(sizes: list[int], fits: Callable[[int], bool]) -> tuple[int, list[int]]:
    """The first size of `sizes` that fits, and the sizes that did not."""
    failed = []
    for size in sizes:
        if fits(size):
            return size, failed
        failed.append(size)
    raise ConfigError("data.batch_size", "auto", f"out of memory even at a per-device batch of "
                      f"{sizes[-1]}, which E / world_size cannot be halved to exactly",
                      "use a smaller effective_batch_size (a power of 2 halves furthest), "
                      "a smaller model, or a lower precision")


def one_step_fits(job: Job, device: torch.device, size: int) -> bool:
    """Whether one optimizer step at a per-device batch of `size` runs without out-of-memory."""
    from stepwise.data.batches import call_model, to_device
    from stepwise.data.loaders import fetch
    from stepwise.loop.precision import Precision, inputs_memory_format, param_dtype, to_memory_format
    from stepwise.models.losses import item_mask, masked_sum, per_sample
    from stepwise.run.build import build_loss, build_model, build_optimizer

    cfg = job.config
    dtype = param_dtype(cfg.trainer.precision)
    precision = Precision(cfg.trainer.precision, device)
    loss_fn = build_loss(cfg, job.data)
    fitted = True
    try:
        inputs, target = to_device(fetch(job.data, dtype, cfg.seed,
                                         [i % job.data.train_samples for i in range(size)]), device)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs_memory_format(inputs, cfg.trainer.channels_last)
        model = build_model(cfg, job.data).to(dtype)
        model = to_memory_format(model.to(device), cfg.trainer.channels_last).train()
        optimizer = build_optimizer(cfg, job.plan, model.parameters())
        with precision.autocast():
            values = loss_fn(call_model(model, inputs), target)
            mask = item_mask(loss_fn, target)
            loss = per_sample(values).mean() if mask is None else masked_sum(values, mask, size)
        precision.backward(loss)
        precision.step(optimizer)
        del inputs, target, model, optimizer, values, loss
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):  # torch < 2.4
        fitted = False  # leave the except block first: its traceback holds the tensors
    if not fitted:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return fitted


def fit_batch_size(job: Job, device: torch.device, replica=None) -> Job:
    """The job with b and accum chosen by trying (`data.batch_size=auto`); unchanged otherwise.

    Args:
        replica: in DDP, this rank's replica: the ranks agree on the smallest b that fitted.
    """
    if job.config.data.batch_size != "auto":
        return job
    sizes = halvings(job.plan.effective_batch_size, job.plan.world_size)
    size, failed = largest_fitting(sizes, lambda b: one_step_fits(job, device, b))
    if replica is not None and replica.distributed:
        import torch.distributed as dist

        agreed = torch.tensor([size], dtype=torch.float64, device=replica.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        size = int(agreed.item())
    accum = job.plan.effective_batch_size // (size * job.plan.world_size)
    plan = plan_for(job.config, job.data, job.plan.world_size, size, accum)
    job = dataclasses.replace(job, plan=plan, items=item_plan(job.data, plan, job.config.seed),
                              auto_batch_tried=tuple(failed) + (size,))
    if failed:
        log.warning("data.batch_size=auto: out of memory at %s; per-device batch %d, accum %d "
                    "(effective batch %d unchanged)", ", ".join(map(str, failed)), size, accum,
                    plan.effective_batch_size)
    else:
        log.info("data.batch_size=auto: per-device batch %d fits (accum %d)", size, accum)
    if replica is None or replica.is_main:
        (job.run_dir / "plan.json").write_text(plan.to_json())
        log.info("plan with data.batch_size=auto resolved:\n%s", job.plan_table())
    return job
