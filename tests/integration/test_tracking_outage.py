"""A tracking server that goes away mid-run never costs training (DESIGN section 6).

A real `mlflow server` on loopback is stopped at a known training step (the GatedMLP fixture
waits at that forward until the test lets it go on): training continues at full speed while
what it logs is kept and retried in the background; restarted, the server gets every value; never
restarted, the job still ends with exit 0, and `python -m stepwise.tracking.replay` sends the rest later.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.cli, pytest.mark.slow]

# digits, 45 steps per epoch x 3 = 135 optimizer steps, every one logged
# Every step is read from the device and logged when it ends (flush_every_n_steps=1), so that a
# metric's timestamp is the time its step ended: the pauses between them are the loop's.
JOB = ("trainer.max_epochs=3", "trainer.log_every_n_steps=1", "trainer.flush_every_n_steps=1",
       "trainer.progress_bar=false",
       "trainer.checkpoint_every_n_steps=0", "model._target_=tests.fixtures.GatedMLP",
       "logger.system_metrics_interval_s=1")
TOTAL_STEPS = 135


def _start(workdir: Path, uri: str, gates: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=str(ROOT), GATES=gates, GATE_DIR=str(workdir))
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *JOB, *extra,
                             f"logger.tracking_uri={uri}", "hydra.run.dir=run"], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_gate(workdir: Path, n: int, proc: subprocess.Popen) -> None:
    while not (workdir / f"reached-{n}").exists():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before forward {n}:\n{proc.stdout.read()}")
        time.sleep(0.02)


def _open_gate(workdir: Path, n: int) -> None:
    (workdir / f"go-{n}").touch()


def _the_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def _loss_steps(client, run_id: str) -> list:
    return sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)


def _longest_pause_s(history, first: int, last: int) -> float:
    """The longest wall time between two consecutive logged steps of first..last, while the server
    was down (timestamps are taken on the training thread when the step is logged; the gates
    themselves wait for the test)."""
    stamps = [m.timestamp for m in history if first <= m.step <= last]
    return max(b - a for a, b in zip(stamps, stamps[1:])) / 1000


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root).start()
    yield server
    server.stop()


def test_a_server_stopped_and_restarted_mid_run_gets_every_value(tmp_path, server):
    """Stopped at step 20, restarted at step 100: exit 0, FINISHED, all 135 train/loss steps, and
    no step waited for the server."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = _start(workdir, server.uri, "20,100")
    _wait_for_gate(workdir, 20, proc)
    server.stop()
    _open_gate(workdir, 20)
    _wait_for_gate(workdir, 100, proc)  # 80 steps trained and logged with no server
    server.start()
    _open_gate(workdir, 100)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "MLflow store does not answer" in out and "answers again" in out, out
    client, run = _the_run(server.uri)
    assert run.info.status == "FINISHED", out
    history = _loss_steps(client, run.info.run_id)
    assert [m.step for m in history] == list(range(1, TOTAL_STEPS + 1))
    assert _longest_pause_s(history, 20, 99) < 10, "a step waited for the tracking server"
    assert not (workdir / "run" / "mlflow_unsent").exists() or \
        not list((workdir / "run" / "mlflow_unsent").iterdir())
    assert "train.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_server_that_never_comes_back_loses_nothing_after_the_replay(tmp_path, server):
    """Stopped at step 20 for good: the job still ends (exit 0) after logger.flush_timeout_s,
    keeps what it could not send in the run dir, and the replay sends it all, status last."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = _start(workdir, server.uri, "20", "logger.flush_timeout_s=2")
    _wait_for_gate(workdir, 20, proc)
    server.stop()
    _open_gate(workdir, 20)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    run_dir = workdir / "run"
    assert f"python -m stepwise.tracking.replay {run_dir}" in out, out
    assert list((run_dir / "mlflow_unsent").glob("*.jsonl"))

    server.start()
    client, run = _the_run(server.uri)
    assert run.info.status == "RUNNING"  # the job's end has not reached the store yet
    assert len(_loss_steps(client, run.info.run_id)) < TOTAL_STEPS
    replay = subprocess.run([sys.executable, "-m", "stepwise.tracking.replay", str(run_dir)],
                            capture_output=True, text=True, cwd=workdir,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.splitlines()[-1].startswith("sent: ")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    history = _loss_steps(client, run.info.run_id)
    assert [m.step for m in history] == list(range(1, TOTAL_STEPS + 1))
    assert _longest_pause_s(history, 20, TOTAL_STEPS) < 10
    assert run.data.metrics["global_step"] == TOTAL_STEPS
    assert "train.log" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not list((run_dir / "mlflow_unsent").glob("*.jsonl"))
    again = subprocess.run([sys.executable, "-m", "stepwise.tracking.replay", str(run_dir)],
                           capture_output=True, text=True, cwd=workdir,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 2 and again.stderr.startswith("error: ")
