"""Warnings for legal values that are almost certainly slips (contract/advice.py): each fires at its
threshold and not just below it, names the key, the value and the fix, and none fires for the
packaged config's options, experiments and sweep points."""

from __future__ import annotations

import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest

from stepwise.contract.advice import Knobs, advise, knobs, plan_warnings, run_warnings
from stepwise.contract.dist_env import DistEnv
from stepwise.contract.plan import make_plan
from stepwise.contract.world import resolve_world
from stepwise.data.arrays import build_data
from stepwise.run.job import plan_for, prepare, resolve_accum
from tests.conftest import compose_config
from tests.unit.test_config import COMPLETING, GROUPS, _options


def _schedule(warmup: float) -> dict:
    return dict(name="constant", unit="epochs", warmup=warmup, warmup_start_factor=0.1,
                total=None, min_lr_factor=0.0, milestones=[], gamma=0.1)


# (make_plan's arguments, Knobs' arguments, the warning's start, whether it fires). Each
# threshold is met in one row and missed by one sample, step or evaluation in the next.
LINEAR = {"lr_rule": "linear"}  # keeps the lr_scaling=none warning out of rows about another
TABLE = [
    # b x W > N: one partial micro-step per epoch; b x W = N is one full one
    (dict(train_samples=100, per_device_batch_size=101, accum=1, **LINEAR), {},
     "data.batch_size=101: b x W = 101 x 1 = 101 is more than the 100", True),
    (dict(train_samples=100, per_device_batch_size=100, accum=1, **LINEAR), {}, "data.batch_size=", False),
    (dict(train_samples=100, per_device_batch_size=51, accum=1, world_size=2, **LINEAR), {},
     "data.batch_size=51: b x W = 51 x 2 = 102", True),
    (dict(train_samples=100, per_device_batch_size=50, accum=1, world_size=2, **LINEAR), {},
     "data.batch_size=", False),
    # E > N: one partial optimizer step per epoch; E = N is full-batch gradient descent
    (dict(train_samples=100, per_device_batch_size=10, accum=11, **LINEAR), {},
     "accum=11: E = b x k x W = 10 x 11 x 1 = 110 is more than the 100", True),
    (dict(train_samples=100, per_device_batch_size=10, accum=10, **LINEAR), {}, "accum=", False),
    (dict(train_samples=100, per_device_batch_size=10, accum=11, **LINEAR),
     {"factor_key": "effective_batch_size"}, "effective_batch_size=110: E = b x k x W", True),
    # a quarter of every epoch left out by data.drop_last, trainer.partial_window=drop, or both
    (dict(train_samples=100, per_device_batch_size=75, accum=1, drop_last=True, **LINEAR), {},
     "data.drop_last=true: 25 of the 100 training samples (25%)", True),
    (dict(train_samples=101, per_device_batch_size=76, accum=1, drop_last=True, **LINEAR), {},
     "data.drop_last=", False),
    (dict(train_samples=100, per_device_batch_size=25, accum=3, partial_window="drop", **LINEAR), {},
     "trainer.partial_window=drop: 25 of the 100 training samples (25%)", True),
    (dict(train_samples=101, per_device_batch_size=1, accum=76, partial_window="drop", **LINEAR), {},
     "trainer.partial_window=", False),
    (dict(train_samples=100, per_device_batch_size=30, accum=2, drop_last=True,
          partial_window="drop", **LINEAR), {},
     "data.drop_last=true: with trainer.partial_window=drop, 40 of the 100", True),
    # lr_scaling=none: E more than 4 times base_batch_size, or less than a quarter of it
    (dict(train_samples=1000, per_device_batch_size=129, accum=1), {},
     "lr_scaling=none: E=129 is 4.03x lr_scaling.base_batch_size=32", True),
    (dict(train_samples=1000, per_device_batch_size=128, accum=1), {}, "lr_scaling=", False),
    (dict(train_samples=1000, per_device_batch_size=7, accum=1), {},
     "lr_scaling=none: E=7 is 1/4.57 of lr_scaling.base_batch_size=32", True),
    (dict(train_samples=1000, per_device_batch_size=8, accum=1), {}, "lr_scaling=", False),
    (dict(train_samples=1000, per_device_batch_size=1000, accum=1, lr_rule="sqrt"), {},
     "lr_scaling=", False),
    # a warmup that reaches the last step: no step at the full LR
    (dict(train_samples=100, per_device_batch_size=10, accum=1, max_epochs=2, **LINEAR,
          schedule=_schedule(2)), {"warmup": 2},
     "schedule.warmup=2: the warmup (200 samples = 20 optimizer steps) lasts the whole run", True),
    (dict(train_samples=100, per_device_batch_size=10, accum=1, max_epochs=2, **LINEAR,
          schedule=_schedule(1.9)), {"warmup": 1.9}, "schedule.warmup=", False),
]
DIGITS = dict(train_samples=1438, per_device_batch_size=32, accum=1, max_epochs=10)
RUN_TABLE = [
    # patience p needs p + 2 evaluations: the first is the best, the last stops nothing
    (DIGITS, {"early_stopping_patience": 9},
     "trainer.early_stopping_patience=9: the run evaluates 10 times", True),
    (DIGITS, {"early_stopping_patience": 8}, "trainer.early_stopping_patience=", False),
    (DIGITS, {"early_stopping_patience": 2, "val_every_n_epochs": 4},
     "trainer.early_stopping_patience=2: the run evaluates 3 times (every "
     "trainer.val_every_n_epochs=4 of its 10 epochs", True),
    (DIGITS, {"early_stopping_patience": 1, "val_every_n_epochs": 4},
     "trainer.early_stopping_patience=", False),
    # a logging interval of the run's length or more: one point, the last step
    (DIGITS, {"log_every_n_steps": 450}, "trainer.log_every_n_steps=450: not less than the run's "
                                         "450 optimizer steps", True),
    (DIGITS, {"log_every_n_steps": 449}, "trainer.log_every_n_steps=", False),
    ({**DIGITS, "max_steps": 1}, {"log_every_n_steps": 5}, "trainer.log_every_n_steps=", False),
]


