"""parallel=fsdp (FSDP2) on gloo with 2 real processes: the weights of one process, a bitwise
resume after SIGKILL, a resume as single, one reduce-scatter round per optimizer step, about half
the memory of DDP per rank, and bad input refused in one line."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from stepwise.contract.dist_env import DistEnv
from stepwise.models import MLP
from stepwise.parallel.replica import Replica, start_replica, stop_replica
from stepwise.run.build import build_trainer
from stepwise.run.checkpoint import CheckpointError, latest_valid, load_checkpoint, read_valid
from stepwise.tracking.tracker import NullTracker
from tests.conftest import ROOT, prepare_job, run_cli, run_two_ranks
from tests.integration.test_resume import _kill_after_first_checkpoint
from tests.ports import free_port

pytestmark = [pytest.mark.ddp, pytest.mark.cli]

# 581 = 9 x 64 + 5: windows of E=64 (b=8, k=4, W=2), then a partial window of one micro-step
# whose 5 samples all go to rank 0 (rank 1 takes part with none). 33 hidden units split 17 + 16
# over the ranks: uneven shards. The max norm is below the gradients' norm: clipping acts.
JOB = ("data=synthetic", "data.train_samples=581", "data.val_samples=64", "logger=none",
       "trainer.precision=64", "trainer.max_epochs=3", "optim.momentum=0.9", "optim.lr=0.2",
       "model.hidden_sizes=[33]", "trainer.grad_clip_norm=0.5", "trainer.checkpoint_every_n_steps=4",
       "trainer.progress_bar=false", "accum=4", "model._target_=tests.fixtures.SlowMLP",
       # the EMA: each rank averages its own shards; its checkpoint state is whole tensors
       "callbacks=ema", "callbacks.ema.decay=0.8")
SINGLE = ("data.batch_size=16",)
FSDP = ("parallel=fsdp", "parallel.nproc=2", "data.batch_size=8")
STEPS = 30  # 10 per epoch
ENV = {"PYTHONPATH": str(ROOT), "SLOW_FORWARD_S": "0.01"}


def _weights(run_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return last["callbacks"]["ema"]["weights"] if ema else last["model"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One directory with an uninterrupted single and fsdp run of JOB."""
    workdir = tmp_path_factory.mktemp("fsdp")
    for name, args in (("single", SINGLE), ("fsdp", FSDP)):
        run_cli(*JOB, *args, f"hydra.run.dir=outputs/{name}", cwd=workdir, check=True, env=ENV)
    return workdir


