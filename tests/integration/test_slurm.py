"""DDP inside a real SLURM step (`srun -n 2`), and sweeps through submitit, on the local cluster
that `bash scripts/slurm-local/up.sh` starts (as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.run.checkpoint import load_checkpoint
from tests.conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]
START = "start one with `bash scripts/slurm-local/up.sh` (as root; scripts/slurm-local/README.md)"


def _node_states() -> str | None:
    """The nodes' states as sinfo gives them (idle, mix, alloc, comp, drain, ...), or None."""
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _slurm_up(patience_s: float = 120) -> tuple[bool, str | None]:
    """Whether a node takes jobs. A node still busy with an earlier job (alloc, comp), or a
    slurmctld too loaded to answer sinfo at once, is waited for, up to `patience_s`, rather than
    taken for a cluster that is down."""
    if shutil.which("sinfo") is None:
        return False, None
    deadline = time.monotonic() + patience_s
    while True:
        states = _node_states()
        if states is not None and ("idle" in states or "mix" in states):
            return True, states
        busy = states is None or any(s in states for s in ("alloc", "comp"))
        if not busy or time.monotonic() > deadline:
            return False, states
        time.sleep(1)


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    up, states = _slurm_up()
    if not up:
        seen = f" (sinfo: {states})" if states else ""
        if os.environ.get("STEPWISE_REQUIRE_SLURM") == "1":
            pytest.fail(f"STEPWISE_REQUIRE_SLURM=1 but no SLURM node takes jobs{seen}: {START}")
        pytest.skip(f"no SLURM node takes jobs{seen}: {START}")


def _srun(workdir: Path, *args: str, tasks: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "HYDRA_", "SLURM_"))}
    return subprocess.run(["srun", "-n", str(tasks), "--cpus-per-task=1", "--time=5",
                           sys.executable, str(ROOT / "train.py"), *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def test_srun_two_tasks_is_one_ddp_job(workdir):
    proc = _srun(workdir, "parallel=ddp", "trainer.max_epochs=1", "trainer.progress_bar=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dirs = [p.parent for p in workdir.glob("outputs/**/.hydra")]
    assert len(run_dirs) == 1, run_dirs  # Hydra's outputs/<date>/<time>, as rank 0 resolved it
    assert (run_dirs[0] / "checkpoints" / "last.pt").exists()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.params["world_size"], run.data.params["effective_batch_size"]) == ("2", "64")
    assert run.data.metrics["global_step"] == 23


def test_srun_tasks_share_a_run_dir_named_with_now(workdir):
    """Each task evaluating ${now:...} (microseconds) itself would make two directories."""
    proc = _srun(workdir, "parallel=ddp", "trainer.max_steps=3", "trainer.progress_bar=false",
                 "hydra.run.dir=out/${now:%H-%M-%S-%f}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run_dir] = list((workdir / "out").iterdir())
    assert (run_dir / ".hydra").is_dir() and (run_dir / "checkpoints" / "last.pt").exists()


def test_more_processes_than_the_allocation_is_refused(workdir):
    proc = _srun(workdir, "parallel=ddp", "parallel.nproc=4", "dry_run=true")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == ["error: parallel.nproc=4: the SLURM allocation started 2 processes per node; "
                      "fix: set parallel.nproc=2 or null, or start 4 tasks per node"], proc.stderr
    assert not (workdir / "outputs").exists() or not list(workdir.glob("outputs/**/plan.json"))


@contextlib.contextmanager
def _start_requeued_jobs_now():
    """slurmctld holds a requeued job back for about two minutes before it may start again; the
    cluster's operator (this test) lets it start sooner, so the test does not wait for nothing.
    Not at once: a job released in the second its previous instance is being cancelled was
    started and failed at once (seen under load), so a job must have been pending for longer than
    the cluster's KillWait (5 s) before it is released."""
    done = threading.Event()

    def release() -> None:
        pending_since: dict[str, float] = {}
        while not done.wait(1.0):
            pending = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i"],
                                     capture_output=True, text=True).stdout.split()
            pending_since = {job: pending_since.get(job, time.monotonic()) for job in pending}
            for job_id, since in pending_since.items():
                if time.monotonic() - since > 8:
                    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                   capture_output=True)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_a_timed_out_job_is_requeued_and_finishes_as_one_run(workdir):
    """A 1-minute time limit ends mid-training (about 50 s of training plus start-up; each attempt
    gets ~30 s before SIGUSR2 and keeps ~30 s to checkpoint and requeue before SLURM's SIGTERM at
    the limit, which a loaded machine needed: at 20 s, `scontrol requeue` was once killed by it;
    a loaded machine needs more attempts: the requeue budget is generous): submitit's
    SIGUSR2 makes stepwise checkpoint, submitit requeues, the job resumes into the same MLflow run
    and ends with the weights of an uninterrupted run."""
    job = ("model._target_=tests.fixtures.SlowMLP", "data.batch_size=16", "trainer.max_epochs=25",
           "trainer.precision=64", "trainer.checkpoint_every_n_steps=100",
           "trainer.progress_bar=false", "trainer.log_every_n_steps=1")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "HYDRA_", "SLURM_"))}
    env.update(PYTHONPATH=str(ROOT), SLOW_FORWARD_S="0.02")
    with _start_requeued_jobs_now():
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm",
             "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30",
             "hydra.launcher.max_num_timeout=30", "hydra.sweep.dir=multirun/requeue",
             "logger.run_name=requeued", *job],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_dir = workdir / "multirun" / "requeue" / "0"
    log = (job_dir / "train.log").read_text()
    assert "resumed from" in log, log[-3000:]

    env["SLOW_FORWARD_S"] = "0"  # the same arithmetic, without the sleeps
    subprocess.run([sys.executable, str(ROOT / "train.py"), *job, "logger=none",
                    "hydra.run.dir=outputs/reference"], cwd=workdir, env=env, check=True,
                   capture_output=True)
    requeued = load_checkpoint(job_dir / "checkpoints" / "last.pt")
    reference = load_checkpoint(workdir / "outputs" / "reference" / "checkpoints" / "last.pt")
    assert requeued["global_step"] == reference["global_step"] == 2250
    for key, value in reference["model"].items():
        assert torch.equal(requeued["model"][key], value), key

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("stepwise.role") == "sweep"]
    [run] = [r for r in runs if r is not parent]  # one run for the job, however often requeued
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert run.info.status == "FINISHED" and run.info.run_name == "requeued"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 2251))


