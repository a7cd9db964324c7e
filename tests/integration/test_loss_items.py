"""Loss items stated by the data (per-sample `item_counts`, no communication) or counted by the
loop: the same training either way, checked against each other, and refused when a window has
no item (tests/fixtures/userpkg: sequences with a target per token, padded with -100)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.contract.errors import EmptyWindow, PlanMismatch
from stepwise.contract.sampler import epoch_permutation
from stepwise.parallel.replica import Replica
from stepwise.run.checkpoint import load_checkpoint
from stepwise.run.fit import train
from stepwise.tracking.tracker import NullTracker
from tests.conftest import ROOT, prepare_job, run_cli

FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
SEARCHPATH = "hydra.searchpath=[pkg://userpkg.conf]"
# 37 sequences of 1 to 12 tokens, a target per token; E = 8, so the last window holds 5.
TAGS = (SEARCHPATH, "model=tagger", "data=tags", "loss=cross_entropy", "metrics=none",
        "logger=none", "trainer.precision=64", "trainer.progress_bar=false", "optim.lr=0.5",
        "optim.momentum=0.0", "trainer.max_epochs=2", "trainer.log_every_n_steps=3")
STATED = "+data.train.state_counts=true"
CPU = Replica("single", 0, 1, torch.device("cpu"))


def _train(tmp_path: Path, *overrides: str):
    job = prepare_job(tmp_path, *TAGS, *overrides)
    train(job, CPU, NullTracker())
    state = load_checkpoint(job.run_dir / "checkpoints" / "last.pt")
    return job, state


def test_stated_and_counted_items_train_alike(tmp_path):
    counted_job, counted = _train(tmp_path / "counted", "data.batch_size=2", "accum=4")
    stated_job, stated = _train(tmp_path / "stated", STATED, "data.batch_size=4", "accum=2")
    assert counted_job.items is None and stated_job.items is not None
    lengths = [len(t) for t in stated_job.data.train_set().tokens]
    assert stated_job.items.total_items == 2 * sum(lengths)  # every sequence, twice
    assert counted["counters"]["items_seen"] == stated["counters"]["items_seen"] == 2 * sum(lengths)
    for key, value in counted["model"].items():
        assert (stated["model"][key] - value).abs().max().item() < 1e-12, key


def test_item_counts_that_disagree_with_the_mask_fail_the_run(tmp_path):
    """Sample 20 (not one of the two the start-up probe tries) states one item too many."""
    step = 1 + epoch_permutation(37, 0, 0).tolist().index(20) // 8
    with pytest.raises(PlanMismatch, match=rf"optimizer step {step}: the loss's item_mask counted "
                                           r"\d+ items, the data's item_counts \d+"):
        _train(tmp_path, STATED, "+data.train.miscount=[20]", "trainer.log_every_n_steps=1")


@pytest.mark.cli
@pytest.mark.parametrize("args,expected", [
    (["+data.train.miscount=[1]"], "error: data.train=item_counts: state "),
    # targets padded with class 0, which cross_entropy's ignore_index=-100 keeps
    (["+data.collate_fn.ignore_index=0"], "error: loss.ignore_index=-100: matches no target of "
     "training samples [0, 1], so nothing is ignored"),
    (["+model.context=8"], "error: model.context=8: sample "),
])
def test_items_that_cannot_be_right_are_one_line_before_any_work(args, expected, workdir):
    env = {"PYTHONPATH": f"{FIXTURES}:{ROOT}"}
    proc = run_cli(*TAGS, STATED, *args, cwd=workdir, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-3000:]
    assert not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize("stated", [True, False])
def test_a_window_without_items_fails_naming_its_step(tmp_path, stated):
    """The third window (b=4, k=2) holds sequences whose targets are all padding."""
    third = epoch_permutation(37, 0, 0)[16:24].tolist()  # the config's seed is 0
    blank = f"+data.train.blank=[{','.join(map(str, third))}]"
    args = [STATED] if stated else []
    with pytest.raises(EmptyWindow) as err:
        _train(tmp_path, *args, blank, "data.batch_size=4", "accum=2")
    assert "optimizer step 3 " in str(err.value) and "has no loss items" in str(err.value)
    if stated:  # found before the step: the samples are named
        assert f"samples {third}" in str(err.value)


@pytest.mark.cli
def test_padding_the_loss_keeps_is_warned_of_without_stated_counts(workdir):
    """Targets padded with class 0, kept by ignore_index=-100: counted, the run goes on, warned."""
    env = {"PYTHONPATH": f"{FIXTURES}:{ROOT}"}
    proc = run_cli(*TAGS, "+data.collate_fn.ignore_index=0", "trainer.max_epochs=1", cwd=workdir,
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in (proc.stdout + proc.stderr).splitlines()
              if "loss.ignore_index=-100 matches no target of training samples [0, 1]" in line]
    assert len(warned) == 1, proc.stdout[-3000:]


@pytest.mark.smoke
@pytest.mark.cli
def test_items_seen_is_logged_and_planned(workdir):
    env = {"PYTHONPATH": f"{FIXTURES}:{ROOT}"}
    proc = run_cli(*TAGS, STATED, "logger=mlflow", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total items" in proc.stdout + proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/items_seen")
    assert history and int(history[-1].value) == int(run.data.params["total_items"])
    assert history[-1].step == int(run.data.params["total_optimizer_steps"])
