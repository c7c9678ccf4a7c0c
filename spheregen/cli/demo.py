"""`spheregen demo`: the main jobs on MNIST, end to end, through the same commands a user would type.

SphereAR (default): tokenizer -> latent cache -> AR transformer -> a grid of class-conditional samples.
Sphere Encoder (`--model sphere`): train it, then grids at 1 and 4 steps, and at 4 steps with pixel-space CFG 3.
Each training step resumes if its run directory holds checkpoints, so a killed demo loses nothing, and a
finished step is skipped when the demo runs again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spheregen.checkpoint import list_checkpoints
from spheregen.cli import HelpFormatter, main
from spheregen.config import load_config
from spheregen.data.datasets import ImageDataset
from spheregen.errors import UserError


def run_spheregen(*argv: str) -> None:
    """Run one `spheregen` command in this process, echoing it; a failure raises UserError."""
    print("$ spheregen " + " ".join(argv), flush=True)
    if main(list(argv)) != 0:
        raise UserError(f"demo step failed: spheregen {' '.join(argv)}")


def train_or_resume(kind: str, config: str, data: str, out: Path, steps: int | None, *extra: str) -> Path:
    """`spheregen train KIND` into `out`: skipped when its last checkpoint reached the target steps, resumed
    when it holds earlier checkpoints. Returns the last checkpoint."""
    ckpts = list_checkpoints(out)
    target = steps
    if target is None:
        target = load_config(kind, config).get("train", {}).get("steps")
    if ckpts and int(ckpts[-1].name.split("_")[1]) >= (target or 0):
        print(f"{kind}: using the finished run in {out}")
        return ckpts[-1]
    argv = ["train", kind, "--config", config, "--data", data, "--out", str(out), *extra]
    if steps:
        argv += ["--steps", str(steps)]
    if ckpts:
        argv.append("--resume")
    run_spheregen(*argv)
    return list_checkpoints(out)[-1]


def demo_sphere_ar(data: str, out: Path, tokenizer_steps: int | None, ar_steps: int | None, cfg: float) -> Path:
    tok = train_or_resume("tokenizer", "mnist_tiny", data, out / "tokenizer", tokenizer_steps)
    latents = out / "latents"
    run_spheregen("encode", "--tokenizer", str(tok), "--data", data, "--split", "train", "--out", str(latents))
    ar = train_or_resume("ar", "mnist_tiny", data, out / "ar", ar_steps, "--latents", str(latents))
    grid = out / f"sphere_ar_samples_cfg{cfg:g}.png"
    run_spheregen("sample", "--ckpt", str(ar), "--n", "8", "--cfg", str(cfg), "--steps", "25", "--out", str(grid))
    return grid


def demo_sphere_encoder(data: str, out: Path, steps: int | None) -> list[Path]:
    ckpt = train_or_resume("sphere", "mnist_tiny", data, out / "sphere_encoder", steps)
    grids = []
    for t in (1, 4):
        grid = out / f"sphere_encoder_samples_{t}step.png"
        run_spheregen("sample", "--ckpt", str(ckpt), "--n", "8", "--steps", str(t), "--out", str(grid))
        grids.append(grid)
    # and with guidance in pixel space, the best CFG position at this size (docs/results.md, sec. 4)
    grid = out / "sphere_encoder_samples_4step_cfg3_pixel.png"
    run_spheregen("sample", "--ckpt", str(ckpt), "--n", "8", "--steps", "4", "--cfg", "3", "--cfg-position", "pixel",
                  "--out", str(grid))
    return grids + [grid]


def run_demo(args: argparse.Namespace) -> int:
    ds = ImageDataset(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"dataset: {len(ds)} images of {ds.image_size}x{ds.image_size}x{ds.channels}, {ds.num_classes} classes "
          f"in {Path(args.data).resolve()}")
    t0 = time.time()
    if args.model == "sphere":
        made = demo_sphere_encoder(args.data, out, args.steps)
    else:
        made = [demo_sphere_ar(args.data, out, args.tokenizer_steps, args.steps, args.cfg)]
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min. Outputs in {out.resolve()}:")
    for p in made:
        print(f"  {p}  (one row per class)")
    print(f"  runs (checkpoints, metrics.csv, eval grids): {out.resolve()}/*/")
    return 0


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=["sphere_ar", "sphere"], default="sphere_ar",
                   help="SphereAR (tokenizer + AR, default) or the Sphere Encoder")
    p.add_argument("--data", default="data/mnist28", help="dataset directory (built by `spheregen data`)")
    p.add_argument("--out", default="runs/demo", help="where runs and images go")
    p.add_argument("--steps", type=int, help="training steps of the AR model / Sphere Encoder (default: config)")
    p.add_argument("--tokenizer-steps", type=int, help="training steps of the tokenizer (default: config)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale for the SphereAR grid")
    p.set_defaults(func=run_demo)
