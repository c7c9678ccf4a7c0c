"""`spheregen train sphere`: the Sphere Encoder, its dataset, and its evaluation (sample grids at 1 and 4 steps
with fixed seeds, reconstruction PSNR)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from spheregen.config import from_dict
from spheregen.data.lazy import open_dataset
from spheregen.engine.setup import data_path, fill_from_data
from spheregen.errors import UserError
from spheregen.images import psnr, save_grid
from spheregen.models.sphere_encoder import SphereEncoder
from spheregen.models.sphere_encoder_nets import SphereEncoderConfig


def training_setup(config: dict, args) -> tuple[SphereEncoder, object, object]:
    """Model, dataset (data.split, default train) and eval_fn; image_size, channels and num_classes come
    from the dataset (explicit values must agree with it)."""
    path = data_path(config)
    data_cfg = config.get("data", {})
    dataset = open_dataset(path, split=data_cfg.get("split", "train"), test_fraction=data_cfg.get("test_fraction", 0.1))
    found = {"image_size": dataset.image_size, "channels": dataset.channels, "num_classes": dataset.num_classes}
    mcfg = from_dict(SphereEncoderConfig, fill_from_data(config.get("model", {}), found, path), "model.")
    try:
        mcfg.validate()
    except ValueError as e:
        raise UserError(f"invalid [model] config: {e}") from None
    model = SphereEncoder(mcfg)
    eval_set = open_dataset(path, split="test") if data_cfg.get("split", "train") == "train" else dataset
    if len(eval_set) == 0:
        eval_set = dataset
    return model, dataset, make_eval_fn(eval_set)


def grid_labels(num_classes: int, per_class: int) -> torch.Tensor | None:
    """Class ids for a grid: each class repeated per_class times (rows = classes), None if unconditional."""
    if num_classes == 0:
        return None
    return torch.arange(num_classes).repeat_interleave(per_class)


def make_eval_fn(dataset, n_recon: int = 64, per_class: int = 8, steps: tuple[int, ...] = (1, 4)):
    """eval_fn(model, step, out_dir): sample grids at 1 and 4 steps (fixed seeds) and reconstruction PSNR."""
    recon_idx = np.linspace(0, len(dataset) - 1, min(n_recon, len(dataset))).astype(np.int64)
    x_ref, _ = dataset.get_batch(recon_idx)

    def eval_fn(model: SphereEncoder, step: int, out_dir: Path) -> dict[str, float]:
        device = next(model.parameters()).device
        K = model.config.num_classes
        labels = grid_labels(min(K, 10), per_class)
        n = len(labels) if labels is not None else 64
        seeds = list(range(n))
        out = {}
        for T in steps:
            t0 = time.perf_counter()
            imgs = model.generate(labels.to(device) if labels is not None else None, steps=T, seeds=seeds, n=n)
            out[f"gen{T}_s_per_img"] = (time.perf_counter() - t0) / n
            save_grid(imgs, n // per_class if K else 8, out_dir / f"samples_step{step:08d}_{T}steps.png")
        x = x_ref.to(device)
        rec = model.reconstruct(x)
        out["recon_psnr"] = psnr(rec, x).mean().item()
        save_grid(torch.cat([x[:16], rec[:16]]), 2, out_dir / f"recon_step{step:08d}.png")
        print(f"eval at step {step}: recon PSNR {out['recon_psnr']:.2f} dB; grids in {out_dir}")
        return out

    return eval_fn