@pytest.mark.parametrize("plan_args,knob_args,start,fires", TABLE + RUN_TABLE)
def test_each_warning_fires_at_its_threshold_and_not_below(plan_args, knob_args, start, fires):
    plan = make_plan(**{"max_epochs": 1, **plan_args})
    lines = plan_warnings(plan, Knobs(**knob_args)) + run_warnings(plan, Knobs(**knob_args))
    matches = tuple(line for line in lines if line.startswith(start))
    assert len(matches) == fires and lines == matches, lines  # only this one, or none
    assert all(line.count("; fix: ") == 1 for line in lines)


# `accum=64` on digits (N=1438, b=32): also what tests/integration/test_warnings.py expects
ACCUM_64 = (
    "accum=64: E = b x k x W = 32 x 64 x 1 = 2048 is more than the 1438 training samples, so "
    "each epoch is one optimizer step of 1438 samples, not 2048 (10 epochs = 10 steps); fix: "
    "use accum=44 or less (E <= N = 1438)",
    "lr_scaling=none: E=2048 is 64x lr_scaling.base_batch_size=32 and optim.lr=0.1 is used "
    "unscaled, so the LR per sample is 1/64 of that at the base (runs that differ in accum, "
    "data.batch_size or world size train at different LRs per sample); fix: use "
    "lr_scaling=linear (sqrt for Adam-type optimizers), or lr_scaling.base_batch_size=2048 if "
    "optim.lr was tuned at E=2048")


def test_the_lines_are_exact():
    plan = make_plan(train_samples=1438, per_device_batch_size=32, accum=64, max_epochs=10)
    assert plan_warnings(plan, Knobs()) == ACCUM_64
    plan = make_plan(train_samples=1438, per_device_batch_size=512, accum=1, drop_last=True,
                     max_epochs=10, lr_rule="linear")
    assert plan_warnings(plan, Knobs()) == (
        "data.drop_last=true: 414 of the 1438 training samples (29%) are left out of every epoch "
        "(the tail of its permutation): the last micro-batch holds fewer than b x W = 512; fix: "
        "use data.drop_last=false (a short last micro-batch is weighted exactly), or a "
        "data.batch_size that leaves less over",)
    patience = run_warnings(make_plan(**{**DIGITS, "max_epochs": 1}),
                            Knobs(early_stopping_patience=3))
    assert patience == ("trainer.early_stopping_patience=3: the run evaluates 1 time (every "
                        "trainer.val_every_n_epochs=1 of its 1 epochs, and after the last), the "
                        "first is always the best so far and the last stops nothing, so early "
                        "stopping never stops it; fix: evaluate more often "
                        "(trainer.val_every_n_epochs) or train more epochs, or set "
                        "trainer.early_stopping_patience=null",)


