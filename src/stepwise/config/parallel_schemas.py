"""Schemas of the `parallel` group (single, dp, ddp, fsdp), registered by stepwise.config.schemas."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    mode: str = "single"


@dataclass
class DDPConfig(ParallelConfig):
    """DistributedDataParallel: one process per device (CPU: gloo, GPUs: NCCL)."""

    mode: str = "ddp"
    nproc: int | None = None
    nnodes: int = 1
    backend: str = "auto"
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    timeout_s: int = 300


@dataclass
class DPConfig(ParallelConfig):
    """nn.DataParallel over `device_ids` (null: every visible GPU) in one process."""

    mode: str = "dp"
    device_ids: list[int] | None = None


@dataclass
class FSDPConfig(ParallelConfig):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): the processes of DDP (same data layout),
    with the parameters, gradients and optimizer state sharded over them."""

    mode: str = "fsdp"
    nproc: int | None = None
    nnodes: int = 1
    backend: str = "auto"
    timeout_s: int = 300
    # Module class names given their own fully_shard (e.g. [Block]); null: each direct child
    # with parameters (the children of a ModuleList or ModuleDict). The root is always sharded.
    shard_modules: list[str] | None = None
    reshard_after_forward: bool = True
