"""torch.distributed helpers: process-group set-up from ``torchrun``'s environment, rank-aware
reductions and barriers that are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def setup(device: str) -> str:
    """Joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs,
    gloo on CPU. Returns this process's device (``cuda:LOCAL_RANK`` on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or initialized():
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def teardown() -> None:
    if initialized():
        dist.destroy_process_group()


def mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over all processes."""
    if not initialized():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def any_flag(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any."""
    if not initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    if initialized():
        dist.barrier()
