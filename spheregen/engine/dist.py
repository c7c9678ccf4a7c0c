"""Data-parallel plumbing for torchrun: process group set-up, DistributedDataParallel around a training
objective, BatchNorm over the global batch, activation checkpointing, FSDP, rank-0 helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op (one process).
Gradients are averaged by torch's DistributedDataParallel (bucketed all-reduces overlapped with backward):
mean of per-rank mean losses == mean over the global batch when every rank holds B / world items. DDP wraps
`Objective(model, "training_loss")`, whose forward is the model's loss method, so any model plugs in unchanged.
"""

from __future__ import annotations

import inspect
import os
import types
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


class Objective(torch.nn.Module):
    """forward(*args) = module.<method>(*args): lets DistributedDataParallel wrap a loss method."""

    def __init__(self, module: torch.nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: Any) -> Any:
        return getattr(self.module, self.method)(*args)


def wrap_ddp(module: torch.nn.Module, method: str, ignore: set[int] = frozenset(),
             find_unused: bool = False) -> torch.nn.Module | None:
    """DistributedDataParallel(Objective(module, method)), or None on one process. Parameters whose id() is in
    `ignore` (another optimizer's, e.g. a GAN discriminator's) are left out of its all-reduces; buffers are
    not broadcast (BatchNorm statistics are global already, see global_batchnorm)."""
    if not is_distributed():
        return None
    from torch.nn.parallel import DistributedDataParallel

    wrapper = Objective(module, method)
    skip = [f"module.{n}" for n, p in module.named_parameters() if id(p) in ignore]
    if skip:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, skip)
    device = next(module.parameters()).device
    ids = [device] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel).parameters  # torch >= 2.13 renamed broadcast_buffers
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(wrapper, device_ids=ids, find_unused_parameters=find_unused, **no_sync)


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of every rank's x is the sum over ranks of dL/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_batchnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm whose training statistics are those of the global batch: mean = sum_r S1_r / sum_r n_r,
    var = sum_r S2_r / sum_r n_r - mean^2 (fp64 sums, a differentiable all-reduce); eval uses running stats."""
    if not (self.training and is_distributed()):
        return type(self).forward(self, x)
    C, dims = x.shape[1], [0] + list(range(2, x.dim()))
    xd = x.double()
    count = torch.full((1,), x.numel() // C, dtype=torch.float64, device=x.device)
    stats = _SumOverRanks.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
    n = stats[-1]
    mean = stats[:C] / n
    var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked += 1
            f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), f)
    shape = [1, C] + [1] * (x.dim() - 2)  # broadcast over N and the spatial dims
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def global_batchnorm(module: torch.nn.Module) -> int:
    """Make every BatchNorm in `module` normalise with global-batch statistics under torchrun (like
    SyncBatchNorm, on gloo as well as NCCL), so N ranks train like one process; returns how many."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.forward = types.MethodType(_global_batchnorm_forward, m)
    return len(norms)


def _checkpointed_forward(self, *args: Any, **kwargs: Any) -> Any:
    """The class's forward under activation checkpointing while training with gradients (recomputed in
    backward, RNG state preserved); a plain call otherwise (sampling, KV caches)."""
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_blocks(module: torch.nn.Module, kinds: tuple[type, ...] = (Block,)) -> int:
    """Activation checkpointing on every transformer block of `module` (parameter names unchanged);
    returns how many blocks."""
    blocks = [m for m in module.modules() if isinstance(m, kinds)]
    for m in blocks:
        m.forward = types.MethodType(_checkpointed_forward, m)
    return len(blocks)


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
    Gradients are then reduce-scattered (averaged) by FSDP itself (no DDP wrapper)."""
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
