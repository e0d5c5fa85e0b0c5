"""Distributed data parallel under ``torchrun``: process group, device per rank, gradient and metric reduction.

``torchrun --nproc_per_node=K -m dscovid.cli.train ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without
them training runs in one process. The backend is gloo on the CPU and NCCL on GPUs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Rank and world size of this process (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (read now, at run time)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        log.info("Process %d of %d joined the %s process group", rank, world_size, backend)
    return DistributedContext(rank, world_size, local_rank)


def shutdown_distributed(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(parameters: Iterable[torch.nn.Parameter], context: DistributedContext) -> None:
    """Average ``.grad`` over the ranks in one flat all-reduce (for steps that bypass DDP's own reducer)."""
    if not context.enabled:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        param.grad = flat[offset:offset + count].view_as(param).clone()
        offset += count


def sum_over_ranks(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers over all ranks (validation counts)."""
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
