"""DDP inside a real SLURM step (`srun -n 2`, the local cluster of ../shared/slurm-local)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.ddp]


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return proc.returncode == 0 and ("idle" in proc.stdout or "mix" in proc.stdout)


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if not _slurm_up():
        if os.environ.get("STEPWISE_REQUIRE_SLURM") == "1":
            pytest.fail("STEPWISE_REQUIRE_SLURM=1 but no SLURM cluster answers (sinfo)")
        pytest.skip("no SLURM cluster: start one with ../shared/slurm-local/up.sh")


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
    assert len(run_dirs) == 1 and run_dirs[0].parent.name == "slurm", run_dirs
    assert (run_dirs[0] / "checkpoints" / "last.pt").exists()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.params["world_size"], run.data.params["effective_batch_size"]) == ("2", "64")
    assert run.data.metrics["global_step"] == 23


def test_more_processes_than_the_allocation_is_refused(workdir):
    proc = _srun(workdir, "parallel=ddp", "parallel.nproc=4", "dry_run=true")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == ["error: parallel.nproc=4: the SLURM allocation started 2 processes per node; "
                      "fix: set parallel.nproc=2 or null, or start 4 tasks per node"], proc.stderr
    assert not (workdir / "outputs").exists() or not list(workdir.glob("outputs/**/plan.json"))
