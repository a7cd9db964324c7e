"""Callbacks without a run: hooks called in order with a note naming the one that raised, state by
name, the LR monitor's values per group, the sample logger's rows, and the metric names a
callback's evaluation adds for `trainer.monitor`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stepwise.callbacks.building import build_callbacks, check_callbacks
from stepwise.callbacks.lr_monitor import group_values
from stepwise.callbacks.samples import rows
from stepwise.contract.errors import ConfigError
from stepwise.contract.monitor import metric_names
from stepwise.loop.callbacks import Callback, Callbacks


class Recorder(Callback):
    def __init__(self, calls: list, name: str, fail: bool = False) -> None:
        self.calls, self.name, self.fail = calls, name, fail

    def on_step_end(self, run, logged):
        self.calls.append((self.name, logged))
        if self.fail:
            raise ValueError("boom")

    def on_evaluation_end(self, run, split, metrics):
        return {f"{split}/{self.name}": len(metrics)}

    def state_dict(self):
        return {"name": self.name}

    def load_state_dict(self, state):
        self.calls.append(("loaded", state["name"]))


def _callbacks(*names: str, fail: str = "") -> tuple[Callbacks, list]:
    calls: list = []
    callbacks = Callbacks({n: Recorder(calls, n, fail=n == fail) for n in names})
    trainer = SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1))
    callbacks.attach(trainer)
    return callbacks, calls


def test_hooks_run_in_the_config_s_order_and_see_what_the_ones_before_added():
    callbacks, calls = _callbacks("b", "a")
    callbacks.step_end(True)
    assert calls == [("b", True), ("a", True)]
    # "a" sees the metric "b" added: 2 metrics then
    assert callbacks.evaluation_end("val", {"val/loss": 1.0}) == {"val/b": 1, "val/a": 2}
    assert callbacks.state_dict() == {"b": {"name": "b"}, "a": {"name": "a"}}
    assert callbacks.load_state_dict({"a": {"name": "x"}}) == ["b"]  # b had no saved state
    assert calls[-1] == ("loaded", "x")
    assert not Callbacks({})


def test_an_error_in_a_hook_names_the_callback_and_the_hook():
    callbacks, _ = _callbacks("first", "second", fail="second")
    with pytest.raises(ValueError, match="boom") as raised:
        callbacks.step_end(False)
    assert raised.value.__notes__ == ["in callback second (Recorder.on_step_end)"]


def test_group_values_name_each_group_and_its_momentum():
    weights = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    adam = torch.optim.AdamW([{"params": [weights[0]], "name": "body"},
                              {"params": [weights[1]], "lr": 0.5, "betas": (0.8, 0.99)}], lr=0.1)
    assert group_values(adam) == {"lr/body": 0.1, "momentum/body": 0.9, "lr/1": 0.5,
                                  "momentum/1": 0.8}
    assert group_values(torch.optim.SGD(weights, lr=0.2)) == {"lr/0": 0.2, "momentum/0": 0.0}


def test_sample_rows_have_a_prediction_for_class_scores_only():
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert rows([4, 7], scores, torch.tensor([1, 2])) == [
        {"index": 4, "target": 1, "predicted": 1, "output": [0.1, 2.0, -1.0]},
        {"index": 7, "target": 2, "predicted": 0, "output": [3.0, 0.0, 0.5]}]
    assert rows([0], torch.tensor([[1.5]]), torch.tensor([[1.0]])) == [
        {"index": 0, "target": [1.0], "output": [1.5]}]  # regression: no argmax


def test_a_callback_s_evaluation_adds_monitorable_names():
    data = SimpleNamespace(task="classification")
    assert metric_names(data, None, ("ema",)) == ["val/loss", "val/accuracy", "val_ema/loss",
                                                  "val_ema/accuracy"]
    assert check_callbacks({"ema": {"_target_": "stepwise.callbacks.EMA"}}) == ("ema",)
    assert check_callbacks({}) == () and check_callbacks(None) == ()


def test_the_ema_refuses_values_outside_its_range_in_one_line():
    with pytest.raises(ConfigError, match=r"callbacks\.ema=stepwise\.callbacks\.ema\.EMA\(decay=1\.0\)"
                                          r": building it raised ValueError"):
        build_callbacks({"ema": {"_target_": "stepwise.callbacks.EMA", "decay": 1.0}})
    with pytest.raises(ConfigError, match="needs a _target_"):
        check_callbacks({"ema": {"decay": 0.9}})
