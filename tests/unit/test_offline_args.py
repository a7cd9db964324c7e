"""`stepwise eval|predict` arguments and a run's saved config read back as the typed Config, with
data overrides: in-process, no run needed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stepwise.config.parallel_schemas import DDPConfig
from stepwise.config.saved import parse_args, saved_config
from stepwise.config.schemas import DigitsConfig, MLPConfig, SGDConfig, SyntheticConfig
from stepwise.contract.errors import ConfigError
from stepwise.run.prediction import _short, batch_columns
from tests.conftest import compose_config

RUN_ID = "0123456789" * 3 + "01"  # 32 digits: Hydra alone would read it as a number


def _tree(*overrides: str) -> dict:
    """A run's config.yaml as main.py writes it (the resolved config)."""
    tree = dataclasses.asdict(compose_config(*overrides))
    tree.pop("defaults")
    return tree


def test_arguments_are_hydra_overrides_with_run_ids_kept_as_typed():
    args = parse_args("eval", [f"run={RUN_ID}", "which=best", "split=val", "parallel=ddp",
                               "parallel.nproc=3", "data.batch_size=50", "name=x-1"])
    assert (args.run, args.which, args.split, args.name) == (RUN_ID, "best", "val", "x-1")
    assert args.parallel_config() == DDPConfig(nproc=3)
    assert args.data_overrides == ("data.batch_size=50",)
    assert parse_args("predict", ["ckpt=/a/b.pt"]).ckpt == "/a/b.pt"


@pytest.mark.parametrize(("argv", "line"), [
    ([], "run=null: give the run"),
    ([f"run={RUN_ID}", "ckpt=/x.pt"], f"run={RUN_ID}: give the run"),
    (["ckpt=/x.pt", "which=best"], "which=best: picks a checkpoint of run=..."),
    ([f"run={RUN_ID}", "which=first"], "which=first: unknown value; fix: use one of last, best"),
    ([f"run={RUN_ID}", "parallel=fsdp"], "parallel=fsdp: unknown value; fix: use one of single, ddp"),
    ([f"run={RUN_ID}", "parallel.nproc=2"], "parallel.nproc=?: is a key of parallel=ddp"),
    ([f"run={RUN_ID}", "optim.lr=1"], "optim.lr=1: stepwise eval takes no such key"),
    ([f"run={RUN_ID}", "+data.x=1"], "+data.x=1: stepwise eval takes plain key=value"),
    ([f"run={RUN_ID}", "name=a/b"], "name=a/b: must be letters"),
    ([f"run={RUN_ID}", "weights=EMA"], "weights=EMA: must be model, or the name of averaged weights"),
])
def test_arguments_it_cannot_use_are_one_line(argv, line):
    with pytest.raises(ConfigError) as err:
        parse_args("eval", argv)
    assert str(err.value).startswith(line), str(err.value)


def test_the_saved_config_comes_back_typed_with_the_data_overrides():
    tree = _tree("model.hidden_sizes=[32]", "data.val_fraction=0.3", "optim.lr=0.7")
    args = parse_args("eval", [f"run={RUN_ID}", "data.split_seed=4", "trainer.device=cpu"])
    config = saved_config(tree, args)
    assert config.model == MLPConfig(hidden_sizes=[32])  # the run's, not the defaults
    assert config.data == DigitsConfig(val_fraction=0.3, split_seed=4)
    assert config.optim == SGDConfig(lr=0.7, momentum=0.9)
    assert config.trainer.device == "cpu" and config.parallel.mode == "single"


def test_another_data_option_is_composed_from_the_package():
    args = parse_args("eval", [f"run={RUN_ID}", "data=synthetic", "data.num_features=64"])
    config = saved_config(_tree(), args)
    assert config.data == SyntheticConfig(num_features=64)


@pytest.mark.parametrize(("override", "line"), [
    ("data.val_fractio=0.5", "data.val_fractio=0.5: the run's data (DigitsConfig) cannot take it"),
    ("data.val_fraction=abc", "data.val_fraction=abc: the run's data (DigitsConfig) cannot take it"),
])
def test_a_data_key_the_run_data_lacks_is_one_line(override, line):
    with pytest.raises(ConfigError) as err:
        saved_config(_tree(), parse_args("eval", [f"run={RUN_ID}", override]))
    assert str(err.value).startswith(line), str(err.value)


def test_prediction_columns():
    out = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    columns = batch_columns(out, torch.tensor([1, 2]), [7, 8], classification=True)
    assert list(columns) == ["index", "target", "predicted", "probability", "logit_0", "logit_1",
                             "logit_2"]
    assert columns["index"].tolist() == [7, 8] and columns["predicted"].tolist() == [1, 0]
    e = np.exp(1.0)
    np.testing.assert_allclose(columns["probability"], [e * e / (e * e + 2), e / (e + 2)], rtol=1e-6)
    # per-token classes (N, classes, T): one list per sample; regression: output_<i>
    tokens = batch_columns(torch.zeros(2, 5, 3), torch.zeros(2, 3, dtype=torch.long), [0, 1], True)
    assert list(tokens) == ["index", "target", "predicted", "probability"]
    assert [len(row) for row in tokens["predicted"]] == [3, 3]
    assert list(batch_columns(torch.zeros(2, 2), torch.zeros(2, 2), [0, 1], False)) == [
        "index", "target", "output_0", "output_1"]
    assert _short(["index", "logit_0", "logit_1", "logit_2", "x_1"]) == "index, logit_0..logit_2, x_1"
