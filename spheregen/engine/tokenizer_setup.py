"""`spheregen train tokenizer`: the S-VAE, its dataset, and its evaluation (held-out PSNR / SSIM and a grid of
originals above reconstructions)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from spheregen.config import from_dict
from spheregen.data.lazy import open_dataset
from spheregen.engine.setup import data_path, fill_from_data
from spheregen.images import psnr, save_grid
from spheregen.losses import say_once
from spheregen.models.tokenizer import Tokenizer, TokenizerConfig


def training_setup(config: dict, args) -> tuple[Tokenizer, object, object]:
    """Model, the train split of data.path, and the eval_fn; image size and channels come from the data."""
    path = data_path(config)
    data = config.get("data", {})
    fraction = float(data.get("test_fraction", 0.1))
    train_set = open_dataset(path, split="train", test_fraction=fraction)
    found = {"image_size": train_set.image_size, "in_channels": train_set.channels}
    cfg = from_dict(TokenizerConfig, fill_from_data(config.get("model", {}), found, path), "model.")
    model = Tokenizer(cfg)
    model.perceptual_module()  # say at start-up whether the perceptual term is on
    eval_fn = make_eval_fn(path, fraction, int(data.get("eval_images", 512)))
    return model, train_set, eval_fn


@torch.no_grad()
def evaluate_reconstruction(model: Tokenizer, dataset, max_images: int = 512, batch_size: int = 128,
                            grid_path: str | Path | None = None, grid_n: int = 16) -> dict[str, float]:
    """Mean per-image PSNR (dB, pixels in [0, 1]) and SSIM of posterior-mode reconstructions of up to
    `max_images` images spread evenly over `dataset`; optionally a PNG of `grid_n` of them (also spread
    evenly, so sorted datasets show every class), originals above reconstructions below."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    model.eval()
    device = next(model.parameters()).device
    n = min(len(dataset), max_images)
    chosen = torch.linspace(0, len(dataset) - 1, n).round().long()
    psnrs, ssims, originals, recons = [], [], [], []
    show = set(torch.linspace(0, n - 1, min(grid_n, n)).round().long().tolist())
    for start in range(0, n, batch_size):
        x, _ = dataset.get_batch(chosen[start:start + batch_size])
        x = x.to(device)
        x_hat = model.reconstruct(x).float()
        psnrs.append(psnr(x, x_hat))
        ssims.append(ssim((x_hat + 1) / 2, (x.float() + 1) / 2, data_range=1.0, reduction="none"))
        keep = [i - start for i in range(start, start + len(x)) if i in show]
        originals.append(x[keep].cpu())
        recons.append(x_hat[keep].cpu())
    if grid_path is not None and n:
        save_grid(torch.cat([torch.cat(originals), torch.cat(recons)]), 2, grid_path, pad=0,
                  scale=max(1, 64 // model.config.image_size))
    return {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item()}


def make_eval_fn(data_path: str | Path, test_fraction: float = 0.1, max_images: int = 512):
    """eval_fn(model, step, out_dir) for the Trainer: held-out PSNR / SSIM and recon_step_XXXXXXXX.png."""
    test_set = open_dataset(data_path, split="test", test_fraction=test_fraction)
    if len(test_set) == 0:
        say_once(f"{data_path}: no held-out images (data.test_fraction = {test_fraction}); no reconstruction eval")
        return None

    start = time.perf_counter()

    def eval_fn(model: Tokenizer, step: int, out_dir: Path) -> dict[str, float]:
        grid_path = Path(out_dir) / f"recon_step_{step:08d}.png"
        result = evaluate_reconstruction(model, test_set, max_images, grid_path=grid_path)
        result["wall_s"] = time.perf_counter() - start  # since set-up, evals included
        print(f"eval step {step}: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
              f"({min(len(test_set), max_images)} held-out images, {result['wall_s']:.0f} s)", flush=True)
        return result

    return eval_fn