def test_slurm_ddp_sweep_is_one_parent_with_two_ddp_children(workdir):
    """hydra/launcher=slurm with parallel=ddp: each job is one sbatch of 2 tasks (tasks_per_node
    follows parallel.nproc), the 2 ranks of one DDP run; the sweep is one parent run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "HYDRA_", "SLURM_"))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "parallel=ddp",
         "parallel.nproc=2", "accum=1,4", "trainer.max_epochs=1", "trainer.progress_bar=false",
         "hydra.launcher.timeout_min=5", "hydra.sweep.dir=multirun/slurm_ddp"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_dir = workdir / "multirun" / "slurm_ddp"
    # submitit's folders: <array job>_<job num>/<array job>_<job num>_<task>_log.out
    tasks: dict[str, list[str]] = {}
    for log in (sweep_dir / ".submitit").glob("*/*_log.out"):
        tasks.setdefault(log.parent.name, []).append(log.name.split("_")[-2])
    assert len(tasks) == 2 and all(sorted(t) == ["0", "1"] for t in tasks.values()), tasks
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("stepwise.role") == "sweep"]
    children = sorted((r for r in runs if r is not parent),
                      key=lambda r: int(r.data.tags["stepwise.job_num"]))
    assert [r.data.tags["mlflow.parentRunId"] for r in children] == [parent.info.run_id] * 2
    assert [(r.data.params["world_size"], r.data.params["accum"]) for r in children] == \
        [("2", "1"), ("2", "4")]
    assert [r.data.metrics["global_step"] for r in children] == [23, 6]
    assert {r.info.status for r in runs} == {"FINISHED"}
