"""Sphere Encoder evaluation helpers: PSNR, training-time sample grids, and BatchNorm recalibration.

BN recalibration (paper App. C.4): a model with latent BN (App. C.3) normalises z with running statistics
gathered during training. Before sampling, `recalibrate_bn` resets them and re-estimates them as a plain
average over calibration batches (momentum None), from either
- reference images: z = E(x, y) for real images x (the paper's "calibrate with reference images"), or
- generated images: the encoder passes inside Algorithm 1 while sampling n images ("calibrate with generated
  images", 500 in the paper; BigGAN's standing statistics).
`spheregen sphere-encoder recalibrate-bn` writes a copy of a checkpoint with the new statistics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .sample_cli import save_grid

SphereEncoder = nn.Module  # the model type (spheregen.sphere_encoder imports this module)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) on [0, 1] images (inputs in [-1, 1])."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


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
        out["recon_psnr"] = psnr(rec, x)
        save_grid(torch.cat([x[:16], rec[:16]]), 2, out_dir / f"recon_step{step:08d}.png")
        print(f"eval at step {step}: recon PSNR {out['recon_psnr']:.2f} dB; grids in {out_dir}")
        return out

    return eval_fn


# -- BatchNorm recalibration (App. C.4) -------------------------------------------------------------------
@torch.no_grad()
def recalibrate_bn(model: SphereEncoder, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   n: int = 500, batch_size: int = 50, steps: int = 4, cfg: float = 1.0,
                   cfg_position: str = "combo", seed: int = 0) -> int:
    """Re-estimate the latent BN statistics: running mean / var = plain averages over the calibration batches.

    With `images` [M, C, H, W] in [-1, 1] (and their labels): encode them. Without: sample n images with
    Algorithm 1 (`steps`, `cfg`; classes cycled, seeds seed + k) and average over every encoder pass inside.
    Returns the number of batches averaged. The model is left in eval mode.
    """
    bn = model.encoder.bn
    if bn is None:
        raise UserError("this Sphere Encoder has no latent BatchNorm (model.latent_bn = false); nothing to "
                        "recalibrate")
    device = next(model.parameters()).device
    model.eval()
    bn.reset_running_stats()
    momentum, bn.momentum = bn.momentum, None  # None: cumulative average over all batches
    bn.train()
    try:
        if images is not None:
            for i in range(0, len(images), batch_size):
                lab = labels[i:i + batch_size].to(device) if labels is not None else None
                model.encode(images[i:i + batch_size].to(device), lab)
        else:
            K = model.config.num_classes
            for i in range(0, n, batch_size):
                k = torch.arange(i, min(i + batch_size, n))
                lab = (k % K).to(device) if K else None
                model.generate(lab, steps=steps, cfg=cfg, cfg_position=cfg_position,
                               seeds=[seed + int(j) for j in k], n=len(k))
    finally:
        bn.momentum = momentum
        model.eval()
    return int(bn.num_batches_tracked)


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model

    if min(args.n, args.batch_size, args.steps) < 1:
        raise UserError("--n, --batch-size and --steps must be at least 1")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite or another --out")
    model = load_model(args.ckpt, expect="sphere_encoder").eval()
    if args.data:
        from .data import ImageDataset

        data = ImageDataset(args.data, split=args.split)
        idx = np.random.default_rng(args.seed).permutation(len(data))[:args.n]
        x, y = data.get_batch(np.sort(idx))
        batches = recalibrate_bn(model, x, y if model.config.num_classes else None, batch_size=args.batch_size)
        what = f"{len(idx)} images of {args.data}"
    else:
        batches = recalibrate_bn(model, n=args.n, batch_size=args.batch_size, steps=args.steps, cfg=args.cfg,
                                 seed=args.seed)
        what = f"{args.n} generated images ({args.steps} steps, CFG {args.cfg})"
    model.save_pretrained(out, extra={"bn_recalibrated_on": what})
    print(f"recalibrated the latent BatchNorm on {what} ({batches} encoder batches): {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `spheregen sphere-encoder recalibrate-bn`."""
    p = sub.add_parser("sphere-encoder", help="Sphere Encoder utilities (BatchNorm recalibration)")
    kinds = p.add_subparsers(dest="se_command", metavar="TOOL", required=True)
    q = kinds.add_parser("recalibrate-bn", help="re-estimate latent BatchNorm statistics before sampling "
                                                "(paper App. C.4); writes a new checkpoint directory")
    q.add_argument("--ckpt", required=True, help="Sphere Encoder checkpoint directory (model.latent_bn = true)")
    q.add_argument("--out", required=True, help="new checkpoint directory")
    q.add_argument("--data", help="calibrate on real images of this spheregen dataset (default: generated ones)")
    q.add_argument("--split", default="train", help="dataset split with --data (default train)")
    q.add_argument("--n", type=int, default=500, help="calibration images (default 500, as in the paper)")
    q.add_argument("--batch-size", type=int, default=50)
    q.add_argument("--steps", type=int, default=4, help="sampling steps for generated images (default 4)")
    q.add_argument("--cfg", type=float, default=1.0, help="CFG scale for generated images (default 1)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=_cmd_recalibrate)
