"""The data-parallel replica a process runs as: device, model wrapping, no_sync and reductions.

Chosen once per process; the training loop asks it, never `torch.distributed` directly.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from stepwise.contract.world import PROCESS_MODES, World
from stepwise.parallel import fsdp


@dataclass
class Replica:
    """One data-parallel replica (single: the only one; dp: one process driving W devices; ddp
    and fsdp: one process per replica, fsdp with the model sharded over them).

    Attributes:
        mode: `single`, `dp`, `ddp` or `fsdp`.
        rank: this process's rank among the replicas that load data (0 for single and dp).
        world_size: data-parallel replicas W of the batch contract.
        device: where this process puts its micro-batches.
    """

    mode: str
    rank: int
    world_size: int
    device: torch.device
    device_ids: list[int] | None = None
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    shard_modules: tuple[str, ...] | None = None  # fsdp: classes sharded on their own
    reshard_after_forward: bool = True  # fsdp
    # Only for measuring what no_sync saves (benchmarks, tests): all-reduce on every micro-step.
    sync_every_micro_step: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """One process per replica (ddp, fsdp): the reductions are collectives over the ranks."""
        return self.mode in PROCESS_MODES

    @property
    def loader_ranks(self) -> int:
        """Processes that load distinct data (DP loads the whole b x W slice in one process)."""
        return self.world_size if self.distributed else 1

    @property
    def blocks_per_process(self) -> int:
        """Blocks of b samples this process loads per micro-step (W for DP, else 1)."""
        return self.world_size if self.mode == "dp" else 1

    @property
    def loss_multiplier(self) -> float:
        # DDP and FSDP average gradients over ranks; multiplying by W turns that average back
        # into the sum over all real samples of the window, which the loop divides by its count.
        return float(self.world_size) if self.distributed else 1.0

    def wrap(self, model: nn.Module, precision: str = "32") -> nn.Module:
        """Put the model on the device and wrap it for the parallel mode (`precision`:
        `trainer.precision`, which FSDP's mixed precision policy follows)."""
        model = model.to(self.device)
        if self.mode == "fsdp":
            return fsdp.shard(model, self.device, self.world_size, self.shard_modules,
                                 self.reshard_after_forward, precision)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            if self.sync_batchnorm:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids,
                                           find_unused_parameters=self.find_unused_parameters)
        if self.mode == "dp":
            return nn.DataParallel(model, device_ids=self.device_ids)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The bare model under torch.compile's and DDP's or DataParallel's wrappers."""
        model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
        return model.module if isinstance(model, (nn.DataParallel,
                                                  nn.parallel.DistributedDataParallel)) else model

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on every micro-step but the
        last of a window."""
        if self.mode == "fsdp":
            return fsdp.gradient_sync(self.unwrap(model), sync or self.sync_every_micro_step)
        if self.mode == "ddp" and not sync and not self.sync_every_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The bare model's full state dict (FSDP: gathered, on rank 0 only; collective)."""
        if self.mode == "fsdp":
            return fsdp.full_model_state(self.unwrap(model))
        return self.unwrap(model).state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state dict; None under FSDP, whose shards go to the checkpoint's DCP
        directory instead (stepwise.parallel.fsdp.write_shards)."""
        return None if self.mode == "fsdp" else optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict) -> None:
        """Load a checkpoint of whole tensors ("model", "optimizer"), as single or ddp wrote it."""
        if self.mode == "fsdp":
            fsdp.load_full(self.unwrap(model), optimizer, state)
            return
        self.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a bare model's full state dict (a checkpoint's `model`) into the wrapped model;
        under FSDP every rank keeps its shards of it."""
        if self.mode == "fsdp":
            fsdp.load_full_model(self.unwrap(model), state)
        else:
            self.unwrap(model).load_state_dict(state)

    def weights_copy(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of this process's weights (its shards under FSDP), for `restore_weights`."""
        state = (fsdp.sharded_model_state(self.unwrap(model)) if self.mode == "fsdp"
                 else self.unwrap(model).state_dict())
        return {key: value.detach().clone() for key, value in state.items()}

    def restore_weights(self, model: nn.Module, copy: dict[str, torch.Tensor]) -> None:
        """Put back the weights of `weights_copy`."""
        if self.mode == "fsdp":
            fsdp.load_sharded_model(self.unwrap(model), copy)
        else:
            self.unwrap(model).load_state_dict(copy)

    def local_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This process's weights (parameters and buffers) by name, as tensors that share the
        model's storage (the local tensors of its shards under FSDP): writing into them writes
        the model, and they follow its updates."""
        module = self.unwrap(model)
        state = fsdp.sharded_model_state(module) if self.mode == "fsdp" else module.state_dict()
        return {key: value.to_local() if hasattr(value, "to_local") else value
                for key, value in state.items()}

    def all_gather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...] (a one-element list with one process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def lagged_max(self) -> LaggedMax:
        """A max over ranks whose answer comes one call late (see LaggedMax)."""
        return LaggedMax(self.distributed)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (identity with one process)."""
        if self.distributed:
            import torch.distributed as dist

            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


class LaggedMax:
    """The max of an integer over ranks, read one call late: `exchange(v)` starts an all-reduce
    of v and returns the result of the previous call's. Every rank reads the same answer at the
    same call, the tiny all-reduce overlaps a whole optimizer step, and it runs on a gloo group
    of CPU tensors, so it never waits for the GPU. With one process: v itself, at once.
    """

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed
        self.group = None
        self.pending: tuple[torch.Tensor, object] | None = None

    def exchange(self, value: int) -> int:
        if not self.distributed:
            return value
        import torch.distributed as dist

        if self.group is None:  # collective: every rank makes its first call at the same step
            self.group = (dist.group.WORLD if dist.get_backend() == "gloo"
                          else dist.new_group(backend="gloo"))
        result = self.close()
        buffer = torch.tensor([float(value)])
        self.pending = buffer, dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group,
                                               async_op=True)
        return result

    def close(self) -> int:
        """Wait for the exchange in flight, if any; its result."""
        if self.pending is None:
            return 0
        buffer, work = self.pending
        self.pending = None
        work.wait()
        return int(buffer.item())


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is reported by `job.validate`."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def start_replica(world: World, parallel, device: str) -> Replica:
    """The replica of this process in `world`; for DDP and FSDP, join the process group first.

    Args:
        world: the job's world (stepwise.contract.world), as this process's rank sees it.
        parallel: the `parallel` config, for the options of its mode.
        device: `trainer.device`.
    """
    if world.mode == "single":
        return Replica("single", 0, 1, resolve_device(device))
    if world.mode == "dp":
        ids = list(world.device_ids)
        return Replica("dp", 0, world.size, torch.device("cuda", ids[0]), device_ids=ids)
    import torch.distributed as dist

    env = world.env
    os.environ.update(env.torch_env())  # SLURM gives these under other names
    target = resolve_device(device, env.local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if target.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=timedelta(seconds=parallel.timeout_s))
    if world.mode == "fsdp":
        names = parallel.shard_modules
        return Replica("fsdp", world.rank, world.size, target,
                       shard_modules=tuple(names) if names is not None else None,
                       reshard_after_forward=parallel.reshard_after_forward)
    return Replica("ddp", world.rank, world.size, target,
                   sync_batchnorm=parallel.sync_batchnorm,
                   find_unused_parameters=parallel.find_unused_parameters)


def stop_replica(replica: Replica, failed: bool = False) -> None:
    """Leave the process group (DDP, FSDP); nothing to do otherwise.

    A rank that `failed` leaves without a word: its peers may be inside a collective it will
    never join, and a barrier now could pair with their all-reduce and hang or corrupt both.
    Its exit closes the sockets, the launcher sees the failure and ends the other ranks.
    """
    if replica.distributed and not failed:
        import torch.distributed as dist

        if dist.is_initialized():
            # Leave together: a rank whose peers already closed their gloo sockets can abort
            # ("terminate called without an active exception") while tearing its group down.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()
