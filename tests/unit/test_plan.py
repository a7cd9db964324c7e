"""The plan: table-driven counts and properties of the windows (pure, no torch)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepwise.contract.errors import ConfigError
from stepwise.contract.plan import derive_accum, lr_scale_factor, make_plan

# N, b, k, W, drop_last, partial_window, max_steps, max_epochs ->
#   micro/epoch, steps/epoch, last window (micro, samples), dropped/epoch, total steps, total samples
TABLE = [
    # digits train split: 1438 = 22 x 64 + 30, the last window is short in samples only
    (1438, 64, 1, 1, False, "step", -1, 3, 23, 23, (1, 30), 0, 69, 3 * 1438),
    # 180 micro-steps of 8 = 22 windows of 8 + a partial window of 4 micro-steps (30 samples)
    (1438, 8, 8, 1, False, "step", -1, 3, 180, 23, (4, 30), 0, 69, 3 * 1438),
    (1438, 8, 8, 1, False, "drop", -1, 3, 180, 22, (8, 64), 30, 66, 3 * 1408),
    # drop_last drops the last 6 samples (1438 = 179 x 8 + 6), the partial window then holds 24
    (1438, 8, 8, 1, True, "step", -1, 2, 179, 23, (3, 24), 6, 46, 2 * 1432),
    # max_steps shorter than an epoch: stops mid-epoch
    (1438, 8, 8, 1, False, "step", 5, 3, 180, 23, (4, 30), 0, 5, 5 * 64),
    # max_steps longer than max_epochs allow: epochs bind
    (100, 10, 2, 1, False, "step", 1000, 2, 10, 5, (2, 20), 0, 10, 200),
    # max_steps ends inside the second epoch
    (100, 10, 3, 1, False, "step", 6, -1, 10, 4, (1, 10), 0, 6, 100 + 2 * 30),
    # W=2: 13 samples, b=4: micro-steps of 8 cover [0,8) and [8,13); rank 1 gets 1 real sample
    (13, 4, 1, 2, False, "step", -1, 1, 2, 2, (1, 5), 0, 2, 13),
    (13, 4, 1, 2, True, "step", -1, 1, 1, 1, (1, 8), 5, 1, 8),
    # the linreg demo: 1000 samples, 40 per step either way
    (1000, 10, 4, 1, False, "step", -1, 3, 100, 25, (4, 40), 0, 75, 3000),
    (1000, 40, 1, 1, False, "step", -1, 3, 25, 25, (1, 40), 0, 75, 3000),
]


@pytest.mark.parametrize(
    "n,b,k,w,drop_last,partial,max_steps,max_epochs,micro,spe,last,dropped,total,samples", TABLE)
def test_plan_table(n, b, k, w, drop_last, partial, max_steps, max_epochs, micro, spe, last,
                    dropped, total, samples):
    plan = make_plan(train_samples=n, per_device_batch_size=b, accum=k, world_size=w,
                     drop_last=drop_last, partial_window=partial, max_steps=max_steps,
                     max_epochs=max_epochs)
    assert plan.effective_batch_size == b * k * w
    assert plan.micro_steps_per_epoch == micro
    assert plan.optimizer_steps_per_epoch == spe
    assert (plan.last_window_micro_steps, plan.last_window_samples) == last
    assert plan.samples_dropped_per_epoch == dropped
    assert plan.total_optimizer_steps == total
    assert plan.total_samples == samples
    assert plan.budget == ("max_steps" if total == max_steps else "max_epochs")


def test_shards_give_rank_one_an_empty_block():
    plan = make_plan(train_samples=13, per_device_batch_size=4, accum=1, world_size=2,
                     max_epochs=1)
    assert [plan.shard(0, r) for r in (0, 1)] == [(0, 4), (4, 8)]
    assert [plan.shard(1, r) for r in (0, 1)] == [(8, 12), (12, 13)]
    plan = make_plan(train_samples=9, per_device_batch_size=4, accum=1, world_size=2,
                     max_epochs=1)
    assert [plan.shard(1, r) for r in (0, 1)] == [(8, 9), (9, 9)]  # rank 1: padding only
    assert plan.shard(1, 0, blocks=2) == (8, 9)  # DataParallel loads both blocks


@given(n=st.integers(1, 500), b=st.integers(1, 17), k=st.integers(1, 9), w=st.integers(1, 4),
       drop_last=st.booleans(), partial=st.sampled_from(["step", "drop"]))
def test_windows_partition_the_used_samples(n, b, k, w, drop_last, partial):
    try:
        plan = make_plan(train_samples=n, per_device_batch_size=b, accum=k, world_size=w,
                         drop_last=drop_last, partial_window=partial, max_epochs=1)
    except ConfigError:
        unit = b * w
        kept = n // unit * unit if drop_last else n
        assert kept == 0 or (partial == "drop" and math.ceil(kept / unit) < k)
        return
    unit = b * w
    kept = n // unit * unit if drop_last else n
    micro = math.ceil(kept / unit)
    expected = micro // k if partial == "drop" else math.ceil(micro / k)
    assert plan.optimizer_steps_per_epoch == expected
    covered, cursor = [], 0
    for s in range(plan.optimizer_steps_per_epoch):
        window = plan.window(s)
        assert window.first_micro_step == s * k
        assert 1 <= window.micro_steps <= k and 1 <= window.samples <= plan.effective_batch_size
        ranks = [plan.shard(j, r) for j in range(window.first_micro_step,
                 window.first_micro_step + window.micro_steps) for r in range(w)]
        for start, stop in ranks:
            assert start == cursor or start == stop
            cursor = max(cursor, stop)
            covered += range(start, stop)
        assert sum(stop - start for start, stop in ranks) == window.samples
    assert covered == list(range(plan.samples_per_epoch))
    assert plan.samples_per_epoch + plan.samples_dropped_per_epoch == n
    assert plan.total_samples == plan.samples_per_epoch


@pytest.mark.parametrize("rule,e,base,factor", [
    ("none", 256, 32, 1.0), ("linear", 256, 32, 8.0), ("linear", 16, 32, 0.5),
    ("sqrt", 128, 32, 2.0), ("sqrt", 32, 32, 1.0),
])
def test_lr_rules(rule, e, base, factor):
    assert lr_scale_factor(rule, e, base) == pytest.approx(factor)
    plan = make_plan(train_samples=1000, per_device_batch_size=e, accum=1, max_epochs=1,
                     base_lr=0.1, lr_rule=rule, base_batch_size=base)
    assert plan.lr == pytest.approx(0.1 * factor)


def test_derive_accum_and_its_error():
    assert derive_accum(256, 16, 2) == 8
    with pytest.raises(ConfigError) as err:
        derive_accum(100, 32, 1)
    assert str(err.value) == ("effective_batch_size=100: not a multiple of data.batch_size x "
                              "world_size = 32 x 1 = 32; fix: use effective_batch_size=96 or 128, "
                              "or change data.batch_size")


@pytest.mark.parametrize("kwargs,key", [
    (dict(accum=0), "accum"), (dict(accum=-2), "accum"), (dict(per_device_batch_size=0),
     "data.batch_size"), (dict(max_steps=0), "trainer.max_steps"),
    (dict(max_epochs=-1, max_steps=-1), "trainer.max_epochs"),
    (dict(partial_window="keep"), "trainer.partial_window"), (dict(lr_rule="cubic"),
     "lr_scaling.rule"), (dict(base_lr=-0.1), "optim.lr"), (dict(base_batch_size=0),
     "lr_scaling.base_batch_size"),
    (dict(per_device_batch_size=200, drop_last=True), "data.batch_size"),
])
def test_bad_inputs_name_their_key(kwargs, key):
    args = dict(train_samples=100, per_device_batch_size=10, accum=1, max_epochs=1)
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        make_plan(**args)
    assert err.value.key == key
    assert "fix:" in str(err.value) and "\n" not in str(err.value)
