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

from spheregen.layers import Block


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


# -- FSDP (fully_shard) for the large configs ----------------------------------------------------------
def shard_model(model: torch.nn.Module, methods: tuple[str, ...] = ("training_loss",)) -> None:
    """FSDP2: shard every transformer block, then the root; `methods` run with the FSDP hooks like forward.
    Gradients are then reduce-scattered (averaged) by FSDP itself, so `average_gradients` is skipped."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m)
    fully_shard(model)
    for name in methods:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a sharded DTensor (collective); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sd_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_sd_options())


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_sd_options())


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Every rank reads the full checkpoint and keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, opt, optim_state, options=options)


def shutdown() -> None:
    """Leave the process group cleanly (a gloo group torn down at interpreter exit can abort the process)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
