"""The data-parallel replica a process runs as: device, model wrapping, no_sync and reductions.

Chosen once per process; the training loop asks it, never `torch.distributed` directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Replica:
    """One data-parallel replica (single: the only one; dp: one process driving W devices).

    Attributes:
        mode: `single`, `dp` or `ddp`.
        rank: this process's rank among the replicas that load data (0 for single and dp).
        world_size: data-parallel replicas W of the batch contract.
        device: where this process puts its micro-batches.
    """

    mode: str
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loader_ranks(self) -> int:
        """Processes that load distinct data (DP loads the whole b x W slice in one process)."""
        return self.world_size if self.mode == "ddp" else 1

    @property
    def blocks_per_process(self) -> int:
        """Blocks of b samples this process loads per micro-step (W for DP, else 1)."""
        return self.world_size if self.mode == "dp" else 1

    @property
    def loss_multiplier(self) -> float:
        # DDP averages gradients over ranks; multiplying by W turns that average back into the
        # sum over all real samples of the window, which the loop divides by the window's count.
        return float(self.world_size) if self.mode == "ddp" else 1.0

    def wrap(self, model: nn.Module) -> nn.Module:
        """Put the model on the device and wrap it for the parallel mode."""
        model = model.to(self.device)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "dp":
            return nn.DataParallel(model)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on every micro-step but the last of a window."""
        if self.mode == "ddp" and not sync:
            return model.no_sync()
        return contextlib.nullcontext()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (identity with one process)."""
        if self.mode == "ddp":
            import torch.distributed as dist

            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is reported by `job.validate`."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)
