"""`spheregen encode`: a latent cache (the tokenizer's posterior of every image and its mirror) for AR training."""

from __future__ import annotations

import argparse
from pathlib import Path

from spheregen.cli import HelpFormatter, add_device_option
from spheregen.data.datasets import ImageDataset
from spheregen.data.latents import write_latent_cache
from spheregen.generation import load_tokenizer
from spheregen.runtime import default_device


def _cmd_encode(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer, use_ema=not args.raw_weights, device=default_device(args.device))
    dataset = ImageDataset(args.data, split=args.split)
    # record the exact checkpoint used (a run directory would resolve to a newer one after more training)
    out = write_latent_cache(tokenizer, dataset, args.out, tokenizer.source_path, args.batch_size,
                             {"data": str(Path(args.data).resolve()), "split": args.split})
    T = tokenizer.grid[0] * tokenizer.grid[1]
    print(f"wrote the {tokenizer.config.posterior} posterior of {len(dataset)} images x 2 flips "
          f"({T} tokens of dim {tokenizer.config.latent_dim}) to {out}")
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint or run directory, or the authors' "
                                                      "vae.pt (a path or hf:guolinke/SphereAR/vae.pt)")
    p.add_argument("--data", required=True, help="dataset directory (from `spheregen data`)")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--split", default="all", choices=["all", "train", "test"], help="which images")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    add_device_option(p)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.set_defaults(func=_cmd_encode)

