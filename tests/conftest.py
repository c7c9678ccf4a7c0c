"""Shared fixtures: one torch thread for the tiny models, tiny untrained checkpoints for CLI tests."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from spheregen.models.ar import ARConfig, SphereAR
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster when the shared cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Untrained tiny tokenizer + AR checkpoints, a 28 px and a 32 px dataset, an image file."""
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(image_size=28, in_channels=1, channels=(8, 16, 16), dim=32, enc_depth=1,
                                    dec_depth=1, n_heads=2, mlp_hidden=64, n_registers=0, perceptual="none",
                                    disc_weight=0.0))
    tok.save_pretrained(root / "tok")
    ar = SphereAR(ARConfig(token_dim=16, grid=(7, 7), radius=4.0, num_classes=10, tokenizer=str(root / "tok"),
                           dim=32, n_layers=1, n_heads=2, n_cls_tokens=2, head_depth=1, head_width=32, head_adaln=1))
    ar.save_pretrained(root / "ar")
    for name, size in (("d28", 28), ("d32", 32)):
        d = root / name
        d.mkdir()
        np.save(d / "images.npy", np.zeros((4, size, size, 1), np.uint8))
        np.save(d / "labels.npy", np.arange(4, dtype=np.int64))
        (d / "classes.json").write_text(json.dumps([str(i) for i in range(10)]))
        (d / "meta.json").write_text(json.dumps({"source": "test", "size": size, "count": 4, "channels": 1}))
    # a corrupt copy and a config/weights mismatch
    bad = root / "ar_corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((root / "ar" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    mismatch = root / "ar_mismatch"
    mismatch.mkdir()
    cfg = json.loads((root / "ar" / "config.json").read_text())
    cfg["model"]["dim"] = 64
    (mismatch / "config.json").write_text(json.dumps(cfg))
    (mismatch / "model.safetensors").write_bytes((root / "ar" / "model.safetensors").read_bytes())
    Image.new("L", (28, 28)).save(root / "digit.png")
    (root / "a_file").write_text("not a directory")
    return root


