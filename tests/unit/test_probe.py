"""Numeric keys against the range their component accepts: torch-free rules in `job.validate`
(dry runs too), torch's own refusals through `stepwise.run.probe`, and warnings for legal slips."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from stepwise.contract.errors import ConfigError
from stepwise.run.job import prepare, validate
from stepwise.run.probe import probe, probe_model, probe_optimizer
from tests.conftest import compose_config, prepare_job

RULES = [
    (["optim.momentum=2"], "optim.momentum", "must be in [0, 1)"),
    (["optim.momentum=1"], "optim.momentum", "must be in [0, 1)"),
    (["optim.momentum=-0.1"], "optim.momentum", "must be in [0, 1)"),
    (["optim.dampening=1.5"], "optim.dampening", "must be in [0, 1]"),
    (["optim.dampening=-1"], "optim.dampening", "must be in [0, 1]"),
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov", "needs optim.momentum > 0"),
    (["optim.nesterov=true", "optim.dampening=0.5"], "optim.nesterov", "dampening=0.5"),
    (["optim=adamw", "optim.betas=[0.9,1.0]"], "optim.betas", "must be two values in [0, 1)"),
    (["optim=adamw", "optim.betas=[-0.1,0.999]"], "optim.betas", "must be two values in [0, 1)"),
    (["optim=adamw", "optim.betas=[0.9]"], "optim.betas", "must be two values in [0, 1)"),
    (["optim=adamw", "optim.eps=0"], "optim.eps", "0/0 = NaN"),
    (["optim.weight_decay=-1"], "optim.weight_decay", "must be >= 0"),
    (["model.hidden_sizes=[64,0]"], "model.hidden_sizes", "at least 1 unit"),
    (["model.hidden_sizes=[-3]"], "model.hidden_sizes", "at least 1 unit"),
    (["model=cnn", "model.widths=[8,0]"], "model.widths", "at least 1 unit"),
    (["seed=-1"], "seed", "numpy takes no negative seeds"),
    (["data.split_seed=-1"], "data.split_seed", "numpy takes no negative seeds"),
    (["data.val_fraction=1.5"], "data.val_fraction", "must be in [0, 1)"),
    (["data.num_workers=1", "data.prefetch_factor=0"], "data.prefetch_factor", "must be >= 1"),
    (["data=synthetic", "data.noise_std=-1"], "data.noise_std", "must be >= 0"),
    (["data=linreg", "data.val_samples=-1"], "data.val_samples", "must be >= 0"),
    (["data=linreg", "data.weights=[]"], "data.weights", "one weight per input feature"),
    (["data=fake", "data.train_samples=0"], "data.train_samples", "must be >= 1"),
    (["data=fake", "data.num_classes=0"], "data.num_classes", "must be >= 1"),
    (["data=fake", "data.std=[0.25,0,0.25]"], "data.std", "must all be positive"),
    (["logger.system_metrics_interval_s=-1"], "logger.system_metrics_interval_s", "must be >= 0"),
    (["logger.flush_timeout_s=-5"], "logger.flush_timeout_s", "must be >= 0"),
]


@pytest.mark.parametrize("overrides,key,problem", RULES, ids=[" ".join(r[0]) for r in RULES])
def test_out_of_range_values_are_refused_without_torch(overrides, key, problem):
    with pytest.raises(ConfigError) as caught:
        validate(compose_config(*overrides))
    assert (caught.value.key, problem in caught.value.problem) == (key, True), caught.value


@pytest.mark.parametrize("overrides", [["optim.momentum=0.99", "optim.dampening=1"],
                                       ["optim.nesterov=true"], ["optim.momentum=0"],
                                       ["optim=adamw", "optim.betas=[0,0.9999]"],
                                       ["model.hidden_sizes=[]"], ["data.val_fraction=0"],
                                       ["logger.system_metrics_interval_s=0"],
                                       ["logger.flush_timeout_s=0"]])
def test_values_at_the_edges_of_the_ranges_pass(overrides):
    validate(compose_config(*overrides))


def _unchecked(tmp_path: Path, *overrides: str, **optim_values):
    """A job whose optim.* values skipped job.validate: what only torch would refuse."""
    job = prepare_job(tmp_path, "dry_run=true", *overrides)
    config = dataclasses.replace(job.config, optim=dataclasses.replace(job.config.optim,
                                                                       **optim_values))
    return config, job


@pytest.mark.parametrize("overrides,values,key,torch_says", [
    ([], dict(nesterov=True, momentum=0.0), "optim.nesterov", "Nesterov momentum requires"),
    ([], dict(momentum=-0.5), "optim.momentum", "Invalid momentum value: -0.5"),
    ([], dict(weight_decay=-1.0), "optim.weight_decay", "Invalid weight_decay value"),
    (["optim=adamw"], dict(betas=[0.9, 1.5]), "optim.betas", "Invalid beta parameter at index 1"),
    (["optim=adamw"], dict(eps=-1.0), "optim.eps", "Invalid epsilon value"),
])
def test_torch_optim_refusals_name_the_key(tmp_path, overrides, values, key, torch_says):
    config, job = _unchecked(tmp_path, *overrides, **values)
    with pytest.raises(ConfigError) as caught:
        probe_optimizer(config, job.plan)
    assert caught.value.key == key and torch_says in caught.value.problem
    assert caught.value.value == values[key.split(".")[1]]


def test_an_optimizer_that_takes_other_arguments_is_refused_before_training(tmp_path):
    args = ("optim._target_=torch.optim.RMSprop",)  # SGD's dampening and nesterov: not RMSprop's
    with pytest.raises(ConfigError, match=r"^optim=sgd: torch.optim.RMSprop refuses the optim.\* "
                                          r"values \(.*'dampening'"):
        prepare_job(tmp_path, *args)
    assert prepare_job(tmp_path, *args, "dry_run=true").plan  # dry runs build nothing


def test_a_model_that_torch_cannot_build_names_the_key(tmp_path):
    job = prepare_job(tmp_path, "dry_run=true")
    model = dataclasses.replace(job.config.model, hidden_sizes=[-3])
    with pytest.raises(ConfigError, match=r"^model.hidden_sizes=\[-3\]: stepwise.models.MLP "
                                          r"cannot be built with it \(.*negative dimension"):
        probe_model(model, job.data, "digits")
    with pytest.raises(ConfigError, match=r"^model=mlp: stepwise.models.Linear cannot be built "
                                          r"with these model.\* values \(.*hidden_sizes"):
        prepare_job(tmp_path, "model._target_=stepwise.models.Linear")


def test_probes_leave_the_global_rng_as_it_was(tmp_path):
    job = prepare_job(tmp_path, "dry_run=true")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe(job.config, job.data, "digits", job.plan)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("overrides,expected", [
    (["optim.lr=20"], "optim.lr=20: unusually large for SGD"),
    (["optim=adamw", "optim.lr=0.5", "lr_scaling=linear", "effective_batch_size=128"],
     "optim.lr=0.5 (scaled to 2 by lr_scaling): unusually large for AdamW"),
    (["optim=adamw", "optim.weight_decay=5"], "optim.weight_decay=5: unusually large (typical: "
                                              "0.01 to 0.1): each step multiplies every weight by "
                                              "1 - lr x weight_decay = 0.995"),
    (["data=synthetic", "data.num_classes=1"], "data.num_classes=1: every label is that class"),
])
def test_a_legal_but_unlikely_value_gets_one_warning(tmp_path, caplog, overrides, expected):
    with caplog.at_level(logging.WARNING, logger="stepwise"):
        prepare(compose_config("dry_run=true", *overrides), run_dir=tmp_path, start_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(expected), warnings


def test_the_defaults_warn_of_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="stepwise"):
        prepare(compose_config(), run_dir=tmp_path, start_dir=tmp_path)
        prepare(compose_config("optim=adamw"), run_dir=tmp_path, start_dir=tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