@pytest.mark.parametrize("b,row", [(128, "1/4 of that at base_batch_size=32 (E=128, lr_scaling=none)"),
                                   (16, "2x that at base_batch_size=32 (E=16, lr_scaling=none)"),
                                   (32, None)])
def test_the_plan_table_says_the_lr_per_sample_under_lr_scaling_none(b, row):
    table = make_plan(train_samples=1438, per_device_batch_size=b, accum=1, max_epochs=1).table()
    lines = [line.split(None, 3)[-1] for line in table.splitlines() if "lr per sample" in line]
    assert lines == ([row] if row else [])
    scaled = make_plan(train_samples=1438, per_device_batch_size=b, accum=1, max_epochs=1,
                       lr_rule="linear")
    assert "lr per sample" not in scaled.table()


def test_the_plan_keeps_its_warnings_in_plan_json():
    plan = advise(make_plan(train_samples=1438, per_device_batch_size=256, accum=1, max_epochs=1),
                  Knobs())
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("lr_scaling=none: E=256 is 8x")
    assert json.loads(plan.to_json())["warnings"] == list(plan.warnings)
    assert make_plan(train_samples=1438, per_device_batch_size=256, accum=1,
                     max_epochs=1).warnings == ()  # make_plan alone: the numbers only


def _train_samples(config) -> int:
    target = config.data._target_.rsplit(".", 1)[-1]
    known = {"cifar10": 50000, "mnist": 60000}  # their training splits, not in the test machine
    return known.get(target) or build_data(dataclasses.asdict(config.data)).train_samples


def _packaged_lines(*overrides: str) -> tuple[str, ...]:
    config = compose_config(*overrides)
    world = resolve_world(config.parallel, config.trainer.device, DistEnv(), gpus=2)
    data = SimpleNamespace(train_samples=_train_samples(config))
    plan = plan_for(config, data, world.size, *resolve_accum(config, world.size))
    return plan.warnings + run_warnings(plan, knobs(config))


# data=dataset's fixture large enough for the default batch (its test in test_config is smaller)
SIZED = {**COMPLETING, "data=dataset": [COMPLETING["data=dataset"][0].replace("size: 10", "size: 64")]}
PACKAGED = [[f"{g}={o}", *SIZED.get(f"{g}={o}", [])] for g in GROUPS for o in _options(g)
            if f"{g}={o}" != "data=imagefolder"]  # a folder of the user's own
# (cifar10_resnet18's 5 warmup epochs are refused in debug=fast's 5 steps: longer than the run)
EXPERIMENT_DEBUG = [[f"experiment={o}", "debug=fast"] for o in _options("experiment")
                    if o != "cifar10_resnet18"]
SWEEP_POINTS = ([["experiment=digits_sweep", f"data.batch_size={b}", f"lr_scaling={rule}"]
                 for b in (16, 32, 64, 128) for rule in ("linear", "sqrt")]
                + [["hparams_search=optuna", f"accum={k}"] for k in (1, 2, 4)])


@pytest.mark.parametrize("overrides", PACKAGED + EXPERIMENT_DEBUG + SWEEP_POINTS, ids=" ".join)
def test_no_packaged_config_warns(overrides):
    assert _packaged_lines(*overrides) == ()


def test_an_accum_sweep_under_lr_scaling_none_says_so():
    """`-m accum=1,2,4,8` (docs/design.md): the plan table says each job's LR per sample, and
    the job of E = 8 x base_batch_size gets the warning."""
    for accum, row in ((1, None), (2, "1/2 of that"), (4, "1/4 of that"), (8, "1/8 of that")):
        config = compose_config(f"accum={accum}")
        plan = plan_for(config, SimpleNamespace(train_samples=1438), 1, 32, accum)
        assert (plan.lr_per_sample() or None) == (row and f"{row} at base_batch_size=32 "
                                                          f"(E={32 * accum}, lr_scaling=none)")
        assert [line.split(" lr_scaling.")[0] for line in plan.warnings] == (
            ["lr_scaling=none: E=256 is 8x"] if accum == 8 else [])


def test_prepare_logs_them_once_at_warning_level(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="stepwise"):
        job = prepare(compose_config("dry_run=true", "accum=64", "trainer.monitor=val/loss",
                                     "trainer.early_stopping_patience=9"),
                      run_dir=tmp_path, start_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split("=")[0] for w in warnings] == ["accum", "lr_scaling",
                                                   "trainer.early_stopping_patience"]
    assert job.plan.warnings == tuple(warnings[:2])
    from stepwise.run.job import run_params

    assert run_params(job)["plan_warnings"] == "\n".join(warnings[:2])
