"""Where and how models run: the default device, and autocast (bf16 on CUDA; fp32 on CPU, where bf16 is slower)."""

from __future__ import annotations

import os

import torch

from spheregen.errors import UserError


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given (checked: a UserError names a bad one); else ("auto" too) cuda:LOCAL_RANK under
    torchrun (one GPU per rank), cuda when available, else cpu."""
    if device is not None and device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        return dev
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, a disabled one elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
