"""Models that take token ids and mapping batches, logged as MLflow PyTorch models into a real
sqlite store and loaded back with `mlflow.pytorch.load_model`: the same outputs on batches of
other sizes and sequence lengths than the example the model was logged with. A model torch.export
cannot trace (a GRU over packed sequences), or whose inputs are not tensors, is logged as the
pickled module, linked to the run alike, and says so; one that cannot be pickled either is an
error line, and the run keeps its weights."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import types

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from stepwise.data.loaders import fetch
from stepwise.run.build import build_model
from stepwise.run.checkpoint import load_checkpoint
from stepwise.run.model_log import log_run_models
from stepwise.tracking.models import UnsupportedInputs, log_model, positional
from tests.conftest import ROOT, prepare_job, run_cli

FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))  # userpkg, as its configs name it

LM = ("data=tinytext", "model=tiny_lm", "loss=cross_entropy", "metrics=none", "logger=none",
      "data.train.samples=40", "data.train.min_len=1", "data.train.max_len=24",
      "data.val.samples=8", "data.val.max_len=24", "data.test.samples=8", "data.test.max_len=24",
      "model.dim=16", "model.layers=1", "model.heads=2", "model.context=24")
SEARCHPATH = "hydra.searchpath=[pkg://userpkg.conf]"
BAG = (SEARCHPATH, "experiment=seqs", "logger=none")
GRU = (SEARCHPATH, "experiment=gru", "logger=none")  # userpkg.models.GRUClassifier
NEEDS = "mlflow.pytorch.load_model needs userpkg importable and " \
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION unset or true"


def _store(tmp_path):
    """(tracking URI, client, run id) of a new run in a sqlite store under `tmp_path`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("models")).info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("overrides,inputs", [(LM, {"tokens": ("int64", (-1, -1))}),
                                              (BAG, {"tokens": ("int64", (-1, -1)),
                                                     "mask": ("bool", (-1, -1))})],
                         ids=["token_ids", "mapping"])
def test_token_and_mapping_models_load_back_with_the_same_outputs(tmp_path, overrides, inputs):
    job = prepare_job(tmp_path, *overrides)
    torch.manual_seed(0)
    model = build_model(job.config, job.data).eval()
    example, _ = fetch(job.data, torch.float32, 0, [0, 1])
    uri, client, run_id = _store(tmp_path)
    logged = log_model(uri, run_id, model, example, name="model", step=7)
    assert logged.form == "pt2" and logged.describe() == f": {logged.uri}"
    model_uri = logged.uri
    assert model_uri.startswith("models:/")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    spec = mlflow.models.get_model_info(model_uri).signature.inputs.to_dict()
    assert {s["name"]: (s["tensor-spec"]["dtype"], s["tensor-spec"]["shape"]) for s in spec} == inputs
    batch, _ = fetch(job.data, torch.float32, 0, list(range(2, 9)))
    lengths = {example["tokens"].shape[1], batch["tokens"].shape[1]}
    assert len(lengths) == 2, "the check needs a batch whose sequences differ from the example's"
    for cut in (batch, {key: value[:3, :5] for key, value in batch.items()}):
        with torch.no_grad():
            assert torch.equal(loaded(*cut.values()), model(**cut))
    assert client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id == run_id


def test_inputs_that_are_not_tensors_are_refused_with_the_reason():
    assert positional(torch.ones(2))[1] is None
    assert positional((torch.ones(2), torch.ones(2)))[1] == ("input_0", "input_1")
    with pytest.raises(UnsupportedInputs, match="takes dict inputs holding list"):
        positional({"tokens": torch.ones(2), "words": ["a", "b"]})


@pytest.mark.slow
def test_a_model_torch_export_cannot_trace_is_logged_pickled_with_the_same_outputs(tmp_path,
                                                                                  monkeypatch):
    job = prepare_job(tmp_path, *GRU)
    torch.manual_seed(0)
    model = build_model(job.config, job.data).eval()
    example, _ = fetch(job.data, torch.float32, 0, [0, 1])
    uri, client, run_id = _store(tmp_path)
    client.log_metric(run_id, "val/loss", 0.25, step=7)
    logged = log_model(uri, run_id, model, example, name="model", step=7)
    assert (logged.form, logged.packages) == ("pickle", ("userpkg",))
    assert logged.why.startswith("torch.export cannot trace it: TypeError: zeros(): argument")
    assert logged.describe() == f" as a pickled module ({logged.why}): {logged.uri}; {NEEDS}"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert type(loaded) is type(model) and not loaded.training  # the module itself, as trained
    batch, _ = fetch(job.data, torch.float32, 0, list(range(2, 12)))
    lengths = batch["mask"].sum(1)
    assert len(set(lengths.tolist())) > 2 and batch["tokens"].shape[1] != \
        example["tokens"].shape[1], "the check needs padded sequences of other lengths"
    with torch.no_grad():
        expected = model(**batch)
        assert torch.equal(loaded(**batch), expected)
        assert torch.equal(mlflow.pytorch.load_model(logged.uri)(**batch), expected)
    # The pt2 form's signature and linkage: one READY model of the run, at its step's metrics.
    spec = mlflow.models.get_model_info(logged.uri).signature.inputs.to_dict()
    assert [(s["name"], s["tensor-spec"]["shape"]) for s in spec] == [("tokens", (-1, -1)),
                                                                      ("mask", (-1, -1))]
    [found] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert (found.model_id, found.source_run_id, found.status.value) == \
        (logged.uri.removeprefix("models:/"), run_id, "READY")
    assert [(m.key, m.value, m.step) for m in found.metrics] == [("val/loss", 0.25, 7)]
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs] == \
        [(found.model_id, 7)]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # as the line says
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pytorch.load_model(logged.uri)


