"""`python train.py -m ...`: one MLflow parent run per sweep, each job a child, a CSV and a PNG.

Real Hydra multiruns (basic launcher and submitit's local launcher), a real sqlite store and a
real `mlflow server` on loopback. The SLURM variant is in test_slurm.py.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from stepwise.tracking.sweep_report import CSV_NAME, PNG_NAME
from tests.conftest import ROOT, run_cli, serve_mlflow

pytestmark = [pytest.mark.cli]

TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")  # matplotlib's first line colours


def sweep_runs(uri: str) -> tuple[MlflowClient, object, list]:
    """(client, the parent run, its children in job order); fails unless there is one parent."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("stepwise")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("stepwise.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every other run is a child of the sweep"
    return client, parent, sorted(children, key=lambda r: int(r.data.tags["stepwise.job_num"]))


def summary_rows(client: MlflowClient, parent) -> list[dict[str, str]]:
    path = client.download_artifacts(parent.info.run_id, CSV_NAME)
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def colours_drawn(png: Path) -> list[str]:
    """Which of matplotlib's first four line colours cover a visible stretch of the image."""
    from matplotlib import image

    pixels = (image.imread(png)[..., :3] * 255).round()
    present = []
    for colour in TAB10:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        if np.count_nonzero(np.abs(pixels - rgb).max(axis=-1) <= 8) > 200:
            present.append(colour)
    return present


@pytest.mark.smoke
def test_basic_sweep_is_one_parent_with_a_child_per_job(workdir):
    proc = run_cli("-m", "accum=1,2,4", "trainer.max_epochs=1", "trainer.progress_bar=false",
                   "trainer.log_every_n_steps=1", "hydra.sweep.dir=multirun/accum", "logger.log_model=false",
                   cwd=workdir,
                   check=True)
    client, parent, children = sweep_runs(f"sqlite:///{workdir / 'mlflow.db'}")
    assert parent.info.status == "FINISHED", proc.stderr
    assert [c.data.params["accum"] for c in children] == ["1", "2", "4"]
    assert [c.data.params["effective_batch_size"] for c in children] == ["32", "64", "128"]
    assert all(c.info.status == "FINISHED" for c in children)
    sweep_dir = workdir / "multirun" / "accum"
    for job, child in enumerate(children):
        tags = child.data.tags
        assert tags["stepwise.job_num"] == str(job)
        assert tags["stepwise.sweep_dir"] == str(sweep_dir.resolve())
        assert f"accum={child.data.params['accum']}" in tags["stepwise.overrides"].split()
        assert child.info.run_name == tags["stepwise.overrides"]

    rows = summary_rows(client, parent)
    assert [r["accum"] for r in rows] == ["1", "2", "4"]
    assert [int(float(r["global_step"])) for r in rows] == [45, 23, 12]
    assert [r["status"] for r in rows] == ["FINISHED"] * 3
    for row, child in zip(rows, children):
        assert float(row["val/loss"]) == child.data.metrics["val/loss"]
        assert float(row["wall_time_s"]) > 0
    png = Path(client.download_artifacts(parent.info.run_id, PNG_NAME))
    assert colours_drawn(png) == list(TAB10[:3])  # three lines, no fourth
    assert (sweep_dir / CSV_NAME).exists() and (sweep_dir / PNG_NAME).exists()


