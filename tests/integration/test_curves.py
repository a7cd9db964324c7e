"""Issue 17's comparable curves: dense train/loss by default without a host sync per step, an
x for every validation point, the gradient norm actually applied, and a progress line in logs
that are not a terminal. Real CLI runs, read back from the sqlite store."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.nn import functional as F

from stepwise.contract.sampler import epoch_permutation
from stepwise.parallel.replica import Replica
from stepwise.run.build import build_trainer
from stepwise.tracking.sweep_report import PNG_NAME, curve
from stepwise.tracking.tracker import NullTracker
from tests.conftest import prepare_job, run_cli

pytestmark = pytest.mark.cli

CPU = Replica("single", 0, 1, torch.device("cpu"))


def _runs(workdir: Path) -> tuple[MlflowClient, dict[str, object]]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    return client, {run.info.run_name: run for run in runs}


def _history(client: MlflowClient, run, key: str) -> dict[int, float]:
    points = client.get_metric_history(run.info.run_id, key)
    assert len({m.step for m in points}) == len(points), f"{key} logged twice at a step"
    return {m.step: m.value for m in points}


def test_a_sweep_gets_dense_curves_and_an_x_for_every_validation_point(workdir):
    """The issue's sweep: 135 and 36 optimizer steps used to give 3 and 1 train/loss points,
    and 2 of 3 val/loss points had no train/samples_seen."""
    proc = run_cli("-m", "accum=1,4", "trainer.max_epochs=3", "hydra.sweep.dir=multirun/s",
                   "logger.log_model=false",
                   cwd=workdir, check=True)
    client, runs = _runs(workdir)
    children = {run.data.params["accum"]: run for run in runs.values()
                if "mlflow.parentRunId" in run.data.tags}  # the parent has its best child's accum
    for accum, steps, epoch_steps in (("1", 135, 45), ("4", 36, 12)):
        run = children[accum]
        loss = _history(client, run, "train/loss")
        assert sorted(loss) == list(range(1, steps + 1))  # min(steps, 100) or more: all here
        seen = _history(client, run, "train/samples_seen")
        assert set(seen) == set(loss)
        assert sorted(_history(client, run, "train/lr")) == sorted(loss)
        val = _history(client, run, "val/loss")
        assert sorted(val) == [epoch_steps, 2 * epoch_steps, 3 * epoch_steps]
        assert [seen[step] for step in sorted(val)] == [1438, 2876, 4314]
        epochs = _history(client, run, "epoch")
        assert [epochs[step] for step in sorted(val)] == [1.0, 2.0, 3.0]
        assert curve(client, run.info.run_id, "val/loss")[0] == [1438, 2876, 4314]
        assert len(_history(client, run, "train/grad_norm")) == steps
        rates = _history(client, run, "train/samples_per_s")
        assert steps in rates and all(rate > 0 for rate in rates.values())
        assert set(_history(client, run, "train/peak_rss_mb")) == set(rates)
        assert 0 < _history(client, run, "train/step_time_s")[steps] < 1
        # stdout is a pipe here, as in a SLURM job: tqdm shows nothing, the log says it
        assert f"step {steps}/{steps} (100%) loss " in proc.stdout
    assert "step 45/135 (33%) loss " in proc.stdout  # read before the first evaluation
    assert (workdir / "multirun" / "s" / PNG_NAME).stat().st_size > 10_000


def test_reading_the_losses_later_logs_the_values_of_reading_every_step(workdir):
    """Auto-interval logging (every 2nd of 225 steps, read every ~50) against reading every
    step (the old `log_every_n_steps=1`): the same values at the same steps, same weights."""
    common = ("trainer.max_epochs=5", "trainer.progress_bar=false", "logger.log_model=false")
    run_cli(*common, "trainer.log_every_n_steps=1", "trainer.flush_every_n_steps=1",
            "logger.run_name=every", "hydra.run.dir=outputs/every", cwd=workdir, check=True)
    run_cli(*common, "logger.run_name=auto", "hydra.run.dir=outputs/auto", cwd=workdir,
            check=True)
    client, runs = _runs(workdir)
    for key in ("train/loss", "train/lr", "train/samples_seen", "train/grad_norm"):
        every, auto = (_history(client, runs[name], key) for name in ("every", "auto"))
        assert sorted(every) == list(range(1, 226))
        evaluated = {45, 135} if key == "train/samples_seen" else set()  # odd epoch ends
        assert sorted(auto) == sorted({*range(2, 225, 2), 225} | evaluated), key  # 225 // 100
        assert all(auto[step] == every[step] for step in auto), key
    weights = [torch.load(Path(workdir, "outputs", name, "checkpoints", "last.pt"),
                          weights_only=True)["model"] for name in ("every", "auto")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_the_host_reads_the_device_only_at_flush_points(tmp_path, monkeypatch):
    """135 logged steps, and the losses are copied to the host 3 times: before each evaluation
    (steps 45 and 90, epoch ends) and at the last step; no step in between syncs."""
    job = prepare_job(tmp_path, "logger=none", "trainer.max_epochs=3",
                      "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=0")
    trainer = build_trainer(job, CPU, NullTracker())
    syncs: list[int] = []

    def counting(original):
        def counted(self, *args, **kwargs):
            syncs.append(trainer.counters.global_step)
            return original(self, *args, **kwargs)
        return counted

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    trainer.fit()
    monkeypatch.undo()
    assert trainer.step_log.every == 1 and trainer.step_log.reads == 3
    # each read, each evaluation (its sums, torchmetrics' accuracy), at the end the plan check
    assert Counter(syncs) == {45: 3, 90: 3, 135: 4}


LINREG = ("experiment=linreg_accum", "trainer.log_every_n_steps=5")


def _hand_norms(tmp_path: Path) -> list[float]:
    """The gradient norm of every step of `experiment=linreg_accum` (E=40, SGD without
    momentum, float64), by hand: the whole window in one batch, the mean squared error."""
    job = prepare_job(tmp_path / "hand", *LINREG, "logger=none")
    model = copy.deepcopy(Replica.unwrap(build_trainer(job, CPU, NullTracker()).model))
    x = torch.as_tensor(job.data.x_train).double()
    y = torch.as_tensor(job.data.y_train).double()
    norms = []
    for epoch in range(3):
        order = torch.from_numpy(epoch_permutation(len(x), job.config.seed, epoch))
        for first in range(0, len(x), 40):
            window = order[first:first + 40]
            model.zero_grad()
            F.mse_loss(model(x[window]), y[window]).backward()
            norms.append(math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters())))
            with torch.no_grad():
                for p in model.parameters():
                    p -= job.plan.lr * p.grad
    return norms


def test_grad_norm_is_the_norm_of_the_gradient_applied(workdir):
    """After accumulation (b=10, k=4), after the DDP all-reduce and over FSDP's shards (b=10,
    k=2, W=2; each rank's squared share summed with the losses): the norm of the window's
    whole gradient, at the logged steps only."""
    hand = _hand_norms(workdir)
    run_cli(*LINREG, "logger.run_name=k4", "hydra.run.dir=outputs/k4", cwd=workdir, check=True)
    for mode in ("ddp", "fsdp"):
        run_cli(*LINREG, f"parallel={mode}", "parallel.nproc=2", "accum=2",
                f"logger.run_name={mode}", f"hydra.run.dir=outputs/{mode}", cwd=workdir,
                check=True)
    client, runs = _runs(workdir)
    for name in ("k4", "ddp", "fsdp"):
        norms = _history(client, runs[name], "train/grad_norm")
        assert sorted(norms) == list(range(5, 76, 5)), name
        for step, value in norms.items():
            assert value == pytest.approx(hand[step - 1], rel=1e-12, abs=1e-15), (name, step)
    assert hand[0] > 2 * hand[-1]  # the norm falls as it learns: these are not all one value
    # FSDP logs its model too (unsharded on rank 0; it once hung there until the ranks parted)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)  # 2 input features
    outputs = {name: mlflow.pytorch.load_model(f"runs:/{runs[name].info.run_id}/model")(x)
               for name in ("ddp", "fsdp")}
    assert torch.allclose(outputs["fsdp"], outputs["ddp"], rtol=1e-12, atol=1e-12)
