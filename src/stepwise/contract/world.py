"""The world of a job: its data-parallel replicas W, the processes per node, and this process's
place among them (pure: no torch).

Decided once, in `job.prepare`, from the `parallel` config, the launcher's environment
(stepwise.contract.dist_env) and the number of visible GPUs; the plan reads W from it, the spawner its
processes per node, and `distributed.start_replica` this process's rank and devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stepwise.contract.dist_env import DistEnv
from stepwise.contract.errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
# Modes that run one process per replica (the DDP data layout: loaders, shards, spawning).
PROCESS_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """Where a job's replicas run.

    Attributes:
        mode: `single`, `dp` (one process drives `device_ids`), `ddp` or `fsdp` (one process
            per rank; fsdp also shards the model over the ranks).
        size: the data-parallel replicas W of the batch contract.
        nproc: processes per node: ranks (ddp, fsdp) stepwise spawns or the launcher started;
            else 1.
        device_ids: for `dp`, the GPUs the one process drives.
        env: this process's launcher environment: its rank, and where the ranks meet.
    """

    mode: str = "single"
    size: int = 1
    nproc: int = 1
    device_ids: tuple[int, ...] = ()
    env: DistEnv = DistEnv()

    @property
    def rank(self) -> int:
        """This process's rank among the processes that load data (0 for single and dp)."""
        return self.env.rank if self.mode in PROCESS_MODES else 0

    @property
    def spawns(self) -> bool:
        """DDP or FSDP that nobody launched: stepwise starts `nproc` ranks on this node itself."""
        return self.mode in PROCESS_MODES and not self.env.launched

    def joined(self, env: DistEnv) -> World:
        """The same world, seen from a rank that `env` describes (a spawned worker)."""
        return dataclasses.replace(self, env=env)


def resolve_world(parallel, device: str, env: DistEnv, gpus: int) -> World:
    """The world of the `parallel` config (mode and options) on `device`, checked.

    Args:
        env: the launcher's environment (torchrun, SLURM, submitit) or a plain process.
        gpus: CUDA devices visible to this process.
    """
    mode = parallel.mode
    if mode == "single":
        if env.launched and env.world_size > 1:
            raise ConfigError("parallel", "single", f"{env.source} started {env.world_size} "
                              "processes, which would all train the same model alone",
                              "use parallel=ddp, or start one process")
        return World("single", env=env)
    if mode == "dp":
        if gpus == 0:
            raise ConfigError("parallel", "dp", "nn.DataParallel needs CUDA devices and none is "
                              "visible", "use parallel=ddp (gloo on CPU) or parallel=single")
        ids = parallel.device_ids if parallel.device_ids is not None else list(range(gpus))
        if not ids or any(not 0 <= i < gpus for i in ids) or len(set(ids)) != len(ids):
            raise ConfigError("parallel.device_ids", ids, f"must be distinct ids in 0..{gpus - 1}",
                              "list visible GPUs, or null for all of them")
        return World("dp", size=len(ids), device_ids=tuple(ids), env=env)
    world = _ddp(parallel, device, env, gpus if device != "cpu" else 0)
    if mode != "fsdp":
        return world
    if world.size == 1:
        raise ConfigError("parallel", "fsdp", "world_size=1: one process has nothing to shard "
                          "over (FSDP would keep the whole model on its one device, as single "
                          "does, and add gathers)", "use parallel=single, or parallel.nproc>=2")
    return dataclasses.replace(world, mode="fsdp")


def _ddp(parallel, device: str, env: DistEnv, gpus: int) -> World:
    if parallel.backend not in BACKENDS:
        raise ConfigError("parallel.backend", parallel.backend, "unknown value",
                          f"use one of {', '.join(BACKENDS)}")
    if parallel.timeout_s <= 0:
        raise ConfigError("parallel.timeout_s", parallel.timeout_s, "must be positive",
                          "set a number of seconds, e.g. parallel.timeout_s=300")
    if parallel.backend == "nccl" and gpus == 0:
        raise ConfigError("parallel.backend", "nccl", "NCCL needs CUDA devices and none is "
                          "visible", "use parallel.backend=gloo or auto")
    if not env.launched and parallel.nnodes > 1:
        raise ConfigError("parallel.nnodes", parallel.nnodes, "stepwise spawns processes on one "
                          "node only", "start each node with torchrun (see launch/README.md)")
    nproc, size = ddp_world(parallel.nproc, parallel.nnodes, env, gpus)
    if env.launched and size != nproc * parallel.nnodes:
        raise ConfigError("parallel.nnodes", parallel.nnodes, f"the launcher started {size} "
                          f"processes, {nproc} per node", f"set parallel.nnodes={size // nproc}")
    if gpus and nproc > gpus and device != "cpu":
        raise ConfigError("parallel.nproc", nproc, f"only {gpus} GPUs are visible",
                          f"set parallel.nproc={gpus} or fewer, or trainer.device=cpu")
    return World("ddp", size=size, nproc=nproc, env=env)


def ddp_world(nproc: int | None, nnodes: int, env: DistEnv, gpus: int) -> tuple[int, int]:
    """(processes per node, world size) for `parallel=ddp`, checked against the launcher.

    Args:
        nproc: `parallel.nproc`; None means the launcher's count, else the GPUs, else 2.
        nnodes: `parallel.nnodes`.
        env: what launched this process.
        gpus: CUDA devices visible to this process.
    """
    if nproc is not None and nproc < 1:
        raise ConfigError("parallel.nproc", nproc, "must be at least 1",
                          "set parallel.nproc=2, or null for the default")
    if nnodes < 1:
        raise ConfigError("parallel.nnodes", nnodes, "must be at least 1", "set parallel.nnodes=1")
    if env.launched:
        if nproc is not None and nproc != env.local_world_size:
            launcher = {"slurm": "the SLURM allocation",
                        "submitit": "submitit's local launcher"}.get(env.source, "torchrun")
            raise ConfigError(
                "parallel.nproc", nproc,
                f"{launcher} started {env.local_world_size} processes per node",
                f"set parallel.nproc={env.local_world_size} or null, or start {nproc} tasks per node",
            )
        return env.local_world_size, env.world_size
    per_node = nproc if nproc is not None else (gpus or 2)
    return per_node, per_node * nnodes


def submitit_tasks_per_node(mode: str, nproc: int | None, gpus_per_node: int | None) -> int:
    """Tasks per node a submitit launcher starts for `parallel`: one per DDP/FSDP rank, else one.

    With `parallel.nproc=null`, DDP and FSDP run one rank per GPU of the node, or 2 on CPU-only
    nodes (the default of `python train.py parallel=ddp` on one machine).
    """
    if mode not in PROCESS_MODES:
        return 1
    if nproc is not None:
        return nproc
    return gpus_per_node or 2
