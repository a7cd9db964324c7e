"""`python train.py` end to end: real Hydra composition, real MLflow store read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.run.checkpoint import load_checkpoint
from tests.conftest import run_cli

pytestmark = pytest.mark.cli


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def _only_run(workdir: Path):
    client = _client(workdir)
    experiment = client.get_experiment_by_name("stepwise")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _run_dirs(workdir: Path) -> list[Path]:
    return sorted(p.parent for p in (workdir / "outputs").glob("*/*/.hydra"))


def test_default_job_trains_and_logs_the_run(workdir):
    # No wall-time bound here (the machine is shared): README gives the measured time.
    proc = run_cli(cwd=workdir, check=True)
    client, run = _only_run(workdir)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert {k: params[k] for k in ("effective_batch_size", "per_device_batch_size", "accum",
            "world_size", "parallel", "train_samples", "optimizer_steps_per_epoch",
            "total_optimizer_steps", "lr")} == {
        "effective_batch_size": "32", "per_device_batch_size": "32", "accum": "1",
        "world_size": "1", "parallel": "single", "train_samples": "1438",
        "optimizer_steps_per_epoch": "45", "total_optimizer_steps": "450", "lr": "0.1"}
    assert params["trainer.max_epochs"] == "10" and params["model.hidden_sizes"] == "[128, 128]"
    metrics = run.data.metrics
    assert metrics["global_step"] == 450 and metrics["val/accuracy"] > 0.9
    # trainer.log_every_n_steps=null by default: every 450 // 100 = 4 steps, and the last step
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [*range(4, 450, 4), 450]
    seen = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/samples_seen")}
    assert seen[48] == 1438 + 3 * 32 and seen[450] == 14380
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert [seen[m.step] for m in val] == [1438 * epoch for epoch in range(1, 11)]
    assert "step 450/450 (100%) loss " in proc.stdout  # stdout is not a terminal here
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plan.json"} <= artifacts
    [run_dir] = _run_dirs(workdir)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["total_optimizer_steps"] == 450 and plan["effective_batch_size"] == 32
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["global_step"] == 450
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))
    model.load_state_dict(checkpoint["model"])  # the bare model, no wrapper prefixes
    assert "effective_batch_size (E=b*k*W)  32" in proc.stdout + proc.stderr


@pytest.mark.smoke
def test_accum_and_batch_size_give_effective_batch_128(workdir):
    run_cli("accum=8", "data.batch_size=16", "trainer.max_epochs=2", "lr_scaling=linear",
            "trainer.log_every_n_steps=1", "logger.log_model=false", cwd=workdir, check=True)
    client, run = _only_run(workdir)
    params = run.data.params
    assert (params["effective_batch_size"], params["accum"], params["per_device_batch_size"]) == (
        "128", "8", "16")
    # 1438 samples: 90 micro-steps of 16 = 11 windows of 8 + a partial window of 2 micro-steps.
    assert (params["optimizer_steps_per_epoch"], params["total_optimizer_steps"]) == ("12", "24")
    assert float(params["lr"]) == pytest.approx(0.1 * 128 / 32)
    assert run.data.metrics["global_step"] == 24
    lrs = client.get_metric_history(run.info.run_id, "train/lr")
    assert len(lrs) == 24 and all(m.value == pytest.approx(0.4) for m in lrs)


def test_effective_batch_size_derives_accum(workdir):
    proc = run_cli("effective_batch_size=256", "data.batch_size=32", "dry_run=true",
                   cwd=workdir, check=True)
    [run_dir] = _run_dirs(workdir)
    assert json.loads((run_dir / "plan.json").read_text())["accum"] == 8
    assert "accum (k)                       8" in proc.stdout + proc.stderr
    assert not (workdir / "mlflow.db").exists()  # dry runs touch no tracking store


@pytest.mark.smoke
def test_linreg_accum_experiment_matches_batch_40(workdir):
    """The textbook demonstration: batch 10 x accum 4 == batch 40, per epoch and in the weights."""
    runs = {}
    for name, args in {"b10k4": [], "b40k1": ["data.batch_size=40", "accum=1"]}.items():
        run_cli("experiment=linreg_accum", f"logger.run_name={name}", "logger.log_model=false",
                f"hydra.run.dir=outputs/{name}", *args, cwd=workdir, check=True)
        runs[name] = load_checkpoint(workdir / "outputs" / name / "checkpoints" / "last.pt")
    client = _client(workdir)
    experiment = client.get_experiment_by_name("stepwise")
    losses = {}
    for run in client.search_runs([experiment.experiment_id]):
        history = client.get_metric_history(run.info.run_id, "val/loss")
        losses[run.info.run_name] = [(m.step, m.value) for m in history]
        assert run.data.params["effective_batch_size"] == "40"
    assert [s for s, _ in losses["b10k4"]] == [25, 50, 75]
    for (_, a), (_, b) in zip(losses["b10k4"], losses["b40k1"]):
        assert abs(a - b) < 1e-12
    values = [v for _, v in losses["b10k4"]]
    assert values[0] > values[1] > values[2]  # it is learning y = -2 x1 + 3.4 x2 + 4.2
    for key, value in runs["b40k1"]["model"].items():
        assert (runs["b10k4"]["model"][key] - value).abs().max().item() < 1e-12
    assert runs["b10k4"]["global_step"] == runs["b40k1"]["global_step"] == 75
