"""trainer.monitor: the best evaluation, early stopping and their checks (pure, no torch); the plan
cut at an early stop; a sweep's objective and best child."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from stepwise.config.schemas import ScheduleConfig
from stepwise.contract.errors import ConfigError
from stepwise.contract.monitor import Monitor, check_monitor
from stepwise.contract.plan import make_plan
from stepwise.contract.plan_check import mismatches, planned_counts
from stepwise.main import objective
from stepwise.tracking.best_child import Criterion, best_child, criterion, sweeper_direction

NAN = math.nan
# mode, patience, min_delta, values at steps 10, 20, ... -> best step, stopped at
TABLE = [
    ("min", None, 0.0, [3.0, 2.0, 2.5, 1.0], 40, None),
    ("max", None, 0.0, [3.0, 2.0, 2.5, 1.0], 10, None),
    ("min", 2, 0.0, [3.0, 2.0, 2.5, 2.1], 20, 40),  # 2 without improvement: stop at 40
    ("min", 2, 0.0, [3.0, 2.0, 2.5, 1.9, 2.0], 40, None),  # the count restarts at a new best
    ("min", 1, 0.0, [3.0, 3.0], 10, 20),  # equal is no improvement
    ("min", 2, 0.5, [3.0, 2.6, 2.4, 2.2], 30, None),  # 2.6, 2.2: within min_delta; 2.4: not
    ("min", 3, 0.0, [NAN, 2.0, NAN, NAN, NAN], 20, 50),  # NaN never improves
    ("max", 1, 0.0, [0.5, 0.9, 0.8], 20, 30),
]


@pytest.mark.parametrize("mode,patience,min_delta,values,best_step,stopped_at", TABLE)
def test_monitor_keeps_the_best_and_stops_after_patience(mode, patience, min_delta, values,
                                                          best_step, stopped_at):
    monitor = Monitor("val/loss", mode, patience, min_delta)
    for i, value in enumerate(values):
        if monitor.stopped:
            pytest.fail(f"evaluated after the stop at {monitor.stopped_at}")
        monitor.update({"val/loss": value, "val/accuracy": i / 10}, step=10 * (i + 1))
    assert monitor.best_step == best_step
    assert monitor.stopped_at == stopped_at
    best_value = values[best_step // 10 - 1]
    assert monitor.best_record() == {"best/val/loss": best_value,
                                     "best/val/accuracy": (best_step // 10 - 1) / 10,
                                     "best/global_step": best_step}


def test_patience_running_out_at_the_last_evaluation_stops_nothing():
    monitor = Monitor("val/loss", "min", patience=1)
    monitor.update({"val/loss": 1.0}, 10)
    monitor.update({"val/loss": 2.0}, 20, final=True)
    assert not monitor.stopped and monitor.bad_evaluations == 1


def test_monitor_state_survives_a_checkpoint_round_trip():
    monitor = Monitor("val/loss", "min", patience=3)
    for step, value in ((10, 2.0), (20, 1.0), (30, 1.5)):
        monitor.update({"val/loss": value}, step)
    fresh = Monitor("val/loss", "min", patience=3)
    assert fresh.load_state_dict(monitor.state_dict())
    assert (fresh.best, fresh.best_step, fresh.bad_evaluations, fresh.evaluations) == (1.0, 20, 1, 3)
    fresh.update({"val/loss": 1.2}, 40)
    fresh.update({"val/loss": 1.1}, 50)
    assert fresh.stopped_at == 50  # 3 in a row without improvement, counted across the resume
    stopped = fresh.state_dict()
    same = Monitor("val/loss", "min", patience=3)
    assert same.load_state_dict(stopped) and same.stopped_at == 50
    patient = Monitor("val/loss", "min", patience=4)  # a resume with more patience trains on
    assert patient.load_state_dict(stopped) and patient.stopped_at is None
    assert not Monitor("val/accuracy", "max").load_state_dict(monitor.state_dict())
    assert not Monitor("val/loss", "max").load_state_dict(monitor.state_dict())
    assert not Monitor("val/loss").load_state_dict(None)


def test_a_metric_the_evaluation_did_not_return_is_named():
    with pytest.raises(ConfigError, match=r"trainer.monitor=val/f1: .*returned val/accuracy, "
                                          r"val/loss"):
        Monitor("val/f1").update({"val/loss": 1.0, "val/accuracy": 0.5}, 10)


def _trainer(**keys):
    base = dict(monitor=None, monitor_mode="min", early_stopping_patience=None, min_delta=0.0)
    return SimpleNamespace(**{**base, **keys})


CLASSIFICATION = SimpleNamespace(val_samples=100, task="classification")
BAD = [
    (dict(monitor="val/acc"), CLASSIFICATION, None,
     "trainer.monitor=val/acc: the evaluation logs no such metric; fix: use one of val/loss, "
     "val/accuracy"),
    (dict(monitor="train/loss"), SimpleNamespace(val_samples=100, task="regression"), None,
     "trainer.monitor=train/loss: the evaluation logs no such metric; fix: use one of val/loss"),
    (dict(monitor="val/accuracy"), CLASSIFICATION, {"f1": {}},
     "trainer.monitor=val/accuracy: the evaluation logs no such metric; fix: use one of "
     "val/loss, val/f1"),
    (dict(monitor="val/loss"), SimpleNamespace(val_samples=0, task="classification"), None,
     "trainer.monitor=val/loss: the data has no validation set"),
    (dict(early_stopping_patience=3), CLASSIFICATION, None,
     "trainer.early_stopping_patience=3: needs a metric to watch"),
    (dict(monitor="val/loss", early_stopping_patience=0), CLASSIFICATION, None,
     "trainer.early_stopping_patience=0: must be at least 1"),
    (dict(monitor="val/loss", monitor_mode="lowest"), CLASSIFICATION, None,
     "trainer.monitor_mode=lowest: unknown value"),
    (dict(monitor="val/loss", min_delta=-0.1), CLASSIFICATION, None,
     "trainer.min_delta=-0.1: must be >= 0"),
]


@pytest.mark.parametrize("keys,data,metrics,message", BAD)
def test_bad_monitor_settings_are_one_line_errors(keys, data, metrics, message):
    with pytest.raises(ConfigError) as err:
        check_monitor(_trainer(**keys), data, metrics)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("name,metrics", [("val/loss", None), ("val/accuracy", None),
                                           ("val/f1", {"f1": {}}), ("val/f1/3", {"f1": {}})])
def test_metrics_the_evaluation_logs_can_be_monitored(name, metrics):
    check_monitor(_trainer(monitor=name), CLASSIFICATION, metrics)


@pytest.mark.parametrize("epochs_done", [1, 2, 3])
def test_the_plan_cut_at_an_early_stop_is_the_plan_of_the_shorter_run(epochs_done):
    """Stopping after epoch e executes what a run of e epochs plans, the LR warmup and decay
    included (a schedule that does not depend on the run's length)."""
    schedule = dataclasses.asdict(ScheduleConfig(name="multistep", warmup=0.5, milestones=[0.75]))
    common = dict(train_samples=1438, per_device_batch_size=16, accum=3, schedule=schedule)
    full = make_plan(max_epochs=4, **common)
    short = make_plan(max_epochs=epochs_done, **common)
    cut = planned_counts(full, None, short.total_optimizer_steps)
    assert cut == planned_counts(short, None, short.total_optimizer_steps)
    assert cut["global_step"] == epochs_done * full.optimizer_steps_per_epoch
    assert mismatches({**cut, "final lr": cut["final lr"] * (1 + 1e-12)}, cut) == []
    assert mismatches({**cut, "micro_steps": cut["micro_steps"] + 1}, cut) == [
        f"micro_steps: executed {cut['micro_steps'] + 1}, planned {cut['micro_steps']}"]


def test_the_objective_is_the_best_value_when_monitoring():
    metrics = {"val/loss": 0.9, "best/val/loss": 0.5, "best/val/accuracy": 0.8,
               "val/accuracy": 0.7, "global_step": 10}
    assert objective(metrics, "val/loss") == 0.9
    assert objective(metrics, "val/loss", monitor="val/loss") == 0.5
    # the accuracy of the best checkpoint (by val/loss), not the last evaluation's
    assert objective(metrics, "val/accuracy", monitor="val/loss") == 0.8
    with pytest.raises(ConfigError, match="optimized_metric=val/f1"):
        objective(metrics, "val/f1", monitor="val/loss")


def _run(i: int, metrics: dict, **params) -> SimpleNamespace:
    """What best_child reads of an MLflow Run: its id, params and latest metrics."""
    return SimpleNamespace(info=SimpleNamespace(run_id=f"run{i}"),
                           data=SimpleNamespace(metrics=metrics, params=params, tags={}))


def test_the_best_child_is_chosen_by_the_monitored_metric_in_its_mode():
    monitored = {"trainer.monitor": "val/accuracy", "trainer.monitor_mode": "max",
                 "optimized_metric": "None"}
    runs = [_run(0, {"best/val/accuracy": 0.7, "val/loss": 0.1}, **monitored),
            _run(1, {"best/val/accuracy": 0.9, "val/loss": 0.5}, **monitored),
            _run(2, {"val/loss": 0.0}, **monitored)]  # failed before its first evaluation
    rule = criterion(runs)
    assert rule == Criterion("best/val/accuracy", "max")
    assert best_child(runs, rule).info.run_id == "run1"
    assert criterion(runs, sweeper_direction("minimize")) == Criterion("best/val/accuracy", "min")
    plain = [_run(i, {"val/loss": v}, **{"trainer.monitor": "None"})
             for i, v in enumerate([0.4, 0.2, 0.2, NAN])]
    assert criterion(plain) == Criterion("val/loss", "min")
    assert best_child(plain, criterion(plain)).info.run_id == "run1"  # the first on a tie
    assert best_child(plain, Criterion("val/f1", "min")) is None
