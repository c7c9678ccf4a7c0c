"""`spheregen sample`: draw images from any generator checkpoint (SphereAR, Sphere Encoder).

The command only needs the model's
    generate_images(labels: LongTensor [B], seeds: list[int], options: dict) -> float [B, C, H, W] in [-1, 1]
    num_classes: int (0 = unconditional)
with options {"cfg", "cfg_schedule", "sampler", "steps", "temperature", "progress"} (a model ignores keys it
has no use for). A model that decodes through a separate tokenizer defines `attach_decoder(tokenizer)` and
stores the tokenizer path in `config.tokenizer`.

Sample k (counted over the whole run, class by class) uses seed `--seed + k`, so it does not depend on
--batch-size. Outputs: a grid PNG (one row per class), a directory of PNGs, and/or an ADM-style .npz:
`arr_0` uint8 [N, H, W, C] (C = 1 for grayscale data) and, for class-conditional models, `arr_1` int64
labels [N] (guided-diffusion's image_sample.py writes np.savez(path, images, labels) when class_cond).
Pixels are round((x + 1) * 127.5) clipped to [0, 255], as in spheregen.inception.quantize.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_model, read_config
from .errors import UserError


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def save_grid(images: torch.Tensor, rows: int, path: str | Path, pad: int = 2) -> Path:
    """Tile images [N, C, H, W] in [-1, 1] into `rows` rows (row-major, ceil(N / rows) columns) with a
    black `pad`-pixel border and write a PNG."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    cols = math.ceil(n / rows)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(canvas).save(path)
    return path


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """'0,3,7' -> [0, 3, 7]; None -> every class ([0] for an unconditional model). Range-checked."""
    if num_classes == 0:
        if text:
            raise UserError("this model is unconditional (no classes); drop --classes")
        return [0]
    if not text:
        return list(range(num_classes))
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, got {text!r}") from None
    for i in ids:
        if not 0 <= i < num_classes:
            raise UserError(f"class id {i} is out of range; this model has classes 0..{num_classes - 1}")
    return ids


def class_labels(classes: list[int], n: int, mode: str = "balanced", seed: int = 0) -> list[int]:
    """balanced: n of each class, class by class; random: n * len(classes) labels drawn uniformly from
    `classes` by a generator seeded with `seed` (the same list on every rank and for any batch size)."""
    if mode == "balanced":
        return [c for c in classes for _ in range(n)]
    g = torch.Generator().manual_seed(int(seed))
    picks = torch.randint(len(classes), (n * len(classes),), generator=g)
    return [classes[i] for i in picks.tolist()]


# Modules whose import registers the model types that can appear in a checkpoint.
MODEL_MODULES = ("spheregen.ar", "spheregen.tokenizer", "spheregen.sphere_encoder")


