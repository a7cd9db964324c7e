"""The hand-written loop of W5/W6 (benchmarks/overhead.py): a character language model on
padded variable-length sequences, with the exact per-token normalisation written out by hand:
each micro-batch's summed token losses times W / (the window's target tokens), the window's
count taken from the dataset's lengths, as a careful PyTorch user would write it.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch.nn import functional as F

from stepwise.contract.sampler import epoch_permutation
from stepwise.data.text import pad_collate
from stepwise.run.build import build_model, build_optimizer


def run_handwritten_tokens(job, replica, steps: int, barrier) -> float:
    """Seconds for `steps` optimizer steps, from the end of the first."""
    cfg, plan = job.config, job.plan
    torch.manual_seed(cfg.seed)
    model = replica.wrap(build_model(cfg, job.data))
    optimizer = build_optimizer(cfg, plan, model.parameters())
    dataset = job.data.train_set()
    counts = np.asarray(dataset.item_counts)
    b, accum, world, rank = plan.per_device_batch_size, plan.accum, plan.world_size, replica.rank
    window_size = b * accum * world
    start, done, epoch = 0.0, 0, 0
    while done < steps:
        perm = epoch_permutation(len(dataset), cfg.seed, epoch)  # stepwise's order, as W1-W4
        epoch += 1
        for first in range(0, len(perm) - window_size + 1, window_size):
            window = perm[first:first + window_size]
            scale = world / int(counts[window].sum())  # DDP averages the ranks' gradients
            for j in range(accum):
                idx = window[(j * world + rank) * b:(j * world + rank + 1) * b]
                batch = pad_collate([dataset[int(i)] for i in idx])
                sync = j == accum - 1 or replica.mode != "ddp"
                with contextlib.nullcontext() if sync else model.no_sync():
                    logits = model(batch["tokens"].to(replica.device))
                    loss = F.cross_entropy(logits, batch["target"].to(replica.device),
                                           reduction="sum") * scale
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == 1:
                barrier(replica)
                start = time.perf_counter()
            if done == steps:
                break
    barrier(replica)
    return time.perf_counter() - start


def token_lines(job, steps: int, rate_stepwise: float, rate_handwritten: float) -> list[str]:
    """Tokens per second of both loops, and the padding share of the micro-batches, over the
    timed optimizer steps (2..steps) of the first epochs."""
    items, plan = job.items, job.plan
    samples = (steps - 1) * plan.effective_batch_size
    tokens = items.items_after(steps) - items.items_after(1)
    per_sample = tokens / samples
    padded = real = 0
    b = plan.per_device_batch_size
    for step in range(1, steps):
        epoch, in_epoch = divmod(step, plan.optimizer_steps_per_epoch)
        perm = items.permutation(epoch)
        first = in_epoch * plan.effective_batch_size
        for block in range(0, plan.effective_batch_size, b):
            lengths = items.counts[perm[first + block:first + block + b]]
            padded += int(lengths.max()) * len(lengths)
            real += int(lengths.sum())
    return [f"  {'tokens/s':>12}: stepwise {rate_stepwise * per_sample:,.0f}, hand-written "
            f"{rate_handwritten * per_sample:,.0f} ({tokens} target tokens timed, "
            f"{per_sample:.1f} per sequence)",
            f"  {'padding':>12}: {1 - real / padded:.1%} of the micro-batches' token positions"]
