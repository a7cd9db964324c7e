"""The order-preserving sampler: the epoch order depends on (seed, epoch) and N only."""

from __future__ import annotations

import numpy as np

from stepwise.contract.plan import make_plan
from stepwise.contract.sampler import MicroBatchSampler, epoch_permutation


def _plan(n, b, k, w, **kw):
    return make_plan(train_samples=n, per_device_batch_size=b, accum=k, world_size=w,
                     max_epochs=1, **kw)


def _optimizer_step_samples(n, b, k, w, seed=3, epoch=2):
    """The sets of sample indices of each optimizer step, over all ranks (padding removed)."""
    plan = _plan(n, b, k, w)
    per_rank = []
    for rank in range(w):
        sampler = MicroBatchSampler(plan, rank, seed)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    steps = []
    for s in range(plan.optimizer_steps_per_epoch):
        window = plan.window(s)
        samples = []
        for j in range(window.first_micro_step, window.first_micro_step + window.micro_steps):
            for rank in range(w):
                start, stop = plan.shard(j, rank)
                samples += per_rank[rank][j][: stop - start]
        steps.append(samples)
    return steps


def test_every_factoring_of_e_sees_the_same_windows():
    reference = _optimizer_step_samples(101, 24, 1, 1)
    for b, k, w in [(12, 2, 1), (6, 4, 1), (12, 1, 2), (3, 4, 2), (2, 3, 4), (1, 24, 1)]:
        assert _optimizer_step_samples(101, b, k, w) == reference, (b, k, w)
    perm = epoch_permutation(101, 3, 2).tolist()
    assert reference[0] == perm[:24] and reference[-1] == perm[96:]


def test_permutation_depends_on_seed_and_epoch():
    a = epoch_permutation(50, 0, 0)
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_permutation(50, 0, 1))
    assert not np.array_equal(a, epoch_permutation(50, 1, 0))
    assert np.array_equal(a, epoch_permutation(50, 0, 0))


def test_padding_and_dropped_partial_window():
    plan = _plan(9, 4, 1, 2)  # micro-step 1: rank 0 gets 1 sample, rank 1 none
    batches = list(MicroBatchSampler(plan, 1, seed=0))
    assert len(batches) == 2 and len(batches[1]) == 1  # one padding index, zero weight
    plan = _plan(10, 2, 3, 1, partial_window="drop")  # 5 micro-steps: one window of 3 kept
    assert len(list(MicroBatchSampler(plan, 0, seed=0))) == 3
