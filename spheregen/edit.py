"""Training-free editing with a Sphere Encoder (Sec. 4 and Fig. 6): `spheregen edit manipulate|crossover|interpolate`.

- manipulate:  encode/decode an image T times conditioned on a new class, x <- D(f(f(E(x, c)) + r sigma e'), c),
               with r = 1, gamma = 0 and no CFG (Fig. 8).
- crossover:   stitch A and B (left / right halves, top / bottom, B's centre in A, quadrants, a diagonal), then
               harmonise with the same loop at r = 0.25 and the decay r_t = r (1 - k/K)^gamma, gamma = 1 (Fig. 9).
- interpolate: slerp on the sphere between v_A = f(E(A)) and v_B = f(E(B)),
               v(t) = [sin((1 - t) theta) v_A + sin(t theta) v_B] / sin(theta), decoded (optionally refined);
               or, with --noise (Fig. 6), generate from interpolated input noise e(t) (lerp e_a (1 - t) + e_b t,
               slerp, or bilinear over four corners) with the label embeddings interpolated by the same weights,
               in T steps.

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


STITCH_MODES = ("left-right", "top-bottom", "center", "quadrants", "diagonal")


def stitch_mask(h: int, w: int, mode: str = "left-right") -> torch.Tensor:
    """[h, w] bool, True where the composite takes A: A's left half, top half, everything but B's centre square
    (half the side), the top-left and bottom-right quadrants, or the part above the anti-diagonal."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = {"left-right": cols < w // 2, "top-bottom": rows < h // 2,
             "center": ~((abs(2 * rows - h + 1) < h // 2) & (abs(2 * cols - w + 1) < w // 2)),
             "quadrants": (rows < h // 2) == (cols < w // 2), "diagonal": rows * w + cols * h < h * w - (h + w) // 2}
    if mode not in masks:
        raise UserError(f"stitch mode must be one of {', '.join(STITCH_MODES)}, got {mode!r}")
    return masks[mode]


def stitch(xa: torch.Tensor, xb: torch.Tensor, mode: str = "left-right") -> torch.Tensor:
    """The composite of A and B (default: left half of A next to the right half of B)."""
    return torch.where(stitch_mask(xa.shape[-2], xa.shape[-1], mode).to(xa.device), xa, xb)


@torch.no_grad()
def crossover(model: SphereEncoder, xa: torch.Tensor, xb: torch.Tensor, steps: int = 10, r: float = 0.25,
              gamma: float = 1.0, labels: torch.Tensor | None = None, seed: int = 0,
              mode: str = "left-right") -> list[torch.Tensor]:
    """Image crossover: stitch(A, B, mode), then the images after each of `steps` harmonising loops (no CFG)."""
    model.check_labels(labels)
    x = stitch(xa, xb, mode)
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


# -- noise interpolation (Fig. 6) ---------------------------------------------------------------------
NOISE_MODES = ("lerp", "slerp", "bilinear")


def interp_weights(mode: str, n: int) -> torch.Tensor:
    """Corner weights per frame: lerp / slerp [n, 2] = (1 - t, t), t = linspace(0, 1, n); bilinear [n * n, 4]
    = ((1 - u)(1 - v), u (1 - v), (1 - u) v, u v) row-major (v down the rows, u along them)."""
    t = torch.linspace(0, 1, n)
    if mode in ("lerp", "slerp"):
        return torch.stack([1 - t, t], dim=1)
    if mode != "bilinear":
        raise UserError(f"noise interpolation mode must be one of {', '.join(NOISE_MODES)}, got {mode!r}")
    v, u = (g.flatten() for g in torch.meshgrid(t, t, indexing="ij"))
    return torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v], dim=1)


def interp_noise(ends: torch.Tensor, weights: torch.Tensor, mode: str = "lerp") -> torch.Tensor:
    """Input noise per frame [F, R, N, d] from corners ends [R, K, N, d]: sum_k w_k e_k (lerp: a (1 - t) + b t,
    bilinear), or slerp (sin((1 - t) th) a + sin(t th) b) / sin(th), th = angle(a, b) per row."""
    if mode != "slerp":
        out = torch.zeros(len(weights), *ends[:, 0].shape, dtype=ends.dtype, device=ends.device)
        for k in range(ends.shape[1]):
            out = out + ends[:, k].unsqueeze(0) * weights[:, k].view(-1, 1, 1, 1).to(ends)
        return out
    a, b = ends[:, 0].double(), ends[:, 1].double()
    cos = ((a * b).flatten(1).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos).view(1, -1, 1, 1).clamp_min(1e-6)
    t = weights[:, 1].double().view(-1, 1, 1, 1)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.to(ends.dtype)


@torch.no_grad()
def noise_interpolate(model: SphereEncoder, ends: torch.Tensor, classes: torch.Tensor | None, weights: torch.Tensor,
                      refine_noise: torch.Tensor | None = None, mode: str = "lerp", steps: int = 4, cfg: float = 1.0,
                      cfg_position: str = "combo", r: float = 1.0, gamma: float = 0.0) -> list[torch.Tensor]:
    """Fig. 6: frame f of row r is Algorithm 1 from e_f = interp(ends[r]), with the label embeddings mixed by the
    same weights (soft labels sum_k w_k onehot(classes[r, k]); None: the null label). refine_noise e': [R, N, d]
    shared by every frame, or [F, R, N, d] per frame. Returns per step (1-step first) images [F, R, C, H, W]."""
    if steps > 1 and refine_noise is None:
        raise UserError("noise_interpolate needs refine_noise e' for more than one step")
    noise = interp_noise(ends, weights, mode)
    device = next(model.parameters()).device
    per_step: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    for f in range(len(weights)):
        labels = None
        if classes is not None:
            labels = model.soft_labels(weights[f].expand(len(classes), -1).to(device), classes.to(device))
        e_ref = refine_noise[f] if refine_noise is not None and refine_noise.dim() == 4 else refine_noise
        draws = iter([noise[f].to(device)] + ([e_ref.to(device)] if e_ref is not None else []))
        trace: list[torch.Tensor] = []
        model.generate(labels, steps, cfg, cfg_position, gamma=gamma, r=r, n=len(ends), noise=draws.__next__,
                       trace=trace)
        for k, x in enumerate(trace):
            per_step[k].append(x)
    return [torch.stack(frames) for frames in per_step]


# -- command line -------------------------------------------------------------------------------------
def _load(args) -> SphereEncoder:
    """The --ckpt directory, or an authors' .pth / hf: file converted once into the cache (interop/hub.py)."""
    from .interop.hub import resolve_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(resolve_checkpoint(args.ckpt), expect="sphere_encoder").eval().to(device)


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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `spheregen edit manipulate|crossover|interpolate`."""
    edit = sub.add_parser("edit", help="training-free editing with a Sphere Encoder checkpoint")
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
    p.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="the two source images")
    p.add_argument("--stitch", choices=STITCH_MODES, default="left-right",
                   help="how A and B are combined: A left / B right (default), A top / B bottom, B's centre square "
                        "in A, quadrants (A top-left and bottom-right), A above the anti-diagonal")
    p.add_argument("--class", dest="cls", type=int, help="class id to condition on (default: the null label)")
    p.add_argument("--result-only", action="store_true", help="write only the final image (default: A, B, every step)")
    common(p, steps=10, r=0.25, gamma=1.0)
    p.set_defaults(func=_cmd_crossover)

    p = kinds.add_parser("interpolate", help="decode a slerp between two images' latents on the sphere, or "
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
    p.add_argument("--cfg-position", choices=CFG_POSITIONS, default="combo")
    common(p, steps="1 with --images, 4 with --noise", r="0.25 with --images, 1.0 with --noise",
           gamma="1.0 with --images, 0.0 with --noise")
    p.set_defaults(func=_cmd_interpolate)
