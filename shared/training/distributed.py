"""DistributedDataParallel plumbing: one process per device, launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is the single-process
no-op. NCCL joins GPUs, gloo joins CPU processes. Rank 0 alone writes records and checkpoints; the
others train and agree with it through collectives (loss averages, stop decisions).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.flags import pick_device
from shared.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> tuple[DistContext, torch.device]:
    """Joins the process group if torchrun started us; returns (context, this process's device).

    device_name: 'auto' | 'cpu' | 'cuda' | 'cuda:N'. Under torchrun with CUDA, each process takes GPU
    LOCAL_RANK and the backend is NCCL; on CPU it is gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size <= 1:
        return DistContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, local_rank, world_size), device


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The average of a tensor over all processes (the tensor itself when single-process)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def no_sync(model):
    """DDP's no_sync() (backwards accumulate gradients without the all-reduce) for a DistributedDataParallel
    model, also under torch.compile, which forwards the attribute; a null context for a plain module."""
    return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


def broadcast_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Rank 0's decision (e.g. 'stop early'), made known to every rank."""
    if not ctx.enabled:
        return flag
    box = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(box, src=0)
    return bool(box.item())


def broadcast_int(value: int, ctx: DistContext, device: torch.device) -> int:
    """Rank 0's integer (e.g. a planned step count), made known to every rank."""
    if not ctx.enabled:
        return value
    box = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(box, src=0)
    return int(box.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (e.g. a signal that reached some ranks first)."""
    if not ctx.enabled:
        return flag
    box = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())
