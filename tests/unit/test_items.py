"""Each window's loss items from per-sample counts and the seed (pure: no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from stepwise.contract.errors import ConfigError
from stepwise.contract.items import item_plan
from stepwise.contract.plan import make_plan
from stepwise.contract.sampler import MicroBatchSampler


class Data:
    def __init__(self, counts):
        self.item_counts = counts


def _brute_force(plan, counts, seed):
    """Items per optimizer step, from what the sampler hands each rank at each micro-step."""
    per_step = []
    for epoch in range(plan.epochs):
        samplers = [MicroBatchSampler(plan, rank, seed, arrays=True) for rank in range(plan.world_size)]
        micro = [[] for _ in range(plan.used_micro_steps_per_epoch())]
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            for j, indices in enumerate(sampler):
                start, stop = plan.shard(j, rank)
                micro[j].extend(indices[:stop - start].tolist())  # an empty shard pads with 1
        for step in range(plan.optimizer_steps_per_epoch):
            window = plan.window(step)
            samples = sum(micro[window.first_micro_step:window.first_micro_step + window.micro_steps], [])
            assert len(samples) == window.samples
            per_step.append(int(counts[samples].sum()))
    return per_step[:plan.total_optimizer_steps]


@pytest.mark.parametrize("b,k,w,drop_last,partial,max_steps", [
    (4, 2, 1, False, "step", -1),  # 37 = 4 x 8 + 5: a partial last window
    (2, 2, 2, False, "step", -1),  # a rank gets a short or empty block at the end
    (4, 2, 2, True, "drop", -1),  # samples dropped: each epoch uses a different subset
    (3, 1, 2, False, "step", 17),  # max_steps ends inside the third epoch
])
def test_window_items_are_the_sum_over_what_the_ranks_load(b, k, w, drop_last, partial, max_steps):
    counts = np.random.default_rng(0).integers(0, 40, size=37)
    plan = make_plan(train_samples=37, per_device_batch_size=b, accum=k, world_size=w,
                     drop_last=drop_last, partial_window=partial, max_epochs=3, max_steps=max_steps)
    items = item_plan(Data(counts), plan, seed=5)
    expected = _brute_force(plan, counts, seed=5)
    got = [items.window(*divmod(s, plan.optimizer_steps_per_epoch)) for s in range(len(expected))]
    assert got == expected
    assert items.total_items == sum(expected)
    for steps in range(len(expected) + 1):
        assert items.items_after(steps) == sum(expected[:steps])


def test_counts_that_are_not_one_integer_per_sample_are_one_config_error():
    plan = make_plan(train_samples=5, per_device_batch_size=2, accum=1, max_epochs=1)
    assert item_plan(object(), plan, 0) is None  # no item_counts: the loop counts
    for bad in ([1, 2, 3], [1.5] * 5, [1, 2, -1, 3, 4]):
        with pytest.raises(ConfigError) as err:
            item_plan(Data(bad), plan, 0)
        assert err.value.key == "data.train" and "one integer >= 0 per training sample" in str(err.value)
