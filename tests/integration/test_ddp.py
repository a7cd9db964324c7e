"""DDP on gloo with 2 real processes: equivalence with one process, one all-reduce per optimizer
step, one run directory and one MLflow run however it is launched, and failures that end the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.contract.dist_env import DistEnv
from stepwise.parallel.replica import start_replica, stop_replica
from stepwise.run.build import build_trainer
from stepwise.run.checkpoint import load_checkpoint
from stepwise.tracking.tracker import NullTracker
from tests.conftest import (
    ROOT,
    by_hand_on_test_split,
    count_allreduce_rounds,
    prepare_job,
    run_cli,
    run_two_ranks,
)
from tests.ports import free_port

pytestmark = [pytest.mark.ddp, pytest.mark.cli]

# 645 = 5 x 128 + 5: in the last micro-step of every factoring below, rank 1 has no real sample.
EXACT = ("data=synthetic", "data.train_samples=645", "data.val_samples=64", "logger=none",
         "trainer.precision=64", "trainer.max_epochs=3", "optim.momentum=0.9", "optim.lr=0.2",
         "model.hidden_sizes=[32]")


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def _runs(workdir: Path):
    client = _client(workdir)
    return client, client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])


def test_ddp_factorings_end_with_the_single_process_weights(workdir):
    """...and report the same train/loss at every step: the window's mean loss, whatever the
    world size (DDP's gradient average is undone by `loss_multiplier`, the report must not be)."""
    weights = {}
    logged = [arg for arg in EXACT if arg != "logger=none"]
    for name, args in {
        "single_b32_k4": ["data.batch_size=32", "accum=4"],
        "ddp_b16_k4": ["parallel=ddp", "parallel.nproc=2", "data.batch_size=16", "accum=4"],
        "ddp_b32_k2": ["parallel=ddp", "parallel.nproc=2", "data.batch_size=32", "accum=2"],
        "ddp_b8_k8": ["parallel=ddp", "parallel.nproc=2", "data.batch_size=8", "accum=8"],
    }.items():
        run_cli(*logged, *args, f"hydra.run.dir=outputs/{name}", f"logger.run_name={name}",
                "trainer.log_every_n_steps=1", "logger.log_model=false", cwd=workdir, check=True)
        checkpoint = load_checkpoint(workdir / "outputs" / name / "checkpoints" / "last.pt")
        assert checkpoint["plan"]["effective_batch_size"] == 128
        assert checkpoint["global_step"] == 18  # 6 steps per epoch (5 x 128 + 5) x 3
        weights[name] = checkpoint["model"]
    reference = weights.pop("single_b32_k4")
    for name, state in weights.items():
        for key, value in reference.items():
            assert (state[key] - value).abs().max().item() < 1e-9, (name, key)
    client, runs = _runs(workdir)
    losses = {run.info.run_name: [m.value for m in sorted(
        client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
        for run in runs}
    reference = losses.pop("single_b32_k4")
    assert len(reference) == 18 and reference[0] > 2.0  # about ln(10) at the start
    for name, values in losses.items():
        assert max(abs(a - b) for a, b in zip(values, reference)) < 1e-9 and len(values) == 18, name


def _count_allreduce_rounds(rank: int, tmp: str, sync_every: bool, queue) -> None:
    # The free port the test chose, for both: start_replica exports env's MASTER_PORT again.
    env = DistEnv(source="torchrun", rank=rank, local_rank=rank, world_size=2, local_world_size=2,
                  master_port=int(Path(tmp, "port").read_text()))
    os.environ.update(env.torch_env())
    job = prepare_job(Path(tmp) / f"r{rank}", "parallel=ddp", "parallel.nproc=2", "logger=none",
                      "data.batch_size=16", "accum=8", "trainer.max_steps=4",
                      "trainer.progress_bar=false")
    replica = start_replica(job.world.joined(env), job.config.parallel, "cpu")
    replica.sync_every_micro_step = sync_every
    trainer = build_trainer(job, replica, NullTracker())
    rounds = count_allreduce_rounds(trainer.model)
    trainer.fit()
    queue.put((rank, len(rounds), trainer.counters.global_step, trainer.counters.micro_steps))
    stop_replica(replica)


@pytest.mark.parametrize("sync_every,expected_rounds", [(False, 4), (True, 32)])
def test_one_allreduce_round_per_optimizer_step(tmp_path, sync_every, expected_rounds):
    """accum=8, 4 optimizer steps: 4 all-reduce rounds with no_sync, 32 without it."""
    (tmp_path / "port").write_text(str(free_port()))
    results = run_two_ranks(_count_allreduce_rounds, str(tmp_path), sync_every)
    # The MLP's gradients fit in one DDP bucket: one hook call is one all-reduce round.
    assert results == [(0, expected_rounds, 4, 32), (1, expected_rounds, 4, 32)]


@pytest.mark.smoke
def test_parallel_ddp_accum_8_is_one_job(workdir):
    proc = run_cli("parallel=ddp", "accum=8", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                   "logger.log_model=false", cwd=workdir, check=True)
    run_dirs = list(workdir.glob("outputs/*/*/.hydra"))
    assert len(run_dirs) == 1
    client, runs = _runs(workdir)
    [run] = runs
    params = run.data.params
    assert (params["world_size"], params["effective_batch_size"], params["parallel"]) == (
        "2", str(32 * 8 * 2), "ddp")
    # 1438 samples: 23 micro-steps of 64 = 2 windows of 8 + a partial window of 7 -> 3 per epoch
    assert params["total_optimizer_steps"] == "6"
    assert run.info.status == "FINISHED" and run.data.metrics["global_step"] == 6
    assert "global_step on each rank: [6, 6] (plan: 6)" in proc.stdout + proc.stderr
    cores = len(os.sched_getaffinity(0))  # the ranks share them instead of oversubscribing
    assert (f"{cores} CPU cores for 2 DDP ranks: {max(1, cores // 2)} intra-op threads per rank"
            in proc.stdout + proc.stderr)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    val = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert len(val) == 2 and all(0.0 <= m.value <= 1.0 for m in val)


# digits, b=16 on 2 ranks: 45 steps per epoch. monitor_mode=max on a falling val/loss keeps the
# first evaluation (step 45) as the best, so best.pt's weights are not the final ones (step 90).
TESTED = ("model.hidden_sizes=[32]", "data.batch_size=16", "trainer.max_epochs=2",
          "trainer.monitor=val/loss", "trainer.monitor_mode=max", "logger.log_model=false",
          "trainer.progress_bar=false", "parallel.nproc=2")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_the_test_split_is_tested_exactly_with_the_best_weights_over_uneven_shards(
        workdir, tmp_path, parallel):
    """The 179 test samples are sharded 90 + 89 over the ranks (each rank evaluates its shard in
    batches of 16, the last ones of 10 and 9): test/loss is the mean over all 179, with best.pt's
    weights, not the mean of the ranks' means, nor the final weights' loss."""
    run_dir = workdir / "outputs" / parallel
    proc = run_cli(*TESTED, f"parallel={parallel}", f"hydra.run.dir={run_dir}", cwd=workdir,
                   check=True)
    _, [run] = _runs(workdir)
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (best["global_step"], last["global_step"]) == (45, 90)
    job = prepare_job(tmp_path, *TESTED, f"parallel={parallel}", "dry_run=true")
    assert (job.data.test_samples, job.plan.test_samples) == (179, 179)
    expected = by_hand_on_test_split(job, best["model"], shards=2)
    metrics = run.data.metrics
    assert metrics["test/loss"] == pytest.approx(expected["test/loss"], abs=1e-6)
    assert metrics["test/accuracy"] == expected["test/accuracy"]
    # The test can tell the exact reduction from a mean of means, and best from final weights.
    assert abs(expected["mean_of_shard_means"] - expected["test/loss"]) > 1e-4
    assert abs(by_hand_on_test_split(job, last["model"])["test/loss"] - metrics["test/loss"]) > 0.1
    assert [m.step for m in _client(workdir).get_metric_history(run.info.run_id, "test/loss")] \
        == [90]
    assert run.data.tags["stepwise.tested"] == (
        f"best at global_step 45 (checkpoints/best.pt, val/loss={best['best_value']:.6g})")
    output = proc.stdout + proc.stderr
    assert f"test/loss={metrics['test/loss']:.6g}, test/accuracy={metrics['test/accuracy']:.6g}, " \
        "global_step=90" in output
    if parallel == "ddp":  # `stepwise eval` of best.pt on the test split, in one process, agrees
        run_cli("eval", f"run={run_dir}", "split=test", "which=best", cwd=workdir, check=True)
        [(step, value)] = [(m.step, m.value) for m in _client(workdir).get_metric_history(
            run.info.run_id, "eval/test/loss")]
        assert step == 45 and value == pytest.approx(metrics["test/loss"], abs=1e-6)


def test_torchrun_makes_one_run_dir_and_one_mlflow_run(workdir):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
                           "parallel=ddp", "trainer.max_epochs=1"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dirs = [p.parent for p in workdir.glob("outputs/**/.hydra")]
    assert len(run_dirs) == 1, run_dirs
    assert (run_dirs[0] / "checkpoints" / "last.pt").exists()
    _, runs = _runs(workdir)
    assert len(runs) == 1
    assert runs[0].data.params["world_size"] == "2" and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["global_step"] == 23


def _live_processes_in_session(sid: int) -> list[str]:
    """Processes of session `sid` that still run (zombies, already dead, are not counted)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            alive.append(stat.parent.name)
    return alive


def _processes_gone(sid: int, within_s: float = 20.0) -> list[str]:
    """Wait for the session's processes to end (a worker the launcher killed may take a moment
    under load); what still runs after `within_s` is left behind: a worker waiting in a
    collective for a dead peer would wait parallel.timeout_s, 300 s."""
    deadline = time.monotonic() + within_s
    while (alive := _live_processes_in_session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("delay", ["0", "1.5"])
def test_a_failing_rank_ends_the_job(delay, workdir):
    """With a delay, rank 0 already waits in the gradient all-reduce when rank 1 fails: the failing
    rank must leave without any further collective (a barrier would pair with that all-reduce and
    both would wait for parallel.timeout_s, 300 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(FAIL_RANK="1", FAIL_AFTER="3", FAIL_DELAY_S=delay, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "parallel=ddp", "trainer.max_epochs=50",
         "model._target_=tests.fixtures.FailingMLP"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    output, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 60, elapsed
    assert "injected failure on rank 1" in output and "a DDP worker failed" in output
    assert _processes_gone(proc.pid) == []  # no worker is left running
    _, [run] = _runs(workdir)
    assert run.info.status == "FAILED"


SLURM_TWO_TASKS = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                   "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                   "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost"}


@pytest.mark.parametrize("args,env,expected", [
    (["parallel=dp"], {}, "parallel=dp: nn.DataParallel needs CUDA devices"),
    (["parallel=ddp", "parallel.backend=nccl"], {}, "parallel.backend=nccl: NCCL needs CUDA"),
    (["parallel=ddp", "parallel.backend=mpi"], {}, "parallel.backend=mpi: unknown value"),
    (["parallel=ddp", "parallel.nproc=0"], {}, "parallel.nproc=0: must be at least 1"),
    (["parallel=ddp", "parallel.nnodes=2"], {}, "parallel.nnodes=2: stepwise spawns processes"),
])
def test_bad_parallel_input(args, env, expected, workdir):
    if torch.cuda.is_available() and "CUDA" in expected:
        pytest.skip("needs a machine without GPUs")
    proc = run_cli(*args, cwd=workdir, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "fix:" in lines[0], proc.stderr
    assert not (workdir / "mlflow.db").exists()


def _free_slurm_job_id() -> int:
    """A job id whose rendezvous port (20000 + id, as stepwise derives it under SLURM) is free:
    ids 1000-11999, ports 21000-31999, below the ephemeral range."""
    return free_port(21_000, 32_000) - 20_000


def test_a_refused_srun_job_waits_for_a_rank_slower_than_the_refusal(workdir):
    """Under srun, rank 0 hosts the store that tells the other ranks the run directory. A job
    refused before any work must keep it until every rank has read it: a rank 1 that starts only
    after rank 0 has printed its refusal (a loaded machine) exits 2 at once, instead of waiting 5
    minutes for a store that is gone."""
    args = ["parallel=ddp", "parallel.nproc=4", "dry_run=true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    # rank 0 hosts the store on port 20000 + job id: a job id whose port is free now (a fixed
    # one collided with a real SLURM job of the other test worker)
    slurm = {**SLURM_TWO_TASKS, "SLURM_JOB_ID": str(_free_slurm_job_id())}
    rank0 = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=workdir,
                             env={**env, **slurm}, stderr=subprocess.PIPE, text=True)
    first = rank0.stderr.readline()  # rank 0's refusal: rank 1 has not even started
    assert first.startswith("error: parallel.nproc=4: the SLURM allocation started 2 processes "
                            "per node") and "fix:" in first, first
    rank1 = run_cli(*args, cwd=workdir, timeout=120,
                    env={**slurm, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert rank1.returncode == 2 and rank1.stderr == "", rank1.stderr  # rank 0 speaks for the job
    rest = rank0.communicate(timeout=120)[1]
    assert rank0.returncode == 2 and rest == "", rest  # one line in all
    assert not (workdir / "mlflow.db").exists() and not list(workdir.glob("outputs/*/*/plan.json"))


def test_two_simulated_nodes_through_launch_script(workdir):
    """launch/torchrun_multi_node.sh on two "nodes" (1 process each) with a c10d rendezvous."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="t",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    script = str(ROOT / "launch" / "torchrun_multi_node.sh")
    nodes = [subprocess.Popen(["bash", script, "trainer.max_epochs=1"], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert len(list(workdir.glob("outputs/**/.hydra"))) == 1
    _, [run] = _runs(workdir)
    assert run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
    assert run.data.metrics["global_step"] == 23