def test_fsdp_ends_with_the_single_process_weights(runs):
    single, fsdp = (load_checkpoint(runs / "outputs" / name / "checkpoints" / "last.pt")
                    for name in ("single", "fsdp"))
    assert fsdp["plan"]["effective_batch_size"] == single["plan"]["effective_batch_size"] == 64
    assert fsdp["plan"]["last_window_samples"] == 5
    assert fsdp["global_step"] == single["global_step"] == STEPS
    assert _max_difference(fsdp["model"], single["model"]) < 1e-9
    # The EMA of the shards, each rank's own, is the EMA of the whole weights.
    ema = fsdp["callbacks"]["ema"]
    assert ema["updates"] == single["callbacks"]["ema"]["updates"] == STEPS
    assert _max_difference(ema["weights"], single["callbacks"]["ema"]["weights"]) < 1e-9
    assert _max_difference(ema["weights"], fsdp["model"]) > 1e-3
    # last.pt's model is the full state dict of the bare module: it loads into a plain MLP.
    MLP((32,), 10, [33]).double().load_state_dict(fsdp["model"])
    assert fsdp["model"]["0.weight"].shape == (33, 32) and fsdp["optimizer"] is None
    # The shards beside it, and only for the checkpoints kept (trainer.keep_checkpoints=2).
    checkpoints = runs / "outputs" / "fsdp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [
        "step-00000028.dcp", "step-00000028.pt", "step-00000030.dcp", "step-00000030.pt"]
    assert sorted(p.name for p in (checkpoints / "step-00000030.dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(checkpoints.glob(".*tmp"))


def test_sigkill_then_resume_is_bitwise_identical(runs):
    run_dir = runs / "outputs" / "killed"
    step = _kill_after_first_checkpoint((*JOB, *FSDP), runs, run_dir, random.Random(7).uniform(0, 1))
    assert 0 < step < STEPS
    proc = run_cli(*JOB, *FSDP, f"hydra.run.dir={run_dir}", cwd=runs, check=True, env=ENV)
    assert f"resumed from {run_dir}/checkpoints/step-{step:08d}.pt" in proc.stdout + proc.stderr
    reference = _weights(runs / "outputs" / "fsdp")
    resumed = _weights(run_dir)
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
    reference, resumed = _weights(runs / "outputs" / "fsdp", ema=True), _weights(run_dir, ema=True)
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)


@pytest.mark.parametrize("source,mode,target", [
    ("fsdp", "single", SINGLE),  # the shards, read whole by one process
    ("fsdp", "ddp", ("parallel=ddp", "parallel.nproc=2", "data.batch_size=8")),
    ("single", "fsdp", FSDP),  # a checkpoint of whole tensors, sharded on load
])
def test_a_checkpoint_resumes_in_another_mode(runs, source, mode, target):
    checkpoint = runs / "outputs" / source / "checkpoints" / "step-00000028.pt"
    run_dir = runs / "outputs" / f"{source}_as_{mode}"
    proc = run_cli(*JOB, *target, f"trainer.resume={checkpoint}", f"hydra.run.dir={run_dir}",
                   cwd=runs, check=True, env=ENV)
    assert f"resumed from {checkpoint} at global_step 28" in proc.stdout + proc.stderr
    assert _max_difference(_weights(run_dir), _weights(runs / "outputs" / "single")) < 1e-9
    # The EMA's whole tensors, sharded on load (or read whole), go on averaging exactly.
    assert _max_difference(_weights(run_dir, ema=True),
                           _weights(runs / "outputs" / "single", ema=True)) < 1e-9


def test_shards_that_do_not_fit_the_model_are_refused(runs):
    """Another model's shards under a checkpoint: one line, exit 2. A checkpoint whose shards
    lack a file is not whole: it is refused as damaged (trainer.resume=auto skips it)."""
    import torch.distributed.checkpoint as dcp

    run_dir = runs / "outputs" / "foreign"
    shutil.copytree(runs / "outputs" / "fsdp", run_dir)
    shards = run_dir / "checkpoints" / "step-00000030.dcp"
    shutil.rmtree(shards)
    dcp.save({"model": {"0.weight": torch.zeros(5, 32, dtype=torch.float64)}},
             checkpoint_id=shards, no_dist=True)
    checkpoint = run_dir / "checkpoints" / "step-00000030.pt"
    proc = run_cli(*JOB, *FSDP, f"trainer.resume={checkpoint}", cwd=runs, env=ENV)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: trainer.resume={checkpoint}: its shards (step-00000030.dcp/) "
                           "do not match the model (0.weight: [5, 32] in the shards, [33, 32] in "
                           "the model; 0.bias is not in the shards;"), line
    assert line.endswith("fix: resume with the model that wrote them, or trainer.resume=none")
    (run_dir / "checkpoints" / "step-00000028.dcp" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"its shards step-00000028.dcp/ lack __1_0.distcp"):
        read_valid(run_dir / "checkpoints" / "step-00000028.pt")
    assert latest_valid(run_dir / "checkpoints")[0].name == "step-00000030.pt"
    shutil.rmtree(shards)
    assert latest_valid(run_dir / "checkpoints") is None


