"""`spheregen encode`: a latent cache (the tokenizer's posterior of every image and its mirror, for K augmented
views) for AR training; sharded and memory-mapped, written by every torchrun rank in parallel, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from spheregen.cli import HelpFormatter, add_device_option
from spheregen.data.latent_shards import bytes_per_image
from spheregen.data.latents import PARAM_KEYS, write_sharded_cache
from spheregen.data.lazy import open_dataset
from spheregen.engine import dist
from spheregen.generation import load_tokenizer
from spheregen.runtime import default_device


def _cmd_encode(args: argparse.Namespace) -> int:
    device = dist.init_from_env() or default_device(args.device)
    rank = dist.rank()
    try:
        tokenizer = load_tokenizer(args.tokenizer, use_ema=not args.raw_weights, device=device)
        dataset = open_dataset(args.data, split=args.split)
        # record the exact checkpoint used (a run directory would resolve to a newer one after more training)
        out = write_sharded_cache(
            tokenizer, dataset, args.out, args.views, args.shard_size, args.seed, args.crop_max_scale,
            dist.rank(), dist.world_size(), args.batch_size, args.workers, tokenizer.source_path,
            {"data": str(Path(args.data).resolve()), "split": args.split}, barrier=dist.barrier)
    finally:
        dist.shutdown()
    cfg = tokenizer.config
    T = tokenizer.grid[0] * tokenizer.grid[1]
    per = bytes_per_image(args.views, T, cfg.latent_dim, PARAM_KEYS[cfg.posterior])
    if rank == 0:
        print(f"wrote the {cfg.posterior} posterior of {len(dataset)} images x {args.views} views x 2 flips "
              f"({T} tokens of dim {cfg.latent_dim}, {per / 1024:.1f} KiB per image) to {out}")
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint or run directory, or the authors' "
                                                      "vae.pt (a path or hf:guolinke/SphereAR/vae.pt)")
    p.add_argument("--data", required=True, help="dataset directory (from `spheregen data`, lazy or not)")
    p.add_argument("--out", required=True, help="cache directory to write (a re-run with the same settings "
                                                "resumes an interrupted one)")
    p.add_argument("--split", default="all", choices=["all", "train", "test"], help="which images")
    p.add_argument("--views", type=int, default=1, help="views per image: the centre crop, then K-1 random "
                                                        "resize-and-crops (K > 1 needs a lazy dataset)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    p.add_argument("--crop-max-scale", type=float, default=1.25, help="random short side up to this x the size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    add_device_option(p)
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.set_defaults(func=_cmd_encode)
