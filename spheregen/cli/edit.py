"""`spheregen edit manipulate|crossover|interpolate`: training-free editing with a Sphere Encoder (paper Sec. 4,
Figs. 6, 8, 9; the math is in spheregen.models.sphere_encoder_edit). Input images are converted like the datasets:
composited on white, center-cropped, resized to the model's size, RGB or grayscale per the model's channels."""

from __future__ import annotations

import argparse

import torch

from spheregen.cli import HelpFormatter, add_device_option
from spheregen.errors import UserError, check_class_ids
from spheregen.generation import resolve_checkpoint
from spheregen.images import read_image, save_grid
from spheregen.models import load_model
from spheregen.models.sphere_encoder import CFG_POSITIONS, SphereEncoder
from spheregen.models.sphere_encoder_edit import (
    NOISE_MODES,
    STITCH_MODES,
    crossover,
    interp_weights,
    interpolate,
    manipulate,
    noise_interpolate,
)
from spheregen.runtime import default_device


# -- command line -------------------------------------------------------------------------------------
def _load(args) -> SphereEncoder:
    """The --ckpt directory or run directory, or an authors' .pth / hf: file converted once into the cache."""
    return load_model(resolve_checkpoint(args.ckpt), expect="sphere_encoder").eval().to(default_device(args.device))


def _image(model: SphereEncoder, path: str) -> torch.Tensor:
    cfg = model.config
    return read_image(path, cfg.image_size, cfg.channels).to(next(model.parameters()).device)


def _label(model: SphereEncoder, cls: int | None) -> torch.Tensor | None:
    if cls is None:
        return None
    check_class_ids([cls], model.config.num_classes)
    return torch.tensor([cls], device=next(model.parameters()).device)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")


def _cmd_manipulate(args: argparse.Namespace) -> int:
    _check_steps(args.steps)
    model = _load(args)
    for c in args.cls:
        _label(model, c)
    x = _image(model, args.image)
    rows = []
    for c in args.cls:
        trace = manipulate(model, x, _label(model, c), args.steps, args.r, args.gamma, args.cfg, args.cfg_position,
                           args.seed)
        rows.append(trace[-1] if args.result_only else torch.cat([x] + trace))
    grid = torch.cat(rows)
    save_grid(grid, 1 if args.result_only else len(args.cls), args.out)
    print(f"manipulated {args.image} towards class(es) {', '.join(map(str, args.cls))} in {args.steps} steps: "
          f"{args.out}")
    return 0


