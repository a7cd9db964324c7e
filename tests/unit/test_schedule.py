"""LR rules, schedules in samples, and budgets: pure tables (no torch)."""

from __future__ import annotations

import math

import pytest

from stepwise.contract.errors import ConfigError
from stepwise.contract.plan import make_plan
from stepwise.contract.schedule import adapt_adam

SCHEDULE = dict(name="constant", unit="epochs", warmup=0.0, warmup_start_factor=0.1, total=None,
                min_lr_factor=0.0, milestones=[], gamma=0.1)


def plan(n=1000, b=10, k=1, w=1, **kw):
    sched = {**SCHEDULE, **kw.pop("schedule", {})}
    return make_plan(train_samples=n, per_device_batch_size=b, accum=k, world_size=w,
                     schedule=sched, **{"max_epochs": 4, **kw})


@pytest.mark.parametrize("b,k,w,rule,lr", [
    (32, 1, 1, "none", 0.1), (32, 4, 1, "linear", 0.4), (16, 4, 2, "linear", 0.4),
    (8, 8, 4, "linear", 0.8), (32, 4, 1, "sqrt", 0.2), (16, 2, 4, "sqrt", 0.2),
    (8, 1, 1, "linear", 0.025), (8, 1, 1, "sqrt", 0.05),
])
def test_rule_table(b, k, w, rule, lr):
    p = make_plan(train_samples=4096, per_device_batch_size=b, accum=k, world_size=w,
                  max_epochs=1, base_lr=0.1, lr_rule=rule, base_batch_size=32)
    assert p.lr == pytest.approx(lr) and p.lr_scale_factor == pytest.approx(lr / 0.1)


def test_square_root_rule_for_adam():
    betas, eps = adapt_adam((0.9, 0.999), 1e-8, kappa=4.0)
    assert betas == pytest.approx((0.6, 0.996)) and eps == pytest.approx(5e-9)
    betas, eps = adapt_adam((0.9, 0.999), 1e-8, kappa=0.25)  # smaller batch: longer memory
    assert betas == pytest.approx((0.975, 0.99975)) and eps == pytest.approx(2e-8)
    with pytest.raises(ConfigError, match="outside"):
        adapt_adam((0.9, 0.999), 1e-8, kappa=16.0)  # 1 - 16 x 0.1 < 0


def test_linear_warmup_then_constant():
    p = plan(schedule=dict(warmup=0.5, warmup_start_factor=0.1), lr_rule="none")  # 500 samples
    assert p.schedule.warmup_samples == 500 and p.warmup_steps == 50
    assert p.lr_at(0) == pytest.approx(0.01)
    assert p.lr_at(25) == pytest.approx(0.1 * (0.1 + 0.9 * 250 / 500))
    assert p.lr_at(49) < 0.1 and p.lr_at(50) == pytest.approx(0.1) == p.final_lr


def test_cosine_in_samples():
    p = plan(schedule=dict(name="cosine", warmup=1.0))  # 4 epochs of 1000: decay 1000 -> 4000
    assert p.lr_at(100) == pytest.approx(0.1)
    assert p.lr_at(250) == pytest.approx(0.05)  # half-way through the decay
    assert p.final_lr == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2990 / 3000)))


def test_multistep_milestones_in_epochs_follow_the_partial_window():
    # 1030 samples, E=100: 10 full windows + one of 30 per epoch, milestone after 2 epochs
    p = plan(n=1030, b=100, schedule=dict(name="multistep", milestones=[2], gamma=0.5))
    assert p.optimizer_steps_per_epoch == 11 and p.schedule.milestones_samples == (2060,)
    assert [p.lr_at(s) for s in (21, 22)] == [pytest.approx(0.1), pytest.approx(0.05)]


def test_same_samples_same_curve_whatever_the_factoring():
    a = plan(n=1024, b=8, k=8, schedule=dict(name="cosine", warmup=1.0), lr_rule="linear",
             base_batch_size=64)
    b = plan(n=1024, b=32, k=4, w=2, schedule=dict(name="cosine", warmup=1.0), lr_rule="linear",
             base_batch_size=64)
    assert (a.effective_batch_size, b.effective_batch_size) == (64, 256)
    for step in range(b.total_optimizer_steps):
        samples = b.samples_after(step)
        assert b.lr_at(step) == pytest.approx(4 * a.lr_at(samples // 64))
    assert a.schedule.warmup_samples == b.schedule.warmup_samples == 1024
    assert (a.warmup_steps, b.warmup_steps) == (16, 4)


# N=1000, E=100, 10 steps/epoch: (max_steps, max_epochs, max_samples) -> (total steps, binding)
@pytest.mark.parametrize("max_steps,max_epochs,max_samples,total,budget", [
    (-1, 3, -1, 30, "max_epochs"), (25, 3, -1, 25, "max_steps"), (-1, -1, 1500, 15, "max_samples"),
    (-1, 3, 1450, 15, "max_samples"),  # stops after the step that reaches 1450
    (12, 3, 1500, 12, "max_steps"), (-1, 1, 5000, 10, "max_epochs"),
    (30, 3, 3000, 30, "max_epochs"),  # a tie: the first listed binds
])
def test_budgets(max_steps, max_epochs, max_samples, total, budget):
    p = make_plan(train_samples=1000, per_device_batch_size=100, accum=1, max_steps=max_steps,
                  max_epochs=max_epochs, max_samples=max_samples)
    assert (p.total_optimizer_steps, p.budget) == (total, budget)
    assert p.total_samples == total * 100


@pytest.mark.parametrize("schedule,key,words", [
    (dict(name="step"), "schedule.name", "unknown schedule"),
    (dict(unit="hours"), "schedule.unit", "unknown unit"),
    (dict(warmup=5.0), "schedule.warmup", "longer than the whole run"),
    (dict(name="multistep", milestones=[2, 9]), "schedule.milestones", "beyond the end"),
    (dict(name="multistep"), "schedule.milestones", "needs milestones"),
    (dict(name="cosine", warmup=2.0, total=1.0), "schedule.total", "must end after the warmup"),
    (dict(warmup_start_factor=0.0), "schedule.warmup_start_factor", "(0, 1]"),
])
def test_bad_schedules(schedule, key, words):
    with pytest.raises(ConfigError) as err:
        plan(schedule=schedule)
    assert err.value.key == key and words in str(err.value)
