"""`stepwise verify`: the built-in MLP and tiny_lm are invariant; one change each makes a model
not invariant (BatchNorm, dropout, an unmasked mean over padding), and the report names the
first diverging parameters and the experiment that explains it; verify.json, exit statuses, the
MLflow run only when asked."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli

pytestmark = [pytest.mark.cli, pytest.mark.ddp]

FIXTURES = ROOT / "tests" / "fixtures"
ENV = {"PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)])}
LM = ("experiment=tinytext_lm", "model.dim=32", "model.heads=2", "data.batch_size=8", "accum=1")
BAG = ("hydra.searchpath=[pkg://userpkg.conf]", "experiment=seqs")


def _verify(workdir, name: str, *args: str):
    proc = run_cli("verify", *args, f"hydra.run.dir=outputs/{name}", cwd=workdir, env=ENV)
    path = workdir / "outputs" / name / "verify.json"
    assert path.exists(), proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def _invariant(proc, report, factorings: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["verdict"] == "invariant" and report["first_divergence"] is None
    assert report["factorings"] == factorings and report["steps"] == 3
    for name in factorings[1:]:
        steps = report["differences"][name]
        assert [d["step"] for d in steps] == [1, 2, 3]
        assert all(d["agrees"] and d["max_rel"] < 1e-13 for d in steps), steps
    assert "verdict: invariant" in proc.stdout


def _cause(proc, report, name: str) -> dict:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["verdict"] == "not invariant" and report["first_divergence"]["step"] == 1
    [finding] = [f for f in report["diagnosis"] if f["explains"]]
    assert finding["name"] == name and finding["fix"]
    assert f"  {name:<15} CAUSE" in proc.stdout
    return finding


def test_the_builtin_mlp_is_invariant_and_batchnorm_makes_it_not(workdir):
    proc, report = _verify(workdir, "mlp", "verify.log=true")
    _invariant(proc, report, ["32 x 1 x 1", "16 x 2 x 1", "8 x 2 x 2 (ddp)"])
    losses = report["losses"]
    assert losses["8 x 2 x 2 (ddp)"][2]["loss"] == pytest.approx(losses["32 x 1 x 1"][2]["loss"],
                                                                 rel=1e-14)
    # verify.log=true: one MLflow run, the verdict as a tag, verify.json as its artifact.
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.data.tags["stepwise.verify"] == "invariant" and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["verify.json"]

    # The same MLP with a BatchNorm1d after its first layer: the layer and the experiment.
    proc, report = _verify(workdir, "bn", "model._target_=tests.fixtures.BatchNormMLP")
    finding = _cause(proc, report, "batchnorm")
    assert finding["detail"].startswith("first BatchNorm layer in the model: 1 (BatchNorm1d)")
    assert report["first_divergence"]["factoring"] == "16 x 2 x 1"
    assert report["first_divergence"]["parameters"][0]["name"] == "0.weight"  # forward order
    assert "verdict: NOT invariant: from optimizer step 1, 16 x 2 x 1 differs" in proc.stdout
    assert len(list(client.search_runs([run.info.experiment_id]))) == 1  # no run unless asked


def test_tiny_lm_is_invariant_and_dropout_makes_it_not(workdir):
    proc, report = _verify(workdir, "lm", *LM)
    _invariant(proc, report, ["8 x 1 x 1", "4 x 2 x 1", "2 x 2 x 2 (ddp)"])
    proc, report = _verify(workdir, "lm_dropout", *LM, "model.dropout=0.1")
    assert "dropout in dropout, blocks.0.attention" in _cause(proc, report, "dropout")["detail"]
    assert not (workdir / "mlflow.db").exists()
    # Dropout called as a function: no module to switch off, but a rerun with another random
    # state of the same factoring trains differently.
    proc, report = _verify(workdir, "f_dropout", "model._target_=tests.fixtures.FunctionalDropoutMLP")
    assert "the training draws random numbers" in _cause(proc, report, "randomness")["detail"]


def test_a_mean_over_padding_is_named_as_padding_dependent(workdir):
    proc, report = _verify(workdir, "masked", *BAG)
    _invariant(proc, report, ["16 x 1 x 1", "8 x 2 x 1", "4 x 2 x 2 (ddp)"])
    proc, report = _verify(workdir, "unmasked", *BAG, "+model.masked=false")
    finding = _cause(proc, report, "padding")
    assert "with the padding around it" in finding["detail"]


@pytest.mark.parametrize("arg,expected", [
    ("verify.steps=0", "error: verify.steps=0: must be a positive integer; fix: e.g. verify.steps=3"),
    ("verify.step=2", "error: verify.step=2: no such key; fix: use verify.steps=<optimizer steps> "
                      "or verify.log=true"),
    ("accum=0", "error: accum=0: must be a positive integer"),
    ("-m", "error: -m=verify: verify runs one job, not a sweep"),
])
def test_a_mistake_is_one_line_and_exit_2(arg, expected, workdir):
    proc = run_cli("verify", arg, cwd=workdir)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[0].startswith(expected)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (workdir / "outputs").exists()
