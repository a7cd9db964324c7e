"""A crash in the user's own data code (tests/fixtures/userpkg: `Sequences(fail_at=...)`, the
collate function's `refuse_shorter`): its traceback once, then one line naming the key, the
class, the sample, the step and the rank; exit 1 and the MLflow run FAILED."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stepwise.contract.sampler import MicroBatchSampler
from tests.conftest import ROOT, prepare_job, run_cli

pytestmark = pytest.mark.cli

FIXTURES = ROOT / "tests" / "fixtures"
ENV = {"PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)])}
sys.path.insert(0, str(FIXTURES))  # `userpkg` for prepare_job
# 20 training sequences, b=4, accum=2: sample 5 is at position 13 of epoch 0.
ARGS = ("hydra.searchpath=[pkg://userpkg.conf]", "experiment=seqs", "data.train.size=20",
        "data.val.size=8", "data.batch_size=4", "accum=2", "trainer.max_epochs=1",
        "logger.log_model=false", "logger.system_metrics_interval_s=0")
TAIL = "the traceback above is from your code"


def _owner(tmp_path: Path, index: int, *args: str) -> tuple[int, int, int]:
    """(global_step, micro-step, rank) at which the loop loads training sample `index` in epoch 0,
    from the plan's sampler."""
    job = prepare_job(tmp_path / "plan", *ARGS, *args, "logger=none")
    plan = job.plan
    for rank in range(plan.world_size):
        for micro_step, indices in enumerate(MicroBatchSampler(plan, rank, job.config.seed)):
            if index in indices:
                return micro_step // plan.accum, micro_step, rank
    raise AssertionError(f"sample {index} is not in epoch 0")


def _crash(workdir: Path, *args: str) -> list[str]:
    """Run the CLI; check it failed as a crash of the user's code (exit 1, the run FAILED, one
    traceback, one error line); return the lines of stderr."""
    proc = run_cli(*ARGS, *args, cwd=workdir, env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [line.startswith("Traceback (most recent call last)") for line in lines].count(True) == 1, \
        proc.stderr
    assert [line.startswith("error:") for line in lines].count(True) == 1, proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FAILED"
    return lines


@pytest.mark.smoke
def test_a_sample_that_raises_is_named_after_its_traceback(workdir):
    step, micro_step, rank = _owner(workdir, 5)
    assert (step, micro_step, rank) == (1, 3, 0)  # position 13 = 3 x 4 + 1, in window 1 (k=2)
    lines = _crash(workdir, "+data.train.fail_at=[5]")
    assert lines[-1] == (f"error: data.train (userpkg.data.Sequences) raised ValueError at sample "
                         f"index 5 (global_step {step}, micro-step {micro_step} of epoch 0, "
                         f"rank {rank}): bad sample 5; {TAIL}")
    assert "\n".join(lines).count("ValueError: bad sample 5") == 1
    assert 'raise ValueError(f"bad sample {index}")' in "\n".join(lines)  # the user's frame


def test_a_loader_workers_error_keeps_its_sample(workdir):
    """torch re-raises a worker's error in the main process with only its text: the note in it
    still names the sample."""
    step, micro_step, rank = _owner(workdir, 5)
    lines = _crash(workdir, "+data.train.fail_at=[5]", "+data.num_workers=2")
    assert lines[-1] == (f"error: data.train (userpkg.data.Sequences) raised ValueError at sample "
                         f"index 5 (global_step {step}, micro-step {micro_step} of epoch 0, "
                         f"rank {rank}): bad sample 5; {TAIL}")
    assert "\n".join(lines).count("ValueError: bad sample 5") == 1
    assert any(line.startswith("ValueError: Caught ValueError in DataLoader worker process")
               for line in lines)


@pytest.mark.ddp
def test_ddp_names_the_failing_rank_once(workdir):
    """The rank that loads sample 5 fails; the other one is left waiting in its all-reduce and
    stopped by the launcher: neither its error nor the launcher's report adds a line."""
    step, micro_step, rank = _owner(workdir, 5, "parallel=ddp")
    assert rank == 1  # position 13 of b x W = 8: the second block of micro-step 1
    lines = _crash(workdir, "+data.train.fail_at=[5]", "parallel=ddp")
    assert lines[-1] == (f"error: data.train (userpkg.data.Sequences) raised ValueError at sample "
                         f"index 5 (global_step {step}, micro-step {micro_step} of epoch 0, "
                         f"rank {rank}): bad sample 5; {TAIL}")
    text = "\n".join(lines)
    assert text.count("ValueError: bad sample 5") == 1
    assert "a DDP worker failed" not in text and "ChildFailedError" not in text


def test_validation_data_is_named(workdir):
    lines = _crash(workdir, "+data.val.fail_at=[3]")
    assert lines[-1] == ("error: data.val (userpkg.data.Sequences) raised ValueError at sample "
                         "index 3 (validation after epoch 0, global_step 3, rank 0): bad sample 3; "
                         f"{TAIL}")  # 20 samples, 8 a step: 3 steps


def test_the_collate_function_is_named(workdir):
    from userpkg.data import Sequences

    job = prepare_job(workdir / "plan", *ARGS, "logger=none")
    lengths = [len(t) for t in Sequences(20, seed=0).tokens]
    [micro_step, shortest] = next([j, min(lengths[i] for i in indices)] for j, indices in
                                  enumerate(MicroBatchSampler(job.plan, 0, job.config.seed))
                                  if min(lengths[i] for i in indices) < 3)
    lines = _crash(workdir, "+data.collate_fn.refuse_shorter=3")
    assert lines[-1] == ("error: data.collate_fn (userpkg.data.pad_collate) raised ValueError on a "
                         f"batch of 4 samples (global_step {micro_step // 2}, micro-step "
                         f"{micro_step} of epoch 0, rank 0): a sequence of {shortest} tokens; {TAIL}")