def register_known_models() -> None:
    for name in MODEL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def load_tokenizer(path: str, device: str = "cpu") -> torch.nn.Module:
    """A tokenizer (EMA weights) from a checkpoint or a run directory (its newest checkpoint)."""
    from .interop.hub import resolve_checkpoint
    from .tokenizer import load_tokenizer as load

    return load(resolve_checkpoint(path), device=device)


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory as given, the newest checkpoint of a run directory, or an authors' file (a path
    or hf:OWNER/REPO/FILE) converted once into the cache (interop/hub.py)."""
    from .interop.hub import resolve_checkpoint as resolve_foreign
    from .train import list_checkpoints

    p = resolve_foreign(path)
    if not (p / "config.json").is_file():
        ckpts = list_checkpoints(p)
        if ckpts:
            return ckpts[-1]
    return p


def load_generator(ckpt: str, tokenizer: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """Any registered generator checkpoint or run directory (EMA weights), with its decoder attached when
    it needs one."""
    ckpt = resolve_checkpoint(ckpt)
    kind = read_config(ckpt).get("model_type")
    register_known_models()
    model = load_model(ckpt).eval().to(device)
    if not hasattr(model, "generate_images"):
        raise UserError(f"{ckpt} holds a {kind} model, which does not generate images; pass an AR or "
                        "Sphere Encoder checkpoint")
    if hasattr(model, "attach_decoder"):
        path = tokenizer or getattr(model.config, "tokenizer", "")
        if not path:
            raise UserError(f"{ckpt} does not record its tokenizer; pass --tokenizer CKPT")
        if not tokenizer and not Path(path).is_absolute():  # recorded relative to the checkpoint (converted ones)
            path = str((ckpt / path).resolve())
        if not Path(path).is_dir():
            raise UserError(f"tokenizer {path} (recorded in {ckpt}) does not exist; pass --tokenizer CKPT")
        model.attach_decoder(load_tokenizer(path, device))
    return model


def sample_images(model, labels: list[int], seed: int, batch_size: int, options: dict,
                  progress: bool = True) -> torch.Tensor:
    """All images for `labels` in order, in batches; image k uses seed `seed + k`."""
    out = []
    starts = range(0, len(labels), batch_size)
    for s in tqdm(starts, disable=not progress, desc="batches", dynamic_ncols=True):
        lab = torch.tensor(labels[s:s + batch_size], dtype=torch.long)
        seeds = [seed + k for k in range(s, s + len(lab))]
        out.append(model.generate_images(lab, seeds, {**options, "progress": progress}).float().cpu())
    return torch.cat(out)


def sample_to_dir(model, labels: list[int], seed: int, batch_size: int, options: dict, out_dir: Path,
                  num_classes: int, progress: bool = True) -> np.ndarray | None:
    """Write image k (seed `seed + k`) to out_dir/k.png for every k not already there; under torchrun rank r
    takes k = r mod world. Each PNG is written under a temporary name and renamed, so a killed run leaves
    only complete images and a rerun finishes the rest, bit-identical to an uninterrupted run.
    Returns all images as uint8 NHWC on rank 0 (None on the other ranks)."""
    from . import dist

    dist.init_from_env()
    rank, world = dist.rank(), dist.world_size()
    names = [f"{k:06d}_class{y}.png" if num_classes else f"{k:06d}.png" for k, y in enumerate(labels)]
    todo = [k for k in range(rank, len(labels), world) if not (out_dir / names[k]).is_file()]
    for s in tqdm(range(0, len(todo), batch_size), disable=not progress or rank, desc="batches"):
        ks = todo[s:s + batch_size]
        lab = torch.tensor([labels[k] for k in ks], dtype=torch.long)
        batch = model.generate_images(lab, [seed + k for k in ks], {**options, "progress": progress and not rank})
        for k, a in zip(ks, to_uint8(batch.float().cpu())):
            tmp = out_dir / f".{names[k]}.tmp"
            _pil(a).save(tmp, format="PNG")
            os.replace(tmp, out_dir / names[k])
    dist.shutdown()
    if rank != 0:
        return None
    arrays = [np.asarray(Image.open(out_dir / n)) for n in names]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


def default_device() -> str:
    """cuda:LOCAL_RANK under torchrun (one GPU per rank), cuda when available, else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure files can be written there, or raise a one-line UserError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".spheregen-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}); choose another output path") from None