def _cmd_crossover(args: argparse.Namespace) -> int:
    _check_steps(args.steps)
    model = _load(args)
    label = _label(model, args.cls)
    xa, xb = (_image(model, p) for p in args.images)
    trace = crossover(model, xa, xb, args.steps, args.r, args.gamma, label, args.seed, args.stitch)
    save_grid(trace[-1] if args.result_only else torch.cat([xa, xb] + trace), 1, args.out)
    print(f"crossover of {args.images[0]} (A) and {args.images[1]} (B), {args.stitch} stitch, {args.steps} steps: "
          f"{args.out}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    if (args.images is None) == (args.noise is None):
        raise UserError("pass either --images A B (latent slerp between two images) or --noise MODE (Fig. 6)")
    noise = args.noise is not None
    args.steps = args.steps if args.steps is not None else (4 if noise else 1)
    args.r = args.r if args.r is not None else (1.0 if noise else 0.25)
    args.gamma = args.gamma if args.gamma is not None else (0.0 if noise else 1.0)
    _check_steps(args.steps)
    if args.n < 2:
        raise UserError(f"--n must be at least 2, got {args.n}")
    if noise:
        return _cmd_noise_interpolate(args)
    if args.cls is not None and len(args.cls) != 1:
        raise UserError(f"with --images pass one --class, got {len(args.cls)}")
    model = _load(args)
    label = _label(model, args.cls[0] if args.cls else None)
    xa, xb = (_image(model, p) for p in args.images)
    x = interpolate(model, xa, xb, args.n, label, args.steps, args.r, args.gamma, args.seed)
    save_grid(torch.cat([xa, x, xb]), 1, args.out)
    print(f"{args.n} interpolants between {args.images[0]} and {args.images[1]}: {args.out}")
    return 0


def _cmd_noise_interpolate(args: argparse.Namespace) -> int:
    """Rows of frames from seeded noise: row k draws its corners, classes (random unless --class) and e' from
    seed + k; e' is shared by the row's frames."""
    corners = 4 if args.noise == "bilinear" else 2
    if args.rows < 1:
        raise UserError(f"--rows must be at least 1, got {args.rows}")
    model = _load(args)
    K, device = model.config.num_classes, next(model.parameters()).device
    if args.cls is not None and len(args.cls) != corners:
        raise UserError(f"--noise {args.noise} needs {corners} classes (one per corner), got {len(args.cls)}")
    if args.cls is not None:
        model.check_labels(torch.tensor(args.cls))
    ends, classes, refine = [], [], []
    for k in range(args.rows):
        g = torch.Generator().manual_seed(args.seed + k)
        ends.append(torch.randn(corners, *model.latent_shape, generator=g))
        classes.append(torch.tensor(args.cls) if args.cls else torch.randint(0, max(K, 1), (corners,), generator=g))
        refine.append(torch.randn(model.latent_shape, generator=g))
    weights = interp_weights(args.noise, args.n)
    frames = noise_interpolate(model, torch.stack(ends).to(device), torch.stack(classes) if K else None, weights,
                               torch.stack(refine).to(device), args.noise, args.steps, args.cfg, args.cfg_position,
                               args.r, args.gamma)[-1]
    frames = frames.transpose(0, 1).flatten(0, 1)  # row-major: row k's frames, then row k + 1's
    save_grid(frames, args.rows * (args.n if corners == 4 else 1), args.out)
    what = f"{args.rows} row(s) of {args.n} {args.noise} frames"
    what = f"{args.rows} bilinear {args.n} x {args.n} grid(s)" if corners == 4 else what
    print(f"{what} between noise draws (seed {args.seed}), {args.steps} steps: {args.out}")
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    """Register `spheregen edit manipulate|crossover|interpolate`."""
    edit = sub.add_parser(name, help=help, description=help)
    kinds = edit.add_subparsers(dest="edit_command", metavar="EDIT", required=True)

    def common(p: argparse.ArgumentParser, steps, r, gamma) -> None:
        p.add_argument("--ckpt", required=True, help="Sphere Encoder checkpoint directory, or the authors' .pth / "
                       "hf:OWNER/REPO/FILE.pth (converted once into the cache)")
        p.add_argument("--out", required=True, help="output PNG")
        p.add_argument("--steps", type=int, default=steps if isinstance(steps, int) else None,
                       help=f"encode/decode loops (default {steps})")
        p.add_argument("--r", type=float, default=r if isinstance(r, float) else None,
                       help=f"noise strength r, a multiple of tan(alpha) (default {r})")
        p.add_argument("--gamma", type=float, default=gamma if isinstance(gamma, float) else None,
                       help=f"decay r_k = r (1 - k/steps)^gamma (Eq. 13; default {gamma})")
        p.add_argument("--seed", type=int, default=0, help="seed of the shared noise e'")
        add_device_option(p)

    p = kinds.add_parser("manipulate", help="re-generate an image conditioned on another class",
                         formatter_class=HelpFormatter)
    p.add_argument("--image", required=True, help="input image file (any size; center-cropped and resized)")
    p.add_argument("--class", dest="cls", type=int, nargs="+", required=True, help="target class id(s), one row each")
    p.add_argument("--cfg", type=float, default=1.0, help="CFG scale (default 1 = none, as in the paper)")
    p.add_argument("--cfg-position", choices=CFG_POSITIONS, default="combo",
                   help="where CFG acts: decoder output, encoder output, or both")
    p.add_argument("--result-only", action="store_true", help="write only the final images (default: every step)")
    common(p, steps=4, r=1.0, gamma=0.0)
    p.set_defaults(func=_cmd_manipulate)

    p = kinds.add_parser("crossover", help="stitch two images' halves and harmonise the seam",
                         formatter_class=HelpFormatter)
    p.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="the two source images")
    p.add_argument("--stitch", choices=STITCH_MODES, default="left-right",
                   help="how A and B are combined: A left / B right (default), A top / B bottom, B's centre square "
                        "in A, quadrants (A top-left and bottom-right), A above the anti-diagonal")
    p.add_argument("--class", dest="cls", type=int, help="class id to condition on (default: the null label)")
    p.add_argument("--result-only", action="store_true", help="write only the final image (default: A, B, every step)")
    common(p, steps=10, r=0.25, gamma=1.0)
    p.set_defaults(func=_cmd_crossover)

    p = kinds.add_parser("interpolate", formatter_class=HelpFormatter,
                         help="decode a slerp between two images' latents on the sphere, or "
                                             "interpolate input noise and classes (--noise, Fig. 6)")
    p.add_argument("--images", nargs=2, metavar=("A", "B"), help="the two end images")
    p.add_argument("--noise", choices=NOISE_MODES, help="instead of images: interpolate noise draws e (lerp, slerp, "
                   "or bilinear over four corners) and the label embeddings, and generate each frame")
    p.add_argument("--n", type=int, default=8, help="frames from A to B, ends included (default 8; bilinear: n x n)")
    p.add_argument("--rows", type=int, default=1, help="--noise: rows (grids for bilinear), each from seed + row")
    p.add_argument("--class", dest="cls", type=int, nargs="+",
                   help="class id to condition on (--images; default the null label), or one per corner (--noise; "
                        "default random per row)")
    p.add_argument("--cfg", type=float, default=1.0, help="--noise: CFG scale (default 1 = none, as in Fig. 6)")
    p.add_argument("--cfg-position", choices=CFG_POSITIONS, default="combo",
                   help="where CFG acts: decoder output, encoder output, or both")
    common(p, steps="1 with --images, 4 with --noise", r="0.25 with --images, 1.0 with --noise",
           gamma="1.0 with --images, 0.0 with --noise")
    p.set_defaults(func=_cmd_interpolate)