class Scaled(nn.Module):
    """Takes a list of floats beside its tensor: torch.export and MLflow's signature cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, scales: list[float]) -> torch.Tensor:
        return self.linear(x) * torch.tensor(scales)[:, None]


def test_a_model_whose_inputs_are_not_tensors_is_logged_pickled(tmp_path):
    torch.manual_seed(0)
    model = Scaled().eval()
    uri, client, run_id = _store(tmp_path)
    logged = log_model(uri, run_id, model, {"x": torch.randn(2, 3), "scales": [1.0, 2.0]})
    assert (logged.form, logged.packages) == ("pickle", ("tests",))
    assert logged.why == "the model takes dict inputs holding list, and MLflow's PyTorch " \
                         "format (torch.export) takes tensors only"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x, [1.0, -2.0, 3.0, 0.5]), model(x, [1.0, -2.0, 3.0, 0.5]))
    assert mlflow.models.get_model_info(logged.uri).signature is None


def test_a_model_neither_exported_nor_pickled_is_an_error_line_and_the_weights_stay(tmp_path,
                                                                                     caplog):
    job = prepare_job(tmp_path, "model._target_=tests.fixtures.UntraceableMLP",
                      "model.hidden_sizes=[8]")
    model = build_model(job.config, job.data).eval()
    model.lock = threading.Lock()  # cloudpickle cannot pickle it
    uri, client, run_id = _store(tmp_path)
    tracker = types.SimpleNamespace(run_id=run_id, log_model=functools.partial(log_model, uri,
                                                                                run_id))
    with pytest.raises(RuntimeError, match="torch.export cannot trace it: .*; and pickling it "
                                           "failed: TypeError: cannot pickle '_thread.lock'"):
        log_run_models(job, model, tracker, 5)  # no checkpoints/last.pt: raised, run FAILED
    (job.run_dir / "checkpoints").mkdir()
    (job.run_dir / "checkpoints" / "last.pt").touch()
    with caplog.at_level(logging.ERROR, logger="stepwise.run.model_log"):
        log_run_models(job, model, tracker, 5)
    [line] = [r.getMessage() for r in caplog.records if r.name == "stepwise.run.model_log"]
    assert line.startswith("the model could not be logged to MLflow (RuntimeError: torch.export "
                           "cannot trace it: ")
    assert line.endswith(f"; the run's weights are in {job.run_dir / 'checkpoints'}")
    assert {m.status.value for m in client.search_logged_models(
        [client.get_run(run_id).info.experiment_id])} == {"FAILED"}


@pytest.mark.cli
@pytest.mark.slow
def test_a_recurrent_run_logs_its_final_and_best_models_pickled(workdir):
    """The CLI with userpkg's GRU and trainer.monitor: both models in MLflow, each one line
    that says its form, with the weights of last.pt and best.pt."""
    run_dir = workdir / "outputs" / "gru"
    proc = run_cli(SEARCHPATH, "experiment=gru", "trainer.max_steps=3", "trainer.monitor=val/loss",
                   f"hydra.run.dir={run_dir}", cwd=workdir,
                   env={"PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)])})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FINISHED"
    models = {m.name: m for m in client.search_logged_models([run.info.experiment_id])}
    assert sorted(models) == ["best_model", "model"]
    for name, prefix, checkpoint in [("model", "final model", "last.pt"),
                                     ("best_model", "best model (val/loss=", "best.pt")]:
        found = models[name]
        assert (found.source_run_id, found.status.value) == (run.info.run_id, "READY")
        assert f"{found.model_uri}; {NEEDS}" in output
        [line] = [line for line in output.splitlines() if found.model_uri in line]
        assert f"] - {prefix}" in line and " logged to MLflow as a pickled module (torch.export " \
            "cannot trace it: TypeError: zeros(): argument 'size' failed to unpack" in line
        loaded = mlflow.pytorch.load_model(found.model_uri)
        weights = load_checkpoint(run_dir / "checkpoints" / checkpoint)["model"]
        assert weights.keys() == loaded.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items()), name
    assert [o.step for o in run.outputs.model_outputs] == [3, 3]
