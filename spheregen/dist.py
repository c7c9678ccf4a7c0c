"""Data-parallel plumbing for torchrun: process group set-up, gradient averaging, rank-0 helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op (one process).
Gradients are averaged with one all-reduce per bucket after accumulation, which is the DDP update
(mean of per-rank mean losses == mean over the global batch when every rank holds B / world items).
It works for any `training_loss` method, GAN discriminators included, without DDP's forward wrapper.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> torch.device | None:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on CUDA).
    Returns this rank's device, or None when not launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (models are initialised per rank)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.Tensor], bucket_numel: int = 2**24) -> None:
    """grad <- mean over ranks of grad, in flat buckets (one all-reduce per ~64 MB of fp32)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    world = world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= bucket_numel):
            flat = torch.cat([b.flatten() for b in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def average_scalars(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist()))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list on a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
