"""Where a run came from, read back from MLflow: its name, git commit, command, plan, log, system
metrics, and artifacts stored beside the tracking store (issue 17)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.cli


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def _only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_a_run_says_where_it_came_from(tmp_path):
    launch, store = tmp_path / "launch", tmp_path / "store"
    launch.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    proc = run_cli("trainer.max_epochs=1", "accum=2", "logger.log_model=false",
                   f"logger.tracking_uri={uri}",
                   "logger.system_metrics_interval_s=0.5", cwd=launch, check=True)
    client, run = _only_run(uri)
    # MLflow 3's UI opens on GenAI pages: the link asks for the model-training view of the run
    assert (f"in the UI: http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/"
            f"{run.info.run_id}?workflowType=machine_learning") in proc.stdout + proc.stderr
    tags = run.data.tags
    assert run.info.run_name == f"trainer.max_epochs=1 accum=2 logger.log_model=false " \
                                f"logger.tracking_uri={uri} logger.system_metrics_interval_s=0.5"
    assert tags["mlflow.source.git.commit"] == _git("rev-parse", "HEAD", cwd=ROOT)
    branch = _git("rev-parse", "--abbrev-ref", "HEAD", cwd=ROOT)  # "HEAD": a detached checkout
    assert tags.get("mlflow.source.git.branch") == (None if branch == "HEAD" else branch)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=ROOT))
    assert tags["stepwise.git.dirty"] == str(dirty).lower()
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["stepwise.command"] == (f"python {ROOT / 'train.py'} trainer.max_epochs=1 accum=2 "
                                        f"logger.log_model=false logger.tracking_uri={uri} "
                                        "logger.system_metrics_interval_s=0.5")
    # digits: N=1438, b=32, k=2 -> E=64, 23 steps in the one epoch
    assert tags["mlflow.note.content"].startswith(
        "E=64 (b=32 x k=2 x W=1) on N=1438: 23 optimizer steps over 1 epochs")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "train.log", "config.yaml", "plan.json"}
    log_text = Path(client.download_artifacts(run.info.run_id, "train.log", str(tmp_path)))
    assert "executed as planned: 23 optimizer steps" in log_text.read_text()
    # artifacts beside the store, none in the launch directory
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert not (launch / "mlruns").exists() and not (launch / "mlartifacts").exists()
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 1 and memory and memory[0].value > 0


@pytest.mark.slow
def test_an_installed_stepwise_run_from_a_project_tags_the_project_commit(tmp_path):
    """`python -m stepwise` started in the user's own repository (the entry point is not in
    it): the git tags are the project's."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    project = tmp_path / "project"
    project.mkdir()
    _git("init", "-q", "-b", "research", cwd=project)
    (project / "notes.txt").write_text("v1\n")
    _git("add", "notes.txt", cwd=project)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1", cwd=project)
    (project / "notes.txt").write_text("v2\n")  # a tracked change: dirty
    env = {"PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI":
           f"sqlite:///{project / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "stepwise", "trainer.max_steps=3",
                           "logger.system_metrics_interval_s=0"], cwd=project,
                          env={**_clean_env(), **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, run = _only_run(env["MLFLOW_TRACKING_URI"])
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == _git("rev-parse", "HEAD", cwd=project)
    assert tags["mlflow.source.git.branch"] == "research"
    assert tags["stepwise.git.dirty"] == "true"
    assert tags["stepwise.command"] == "python -m stepwise trainer.max_steps=3 " \
                                       "logger.system_metrics_interval_s=0"
    assert run.info.run_name == "trainer.max_steps=3 logger.system_metrics_interval_s=0"


def _clean_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