def test_a_failing_job_fails_the_parent(workdir):
    """The second job crashes (a NaN loss at its 60th forward, on_nonfinite=stop): Hydra stops
    the sweep, and the parent run ends FAILED with the children that ran listed, not RUNNING."""
    proc = run_cli("-m", "model._target_=tests.fixtures.NaNOnceMLP", "trainer.progress_bar=false",
                   "hydra.sweep.dir=multirun/nan", "trainer.max_epochs=1,2", cwd=workdir,
                   env={"NAN_AT": "60", "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    client, parent, children = sweep_runs(f"sqlite:///{workdir / 'mlflow.db'}")
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"]
    assert [r["status"] for r in summary_rows(client, parent)] == ["FINISHED", "FAILED"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback, with its own sqlite store and artifact directory."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with serve_mlflow(root, "--artifacts-destination", str(root / "artifacts")) as uri:
        yield uri


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_local_launcher_ddp_sweep(store, workdir, request):
    """hydra/launcher=local: submitit starts each job as 2 tasks, the 2 ranks of one DDP job."""
    uri = (request.getfixturevalue("mlflow_server") if store == "server"
           else f"sqlite:///{workdir / 'mlflow.db'}")
    run_cli("-m", "hydra/launcher=local", "parallel=ddp", "parallel.nproc=2", "accum=1,4",
            "trainer.max_epochs=1", "trainer.progress_bar=false", f"logger.tracking_uri={uri}",
            f"logger.experiment_name=local-{store}", "hydra.sweep.dir=multirun/local",
            "logger.log_model=false",
            cwd=workdir, check=True)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"local-{store}")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("stepwise.role") == "sweep"]
    children = sorted((r for r in runs if r is not parent),
                      key=lambda r: int(r.data.tags["stepwise.job_num"]))
    assert [r.data.tags["mlflow.parentRunId"] for r in children] == [parent.info.run_id] * 2
    assert [r.data.params["world_size"] for r in children] == ["2", "2"]
    assert [r.data.params["accum"] for r in children] == ["1", "4"]
    assert [r.data.metrics["global_step"] for r in children] == [23, 6]
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
    # One run dir per job, written by its two ranks together.
    assert sorted(p.parent.name for p in (workdir / "multirun" / "local").glob("*/plan.json")) \
        == ["0", "1"]
    rows = summary_rows(client, parent)
    assert [r["world_size"] for r in rows] == ["2", "2"]


@pytest.mark.parametrize("args,expected", [
    (["hydra/launcher=slurm", "hydra.launcher.gpus_per_nod=1"],
     "hydra.launcher.gpus_per_nod=1: no such key; fix: did you mean hydra.launcher.gpus_per_node?"),
    (["hydra/launcher=local", "parallel=ddp", "parallel.nproc=2", "hydra.launcher.tasks_per_node=4"],
     "hydra.launcher.tasks_per_node=4: parallel=ddp with parallel.nproc=2 runs 2 ranks per node"),
    (["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2"],
     "hydra.launcher.tasks_per_node=2: parallel=single runs one process per job"),
    (["logger.tracking_uri=ftp://host/x"],
     "logger.tracking_uri=ftp://host/x: MLflow has no tracking store for ftp://"),
])
def test_bad_sweep_input_is_one_line_before_any_job(args, expected, workdir):
    proc = run_cli("-m", *args, "accum=1,2", cwd=workdir, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}") and "fix:" in lines[0], \
        proc.stderr
    assert "Launching" not in proc.stdout and "#0" not in proc.stdout  # no job was started
    assert not (workdir / "mlflow.db").exists()


def test_optuna_search_minimises_val_loss(workdir):
    """hparams_search=optuna: every trial is a child run, and the best value Optuna reports is
    the smallest final val/loss among them (the value train.py returns to the sweeper)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "trainer.max_epochs=1",
            "trainer.progress_bar=false", "hydra.sweep.dir=multirun/optuna", "logger.log_model=false",
            cwd=workdir,
            check=True)
    client, parent, children = sweep_runs(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(children) == 3 and parent.info.status == "FINISHED"
    import yaml

    result = yaml.safe_load((workdir / "multirun" / "optuna" / "optimization_results.yaml")
                            .read_text())
    losses = [child.data.metrics["val/loss"] for child in children]
    assert result["best_value"] == pytest.approx(min(losses), rel=1e-12)
    best = children[losses.index(min(losses))]
    assert float(best.data.params["optim.lr"]) == pytest.approx(result["best_params"]["optim.lr"])