def _cmd_sample(args: argparse.Namespace) -> int:
    if not (args.out or args.out_dir or args.npz):
        raise UserError("nothing to write: pass --out GRID.png, --out-dir DIR and/or --npz FILE.npz")
    if args.n < 1 or args.batch_size < 1:
        raise UserError("--n and --batch-size must be at least 1")
    for target in (args.out, args.npz):  # fail before minutes of sampling, not after
        if target:
            check_writable(Path(target).parent)
    if args.out_dir:
        check_writable(Path(args.out_dir))
    device = args.device or default_device()
    model = load_generator(args.ckpt, args.tokenizer, device)
    num_classes = int(getattr(model, "num_classes", 0))
    classes = parse_classes(args.classes, num_classes)
    labels = class_labels(classes, args.n, args.class_sampling, args.seed) if num_classes else [0] * args.n
    options = {"cfg": args.cfg, "cfg_schedule": args.cfg_schedule, "sampler": args.sampler,
               "temperature": args.temperature, "cfg_position": args.cfg_position,
               "shared_noise": not args.fresh_noise, "gamma": args.gamma, "first_token": args.first_token}
    if args.steps is not None:  # else each model's own default
        if args.steps < 1:
            raise UserError(f"--steps must be at least 1, got {args.steps}")
        options["steps"] = args.steps
    written = []
    if args.out_dir:  # sharded over torchrun ranks, resumable: finished PNGs are kept and skipped
        arr = sample_to_dir(model, labels, args.seed, args.batch_size, options, Path(args.out_dir), num_classes,
                            progress=not args.quiet)
        if arr is None:  # ranks other than 0 stop here
            return 0
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
        written.append(f"{args.out_dir}/ ({len(arr)} PNGs)")
    else:
        images = sample_images(model, labels, args.seed, args.batch_size, options, progress=not args.quiet)
        arr = to_uint8(images)
    if args.out:
        balanced = num_classes and args.class_sampling == "balanced"
        rows = len(classes) if balanced else max(1, round(math.sqrt(len(labels))))
        written.append(str(save_grid(images, rows, args.out)))
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        if num_classes:
            np.savez(args.npz, arr, np.asarray(labels, dtype=np.int64))
        else:
            np.savez(args.npz, arr)
        written.append(str(args.npz))
    print(f"{len(arr)} images ({', '.join(map(str, classes)) if num_classes else 'unconditional'}): "
          f"{'; '.join(written)}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate images from an AR or Sphere Encoder checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (checkpoints/step_*), a run directory, or an "
                                                 "authors' file, local or hf:guolinke/SphereAR/SphereAR_B.pt "
                                                 "(converted once into ~/.cache/spheregen)")
    p.add_argument("--classes", help="comma-separated class ids (default: every class)")
    p.add_argument("--n", "--num-per-class", dest="n", type=int, default=8,
                   help="images per class (default 8; spell it --num-per-class under torchrun, whose own options "
                        "swallow --n)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale s (1 = none)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="linear",
                   help="constant s, or linear 1 + (s - 1) k / T over tokens k (default linear)")
    p.add_argument("--steps", type=int,
                   help="SphereAR: flow-head solver steps per token (default 100, as the reference); Sphere Encoder: "
                        "decoder passes, 1-6 in the paper (default 4)")
    p.add_argument("--sampler", choices=["euler", "euler_maruyama", "heun"], default="euler_maruyama",
                   help="flow-head solver (default euler_maruyama)")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the initial and SDE noise")
    p.add_argument("--first-token", choices=["shared", "independent"],
                   help="SphereAR, tokens with guidance scale 1 (token 0 of the linear schedule): the null rows take "
                        "the conditional token (shared, native default) or solve their own (independent, the "
                        "authors' sampler and the default of converted checkpoints); default: the checkpoint's")
    p.add_argument("--class-sampling", choices=["balanced", "random"], default="balanced",
                   help="balanced: --n images of each class in order; random: --n x classes images with classes "
                        "drawn uniformly from --classes (seeded by --seed), as the authors' 50k FID runs")
    se = p.add_argument_group("Sphere Encoder")
    se.add_argument("--cfg-position", choices=["pixel", "latent", "combo"], default="combo",
                    help="where CFG acts: decoder output, encoder output, or both with sqrt(s) (default combo)")
    se.add_argument("--fresh-noise", action="store_true",
                    help="draw new noise at every refinement step instead of one shared draw (Algorithm 1)")
    se.add_argument("--gamma", type=float, default=0.0,
                    help="noise-strength decay (1 - (t-1)/(T-1))^gamma over steps t, Eq. 13 (default 0: constant)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: the one recorded in the AR checkpoint)")
    p.add_argument("--out", help="grid PNG, one row per class")
    p.add_argument("--out-dir", help="directory of individual PNGs")
    p.add_argument("--npz", help="ADM-format .npz (arr_0 uint8 NHWC images, arr_1 labels)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_sample)
