"""Training-free editing with a Sphere Encoder (Sec. 4 and Fig. 6): `spheregen edit manipulate|crossover|interpolate`.

- manipulate:  encode/decode an image T times conditioned on a new class, x <- D(f(f(E(x, c)) + r sigma e'), c),
               with r = 1, gamma = 0 and no CFG (Fig. 8).
- crossover:   stitch the left half of A to the right half of B, then harmonise with the same loop at r = 0.25 and
               the decay r_t = r (1 - k/K)^gamma, gamma = 1 (Fig. 9).
- interpolate: slerp on the sphere between v_A = f(E(A)) and v_B = f(E(B)),
               v(t) = [sin((1 - t) theta) v_A + sin(t theta) v_B] / sin(theta), decoded (optionally refined).

Input images are converted like the datasets: composited on white, center-cropped, resized to the model's size,
RGB or grayscale per the model's channels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .checkpoint import load_model
from .data import center_square_resize, to_rgb_on_white
from .errors import UserError
from .sample_cli import save_grid
from .sphere import spherify
from .sphere_encoder import CFG_POSITIONS, SphereEncoder


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image file -> [1, C, size, size] in [-1, 1] (center crop + resize; RGB or L)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist; pass an image file")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = center_square_resize(to_rgb_on_white(im), size)
    except Exception as e:  # anything Pillow raises for a broken or non-image file
        reason = " ".join(str(e).split())[:100] or type(e).__name__
        raise UserError(f"cannot read image {path} ({reason}); pass a PNG/JPEG/... image file") from None
    if channels == 1:
        im = im.convert("L")
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, channels)
    return (t.permute(2, 0, 1).float() / 127.5 - 1.0).unsqueeze(0)


def _trace(model: SphereEncoder, x: torch.Tensor, labels, steps: int, r: float, gamma: float, cfg: float,
           cfg_position: str, seeds: list[int]) -> list[torch.Tensor]:
    """The images after each of `steps` refinement loops (shared noise e', drawn from each sample's seed)."""
    out: list[torch.Tensor] = []
    model.refine(x, labels, steps, r, gamma, cfg, cfg_position, shared_noise=True, seeds=seeds, trace=out)
    return out


@torch.no_grad()
def manipulate(model: SphereEncoder, x: torch.Tensor, labels: torch.Tensor, steps: int = 4, r: float = 1.0,
               gamma: float = 0.0, cfg: float = 1.0, cfg_position: str = "combo", seed: int = 0) -> list[torch.Tensor]:
    """Class manipulation: the images after each of `steps` loops conditioned on `labels` (list of [B, C, H, W])."""
    model.check_labels(labels)
    return _trace(model, x, labels, steps, r, gamma, cfg, cfg_position, [seed + k for k in range(len(x))])


def stitch(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Left half of A next to the right half of B."""
    w = xa.shape[-1]
    return torch.cat([xa[..., : w // 2], xb[..., w // 2:]], dim=-1)


@torch.no_grad()
def crossover(model: SphereEncoder, xa: torch.Tensor, xb: torch.Tensor, steps: int = 10, r: float = 0.25,
              gamma: float = 1.0, labels: torch.Tensor | None = None, seed: int = 0) -> list[torch.Tensor]:
    """Image crossover: stitch(A, B), then the images after each of `steps` harmonising loops (no CFG)."""
    model.check_labels(labels)
    x = stitch(xa, xb)
    return [x] + _trace(model, x, labels, steps, r, gamma, 1.0, "combo", [seed + k for k in range(len(x))])


def slerp(va: torch.Tensor, vb: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Great-circle interpolation between two latents of equal norm, one output per t in ts: [len(ts), ...]."""
    a, b = va.flatten().double(), vb.flatten().double()
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    t = ts.double().view(-1, 1)
    if theta < 1e-6:
        out = (1 - t) * a + t * b
    else:
        out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return spherify(out.to(va.dtype).view(len(ts), *va.shape))  # exact radius sqrt(L) despite rounding


@torch.no_grad()
def interpolate(model: SphereEncoder, xa: torch.Tensor, xb: torch.Tensor, n: int = 8,
                labels: torch.Tensor | None = None, steps: int = 1, r: float = 0.25, gamma: float = 1.0,
                seed: int = 0) -> torch.Tensor:
    """n images decoded along the slerp from f(E(A)) to f(E(B)) (t = 0 ... 1), refined by steps - 1 loops."""
    model.check_labels(labels)
    va, vb = model.encode_sphere(xa, labels), model.encode_sphere(xb, labels)
    v = slerp(va[0], vb[0], torch.linspace(0, 1, n))
    lab = labels.expand(n) if labels is not None else None
    x = model.decode(v, lab)
    if steps > 1:
        x = _trace(model, x, lab, steps - 1, r, gamma, 1.0, "combo", [seed] * n)[-1]
    return x.clamp(-1, 1)


# -- command line -------------------------------------------------------------------------------------
def _load(args) -> SphereEncoder:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.ckpt, expect="sphere_encoder").eval().to(device)


def _image(model: SphereEncoder, path: str) -> torch.Tensor:
    cfg = model.config
    return read_image(path, cfg.image_size, cfg.channels).to(next(model.parameters()).device)


def _label(model: SphereEncoder, cls: int | None) -> torch.Tensor | None:
    if cls is None:
        return None
    model.check_labels(torch.tensor([cls]))
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
    trace = crossover(model, xa, xb, args.steps, args.r, args.gamma, label, args.seed)
    save_grid(trace[-1] if args.result_only else torch.cat([xa, xb] + trace), 1, args.out)
    print(f"crossover of {args.images[0]} (left) and {args.images[1]} (right), {args.steps} steps: {args.out}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    _check_steps(args.steps)
    if args.n < 2:
        raise UserError(f"--n must be at least 2, got {args.n}")
    model = _load(args)
    label = _label(model, args.cls)
    xa, xb = (_image(model, p) for p in args.images)
    x = interpolate(model, xa, xb, args.n, label, args.steps, args.r, args.gamma, args.seed)
    save_grid(torch.cat([xa, x, xb]), 1, args.out)
    print(f"{args.n} interpolants between {args.images[0]} and {args.images[1]}: {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `spheregen edit manipulate|crossover|interpolate`."""
    edit = sub.add_parser("edit", help="training-free editing with a Sphere Encoder checkpoint")
    kinds = edit.add_subparsers(dest="edit_command", metavar="EDIT", required=True)

    def common(p: argparse.ArgumentParser, steps: int, r: float, gamma: float) -> None:
        p.add_argument("--ckpt", required=True, help="Sphere Encoder checkpoint directory")
        p.add_argument("--out", required=True, help="output PNG")
        p.add_argument("--steps", type=int, default=steps, help=f"encode/decode loops (default {steps})")
        p.add_argument("--r", type=float, default=r, help=f"noise strength r, a multiple of tan(alpha) (default {r})")
        p.add_argument("--gamma", type=float, default=gamma,
                       help=f"decay r_k = r (1 - k/steps)^gamma (Eq. 13; default {gamma})")
        p.add_argument("--seed", type=int, default=0, help="seed of the shared noise e'")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    p = kinds.add_parser("manipulate", help="re-generate an image conditioned on another class")
    p.add_argument("--image", required=True, help="input image file (any size; center-cropped and resized)")
    p.add_argument("--class", dest="cls", type=int, nargs="+", required=True, help="target class id(s), one row each")
    p.add_argument("--cfg", type=float, default=1.0, help="CFG scale (default 1 = none, as in the paper)")
    p.add_argument("--cfg-position", choices=CFG_POSITIONS, default="combo")
    p.add_argument("--result-only", action="store_true", help="write only the final images (default: every step)")
    common(p, steps=4, r=1.0, gamma=0.0)
    p.set_defaults(func=_cmd_manipulate)

    p = kinds.add_parser("crossover", help="stitch two images' halves and harmonise the seam")
    p.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="left-half and right-half images")
    p.add_argument("--class", dest="cls", type=int, help="class id to condition on (default: the null label)")
    p.add_argument("--result-only", action="store_true", help="write only the final image (default: A, B, every step)")
    common(p, steps=10, r=0.25, gamma=1.0)
    p.set_defaults(func=_cmd_crossover)

    p = kinds.add_parser("interpolate", help="decode a slerp between two images' latents on the sphere")
    p.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="the two end images")
    p.add_argument("--n", type=int, default=8, help="interpolants from A to B, ends included (default 8)")
    p.add_argument("--class", dest="cls", type=int, help="class id to condition on (default: the null label)")
    common(p, steps=1, r=0.25, gamma=1.0)
    p.set_defaults(func=_cmd_interpolate)
