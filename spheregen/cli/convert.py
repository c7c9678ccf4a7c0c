"""`spheregen convert sphere-ar | sphere-encoder`: the authors' checkpoints -> spheregen checkpoint directories.

The input may be a local file (or experiment folder) or an `hf:OWNER/REPO/FILE` path (spheregen.interop.hub);
the converters themselves are spheregen.interop.sphere_ar and spheregen.interop.sphere_encoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spheregen.cli import HelpFormatter
from spheregen.errors import UserError
from spheregen.interop import sphere_ar
from spheregen.interop import sphere_encoder as se
from spheregen.interop.hub import fetch, is_hub_path
from spheregen.models.ar import SphereAR
from spheregen.models.tokenizer import Tokenizer


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description="Convert the authors' checkpoints (local files or hf:OWNER/"
                                                    "REPO/FILE) into ordinary spheregen checkpoint directories.")
    kinds = p.add_subparsers(dest="convert_kind", metavar="KIND", required=True)
    _add_sphere_ar(kinds)
    _add_sphere_encoder(kinds)


def refuse_overwrite(out: Path, overwrite: bool) -> None:
    """Nothing is overwritten without asking: a non-empty --out needs --overwrite."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it, or another --out")


# -- the command --------------------------------------------------------------------------------------
def _cmd_sphere_ar(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_overwrite(out, args.overwrite)
    ar_file, sibling, label = fetch(args.checkpoint)
    vae_file = fetch(args.vae)[0] if args.vae else None
    written = sphere_ar.convert(ar_file, out, vae_file, args.weights, args.heads, label, sibling)
    if written.name == sphere_ar.TOKENIZER_DIR:
        cfg = Tokenizer.from_pretrained(written).config
        print(f"converted {label} (a VAE alone): {written} ({cfg.image_size} px, {cfg.latent_dim}-d tokens); "
              f"encode a dataset with: spheregen encode --tokenizer {written} ...")
        return 0
    cfg = SphereAR.from_pretrained(written).config
    print(f"converted {label} ({args.weights} weights): {out / sphere_ar.TOKENIZER_DIR} and {written} "
          f"(AR dim {cfg.dim} x {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.num_classes} classes, "
          f"{cfg.grid[0]}x{cfg.grid[1]} tokens); sample with: spheregen sample --ckpt {written} --out grid.png")
    return 0


def _add_sphere_ar(sub) -> None:
    p = sub.add_parser("sphere-ar", help="SphereAR_{B,L,H}.pt (+ vae.pt) -> DIR/tokenizer and DIR/ar; "
                                         "vae.pt alone -> DIR/tokenizer",
                       formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="the authors' AR file: a path or hf:guolinke/SphereAR/SphereAR_B.pt")
    p.add_argument("--vae", help="the authors' vae.pt (path or hf:); default: the AR file's own vae.* keys, "
                                 "else a vae.pt beside it")
    p.add_argument("--out", required=True, help="output directory (gets tokenizer/ and ar/)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which AR weights to take (ema, as the authors' sampler, when the file has it)")
    p.add_argument("--heads", type=int, help="AR attention heads (default: dim / 64, the authors' head width)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_sphere_ar)


def _cmd_sphere_encoder(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_overwrite(out, args.overwrite)
    text = str(args.source)
    if not is_hub_path(text) and Path(text).is_dir():
        pth, cfg = se.experiment_files(Path(text))
        label = str(pth)
    else:
        pth, sibling, label = fetch(text)
        if not pth.is_file():
            raise UserError(f"checkpoint file {pth} does not exist; check the path")
        cfg = None if args.config else se.find_cfg(sibling)
    cfg = Path(args.config) if args.config else cfg
    if cfg is None:
        raise UserError(f"{args.source} has no cfg.json; pass --config cfg.json")
    model = se.convert_file(pth, cfg, args.weights, args.size)
    model.save_pretrained(out, extra={"converted_from": label, "weights": args.weights})
    c = model.config
    kind = f"{c.num_classes} classes" if c.num_classes else "unconditional"
    print(f"wrote {out}: Sphere Encoder {c.image_size} px, width {c.width}, {c.depth} blocks, {c.heads} heads, "
          f"latent {c.n_tokens}x{c.latent_dim}, {c.head} head, {kind}, {args.weights} weights of {label} "
          f"(cfg {cfg}); sample with: spheregen sample --ckpt {out}")
    return 0


def _add_sphere_encoder(sub) -> None:
    """Register `spheregen convert sphere-encoder`."""
    p = sub.add_parser("sphere-encoder", formatter_class=HelpFormatter,
                       help="the Sphere Encoder authors' experiment folder or .pth",
                       description="Convert the Sphere Encoder authors' checkpoint (an experiment folder "
                                   "<job>/{cfg.json, ckpt/*.pth}, a .pth file or hf:OWNER/REPO/FILE.pth) into a "
                                   "spheregen checkpoint directory for `spheregen sample` and `spheregen edit`.")
    p.add_argument("source", metavar="EXPERIMENT_DIR_OR_CKPT", help="experiment folder, .pth file or hf: path")
    p.add_argument("--config", help="the authors' cfg.json (default: beside the ckpt/ folder)")
    p.add_argument("--weights", choices=tuple(se.WEIGHTS), default="model",
                   help="'model' (default; the authors' samplers use it) or 'ema' (ema_model)")
    p.add_argument("--size", action="append", default=[], metavar="NAME=WIDTH,LAYERS,HEADS",
                   help=f"a model size outside the authors' table ({', '.join(se.SIZE_TABLE)}); repeatable")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_sphere_encoder)
