"""Callbacks (the `callbacks` group): hooks once per optimizer step, the EMA exact against a hand
computation and under every factoring of the effective batch (DDP included), the built-ins'
records read back from MLflow, and mistakes refused in one line."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.data.loaders import fetch_split
from stepwise.parallel.replica import Replica
from stepwise.run.build import build_model
from stepwise.run.checkpoint import load_checkpoint
from stepwise.run.fit import train
from stepwise.tracking.tracker import NullTracker
from tests.conftest import ROOT, prepare_job, run_cli

COMMON = ("trainer.precision=64", "trainer.progress_bar=false", "model.hidden_sizes=[16]",
          "optim.momentum=0.9", "optim.lr=0.05", "trainer.max_epochs=1")
# decay 0.8 from step 3 on, every 2nd step: each of the EMA's keys is exercised
EMA_KEYS = ("callbacks.ema.decay=0.8", "callbacks.ema.start_step=3",
            "callbacks.ema.every_n_steps=2", "+callbacks.counter._target_=tests.fixtures.StepCounter")
CPU = Replica("single", 0, 1, torch.device("cpu"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _in_process(tmp_path, *args: str):
    job = prepare_job(tmp_path, *COMMON, "callbacks=ema", *EMA_KEYS, "logger=none", *args)
    metrics = train(job, CPU, NullTracker())
    return job, metrics, load_checkpoint(job.run_dir / "checkpoints" / "last.pt")


@pytest.mark.smoke
def test_the_ema_is_the_average_of_the_weights_after_each_optimizer_step(tmp_path):
    # b=32 x k=2: 23 optimizer steps of 45 micro-steps (1438 = 22 x 64 + 30); every step's
    # weights are in its checkpoint.
    job, metrics, last = _in_process(tmp_path, "data.batch_size=32", "accum=2",
                                     "trainer.checkpoint_every_n_steps=1",
                                     "trainer.keep_checkpoints=100")
    steps = job.plan.total_optimizer_steps
    assert (steps, job.plan.total_micro_steps) == (23, 45)
    weights = {step: load_checkpoint(job.run_dir / "checkpoints" / f"step-{step:08d}.pt")["model"]
               for step in range(3, steps + 1)}
    expected = dict(weights[3])  # up to start_step the average is the weights themselves
    for step in range(4, steps + 1):
        if step % 2 == 0:
            expected = {k: 0.8 * expected[k] + 0.2 * weights[step][k] for k in expected}
    ema = last["callbacks"]["ema"]
    assert ema["updates"] == 10 and ema["evaluates"] == "ema"
    assert _max_difference(ema["weights"], expected) < 1e-12
    assert _max_difference(ema["weights"], last["model"]) > 1e-3  # not the weights themselves
    # Its hooks ran once per optimizer step (not per micro-step) and once per evaluation.
    assert last["callbacks"]["counter"] == {"steps": 23, "logged": 23, "evaluations": 1}
    # val_ema/* is the EMA's weights evaluated, beside the live weights' val/*.
    reference = build_model(job.config, job.data).double().eval()
    reference.load_state_dict(ema["weights"])
    inputs, target = fetch_split(job.data, "val", torch.float64, list(range(180)))
    loss = torch.nn.functional.cross_entropy(reference(inputs), target).item()
    assert abs(metrics["val_ema/loss"] - loss) < 1e-12
    assert abs(metrics["val/loss"] - metrics["val_ema/loss"]) > 1e-3
    assert {"test_ema/loss", "test_ema/accuracy", "test/loss"} <= metrics.keys()


@pytest.mark.ddp
@pytest.mark.cli
def test_the_ema_is_the_same_for_every_factoring_and_logged_with_the_built_ins(tmp_path):
    """E=16 as (b, k, W) = (16, 1, 1), (8, 2, 1) and DDP (4, 2, 2): 90 optimizer steps."""
    runs = {(b, k): _in_process(tmp_path / f"b{b}k{k}", f"data.batch_size={b}", f"accum={k}")[2]
            for b, k in [(16, 1), (8, 2)]}
    ddp = ("parallel=ddp", "parallel.nproc=2", "data.batch_size=4", "accum=2")
    run_dir = tmp_path / "ddp"
    proc = run_cli(*COMMON, "callbacks=[ema,lr_monitor,samples]", *EMA_KEYS, *ddp,
                   "callbacks.samples.num_samples=3", "trainer.monitor=val_ema/loss",
                   "trainer.log_every_n_steps=10", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                   check=True, env={"PYTHONPATH": str(ROOT)})
    runs["ddp"] = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    reference = runs[(16, 1)]["callbacks"]["ema"]["weights"]
    for name, last in runs.items():
        assert last["global_step"] == 90 and last["callbacks"]["ema"]["updates"] == 44, name
        assert _max_difference(last["callbacks"]["ema"]["weights"], reference) < 1e-9, name
        assert last["callbacks"]["counter"]["steps"] == 90, name
    assert _max_difference(reference, runs[(16, 1)]["model"]) > 1e-3

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    # The LR monitor: what each logged step applied, as train/lr says; SGD's momentum.
    assert history("lr/0") == history("train/lr") and len(history("lr/0")) == 9
    assert history("momentum/0") == [(step, 0.9) for step, _ in history("lr/0")]
    # A user's callback logs through the run's outbox, at the logged steps and at the end.
    assert history("callback/steps") == [(s, float(s)) for s in range(10, 91, 10)]
    assert history("callback/fit_end_steps") == [(90, 90.0)]
    assert [step for step, _ in history("val_ema/loss")] == [90]
    assert run.data.metrics["best/val_ema/loss"] == run.data.metrics["val_ema/loss"]
    assert "test_ema/accuracy" in run.data.metrics and "test/accuracy" in run.data.metrics
    # The sample logger: rank 0's file of the first 3 validation samples, as an artifact.
    [artifact] = client.list_artifacts(run.info.run_id, "samples")
    assert artifact.path == "samples/step-00000090.json"
    record = json.loads((run_dir / artifact.path).read_text())
    assert [row["index"] for row in record["rows"]] == [0, 1, 2]
    assert all(len(row["output"]) == 10 and 0 <= row["predicted"] < 10 for row in record["rows"])
    # trainer.monitor=val_ema/loss: MLflow's best model is best.pt's EMA weights.
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert "the ema weights" in proc.stdout + proc.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/best_model")
    job = prepare_job(tmp_path / "shape", *COMMON, "logger=none")
    model = build_model(job.config, job.data).double().eval()
    model.load_state_dict(best["callbacks"]["ema"]["weights"])
    inputs, _ = fetch_split(job.data, "val", torch.float64, list(range(20)))
    with torch.no_grad():
        assert torch.equal(logged(inputs), model(inputs))
    # stepwise eval of best.pt's EMA weights gives the evaluation that made them the best
    proc = run_cli("eval", f"run={run_dir}", "which=best", "weights=ema", cwd=tmp_path, check=True)
    assert "tag stepwise.eval.val_ema" in proc.stdout
    evaluated = client.get_run(run.info.run_id).data.metrics
    assert abs(evaluated["eval/val_ema/loss"] - evaluated["best/val_ema/loss"]) < 1e-12


MISTAKES = [
    (["callbacks=ema", "callbacks.ema.decayy=0.9"], "callbacks.ema.decayy=0.9",
     "did you mean callbacks.ema.decay?"),
    (["callbacks=ema", "callbacks.ema.decay=1.5"], "decay=1.5: must be in [0, 1), e.g. 0.999",
     "fix:"),
    (["+callbacks.net._target_=stepwise.models.MLP"], "callbacks.net._target_=stepwise.models.MLP: "
     "is not a subclass of stepwise.callbacks.Callback", "fix: subclass"),
    (["+callbacks.x._target_=tests.fixtures.StepCountr"], "tests.fixtures has no StepCountr",
     "did you mean tests.fixtures.StepCounter?"),
    (["trainer.monitor=val_ema/loss"], "trainer.monitor=val_ema/loss: the evaluation logs no such "
     "metric", "use one of val/loss, val/accuracy"),
    (["callbacks=ema", "+callbacks.slow._target_=stepwise.callbacks.EMA"],
     "callbacks.slow=stepwise.callbacks.EMA: would log val_ema/* as callbacks.ema does",
     "fix: keep one of them"),
]


@pytest.mark.cli
@pytest.mark.parametrize("args,expected,fix", MISTAKES, ids=[" ".join(a) for a, _, _ in MISTAKES])
def test_a_mistake_in_the_callbacks_is_one_line(args, expected, fix, workdir):
    proc = run_cli(*args, cwd=workdir, env={"PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert expected in lines[0] and fix in lines[0], lines[0]
    assert not (workdir / "outputs").exists()


@pytest.mark.cli
def test_a_callback_that_steps_the_optimizer_fails_the_run_naming_it(workdir):
    proc = run_cli("trainer.max_epochs=1", "+callbacks.bad._target_=tests.fixtures.OptimizerStepper",
                   cwd=workdir, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "callback bad.on_step_end stepped the optimizer" in proc.stderr
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FAILED"
