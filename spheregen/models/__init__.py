"""The models: the S-VAE tokenizer, SphereAR (transformer + flow head) and the Sphere Encoder.

Modules here import only `sphere`, `layers`, `losses`, `config`, `errors`, `checkpoint` and each other
(tests/test_layout.py enforces it). `load_model` rebuilds any registered model (these three, and any a user
registers with `spheregen.checkpoint.register_model`) from a checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spheregen.checkpoint import read_config, registered_models
from spheregen.errors import UserError
from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig

__all__ = ["ARConfig", "SphereAR", "SphereEncoder", "SphereEncoderConfig", "Tokenizer",
           "TokenizerConfig", "load_model"]


def load_model(path: str | Path, use_ema: bool = True, expect: str | None = None) -> torch.nn.Module:
    """Rebuild the model of a checkpoint directory from its config.json `model_type` (EMA weights when present)."""
    config = read_config(path)
    kind, known = config.get("model_type"), registered_models()
    if kind not in known:
        raise UserError(f"{path} holds a model of unknown type {kind!r}; known: {', '.join(sorted(known))}")
    if expect is not None and kind != expect:
        raise UserError(f"{path} holds a {kind} checkpoint, but a {expect} checkpoint is needed here")
    return known[kind].from_pretrained(path, use_ema=use_ema)
