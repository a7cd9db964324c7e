"""trainer.monitor through the real CLI: checkpoints/best.pt holds the best evaluation's weights,
the test split is evaluated with them, early stopping ends FINISHED at the predicted evaluation
(single and DDP), the monitor's state survives a resume (and a test evaluation cut short is done
again), the final and best models load back from MLflow with the checkpoints' outputs, a
registered model gets a version, and a sweep's parent carries its best child and its test metrics."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.data.loaders import fetch
from stepwise.run.build import build_model
from stepwise.run.checkpoint import load_checkpoint
from stepwise.tracking.sweep_report import CSV_NAME
from tests.conftest import by_hand_on_test_split, prepare_job, run_cli

pytestmark = [pytest.mark.cli, pytest.mark.slow]

# digits, an MLP of 32 units: 45 optimizer steps per epoch, evaluations at 45, 90, 135, 180.
JOB = ("model.hidden_sizes=[32]", "trainer.progress_bar=false", "trainer.monitor=val/loss")
# At lr 0.5 val/loss is lowest after epoch 3 (global_step 135), not at the end.
BOUNCY = (*JOB, "optim.lr=0.5")
# monitor_mode=max on a val/loss that falls at every evaluation: the first one stays the best,
# so patience 2 runs out at the third evaluation (global_step 135 of 180).
NEVER_BETTER = (*JOB, "trainer.monitor_mode=max", "trainer.early_stopping_patience=2",
                "logger.log_model=false")
FOUR = "trainer.max_epochs=4"


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def _run_of(client: MlflowClient, run_dir: Path):
    experiment = client.get_experiment_by_name("stepwise")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`stepwise.run_dir` = '{run_dir.resolve()}'")
    return run


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _predicted_stop(values: list[tuple[int, float]], mode: str, patience: int) -> int | None:
    """The step at which `patience` evaluations in a row have not beaten the best."""
    best, bad = None, 0
    for step, value in values:
        if best is None or (value < best if mode == "min" else value > best):
            best, bad = value, 0
        else:
            bad += 1
            if bad == patience:
                return step
    return None


def _outputs(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(inputs)


def test_best_checkpoint_and_the_logged_models(workdir, tmp_path):
    run_dir = workdir / "outputs" / "bouncy"
    proc = run_cli(*BOUNCY, FOUR, "logger.register_model=digits-mlp", f"hydra.run.dir={run_dir}",
                   cwd=workdir, check=True)
    client = _client(workdir)
    run = _run_of(client, run_dir)
    assert run.info.status == "FINISHED"
    history = _history(client, run.info.run_id, "val/loss")
    assert [step for step, _ in history] == [45, 90, 135, 180]
    best_step, best_value = min(history, key=lambda point: point[1])
    assert best_step == 135  # not the last evaluation: best.pt differs from last.pt
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert (best["global_step"], best["best_value"], best["monitor"]) == (best_step, best_value,
                                                                          "val/loss")
    assert run.data.metrics["best/val/loss"] == best_value
    assert run.data.metrics["best/global_step"] == best_step
    assert _history(client, run.info.run_id, "best/global_step") == [(45, 45), (135, 135)]
    assert "best val/loss=" in proc.stdout + proc.stderr

    # The test split (179 samples) is evaluated with best.pt's weights, not the final ones.
    job = prepare_job(tmp_path, *BOUNCY, FOUR)
    by_hand = by_hand_on_test_split(job, best["model"])
    final = by_hand_on_test_split(job, load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    assert run.data.metrics["test/loss"] == pytest.approx(by_hand["test/loss"], abs=1e-6)
    assert run.data.metrics["test/accuracy"] == by_hand["test/accuracy"]
    assert abs(final["test/loss"] - run.data.metrics["test/loss"]) > 0.01
    assert _history(client, run.info.run_id, "test/loss") == [(180, run.data.metrics["test/loss"])]
    assert run.data.tags["stepwise.tested"] == (
        f"best at global_step 135 (checkpoints/best.pt, val/loss={best_value:.6g})")
    assert (f"best/global_step=135, test/loss={run.data.metrics['test/loss']:.6g}, test/accuracy="
            f"{run.data.metrics['test/accuracy']:.6g}, global_step=180") in proc.stdout + proc.stderr

    # The same job stopped after epoch 3 ends with exactly best.pt's weights.
    short_dir = workdir / "outputs" / "short"
    run_cli(*BOUNCY, "trainer.max_epochs=3", "logger.log_model=false",
            f"hydra.run.dir={short_dir}", cwd=workdir, check=True)
    short = load_checkpoint(short_dir / "checkpoints" / "last.pt")["model"]
    assert short.keys() == best["model"].keys()
    assert all(torch.equal(short[key], best["model"][key]) for key in short)

    # The final and the best model load back from MLflow and give the checkpoints' outputs
    # (testing the best weights left the final ones in the model).
    inputs, _ = fetch(job.data, torch.float32, 0, list(range(40)))
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    for name, checkpoint in (("model", "last.pt"), ("best_model", "best.pt")):
        reference = build_model(job.config, job.data).eval()
        reference.load_state_dict(load_checkpoint(run_dir / "checkpoints" / checkpoint)["model"])
        logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{name}")
        assert torch.equal(_outputs(logged, inputs), _outputs(reference, inputs)), name
    final_out = _outputs(mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model"), inputs)
    best_out = _outputs(mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/best_model"), inputs)
    assert not torch.equal(final_out, best_out)
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {
        "dtype": "float32", "shape": (-1, 64)}}]
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)

    # logger.register_model: the best model (with trainer.monitor) is version 1.
    [version] = client.search_model_versions("name = 'digits-mlp'")
    assert (version.version, version.run_id, version.status) == (1, run.info.run_id, "READY")
    [best_model] = [m for m in client.search_logged_models([run.info.experiment_id])
                    if m.name == "best_model"]
    assert version.source == f"models:/{best_model.model_id}"
    assert best_model.source_run_id == run.info.run_id


@pytest.mark.parametrize("parallel", ["single", "ddp"])
def test_early_stopping_ends_finished_at_the_predicted_evaluation(workdir, parallel):
    ddp = ("parallel=ddp", "parallel.nproc=2", "data.batch_size=16") if parallel == "ddp" else ()
    run_dir = workdir / "outputs" / "early"
    proc = run_cli(*NEVER_BETTER, FOUR, *ddp, f"hydra.run.dir={run_dir}", cwd=workdir)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    client = _client(workdir)
    run = _run_of(client, run_dir)
    history = _history(client, run.info.run_id, "val/loss")
    stop = _predicted_stop(history, "max", patience=2)
    assert stop == 135 < int(run.data.params["total_optimizer_steps"]) == 180
    assert [step for step, _ in history] == [45, 90, 135]  # no evaluation after the stop
    assert run.info.status == "FINISHED"
    assert run.data.metrics["global_step"] == stop
    assert run.data.metrics["best/global_step"] == 45
    assert f"early stop at global_step {stop} of 180: val/loss has not improved" in output
    assert f"executed as planned up to its early stop at global_step {stop}" in output
    if parallel == "ddp":
        assert f"global_step on each rank: [{stop}, {stop}]" in output
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["global_step"] == stop and last["monitor"]["stopped_at"] == stop


def test_resume_keeps_the_monitor_state(workdir, tmp_path):
    """Two epochs, then resumed to four: the evaluation at 135 is the second in a row without
    improvement only if the first (at 90, before the resume) was remembered. The first two runs
    end without testing (trainer.test=false: as a job killed during its test evaluation, after
    its final checkpoint); run again, the job trains nothing and tests best.pt's weights."""
    run_dir = workdir / "outputs" / "resumed"
    first = run_cli(*NEVER_BETTER, "trainer.max_epochs=2", "trainer.test=false",
                    f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
    assert "early stop at" not in first.stdout + first.stderr  # the end comes first
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["monitor"]["bad_evaluations"] == 1
    second = run_cli(*NEVER_BETTER, FOUR, "trainer.test=false", f"hydra.run.dir={run_dir}",
                     cwd=workdir, check=True)
    output = second.stdout + second.stderr
    assert "resumed from" in output and "early stop at global_step 135 of 180" in output
    run = _run_of(_client(workdir), run_dir)
    assert run.info.status == "FINISHED" and run.data.metrics["global_step"] == 135
    assert run.data.metrics["best/global_step"] == 45
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["global_step"] == 45
    assert not any(key.startswith("test/") for key in run.data.metrics)
    # Run again: the early-stopped run is complete, nothing is trained; the test split is.
    third = run_cli(*NEVER_BETTER, FOUR, f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
    assert "executed as planned up to its early stop at global_step 135" in third.stdout + \
        third.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == 135
    run = _run_of(_client(workdir), run_dir)
    by_hand = by_hand_on_test_split(prepare_job(tmp_path, *NEVER_BETTER, FOUR, "dry_run=true"),
                                    load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    assert run.data.metrics["test/loss"] == pytest.approx(by_hand["test/loss"], abs=1e-6)
    assert _history(_client(workdir), run.info.run_id, "test/loss") == [
        (135, run.data.metrics["test/loss"])]
    assert run.data.tags["stepwise.tested"].startswith("best at global_step 45 ")


def test_a_sweep_parent_carries_its_best_child(workdir):
    proc = run_cli("-m", "optim.lr=0.05,0.5,1.5", *JOB, "trainer.max_epochs=2",
                   "logger.log_model=false", "hydra.sweep.dir=multirun/lr", cwd=workdir,
                   check=True)
    client = _client(workdir)
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("stepwise.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert len(children) == 3
    best = min(children, key=lambda r: r.data.metrics["best/val/loss"])
    assert parent.data.params["best_child_run_id"] == best.info.run_id
    assert parent.data.tags["stepwise.best_child_run_id"] == best.info.run_id
    assert parent.data.metrics["best/val/loss"] == best.data.metrics["best/val/loss"]
    assert parent.data.params["best_child.criterion"] == "min best/val/loss"
    for key in ("effective_batch_size", "accum", "lr", "per_device_batch_size", "world_size"):
        assert parent.data.params[key] == best.data.params[key], key
    assert parent.data.params["best_child.overrides"] == best.data.tags["stepwise.overrides"]
    assert "best child of the sweep: run " + best.info.run_id in proc.stdout + proc.stderr
    path = client.download_artifacts(parent.info.run_id, CSV_NAME)
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    [marked] = [row for row in rows if row["best_child"] == "True"]
    assert marked["run_id"] == best.info.run_id
    assert float(marked["best/val/loss"]) == best.data.metrics["best/val/loss"]
    # The best child's test metrics (of its best.pt weights), beside the objective.
    for key in ("test/loss", "test/accuracy"):
        assert parent.data.metrics[key] == best.data.metrics[key], key
        assert [float(row[key]) for row in rows] == [
            child.data.metrics[key] for child in sorted(
                children, key=lambda r: int(r.data.tags["stepwise.job_num"]))], key
    assert len({child.data.metrics["test/loss"] for child in children}) == 3
    assert f"test/loss={best.data.metrics['test/loss']:.6g}" in proc.stdout + proc.stderr


def test_a_metric_the_run_does_not_log_is_one_line_before_any_work(workdir):
    proc = run_cli("trainer.monitor=val/acc", "hydra.run.dir=outputs/bad", cwd=workdir)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: trainer.monitor=val/acc: the evaluation logs no such metric; fix: use one of "
        "val/loss, val/accuracy")
    assert "Traceback" not in proc.stderr
    assert not (workdir / "outputs" / "bad").exists()
