"""Run names and command lines (stepwise/tracking/provenance.py)."""

from __future__ import annotations

import time

import pytest

from stepwise.tracking.provenance import command_line, run_name


def test_a_run_is_named_by_its_overrides_without_hydra_ones():
    assert run_name("stepwise", ["accum=4", "hydra.run.dir=/x", "+hydra.job.chdir=true",
                                 "optim=adamw"], 0) == "accum=4 optim=adamw"


def test_a_run_without_overrides_is_named_by_its_experiment_and_start_time():
    started = time.mktime((2026, 11, 30, 14, 5, 9, 0, 0, -1))
    assert run_name("digits", [], started) == "digits 2026-11-30 14:05:09"
    assert run_name("digits", ["hydra.run.dir=/x"], started) == "digits 2026-11-30 14:05:09"


@pytest.mark.parametrize("argv0, prog", [
    ("train.py", "python train.py"),
    ("/src/stepwise/src/stepwise/__main__.py", "python -m stepwise"),
    ("/venv/bin/stepwise", "stepwise"),
    ("/venv/lib/python3.11/site-packages/submitit/core/_submit.py", "stepwise"),
])
def test_the_command_runs_the_job_again(argv0, prog):
    assert command_line(["accum=2", "data.name=my data"], argv0) == \
        f"{prog} accum=2 'data.name=my data'"
