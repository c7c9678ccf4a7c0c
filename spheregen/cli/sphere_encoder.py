"""`spheregen sphere-encoder recalibrate-bn`: re-estimate the latent BatchNorm statistics before sampling
(paper App. C.4; spheregen.models.sphere_encoder.recalibrate_bn) and write a new checkpoint directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from spheregen.cli import HelpFormatter
from spheregen.data.datasets import ImageDataset
from spheregen.errors import UserError
from spheregen.generation import resolve_checkpoint
from spheregen.models import load_model
from spheregen.models.sphere_encoder import recalibrate_bn


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    if min(args.n, args.batch_size, args.steps) < 1:
        raise UserError("--n, --batch-size and --steps must be at least 1")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite or another --out")
    model = load_model(resolve_checkpoint(args.ckpt), expect="sphere_encoder").eval()
    if args.data:
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


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """Register `spheregen sphere-encoder recalibrate-bn`."""
    p = sub.add_parser(name, help=help, description=help)
    kinds = p.add_subparsers(dest="se_command", metavar="TOOL", required=True)
    q = kinds.add_parser("recalibrate-bn", formatter_class=HelpFormatter,
                         help="re-estimate latent BatchNorm statistics before sampling "
                                                "(paper App. C.4); writes a new checkpoint directory")
    q.add_argument("--ckpt", required=True, help="Sphere Encoder checkpoint directory (model.latent_bn = true)")
    q.add_argument("--out", required=True, help="new checkpoint directory")
    q.add_argument("--data", help="calibrate on real images of this spheregen dataset (default: generated ones)")
    q.add_argument("--split", default="train", help="dataset split with --data (default train)")
    q.add_argument("--n", type=int, default=500, help="calibration images (default 500, as in the paper)")
    q.add_argument("--batch-size", type=int, default=50, help="images per calibration batch")
    q.add_argument("--steps", type=int, default=4, help="sampling steps for generated images (default 4)")
    q.add_argument("--cfg", type=float, default=1.0, help="CFG scale for generated images (default 1)")
    q.add_argument("--seed", type=int, default=0, help="first seed of the generated images")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=_cmd_recalibrate)
