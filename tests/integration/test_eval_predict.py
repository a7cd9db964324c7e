"""`stepwise eval` and `stepwise predict` on a run trained once through the real CLI: eval logs
the run's own validation numbers (last.pt: the final val/*, best.pt: best/*) into the same MLflow
run and changes nothing else in it, single process and DDP with uneven shards; predict writes one
row per sample, in order, equal to the checkpoint's model applied by hand; mistakes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.data.arrays import digits
from stepwise.data.loaders import split_samples
from stepwise.models.builtin import MLP
from stepwise.run.checkpoint import load_checkpoint
from tests.conftest import run_cli

pytestmark = [pytest.mark.cli, pytest.mark.slow]

# digits split 80/20 with no test split (1438 training, 359 validation samples: an odd number,
# for uneven shards), b=64: 23 optimizer steps per epoch, so evaluations at global_step 23 and
# 30. monitor_mode=max on a falling val/loss keeps the first evaluation as the best: best.pt
# (step 23) differs from last.pt (step 30).
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.0}
TRAIN = (*(f"data.{key}={value}" for key, value in SPLIT.items()),
         "model.hidden_sizes=[32]", "data.batch_size=64", "trainer.max_steps=30",
         "trainer.monitor=val/loss", "trainer.monitor_mode=max", "trainer.progress_bar=false",
         "logger.log_model=false", "logger.system_metrics_interval_s=0")
VAL_SAMPLES = 359
# 359 samples over 2 ranks in batches of 50: 180 = 50+50+50+30 and 179 = 50+50+50+29.
UNEVEN = ("parallel=ddp", "parallel.nproc=2", "data.batch_size=50")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("evalpredict")
    run_dir = workdir / "outputs" / "run"
    run_cli(*TRAIN, f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
    run_id = (run_dir / ".mlflow_run_id").read_text().strip()
    return {"workdir": workdir, "run_dir": run_dir, "run_id": run_id,
            "client": MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")}


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _snapshot(client: MlflowClient, run_id: str) -> dict:
    """Everything of the run but what an eval adds (eval/* metrics, stepwise.eval.* and
    stepwise.predict.* tags)."""
    run = client.get_run(run_id)
    info = run.info
    return {"status": info.status, "start_time": info.start_time, "end_time": info.end_time,
            "name": info.run_name, "params": dict(run.data.params),
            "tags": {k: v for k, v in run.data.tags.items()
                     if not k.startswith(("stepwise.eval.", "stepwise.predict."))},
            "metrics": {key: _history(client, run_id, key) for key in run.data.metrics
                        if not key.startswith("eval/")}}


def _eval(trained: dict, *args: str) -> subprocess.CompletedProcess:
    return run_cli("eval", *args, cwd=trained["workdir"])


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_eval_of_last_logs_the_final_validation_into_the_same_run(trained):
    client, run_id = trained["client"], trained["run_id"]
    before = _snapshot(client, run_id)
    assert before["status"] == "FINISHED"
    proc = _eval(trained, f"run={run_id}", "split=val", "which=last")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [(step, loss)] = _history(client, run_id, "eval/val/loss")
    [(_, accuracy)] = _history(client, run_id, "eval/val/accuracy")
    assert step == 30
    # the same weights, data, batches and code as the run's last validation: the same floats
    assert loss == dict(_history(client, run_id, "val/loss"))[30]
    assert accuracy == dict(_history(client, run_id, "val/accuracy"))[30]
    assert _snapshot(client, run_id) == before  # status, times, params, tags, other metrics
    record = json.loads(client.get_run(run_id).data.tags["stepwise.eval.val"])
    assert record["checkpoint"] == str(trained["run_dir"] / "checkpoints" / "last.pt")
    assert (record["global_step"], record["split"], record["samples"], record["data"],
            record["world_size"]) == (30, "val", VAL_SAMPLES, "digits", 1)
    assert f"eval/val/loss={loss:.6g}" in proc.stdout.splitlines()[-1]


def test_eval_of_best_by_run_dir_logs_the_best_numbers(trained):
    client, run_id = trained["client"], trained["run_id"]
    best = {key: _history(client, run_id, f"best/val/{key}")[-1] for key in ("loss", "accuracy")}
    assert best["loss"][0] == 23 and best["loss"][1] != dict(_history(client, run_id, "val/loss"))[30]
    proc = _eval(trained, f"run={trained['run_dir']}", "which=best", "name=best")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in ("loss", "accuracy"):
        [(step, value)] = _history(client, run_id, f"eval/best/{key}")
        assert step == 23 and value == pytest.approx(best[key][1], abs=1e-6)


def test_eval_under_ddp_with_uneven_shards_gives_the_same_numbers(trained):
    client, run_id = trained["client"], trained["run_id"]
    proc = _eval(trained, f"run={run_id}", *UNEVEN, "name=ddp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = {key: dict(_history(client, run_id, f"val/{key}"))[30] for key in ("loss", "accuracy")}
    for key in ("loss", "accuracy"):
        [(step, value)] = _history(client, run_id, f"eval/ddp/{key}")
        assert step == 30 and value == pytest.approx(final[key], abs=1e-6)
    assert json.loads(client.get_run(run_id).data.tags["stepwise.eval.ddp"])["world_size"] == 2


def test_data_of_another_shape_is_one_line_and_logs_nothing(trained):
    client, run_id = trained["client"], trained["run_id"]
    before = set(client.get_run(run_id).data.metrics)
    line = _one_error_line(_eval(trained, f"run={run_id}", "data=synthetic"))
    assert line.startswith("error: data=synthetic: the checkpoint's model does not take this "
                           "data: it was trained on data=digits (input_shape [64], num_outputs 10)"
                           ", this data gives input_shape [32], num_outputs 10"), line
    # the same dataset class with digits' shape is taken
    proc = _eval(trained, f"run={run_id}", "data=synthetic", "data.num_features=64",
                 "name=synthetic64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(client.get_run(run_id).data.metrics) - before == {"eval/synthetic64/loss",
                                                                "eval/synthetic64/accuracy"}


def test_a_split_the_data_lacks_is_one_line(trained):
    assert split_samples(digits(**SPLIT), "test") == 0  # the run's data: no test split
    line = _one_error_line(_eval(trained, f"run={trained['run_id']}", "split=test"))
    assert line.startswith("error: split=test: data=digits has no test split"), line
    assert "; fix: " in line


def test_arguments_it_does_not_take_are_one_line(trained):
    line = _one_error_line(_eval(trained, f"run={trained['run_id']}", "trainer.max_steps=3"))
    assert line.startswith("error: trainer.max_steps=3: stepwise eval takes no such key"), line
    line = _one_error_line(_eval(trained, f"run={trained['run_id']}", "weights=ema"))
    assert line.startswith("error: weights=ema: ") and "holds no ema weights (the run had no " \
        "callback that keeps them, e.g. callbacks=ema); fix: use weights=model" in line, line
    line = _one_error_line(_eval(trained, f"run={trained['run_dir']}", "which=best",
                                 f"ckpt={trained['run_dir']}/checkpoints/best.pt"))
    assert line.startswith("error: run="), line
    # python -m stepwise.predict is the same entry point
    proc = subprocess.run([sys.executable, "-m", "stepwise.predict", "run=nowhere"],
                          cwd=trained["workdir"], capture_output=True, text=True, timeout=120)
    assert _one_error_line(proc).startswith("error: run=nowhere: no such run directory")


def _by_hand(run_dir: Path) -> dict[str, np.ndarray]:
    """The validation set through last.pt's weights, in one batch, in float64 for the softmax."""
    model = MLP(input_shape=(64,), num_outputs=10, hidden_sizes=[32])
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    data = digits(**SPLIT)
    with torch.no_grad():
        logits = model(torch.as_tensor(data.x_val)).double()
    probability, predicted = torch.softmax(logits, 1).max(1)
    return {"target": data.y_val, "logits": logits.numpy(), "predicted": predicted.numpy(),
            "probability": probability.numpy()}


def test_predict_writes_one_row_per_sample_in_order_equal_to_the_model(trained):
    client, run_id, run_dir = trained["client"], trained["run_id"], trained["run_dir"]
    before = _snapshot(client, run_id)
    proc = run_cli("predict", f"run={run_id}", cwd=trained["workdir"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = run_dir / "predictions" / "val-last-step30.parquet"
    frame = pd.read_parquet(path)
    hand = _by_hand(run_dir)
    assert list(frame.columns) == ["index", "target", "predicted", "probability",
                                   *(f"logit_{c}" for c in range(10))]
    assert frame["index"].tolist() == list(range(VAL_SAMPLES))
    assert (frame["target"].to_numpy() == hand["target"]).all()
    assert (frame["predicted"].to_numpy() == hand["predicted"]).all()
    np.testing.assert_allclose(frame["probability"], hand["probability"], atol=1e-6)
    np.testing.assert_allclose(frame[[f"logit_{c}" for c in range(10)]], hand["logits"], atol=1e-5)
    artifacts = [a.path for a in client.list_artifacts(run_id, "predictions")]
    assert artifacts == ["predictions/val-last-step30.parquet"]
    assert _snapshot(client, run_id) == before
    # under DDP, 2 ranks with uneven shards: the same file (written again in the same place)
    single = frame.copy()
    proc = run_cli("predict", f"run={run_dir}", *UNEVEN, cwd=trained["workdir"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ddp = pd.read_parquet(path)
    assert list(ddp.columns) == list(single.columns)
    assert ddp["index"].tolist() == list(range(VAL_SAMPLES))
    assert ddp[["target", "predicted"]].equals(single[["target", "predicted"]])
    np.testing.assert_allclose(ddp.to_numpy(float), single.to_numpy(float), atol=1e-6)
    assert not list(path.parent.glob(".*rank*"))  # the ranks' shards are gone
