"""Checkpoint and resume: SIGKILL anywhere resumes bitwise identically, SIGTERM stops cleanly,
elastic resume keeps the sample order, damaged or foreign checkpoints are handled."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.run.checkpoint import load_checkpoint, step_files
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.cli

# 4 epochs of digits at b=16, k=2: 45 windows per epoch (the last one partial), 180 steps.
JOB = ("trainer.max_epochs=4", "data.batch_size=16", "accum=2", "trainer.precision=64",
       "logger.log_model=false",
       "trainer.log_every_n_steps=1",
       "trainer.checkpoint_every_n_steps=7", "trainer.progress_bar=false",
       "model.hidden_sizes=[64]")
DDP = ("parallel=ddp", "parallel.nproc=2", "data.batch_size=8")
# The same, slowed to about 2 s of training (4 ms per forward), so that kills land mid-run,
# with callbacks whose state must resume exactly: the EMA and a counter of its hooks.
SLOW = (*JOB, "model._target_=tests.fixtures.SlowMLP", "callbacks=ema", "callbacks.ema.decay=0.9",
        "+callbacks.counter._target_=tests.fixtures.StepCounter")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _kill_after_first_checkpoint(args, cwd: Path, run_dir: Path, delay: float) -> int:
    """Start the job, wait for its first checkpoint, wait `delay` more, then SIGKILL the whole
    process group (a node failure: no handler runs). Returns the step of the newest checkpoint."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args,
                             f"hydra.run.dir={run_dir}"], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not step_files(run_dir / "checkpoints") and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    newest = step_files(run_dir / "checkpoints")
    return int(newest[0].stem.split("-")[1]) if newest else 0


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("mode", ["single", "ddp"])
def test_sigkill_anywhere_then_resume_is_bitwise_identical(workdir, mode):
    args = (*SLOW, *(DDP if mode == "ddp" else ()))
    run_cli(*args, "hydra.run.dir=outputs/whole", cwd=workdir, check=True,
            env={"PYTHONPATH": str(ROOT)})
    reference = _weights(workdir / "outputs" / "whole")
    callbacks = load_checkpoint(workdir / "outputs" / "whole" / "checkpoints" / "last.pt")["callbacks"]
    assert callbacks["counter"] == {"steps": 180, "logged": 180, "evaluations": 4}
    rng = random.Random(1234 if mode == "single" else 99)
    killed_at = []
    for attempt in range(3 if mode == "single" else 2):
        run_dir = workdir / "outputs" / f"killed{attempt}"
        killed_at.append(_kill_after_first_checkpoint(args, workdir, run_dir, rng.uniform(0, 1.0)))
        proc = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=workdir, check=True,
                       env={"PYTHONPATH": str(ROOT)})  # trainer.resume=auto
        assert "resumed from" in proc.stdout + proc.stderr
        _assert_identical(_weights(run_dir), reference)
        resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")["callbacks"]
        _assert_identical(resumed["ema"]["weights"], callbacks["ema"]["weights"])
        assert resumed["ema"]["updates"] == 180 and resumed["counter"] == callbacks["counter"]
    assert all(0 < step < 180 for step in killed_at), killed_at
    # One MLflow run per job, reopened on resume: every step logged exactly once.
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert len(runs) == 1 + len(killed_at)
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 181)), run.info.run_name


def test_sigterm_stops_cleanly_and_resumes_elastically_on_one_rank(workdir):
    """DDP W=2 (b=8, k=2) is stopped by SIGTERM; it resumes as one process with b=8, k=4."""
    single = (*JOB, "data.batch_size=8", "accum=4")
    run_cli(*single, "hydra.run.dir=outputs/single", cwd=workdir, check=True)
    run_dir = workdir / "outputs" / "elastic"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SLOW, *DDP,
                             f"hydra.run.dir={run_dir}"], cwd=workdir, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not step_files(run_dir / "checkpoints"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal 15 after saving a checkpoint" in output
    assert "Traceback" not in output
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 0 < stopped["global_step"] < 180 and stopped["world_size"] == 2
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = stopped["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    proc = run_cli(*single, "model._target_=tests.fixtures.SlowMLP", f"hydra.run.dir={run_dir}",
                   cwd=workdir, check=True, env={"PYTHONPATH": str(ROOT)})
    assert f"resumed from {run_dir}" in proc.stdout + proc.stderr
    resumed, reference = _weights(run_dir), _weights(workdir / "outputs" / "single")
    for key in reference:
        assert (resumed[key] - reference[key]).abs().max().item() < 1e-9, key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["global_step"] == 180
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 181))


@pytest.mark.smoke
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(workdir):
    args = (*JOB, "trainer.max_epochs=1", "trainer.keep_checkpoints=3")
    run_cli(*args, "hydra.run.dir=outputs/whole", cwd=workdir, check=True)
    run_dir = workdir / "outputs" / "damaged"
    run_cli(*args, "trainer.max_steps=21", f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
    newest = step_files(run_dir / "checkpoints")[0]
    assert newest.name == "step-00000021.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
    output = proc.stdout + proc.stderr
    assert "skipping damaged checkpoint" in output and "step-00000021.pt" in output
    assert "at global_step 14" in output
    _assert_identical(_weights(run_dir), _weights(workdir / "outputs" / "whole"))


def test_a_checkpoint_of_another_config_is_refused(workdir):
    run_cli(*JOB, "trainer.max_steps=7", "hydra.run.dir=outputs/a", cwd=workdir, check=True)
    proc = run_cli(*JOB, "model.hidden_sizes=[32]", "optim.momentum=0.5",
                   "trainer.resume=outputs/a", cwd=workdir)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: trainer.resume=outputs/a/checkpoints/step-00000007.pt: the "
                           "checkpoint is another run's (")
    assert "model.hidden_sizes: [64] != [32]" in line and "optim.momentum: 0.9 != 0.5" in line
    proc = run_cli(*JOB, "trainer.resume=outputs/nothing", cwd=workdir)
    assert proc.returncode == 2 and "trainer.resume=outputs/nothing: no such file" in proc.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_loss(workdir, policy):
    args = (*JOB, "trainer.max_epochs=1", "model._target_=tests.fixtures.NaNOnceMLP",
            f"trainer.on_nonfinite={policy}")
    proc = run_cli(*args, cwd=workdir, env={"NAN_AT": "9", "PYTHONPATH": str(ROOT)})
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    if policy == "stop":  # forward 9 is micro-step 1 of optimizer step 5
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith(
            "error: non-finite loss at optimizer step 5")
        assert run.info.status == "FAILED"
    else:
        assert proc.returncode == 0, proc.stderr
        assert run.info.status == "FINISHED" and run.data.metrics["train/skipped_steps"] == 1
        assert run.data.metrics["global_step"] == 45


def test_an_unreachable_tracking_server_is_reported_quickly(workdir):
    started = time.monotonic()
    proc = run_cli("trainer.max_epochs=1", "logger.tracking_uri=http://127.0.0.1:9",
                   cwd=workdir)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: logger.tracking_uri=http://127.0.0.1:9: no MLflow server answers there")


def test_concurrent_jobs_share_the_sqlite_store(workdir):
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "trainer.max_epochs=2",
                               "trainer.log_every_n_steps=1", "logger.log_model=false",
                               f"seed={i}", f"logger.run_name=job{i}",
                               f"hydra.run.dir=outputs/job{i}"],
                              cwd=workdir, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2", "job3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 90
