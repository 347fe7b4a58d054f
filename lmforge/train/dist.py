"""Distributed training on PyTorch's own engine: `torchrun` starts the processes and sets RANK,
WORLD_SIZE and LOCAL_RANK; this file turns them into a process group and a wrapped model.

The one idea: every rank runs the same driver on its own slice of each global batch (the loader
is already a pure function of (seed, position, rank)), DDP averages the gradients, and so every
rank holds the same weights after every step: rank 0 alone logs and writes checkpoints, and any
rank can resume from them with any number of processes. A rank that fails takes the others down
with it: torchrun stops the remaining workers, and collectives time out instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(strategy: str, timeout_s: int = 600) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a single process
    when there is none. `strategy` none under torchrun with several processes is an error: each
    rank would train alone and overwrite the others' checkpoints."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if strategy == "none":
        raise RuntimeError(
            f"started by torchrun with {world} processes but dist.strategy is none: "
            f"pass --dist.strategy ddp"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's own GPU under torchrun; CPU ranks share the CPU."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap(model: torch.nn.Module, strategy: str, info: DistInfo) -> torch.nn.Module:
    """The module the training loop calls: DDP over `model` (which keeps its own name for saving
    and evaluation, and shares its parameters with the wrapper)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if next(model.parameters()).is_cuda else None
        return DDP(model, device_ids=ids)
    raise ValueError(f"dist.strategy {strategy!r} is not supported")


def no_sync(model: torch.nn.Module, skip: bool):
    """Gradient accumulation: all micro-batches but the last skip DDP's all-reduce."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over ranks (the tensor itself in a single process)."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is True on any: all ranks stop at the same step on Ctrl-C."""
    if not info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
