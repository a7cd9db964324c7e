"""Models that take token ids and mapping batches, logged as MLflow PyTorch models into a real
sqlite store and loaded back with `mlflow.pytorch.load_model`: the same outputs on batches of
other sizes and sequence lengths than the example the model was logged with."""

from __future__ import annotations

import sys

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.data.loaders import fetch
from stepwise.run.build import build_model
from stepwise.tracking.models import UnsupportedInputs, log_model, positional
from tests.conftest import ROOT, prepare_job

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))  # userpkg, as its configs name it

LM = ("data=tinytext", "model=tiny_lm", "loss=cross_entropy", "metrics=none", "logger=none",
      "data.train.samples=40", "data.train.min_len=1", "data.train.max_len=24",
      "data.val.samples=8", "data.val.max_len=24", "model.dim=16", "model.layers=1",
      "model.heads=2", "model.context=24")
BAG = ("hydra.searchpath=[pkg://userpkg.conf]", "experiment=seqs", "logger=none")


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
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("models")).info.run_id
    model_uri = log_model(uri, run_id, model, example, name="model", step=7)
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