def _measure(rank: int, tmp: str, queue) -> None:
    """Reduce-scatter calls per optimizer step (accum=4, with and without gradient sync on the
    micro-steps before the last), and this rank's parameter + gradient + AdamW state bytes
    under fsdp and under ddp, in the same 2 processes."""
    import torch.distributed as dist

    from stepwise.parallel.fsdp import shard_units

    env = DistEnv(source="torchrun", rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                  master_port=int(Path(tmp, "port").read_text()))
    os.environ.update(env.torch_env())
    args = ("logger=none", "data=synthetic", "data.num_features=64", "data.train_samples=256",
            "data.val_samples=0", "model.hidden_sizes=[256,256]", "optim=adamw",
            "data.batch_size=8", "accum=4", "trainer.max_steps=3", "trainer.progress_bar=false",
            "trainer.checkpoint_every_n_steps=0")
    job = prepare_job(Path(tmp) / f"r{rank}", "parallel=fsdp", "parallel.nproc=2", *args)
    replica = start_replica(job.world.joined(env), job.config.parallel, "cpu")
    calls = []
    # What FSDP2 calls (torch 2.13: reduce_scatter_single; older: reduce_scatter_tensor).
    name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else \
        "reduce_scatter_tensor"
    original = getattr(dist, name)

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    setattr(dist, name, counting)
    rounds = {}
    for sync_every in (False, True):
        replica.sync_every_micro_step = sync_every
        calls.clear()
        trainer = build_trainer(job, replica, NullTracker())
        trainer.fit()
        rounds[sync_every] = len(calls) / len(shard_units(trainer.model, None))  # 3 Linears
    replica.sync_every_micro_step = False
    ddp = Replica("ddp", rank, 2, torch.device("cpu"))
    memory = {mode: _state_bytes(build_trainer(job, replica if mode == "fsdp" else ddp,
                                               NullTracker()))
              for mode in ("fsdp", "ddp")}
    queue.put((rank, rounds[False], rounds[True], memory["fsdp"], memory["ddp"]))
    stop_replica(replica)


def _state_bytes(trainer) -> int:
    """Bytes of this rank's parameters, gradients (at the optimizer step) and optimizer state."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    grads = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *_: grads.append(sum(
        local(p.grad) for group in optimizer.param_groups for p in group["params"])))
    for window, batches in trainer.windows(0):
        trainer.train_step(batches, window)
        break
    params = sum(local(p) for p in trainer.model.parameters())
    state = sum(local(v) for s in trainer.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return params + grads[0] + state


def test_one_reduce_scatter_round_per_step_and_half_the_memory_of_ddp(tmp_path):
    """accum=4, 3 optimizer steps: 3 reduce-scatter rounds (one per sharded block each), 12
    when every micro-step syncs; each rank holds about 1/2 of DDP's parameter, gradient and
    AdamW state bytes for an MLP 64-256-256-10 (85,002 parameters)."""
    (tmp_path / "port").write_text(str(free_port()))
    results = run_two_ranks(_measure, str(tmp_path))
    total = 85_002 * 4 * 4  # float32 parameters, gradients, exp_avg and exp_avg_sq
    assert [r[3] for r in results] != [r[4] for r in results]
    for rank, rounds, rounds_syncing, fsdp, ddp in results:
        assert (rounds, rounds_syncing) == (3, 12), rank
        assert ddp == total, rank
        assert 0.45 < fsdp / ddp < 0.55, (rank, fsdp, ddp)
    assert sum(r[3] for r in results) == total  # the shards partition the state exactly


@pytest.mark.parametrize("args,expected", [
    (["parallel.device_ids=[0,1]"], "error: parallel.device_ids=[0,1]: FSDP runs one process per "
                                    "device"),
    (["parallel.shard_modules=[Linaer]"], "error: parallel.shard_modules=['Linaer']: MLP has no "
                                          "module of class Linaer to shard; fix: did you mean Linear?"),
    (["parallel.nproc=1"], "error: parallel=fsdp: world_size=1: one process has nothing to shard "
                           "over"),
    (["trainer.precision=16-mixed"], "error: trainer.precision=16-mixed: parallel=fsdp has no "
                                     "float16 loss scaling"),
])
def test_bad_fsdp_input(args, expected, workdir):
    proc = run_cli("parallel=fsdp", *args, cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(expected) and "; fix: " in line, line
    assert not (workdir / "mlflow.db").exists()
