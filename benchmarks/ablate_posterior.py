"""SphereAR posterior and projection ablation (paper Fig. 4, Table 2, and Fig. 8's CFG robustness).

For one dataset, every arm trains a tokenizer and an AR model on the same budget, then samples `per_class`
images per class at each CFG scale and scores them (Inception FID, class accuracy, classifier-feature dFID):

    arm                   tokenizer posterior   AR input/output projection   paper
    spherical             Power Spherical       yes                          S-VAE, Table 2 No. 4
    spherical_noproj      Power Spherical       no                           (the AR half of the constraint)
    gaussian_norm         Gaussian, then N_R    yes                          N-x, Table 2 No. 3
    gaussian_norm_noproj  Gaussian, then N_R    no                           Table 2 No. 2
    gaussian              diagonal Gaussian     no                           G-x, Table 2 No. 1
    sigma                 sigma-VAE             no                           F-x

Arms sharing a posterior share the tokenizer. All arms use the same KL weight (the dataset's tiny config);
the paper tunes it per family (G-01..16, S-01..08), which this budget cannot afford.

    python benchmarks/ablate_posterior.py --data data/mnist28 --budget cpu
    python benchmarks/ablate_posterior.py --data data/emoji32 --budget cpu --arms spherical,gaussian
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ARMS = {  # name: (tokenizer posterior, AR projection)
    "spherical": ("spherical", True),
    "spherical_noproj": ("spherical", False),
    "gaussian_norm": ("gaussian_norm", True),
    "gaussian_norm_noproj": ("gaussian_norm", False),
    "gaussian": ("gaussian", False),
    "sigma": ("sigma", False),
}
TOKENIZER_CONFIGS = {28: "configs/tokenizer/mnist_tiny.toml", 32: "configs/tokenizer/emoji32_tiny.toml"}
AR_CONFIG = "configs/ar/mnist_tiny.toml"


def tokenizer_config(image_size: int, channels: int) -> str:
    cfg = TOKENIZER_CONFIGS.get(image_size)
    if cfg is None:
        from spheregen.errors import UserError

        raise UserError(f"no tiny tokenizer config for {image_size} px images; use MNIST-28 or a 32 px dataset")
    return cfg


def run_arm(arm: str, data: str, runs: Path, budget: harness.Budget, device: str, ds) -> dict:
    """Train (or reuse) the arm's tokenizer and AR model, then fill its table cells."""
    from spheregen.cli.demo import run_spheregen, train_or_resume
    from spheregen.engine.tokenizer_setup import evaluate_reconstruction
    from spheregen.generation import load_generator, load_tokenizer

    posterior, proj = ARMS[arm]
    dev = ["--device", device]
    tok_dir = runs / f"tokenizer-{posterior}"
    overrides = ["--set", f"model.posterior={posterior}", "--set", "train.eval_every=0",
                 "--set", f"train.ckpt_every={budget.tokenizer_steps}"]
    tok = train_or_resume("tokenizer", tokenizer_config(ds.image_size, ds.channels), tok_dir, "--data", data,
                          *overrides, *dev, steps=budget.tokenizer_steps)
    latents = runs / f"latents-{posterior}"
    if not (latents / "meta.json").is_file():
        run_spheregen("encode", "--tokenizer", str(tok), "--data", data, "--split", "train", "--out", str(latents),
                      *dev)
    flag = str(proj).lower()
    ar = train_or_resume("ar", AR_CONFIG, runs / f"ar-{arm}", "--data", data, "--latents", str(latents),
                         "--set", f"model.project_inputs={flag}", "--set", f"model.project_outputs={flag}",
                         "--set", f"train.ckpt_every={budget.ar_steps}", *dev, steps=budget.ar_steps)

    cells = harness.Cells(runs / f"ar-{arm}", budget)
    from spheregen.data.datasets import ImageDataset

    test = ImageDataset(data, "test")
    rec = cells.get("reconstruction", lambda: evaluate_reconstruction(
        load_tokenizer(tok, device=device), test, max_images=500, grid_path=runs / f"recon-{posterior}.png"))
    model = load_generator(str(ar), device=device)
    labels = harness.class_labels(ds.num_classes, budget.per_class)
    table = []
    for cfg in budget.cfgs:
        def cell(cfg=cfg) -> dict:
            opts = {"cfg": cfg, "cfg_schedule": "constant", "sampler": "euler_maruyama", "steps": budget.head_steps}
            images, sec = harness.generate_all(model, labels, budget.seed, opts)
            harness.save_examples(images, ds.num_classes, budget.per_class, runs / "grids" / f"{arm}_cfg{cfg:g}.png")
            return {"cfg": cfg, **harness.score(images, labels, data, budget, device), "seconds_per_image": sec}

        table.append(cells.get(f"cfg{cfg:g}", cell))
    return {"arm": arm, "posterior": posterior, "ar_projection": proj, "tokenizer": str(tok), "ar": str(ar),
            "recon_psnr": rec["psnr"], "recon_ssim": rec["ssim"], "cells": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset directory: MNIST-28 (data/mnist28) or emoji-32")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    return harness.report(lambda: harness.run_arms(
        args, f"posterior_{Path(args.data).name}", ARMS, run_arm,
        lambda ds: {"image_size": ds.image_size, "tokenizer_config": tokenizer_config(ds.image_size, ds.channels),
                    "ar_config": AR_CONFIG, "sampler": "euler_maruyama", "cfg_schedule": "constant"}))


if __name__ == "__main__":
    sys.exit(main())
