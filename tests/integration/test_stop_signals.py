"""SIGTERM and SIGUSR2 at any moment end the job cleanly: exit 128 + the signal, no traceback,
and the MLflow run (if one exists yet) KILLED with the metrics of the last step taken. Every
signal is sent on an event the job reports (a log line, a checkpoint file), never after a delay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stepwise.run.checkpoint import load_checkpoint, step_files
from tests.conftest import ROOT

pytestmark = pytest.mark.cli

LONG = ("trainer.max_epochs=1000", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=7")
DDP = ("parallel=ddp", "parallel.nproc=2")


def _start(workdir: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args,
                             "hydra.run.dir=outputs/run"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, needle: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"the job ended before printing {needle!r}:\n{''.join(seen)}")


def _wait_for_checkpoint(proc: subprocess.Popen, directory: Path) -> None:
    while not step_files(directory):  # the event itself; the loop only bounds a dead job
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, signum: int, seen: list[str]) -> str:
    proc.send_signal(signum)
    try:
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return "".join(seen) + rest


def _runs(workdir: Path):
    if not (workdir / "mlflow.db").exists():
        return None, []
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stepwise")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.parametrize("mode", ["single", "ddp"])
@pytest.mark.parametrize("event", ["plan (also in", "MLflow run", "spawning"])
def test_a_stop_signal_during_start_up(workdir, mode, event):
    if event == "spawning" and mode == "single":
        pytest.skip("one process spawns nothing")
    proc = _start(workdir, *LONG, *(DDP if mode == "ddp" else ()))
    seen = _wait_for_line(proc, event)
    output = _stop(proc, signal.SIGTERM, seen)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output, output
    assert "stopped by signal 15" in output
    _, runs = _runs(workdir)
    assert [run.info.status for run in runs] in ([], ["KILLED"]), output  # never left RUNNING
    if event != "plan (also in":
        assert len(runs) == 1, output


@pytest.mark.parametrize("mode,signum", [("single", signal.SIGTERM), ("single", signal.SIGUSR2),
                                         ("ddp", signal.SIGTERM)])
def test_a_stop_signal_in_training_logs_the_last_step(workdir, mode, signum):
    """The default logs every 50 steps; the stop comes after the first checkpoint (step 7), so
    before the fix the run showed no train/loss at all."""
    proc = _start(workdir, *LONG, *(DDP if mode == "ddp" else ()))
    _wait_for_checkpoint(proc, workdir / "outputs" / "run" / "checkpoints")
    output = _stop(proc, signum, [])
    assert proc.returncode == 128 + signum, output
    assert "Traceback" not in output
    assert f"stopped by signal {signum} after saving a checkpoint" in output
    last = load_checkpoint(workdir / "outputs" / "run" / "checkpoints" / "last.pt")
    client, [run] = _runs(workdir)
    assert run.info.status == "KILLED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert max(m.step for m in losses) == last["global_step"] >= 7
    seen = client.get_metric_history(run.info.run_id, "train/samples_seen")
    assert max(m.step for m in seen) == last["global_step"]
    assert {m.step: m.value for m in seen}[last["global_step"]] == last["samples_seen"]
