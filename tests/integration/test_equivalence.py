"""Rule 6 of the contract: the same effective batch, factored differently, trains identically."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from stepwise.contract.sampler import epoch_permutation
from stepwise.parallel.replica import Replica
from stepwise.run.build import build_trainer
from stepwise.run.checkpoint import load_checkpoint
from stepwise.run.fit import train
from stepwise.tracking.tracker import NullTracker
from tests.conftest import prepare_job

COMMON = ("logger=none", "trainer.precision=64", "trainer.progress_bar=false",
          "model.hidden_sizes=[32]", "optim.momentum=0.9", "optim.lr=0.05", "trainer.max_epochs=3")


def _final_weights(tmp_path, b: int, k: int) -> dict[str, torch.Tensor]:
    job = prepare_job(tmp_path / f"b{b}k{k}", *COMMON, f"data.batch_size={b}", f"accum={k}")
    assert job.plan.effective_batch_size == 64
    assert job.plan.last_window_samples == 30  # 1438 = 22 x 64 + 30: a partial last window
    train(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker())
    checkpoint = load_checkpoint(job.run_dir / "checkpoints" / "last.pt")
    assert checkpoint["global_step"] == job.plan.total_optimizer_steps == 69
    return checkpoint["model"]


@pytest.mark.smoke
def test_factorings_of_64_end_with_the_same_weights(tmp_path):
    reference = _final_weights(tmp_path, 64, 1)
    initial = prepare_job(tmp_path / "init", *COMMON)
    for b, k in [(32, 2), (16, 4), (8, 8)]:
        weights = _final_weights(tmp_path, b, k)
        for name, value in reference.items():
            assert (weights[name] - value).abs().max().item() < 1e-9, (b, k, name)
    torch.manual_seed(initial.config.seed)
    # The runs moved away from the initialisation: equality is not the trivial kind.
    assert (reference["0.weight"] - torch.nn.Linear(64, 32).weight.double()).abs().max() > 1e-2


@pytest.mark.smoke
def test_each_step_is_the_mean_loss_gradient_over_its_window(tmp_path):
    job = prepare_job(tmp_path, "logger=none", "trainer.precision=64", "trainer.progress_bar=false",
                      "model.hidden_sizes=[16]", "optim.momentum=0.0", "optim.lr=0.5",
                      "data.batch_size=8", "accum=8", "trainer.max_epochs=1",
                      "trainer.log_every_n_steps=1")
    logged: dict[int, dict[str, float]] = {}

    class Recorder(NullTracker):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            logged.setdefault(step, {}).update(metrics)

    trainer = build_trainer(job, Replica("single", 0, 1, torch.device("cpu")), Recorder())
    model, lr, plan = trainer.model, job.plan.lr, job.plan
    x_all = torch.as_tensor(job.data.x_train, dtype=torch.float64)
    y_all = torch.as_tensor(job.data.y_train)
    order = torch.as_tensor(epoch_permutation(plan.train_samples, job.config.seed, 0))
    sizes, losses = [], []
    for s, (window, batches) in enumerate(trainer.windows(0)):
        idx = order[s * 64: s * 64 + window.samples]
        before = [p.detach().clone() for p in model.parameters()]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])  # mean over the window's samples
        grads = torch.autograd.grad(loss, list(model.parameters()))
        trainer.train_step(batches, window)
        for p, p0, g in zip(model.parameters(), before, grads):
            assert (p.detach() - (p0 - lr * g)).abs().max().item() < 1e-12, s
        losses.append(loss.item())
        sizes.append((window.micro_steps, window.samples))
    trainer.check_losses()  # the logged losses are read from the device at flush points
    for s, loss in enumerate(losses):
        assert abs(logged[s + 1]["train/loss"] - loss) < 1e-12, s  # the loss it reports
    assert len(sizes) == 23 and sizes[-1] == (4, 30) and sizes[0] == (8, 64)


def test_the_end_of_run_check_fails_on_a_mismatch(tmp_path):
    """The executed counts and final LR are compared with the plan: a wrong plan fails the run."""
    import dataclasses

    import pytest

    from stepwise.contract.errors import PlanMismatch

    job = prepare_job(tmp_path, "logger=none", "trainer.progress_bar=false", "trainer.max_steps=5",
                      "schedule=cosine")
    for change, words in (({"total_samples": 161}, "samples_seen: executed 160, planned 161"),
                          ({"final_lr": 0.5}, "final lr: executed")):
        trainer = build_trainer(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker())
        trainer.plan = dataclasses.replace(job.plan, **change)
        with pytest.raises(PlanMismatch, match=words):
            trainer.fit()
