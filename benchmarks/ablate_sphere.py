"""Sphere Encoder ablations: sampling steps, noise angle alpha, the three losses, and the CFG position.

Every arm trains the tiny config (configs/sphere/mnist_tiny.toml) on the same budget and is scored at 1, 2, 4
and 6 decoder passes without guidance (Inception FID, class accuracy, classifier-feature dFID); the reference
arm (the config's own alpha, 85, and all losses) is also sampled at 4 steps with CFG at each position (pixel, latent,
combo), and at 4 steps with fresh noise at every step instead of the paper's one shared draw.

    arm           alpha   losses                                          paper
    alpha45       45      reconstruction + pixel + latent consistency     Sec. 4 alpha ablation
    alpha70       70      same
    alpha80       80      same (the paper's angle for 32 px)
    alpha85       85      same (the reference arm: the config as it is)
    recon_only    85      reconstruction only                             loss ablation
    recon_pixcon  85      reconstruction + pixel consistency              loss ablation

    python benchmarks/ablate_sphere.py --data data/mnist32 --budget cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CONFIG = "configs/sphere/mnist_tiny.toml"
REFERENCE = "alpha85"  # the arm that equals the config (its alpha_deg)
ARMS = {  # name: [--set overrides]
    "alpha45": ["model.alpha_deg=45"],
    "alpha70": ["model.alpha_deg=70"],
    "alpha80": ["model.alpha_deg=80"],
    "alpha85": ["model.alpha_deg=85"],
    "recon_only": ["model.w_con_dist=0", "model.w_con_perc=0", "model.w_lat_con=0"],
    "recon_pixcon": ["model.w_lat_con=0"],
}
STEPS = (1, 2, 4, 6)
CFG_SCALE = 2.0


def run_arm(arm: str, data: str, runs: Path, budget: harness.Budget, device: str, ds, config: str = CONFIG,
            arms: dict = ARMS, reference: str = REFERENCE) -> dict:
    """Train (or reuse) one arm of `arms` on `config` and score it; other configs reuse this (sphere_rgb.py)."""
    from spheregen.cli.demo import train_or_resume
    from spheregen.generation import load_generator
    from spheregen.images import psnr

    sets = [a for s in arms[arm] + [f"train.ckpt_every={budget.sphere_steps}", "train.eval_every=0"]
            for a in ("--set", s)]
    ckpt = train_or_resume("sphere", config, runs / arm, "--data", data, *sets, "--device", device,
                           steps=budget.sphere_steps)
    model = load_generator(str(ckpt), device=device)
    cells = harness.Cells(runs / arm, budget)
    labels = harness.class_labels(ds.num_classes, budget.per_class)

    def recon() -> dict:
        import numpy as np
        import torch

        from spheregen.data.datasets import ImageDataset

        test = ImageDataset(data, "test")
        x, _ = test.get_batch(np.arange(min(len(test), 500)))
        with torch.no_grad():
            rec = torch.cat([model.reconstruct(x[i:i + 100].to(device)).cpu() for i in range(0, len(x), 100)])
        return {"psnr": psnr(rec, x).mean().item(), "n": len(x)}

    settings = [(t, 1.0, "combo", True) for t in STEPS]
    if arm == reference:  # CFG at each position, and fresh noise at every step instead of one shared draw
        settings += [(4, CFG_SCALE, pos, True) for pos in ("pixel", "latent", "combo")] + [(4, 1.0, "combo", False)]
    table = []
    for steps, cfg, pos, shared in settings:
        key = f"steps{steps}" + (f"_cfg{cfg:g}_{pos}" if cfg != 1.0 else "") + ("" if shared else "_fresh")

        def cell(steps=steps, cfg=cfg, pos=pos, shared=shared, key=key) -> dict:
            opts = {"steps": steps, "cfg": cfg, "cfg_position": pos, "shared_noise": shared}
            images, sec = harness.generate_all(model, labels, budget.seed, opts)
            harness.save_examples(images, ds.num_classes, budget.per_class, runs / "grids" / f"{arm}_{key}.png")
            return {"steps": steps, "cfg": cfg, "cfg_position": pos, "shared_noise": shared,
                    **harness.score(images, labels, data, budget, device), "seconds_per_image": sec}

        table.append(cells.get(key, cell))
    rec = cells.get("reconstruction", recon)
    return {"arm": arm, "overrides": arms[arm], "checkpoint": str(ckpt), "recon_psnr": rec["psnr"], "cells": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/mnist32", help="dataset directory (32 px; built by `spheregen data`)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    extra = {"config": CONFIG, "cfg_scale": CFG_SCALE, "reference": REFERENCE}
    return harness.report(lambda: harness.run_arms(args, f"sphere_{Path(args.data).name}", ARMS, run_arm,
                                                   lambda ds: extra))


if __name__ == "__main__":
    sys.exit(main())
