"""Which launcher started this process, read from its environment (pure: a Mapping in, no torch).

torchrun (and stepwise's own spawner, which uses torch's elastic launcher) sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A SLURM step started with several tasks
(`srun`, or submitit's `tasks_per_node`) sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the
node list; the rendezvous address is then the first node of the step, on a port derived from the
job id so that concurrent jobs on a node do not collide.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a job. `source` is `torchrun`, `slurm`, `submitit` (its local
    executor) or `none` (not launched)."""

    source: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def launched(self) -> bool:
        return self.source != "none"

    def torch_env(self) -> dict[str, str]:
        """The variables `init_process_group(init_method="env://")` reads."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def tasks_per_node(value: str) -> int:
    """SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE: '2(x3),1' -> 2 (the first node's count)."""
    return int(re.match(r"\d+", value).group())


def detect(env: Mapping[str, str]) -> DistEnv:
    """Read torchrun's variables, else a multi-task SLURM step's, else a plain process."""
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return DistEnv(
            source="torchrun", rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            node_rank=int(env.get("GROUP_RANK", 0)), master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return DistEnv(
            source="slurm", rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)), world_size=ntasks,
            local_world_size=tasks_per_node(per_node), node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=first_host(nodelist),
            master_port=20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000,
        )
    if int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1 and "SUBMITIT_LOCAL_GLOBALID" in env:
        # submitit's local executor (hydra/launcher=local) with several tasks on this machine
        return DistEnv(
            source="submitit", rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
            world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
            local_world_size=int(env["SUBMITIT_LOCAL_NTASKS"]),
            master_port=20000 + int(env.get("SUBMITIT_LOCAL_JOB_ID", "0")) % 20000,
        )
    return DistEnv()
