"""One run directory per job (rank 0 resolves the one the user configured, every rank uses it),
and one live job per run directory (an OS lock that dies with its process)."""

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
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.cli


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}


def _torchrun(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
                           "parallel=ddp", "trainer.max_steps=3", "trainer.progress_bar=false",
                           *args], cwd=workdir, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _runs(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])


def test_torchrun_ranks_share_a_run_dir_named_with_now(workdir):
    """Each rank evaluating ${now:...} (microseconds) itself would make two directories."""
    proc = _torchrun(workdir, "hydra.run.dir=out/${now:%H-%M-%S-%f}")
    assert proc.returncode == 0, proc.stderr
    [run_dir] = [p for p in (workdir / "out").iterdir()]
    assert (run_dir / ".hydra").is_dir() and (run_dir / "checkpoints" / "last.pt").exists()
    _, [run] = _runs(workdir)
    assert run.data.tags["stepwise.run_dir"] == str(run_dir.resolve())


def test_torchrun_keeps_a_run_dir_set_in_a_config_file(workdir):
    (workdir / "conf" / "experiment").mkdir(parents=True)
    (workdir / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nhydra:\n  run:\n    dir: mine/${now:%H-%M-%S-%f}\n")
    proc = _torchrun(workdir, f"hydra.searchpath=[file://{workdir / 'conf'}]", "experiment=mine")
    assert proc.returncode == 0, proc.stderr
    assert not (workdir / "outputs").exists()
    [run_dir] = list((workdir / "mine").iterdir())
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == 3


def test_a_second_live_job_in_the_same_run_dir_stops_before_any_work(workdir):
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "trainer.max_epochs=1000",
                              "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=5",
                              "hydra.run.dir=outputs/shared"], cwd=workdir, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = workdir / "outputs" / "shared" / "checkpoints"
    try:
        while not step_files(checkpoints):  # the first job is training
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.05)
        overrides = (workdir / "outputs" / "shared" / ".hydra" / "overrides.yaml").read_text()
        second = run_cli("accum=2", "hydra.run.dir=outputs/shared", cwd=workdir)
        assert second.returncode == 2, second.stderr
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"error: hydra.run.dir={workdir / 'outputs' / 'shared'}: a live "
                               f"job (pid {first.pid} on ")
        assert "fix: wait for it to end (or stop it), or choose another hydra.run.dir" in line
        # the first job's record is untouched, and it still trains
        assert (workdir / "outputs" / "shared" / ".hydra" / "overrides.yaml").read_text() == overrides
        assert first.poll() is None
        _, runs = _runs(workdir)
        assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    _, [run] = _runs(workdir)
    assert run.info.status == "KILLED"


def test_the_lock_dies_with_a_killed_job(workdir):
    """SIGKILL (no handler runs): the resumed job finds the directory free and continues. 4 ms per
    forward keeps the 90 steps (2 epochs) running well past the first checkpoint."""
    job = ("trainer.max_epochs=2", "model._target_=tests.fixtures.SlowMLP",
           "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=5",
           "hydra.run.dir=outputs/r")
    env = {**_env(), "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *job], cwd=workdir,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not step_files(workdir / "outputs" / "r" / "checkpoints"):
        assert first.poll() is None
        time.sleep(0.05)
    first.kill()
    first.wait()
    proc = run_cli(*job, cwd=workdir, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    assert load_checkpoint(workdir / "outputs" / "r" / "checkpoints" / "last.pt")["global_step"] == 90


def test_a_job_stopped_before_its_first_checkpoint_continues_its_mlflow_run(tmp_path):
    """A SLURM signal can come up to a minute early: a job requeued before its first checkpoint
    logs into the run it opened, and the store holds one run, not a KILLED one beside a new one."""
    from mlflow.tracking import MlflowClient

    from stepwise.run.runner import open_run
    from tests.conftest import prepare_job

    job = prepare_job(tmp_path, "trainer.max_steps=2")
    (job.run_dir / "config.yaml").write_text("{}\n")  # what main writes before the run opens
    (job.run_dir / "plan.json").write_text(job.plan.to_json())
    first = open_run(job)
    first.finish("KILLED")  # stopped during start-up: no checkpoint
    again = open_run(prepare_job(tmp_path, "trainer.max_steps=2"))
    assert again.run_id == first.run_id
    again.finish("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["total_optimizer_steps"] == "2"
    fresh = open_run(prepare_job(tmp_path, "trainer.max_steps=2", "trainer.resume=none"))
    assert fresh.run_id != first.run_id  # resume=none starts a new run
    fresh.finish("FINISHED")
