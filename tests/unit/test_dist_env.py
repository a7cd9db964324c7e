"""Launcher environments read from plain mappings, and the world they make with the `parallel`
config (pure values: no process group needed)."""

from __future__ import annotations

import pytest

from stepwise.config.schemas import DDPConfig, DPConfig, ParallelConfig
from stepwise.contract.dist_env import DistEnv, detect, first_host, tasks_per_node
from stepwise.contract.errors import ConfigError
from stepwise.contract.world import World, ddp_world, resolve_world, submitit_tasks_per_node

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
SRUN = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_NODELIST": "gpu[07-09,12]"}


def test_torchrun_environment():
    assert detect(TORCHRUN) == DistEnv("torchrun", 3, 1, 4, 2, 1, "10.0.0.5", 29400)


def test_srun_environment():
    env = detect(SRUN)
    assert env == DistEnv("slurm", 5, 1, 8, 2, 2, "gpu07", 20000 + 123456 % 20000)
    assert env.torch_env() == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
                               "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_plain_process_and_single_task_slurm_job_are_not_launched():
    assert not detect({}).launched
    batch_script = {**SRUN, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    assert not detect(batch_script).launched
    no_step = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert not detect(no_step).launched


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("gpu[03-05,9],cpu1", "gpu03"),
                                           ("a-b[1,2]", "a-b1"), ("localhost", "localhost")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == 2 and tasks_per_node("4") == 4


@pytest.mark.parametrize("nproc,nnodes,env,gpus,expected", [
    (None, 1, DistEnv(), 0, (2, 2)),  # CPU default: 2 processes
    (None, 1, DistEnv(), 4, (4, 4)),  # one per GPU
    (3, 1, DistEnv(), 0, (3, 3)),
    (None, 2, detect(TORCHRUN), 0, (2, 4)),  # the launcher decides
    (2, 4, detect(SRUN), 8, (2, 8)),
])
def test_ddp_world(nproc, nnodes, env, gpus, expected):
    assert ddp_world(nproc, nnodes, env, gpus) == expected


def test_ddp_world_rejects_more_processes_than_the_allocation():
    with pytest.raises(ConfigError) as err:
        ddp_world(4, 4, detect(SRUN), 0)
    assert err.value.key == "parallel.nproc" and "SLURM allocation started 2" in str(err.value)
    with pytest.raises(ConfigError):
        ddp_world(0, 1, DistEnv(), 0)


def test_submitit_local_tasks_are_ranks():
    env = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
           "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "41234"}
    dist = detect(env)
    assert (dist.source, dist.rank, dist.local_rank, dist.world_size, dist.local_world_size) == \
        ("submitit", 1, 1, 2, 2)
    assert (dist.master_addr, dist.master_port) == ("127.0.0.1", 20000 + 41234 % 20000)
    assert not detect({**env, "SUBMITIT_LOCAL_NTASKS": "1"}).launched  # one task: a plain job


@pytest.mark.parametrize("mode,nproc,gpus,expected", [
    ("single", None, 8, 1), ("dp", None, 4, 1), ("ddp", 3, 8, 3), ("ddp", None, 4, 4),
    ("ddp", None, None, 2), ("ddp", None, 0, 2),
])
def test_submitit_tasks_per_node_follows_parallel(mode, nproc, gpus, expected):
    assert submitit_tasks_per_node(mode, nproc, gpus) == expected


def test_the_world_of_each_mode():
    assert resolve_world(ParallelConfig(), "auto", DistEnv(), 4) == World()
    dp = resolve_world(DPConfig(device_ids=[2, 0]), "auto", DistEnv(), 4)
    assert (dp.mode, dp.size, dp.nproc, dp.device_ids, dp.rank) == ("dp", 2, 1, (2, 0), 0)
    spawned = resolve_world(DDPConfig(), "auto", DistEnv(), 0)
    assert (spawned.size, spawned.nproc, spawned.rank, spawned.spawns) == (2, 2, 0, True)
    worker = spawned.joined(detect({**TORCHRUN, "RANK": "1", "WORLD_SIZE": "2"}))
    assert (worker.size, worker.nproc, worker.rank, worker.spawns) == (2, 2, 1, False)
    launched = resolve_world(DDPConfig(nnodes=4), "cpu", detect(SRUN), 8)
    assert (launched.size, launched.nproc, launched.rank, launched.spawns) == (8, 2, 5, False)


@pytest.mark.parametrize("parallel,device,env,gpus,key", [
    (ParallelConfig(), "auto", detect(SRUN), 0, "parallel"),  # 8 ranks would train alone
    (DPConfig(), "auto", DistEnv(), 0, "parallel"),  # no GPU
    (DPConfig(device_ids=[0, 0]), "auto", DistEnv(), 2, "parallel.device_ids"),
    (DDPConfig(backend="nccl"), "cpu", DistEnv(), 4, "parallel.backend"),
    (DDPConfig(nnodes=2), "cpu", DistEnv(), 0, "parallel.nnodes"),  # spawns on one node only
    (DDPConfig(nnodes=3), "cpu", detect(SRUN), 0, "parallel.nnodes"),  # 8 ranks, 2 per node
    (DDPConfig(nproc=4), "auto", DistEnv(), 2, "parallel.nproc"),  # only 2 GPUs
])
def test_a_world_that_cannot_be_is_one_config_error(parallel, device, env, gpus, key):
    with pytest.raises(ConfigError) as err:
        resolve_world(parallel, device, env, gpus)
    assert err.value.key == key
