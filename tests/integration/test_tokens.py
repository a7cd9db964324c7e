"""Exact per token on the built-in sequence job (data=tinytext, model=tiny_lm, float64): the
gradient of each optimizer step is that of the mean loss over its window's target tokens, so
(b, k, W) factorings of one effective batch end with the same weights, and the naive mean of
each micro-batch's token mean does not; DDP sends no item count when the data states them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from stepwise.contract.dist_env import DistEnv
from stepwise.contract.sampler import epoch_permutation
from stepwise.parallel.replica import Replica, start_replica, stop_replica
from stepwise.run.build import build_trainer
from stepwise.run.checkpoint import load_checkpoint
from stepwise.run.fit import train
from stepwise.tracking.tracker import NullTracker
from tests.conftest import count_allreduce_rounds, prepare_job, run_cli, run_two_ranks
from tests.ports import free_port

# 101 = 3 x 32 + 5 sequences of 1-24 characters: every epoch ends with a window of 5, which in
# DDP with b=8 leaves rank 1 with no real sequence in its last micro-step.
TEXT = ("data=tinytext", "model=tiny_lm", "loss=cross_entropy", "metrics=none", "logger=none",
        "trainer.precision=64", "trainer.progress_bar=false", "data.train.samples=101",
        "data.train.min_len=1", "data.train.max_len=24", "data.val.samples=16",
        "data.val.max_len=24", "data.test.samples=16", "data.test.max_len=24", "model.dim=16",
        "model.layers=1", "model.heads=2", "model.context=24", "optim.lr=0.5",
        "optim.momentum=0.0", "trainer.max_epochs=2")
CPU = Replica("single", 0, 1, torch.device("cpu"))


def _weights(tmp_path: Path, b: int, k: int) -> dict[str, torch.Tensor]:
    job = prepare_job(tmp_path / f"b{b}k{k}", *TEXT, f"data.batch_size={b}", f"accum={k}")
    assert (job.plan.effective_batch_size, job.plan.last_window_samples) == (32, 5)
    train(job, CPU, NullTracker())
    return load_checkpoint(job.run_dir / "checkpoints" / "last.pt")["model"]


def _naive_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    """b=8, k=4 trained by hand on the same micro-batches with the per-micro-batch token mean
    divided by k (the accumulation bug)."""
    job = prepare_job(tmp_path / "naive", *TEXT, "data.batch_size=8", "accum=4")
    trainer = build_trainer(job, CPU, NullTracker())
    model, lr = trainer.model, job.plan.lr
    for epoch in range(job.plan.epochs):
        for _, batches in trainer.windows(epoch):
            loss = sum(F.cross_entropy(model(**inputs), target) for inputs, target, _ in batches)
            grads = torch.autograd.grad(loss / len(batches), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= lr * g
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.cli
@pytest.mark.ddp
def test_factorings_and_ddp_end_with_the_same_weights_and_the_naive_mean_does_not(tmp_path):
    reference = _weights(tmp_path, 32, 1)
    others = {f"b{b}k{k}": _weights(tmp_path, b, k) for b, k in [(16, 2), (8, 4)]}
    ddp_dir = tmp_path / "ddp"
    proc = run_cli(*TEXT, "parallel=ddp", "parallel.nproc=2", "data.batch_size=8", "accum=2",
                   f"hydra.run.dir={ddp_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    others["ddp_b8k2"] = load_checkpoint(ddp_dir / "checkpoints" / "last.pt")["model"]
    for name, weights in others.items():
        for key, value in reference.items():
            assert (weights[key] - value).abs().max().item() < 1e-9, (name, key)
    naive = _naive_weights(tmp_path)
    assert max((naive[key] - value).abs().max().item() for key, value in reference.items()) > 1e-4


def test_each_step_is_the_gradient_of_the_window_token_mean(tmp_path):
    job = prepare_job(tmp_path, *TEXT, "data.batch_size=8", "accum=4")
    trainer = build_trainer(job, CPU, NullTracker())
    model, lr, dataset = trainer.model, job.plan.lr, job.data.train_set()
    collate = job.data.collate(torch.float64)
    order = epoch_permutation(job.plan.train_samples, job.config.seed, 0).tolist()
    for s, (window, batches) in enumerate(trainer.windows(0)):
        samples = order[s * 32: s * 32 + window.samples]
        assert window.items == sum(len(dataset[i]["target"]) for i in samples)
        inputs, target = collate([dataset[i] for i in samples])
        loss = F.cross_entropy(model(**inputs), target)  # the mean over the window's tokens
        grads = torch.autograd.grad(loss, list(model.parameters()))
        before = [p.detach().clone() for p in model.parameters()]
        trainer.train_step(batches, window)
        for p, p0, g in zip(model.parameters(), before, grads):
            assert (p.detach() - (p0 - lr * g)).abs().max().item() < 1e-12, s
    assert s == 3  # 3 full windows and the partial one


class CountingReplica:
    """The replica the item tally talks to, counting its all-reduces (instrumentation)."""

    def __init__(self, replica: Replica) -> None:
        self.replica, self.calls = replica, 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.replica.sum(tensor)


def _count_rounds(rank: int, port: int, tmp: str, stated: bool, queue) -> None:
    env = DistEnv(source="torchrun", rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                  master_port=port)
    overrides = TEXT if stated else (
        "hydra.searchpath=[pkg://userpkg.conf]", "model=tagger", "data=tags", "loss=cross_entropy",
        "metrics=none", "logger=none", "trainer.max_epochs=1")
    job = prepare_job(Path(tmp) / f"r{rank}", *overrides, "parallel=ddp", "parallel.nproc=2",
                      "data.batch_size=2", "accum=2", "trainer.progress_bar=false",
                      "trainer.log_every_n_steps=1000")
    replica = start_replica(job.world.joined(env), job.config.parallel, "cpu")
    trainer = build_trainer(job, replica, NullTracker())
    counting = trainer.tally.replica = CountingReplica(replica)
    rounds = count_allreduce_rounds(trainer.model)
    trainer.fit()
    queue.put((rank, len(rounds), counting.calls, trainer.counters.global_step))
    stop_replica(replica)


@pytest.mark.ddp
@pytest.mark.parametrize("stated", [True, False])
def test_an_optimizer_step_costs_the_gradient_round_and_at_most_one_count(tmp_path, stated,
                                                                          monkeypatch):
    """Stated counts (tinytext's lengths): no count is sent during training, one check at each
    read of the device (before the first epoch's evaluation, and at the last step). Counted
    (sequences without lengths): one small all-reduce per step, and those checks."""
    import sys

    from tests.conftest import ROOT

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "fixtures"))
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    results = run_two_ranks(_count_rounds, free_port(), str(tmp_path), stated)
    steps = results[0][3]
    counts = 2 if stated else steps + 1  # stated: 2 epochs (2 reads); counted: 1 epoch
    # The model's gradients fit in one DDP bucket: one hook call is one all-reduce round.
    assert results == [(0, steps, counts, steps), (1, steps, counts, steps)] and steps > 3
