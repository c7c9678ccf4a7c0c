"""`spheregen sample`: draw images from any generator checkpoint (SphereAR, Sphere Encoder, or an authors' file).

Sample k (counted over the whole run, class by class) uses seed `--seed + k`, so it does not depend on
--batch-size. Outputs: a grid PNG (one row per class), a directory of PNGs, and/or an ADM-style .npz:
`arr_0` uint8 [N, H, W, C] (C = 1 for grayscale data) and, for class-conditional models, `arr_1` int64
labels [N] (guided-diffusion's image_sample.py writes np.savez(path, images, labels) when class_cond).
Pixels are round((x + 1) * 127.5) clipped to [0, 255] (spheregen.images.to_uint8).

Options that belong to one model are refused for the other with one line (a flag is never silently ignored).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from spheregen.cli import HelpFormatter, add_device_option
from spheregen.errors import UserError, check_class_ids
from spheregen.generation import class_labels, load_generator, sample_images, sample_to_dir
from spheregen.images import from_uint8, save_grid, to_uint8
from spheregen.runtime import PRECISIONS, compile_model, default_device, precision_autocast

# flag -> (sampling field, the model it belongs to; None: both)
FLAGS = {"cfg": ("cfg", None), "steps": ("steps", None),
         "cfg_schedule": ("cfg_schedule", "ar"), "sampler": ("sampler", "ar"), "temperature": ("temperature", "ar"),
         "first_token": ("first_token", "ar"),
         "cfg_position": ("cfg_position", "sphere_encoder"), "fresh_noise": ("shared_noise", "sphere_encoder"),
         "gamma": ("gamma", "sphere_encoder")}
MODEL_NAMES = {"ar": "SphereAR", "sphere_encoder": "Sphere Encoder"}


def sampling_options(args: argparse.Namespace, model_type: str) -> dict:
    """The sampling fields the user set; a flag of the other model is a UserError."""
    options = {}
    for flag, (field, owner) in FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if owner is not None and owner != model_type:
            raise UserError(f"--{flag.replace('_', '-')} is a {MODEL_NAMES[owner]} option, but this checkpoint holds "
                            f"a {MODEL_NAMES.get(model_type, model_type)} model; drop it")
        options[field] = (not value) if flag == "fresh_noise" else value
    if getattr(args, "precision", None) and model_type == "ar":  # the AR sets its networks' autocast itself
        options["precision"] = args.precision
    return options


def with_defaults(model, options: dict, quiet: bool = False) -> dict:
    """The checkpoint's recorded default sampling settings (e.g. from `spheregen demo`'s guidance sweep) under
    the flags the user set."""
    defaults = dict(getattr(model, "default_sampling", None) or {})
    if defaults and not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in options)
        if shown:
            print(f"the checkpoint's default sampling settings: {shown}")
    return {**defaults, **options}


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
    check_class_ids(ids, num_classes)
    return ids


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure files can be written there, or raise a one-line UserError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".spheregen-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}); choose another output path") from None


def _check_outputs(args: argparse.Namespace) -> None:
    if not (args.out or args.out_dir or args.npz):
        raise UserError("nothing to write: pass --out GRID.png, --out-dir DIR and/or --npz FILE.npz")
    if args.n < 1 or args.batch_size < 1:
        raise UserError("--n and --batch-size must be at least 1")
    for target in (args.out, args.npz):  # fail before minutes of sampling, not after
        if target:
            check_writable(Path(target).parent)
    if args.out_dir:
        check_writable(Path(args.out_dir))


def _cmd_sample(args: argparse.Namespace) -> int:
    _check_outputs(args)
    device = default_device(args.device)
    model = load_generator(args.ckpt, args.tokenizer, device)
    options = model.sampling_options(with_defaults(model, sampling_options(args, model.model_type), args.quiet))
    autocast = precision_autocast(device, args.precision or "fp32")
    if args.compile:
        compile_model(model)
    num_classes = int(getattr(model, "num_classes", 0))
    classes = parse_classes(args.classes, num_classes)
    labels = class_labels(classes, args.n, args.class_sampling, args.seed) if num_classes else [0] * args.n
    written = []
    if args.out_dir:  # sharded over torchrun ranks, resumable: finished PNGs are kept and skipped
        with autocast:
            arr = sample_to_dir(model, labels, args.seed, args.batch_size, options, Path(args.out_dir), num_classes,
                                progress=not args.quiet)
        if arr is None:  # ranks other than 0 stop here
            return 0
        images = from_uint8(arr)
        written.append(f"{args.out_dir}/ ({len(arr)} PNGs)")
    else:
        with autocast:
            images = sample_images(model, labels, args.seed, args.batch_size, options, progress=not args.quiet)
        arr = to_uint8(images)
    if args.out:
        balanced = num_classes and args.class_sampling == "balanced"
        rows = len(classes) if balanced else max(1, round(math.sqrt(len(labels))))
        written.append(str(save_grid(images, rows, args.out)))
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr, np.asarray(labels, dtype=np.int64)) if num_classes else np.savez(args.npz, arr)
        written.append(str(args.npz))
    print(f"{len(arr)} images ({', '.join(map(str, classes)) if num_classes else 'unconditional'}): "
          f"{'; '.join(written)}")
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (checkpoints/step_*), a run directory, or an "
                                                 "authors' file, local or hf:guolinke/SphereAR/SphereAR_B.pt "
                                                 "(converted once into ~/.cache/spheregen)")
    p.add_argument("--classes", help="comma-separated class ids (default: every class)")
    p.add_argument("--n", "--num-per-class", dest="n", type=int, default=8,
                   help="images per class (spell it --num-per-class under torchrun, whose own options swallow --n)")
    p.add_argument("--class-sampling", choices=["balanced", "random"], default="balanced",
                   help="balanced: --n images of each class in order; random: --n x classes images with classes "
                        "drawn uniformly from --classes (seeded by --seed), as the authors' 50k FID runs")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale s (default 1 = none)")
    p.add_argument("--steps", type=int, help="SphereAR: flow-head solver steps per token (default 100, as the "
                                             "authors); Sphere Encoder: decoder passes, 1-6 in the paper (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k")
    p.add_argument("--batch-size", type=int, default=64, help="images per generation batch")
    p.add_argument("--out", help="grid PNG, one row per class")
    p.add_argument("--out-dir", help="directory of individual PNGs")
    p.add_argument("--npz", help="ADM-format .npz (arr_0 uint8 NHWC images, arr_1 labels)")
    add_device_option(p)
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="autocast dtype of sampling (bf16 / fp16; fp32: none); on CUDA, fp32 matmuls may use TF32. "
                        "Default: SphereAR's transformer and flow head in bf16 on CUDA (as the authors), "
                        "everything else in fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model step (the flow head / the Sphere Encoder's encoder and decoder); "
                        "pays a one-off compile time, worth it for long runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    ar = p.add_argument_group("SphereAR")
    ar.add_argument("--tokenizer", help="tokenizer checkpoint (default: the one recorded in the AR checkpoint)")
    ar.add_argument("--cfg-schedule", choices=["constant", "linear"],
                    help="constant s, or linear 1 + (s - 1) k / T over tokens k (default linear)")
    ar.add_argument("--sampler", choices=["euler", "euler_maruyama", "heun"], help="flow-head solver (default "
                                                                                   "euler_maruyama)")
    ar.add_argument("--temperature", type=float, help="scale of the initial and SDE noise (default 1)")
    ar.add_argument("--first-token", choices=["shared", "independent"],
                    help="tokens with guidance scale 1 (token 0 of the linear schedule): the null rows take the "
                         "conditional token (shared, native default) or solve their own (independent, the authors' "
                         "sampler and the default of converted checkpoints); default: the checkpoint's")
    se = p.add_argument_group("Sphere Encoder")
    se.add_argument("--cfg-position", choices=["pixel", "latent", "combo"],
                    help="where CFG acts: decoder output, encoder output, or both with sqrt(s) (default combo)")
    se.add_argument("--fresh-noise", action="store_const", const=True,
                    help="draw new noise at every refinement step instead of one shared draw (Algorithm 1)")
    se.add_argument("--gamma", type=float,
                    help="noise-strength decay (1 - (t-1)/(T-1))^gamma over steps t, Eq. 13 (default 0: constant)")
    p.set_defaults(func=_cmd_sample)
