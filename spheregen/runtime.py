"""Where and how models run: the default device, autocast (bf16 on CUDA; fp32 on CPU, where bf16 is slower),
the --precision switch (fp32 / bf16 / fp16 autocast, TF32 on CUDA) and the --compile switch (torch.compile)."""

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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_PARTS = ("head", "encoder", "decoder")  # the SphereAR flow head; the Sphere Encoder's two networks


def check_precision(precision: str) -> torch.dtype:
    """The dtype of fp32 / bf16 / fp16, or a UserError naming the choices."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def precision_autocast(device: torch.device | str, precision: str = "fp32") -> torch.autocast:
    """Autocast to bf16 / fp16 on `device` (a disabled one for fp32). On CUDA, fp32 matmuls and convolutions
    may use TF32 (set here, process-wide: torch.set_float32_matmul_precision("high") and cuDNN's allow_tf32)."""
    dtype = check_precision(precision)
    device = torch.device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and dtype == torch.float16 and not _cpu_fp16_autocast():
        raise UserError("fp16 autocast is not supported on this CPU build of torch; use --precision bf16 or fp32")
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return True
    except RuntimeError:
        return False


def compile_model(model: torch.nn.Module, mode: str | None = None) -> list[str]:
    """torch.compile, in place, the networks a sampling step runs (the flow head of SphereAR, the encoder and
    decoder of the Sphere Encoder), keeping parameter names, so the model still saves and loads as before.
    Returns the names compiled; a model with none of them is a UserError."""
    parts = [name for name in COMPILE_PARTS if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not parts:
        raise UserError(f"--compile: {type(model).__name__} has none of {', '.join(COMPILE_PARTS)} to compile")
    for name in parts:
        getattr(model, name).compile(mode=mode)
    return parts
