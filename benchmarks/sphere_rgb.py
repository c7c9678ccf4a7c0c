"""Sphere Encoder on RGB emoji: the retuned tiny config against its old settings, scored at 1, 2, 4 and 6 steps.

Both arms train configs/sphere/emoji32_tiny.toml for the same steps and are scored as in ablate_sphere.py
(Inception FID, class accuracy of the dataset's classifier, classifier-feature dFID; real held-out images at the
same n are the floor); the retuned arm is also sampled at 4 steps with CFG at each position and with fresh noise.

    arm       alpha  latent BN  w_lat_con  encoder LR
    retuned   85     yes        1          1x          (the config as shipped; as mnist_tiny.toml)
    old       80     no         0.1        0.1x        (the config before the MNIST retune)

With the retuned arm it also writes editing examples (a reconstruction grid, then `spheregen edit` commands run
on held-out images, and paper Fig. 6 noise interpolation grids) to docs/images/sphere_emoji_*.png and fig6_*.png,
and records each command in the JSON.

    python benchmarks/sphere_rgb.py --set sphere_steps=1500 --set per_class=20   # ~45 CPU-minutes, 1 thread
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate_sphere  # noqa: E402
import harness  # noqa: E402

CONFIG = "emoji32_tiny"
REFERENCE = "retuned"
ARMS = {  # name: [--set overrides]
    "retuned": [],
    "old": ["model.alpha_deg=80", "model.latent_bn=false", "model.w_lat_con=0.1", "model.enc_lr_scale=0.1"],
}

A, B = 0, 2  # classes of the two held-out images that are edited (Smileys & Emotion, Animals & Nature)
EDITS = [  # (name, caption, `spheregen edit` arguments; {a} and {b} are the held-out images)
    ("sphere_emoji_manipulate", "A (first column) re-generated as classes 0, 2, 3 and 8 (rows), each of 4 steps",
     ["manipulate", "--image", "{a}", "--class", "0", "2", "3", "8", "--steps", "4"]),
    ("sphere_emoji_crossover", "A, B, then their left/right stitch harmonised over 10 steps",
     ["crossover", "--images", "{a}", "{b}", "--steps", "10"]),
    ("sphere_emoji_crossover_quadrants", "the same with the quadrant stitch",
     ["crossover", "--images", "{a}", "{b}", "--steps", "10", "--stitch", "quadrants"]),
    ("sphere_emoji_interpolate", "A, a latent slerp in 8 frames, B (one decode each)",
     ["interpolate", "--images", "{a}", "{b}", "--n", "8"]),
    ("fig6_bilinear", "Fig. 6: noise and class embeddings interpolated bilinearly between four corners (classes 0, "
     "2, 3, 8), 4 steps, no CFG", ["interpolate", "--noise", "bilinear", "--class", "0", "2", "3", "8", "--n", "5"]),
    ("fig6_lerp", "Fig. 6: lerp between two noise draws and two random classes per row, 4 steps",
     ["interpolate", "--noise", "lerp", "--n", "8", "--rows", "4"]),
    ("fig6_slerp", "the same rows with slerp", ["interpolate", "--noise", "slerp", "--n", "8", "--rows", "4"]),
]


def held_out(data: str, cls: int):
    """The first held-out (test split) image of class `cls` as a [1, C, H, W] tensor in [-1, 1]."""
    import numpy as np

    from spheregen.data.datasets import ImageDataset

    test = ImageDataset(data, "test")
    _, y = test.get_batch(np.arange(len(test)))
    return test.get_batch(np.flatnonzero(y.numpy() == cls)[:1])[0]


def make_edits(ckpt: str, data: str, runs: Path, images: Path, device: str) -> list[dict]:
    """A reconstruction grid of held-out images, then every EDITS command on the checkpoint; returns the records."""
    import numpy as np
    import torch

    from spheregen.cli.demo import run_spheregen
    from spheregen.data.datasets import ImageDataset
    from spheregen.generation import load_generator
    from spheregen.images import save_grid

    images.mkdir(parents=True, exist_ok=True)
    test = ImageDataset(data, "test")
    x, _ = test.get_batch(np.arange(min(len(test), 12)))
    with torch.no_grad():
        rec = load_generator(ckpt, device=device).reconstruct(x.to(device)).cpu()
    out = [{"name": "sphere_emoji_reconstruct", "caption": "12 held-out images (top) and their reconstructions "
            "(one encode and decode, no noise)", "image": str(save_grid(torch.cat([x, rec]), 2,
                                                                        images / "sphere_emoji_reconstruct.png"))}]
    inputs = {}
    for key, cls in (("a", A), ("b", B)):
        inputs[key] = str(save_grid(held_out(data, cls), 1, runs / "edits" / f"{key}.png", pad=0))
    for name, caption, args in EDITS:
        argv = ["edit", *[a.format(**inputs) for a in args], "--ckpt", ckpt, "--out", str(images / f"{name}.png"),
                "--device", device]
        run_spheregen(*argv)
        rel = [a.replace(f"{harness.ROOT}/", "") for a in argv]  # paths as typed in the repository
        out.append({"name": name, "caption": caption, "image": rel[rel.index("--out") + 1],
                    "command": "spheregen " + " ".join(rel)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/emoji32", help="RGB dataset directory (built by `spheregen data emoji`)")
    p.add_argument("--config", default=CONFIG, help="Sphere Encoder config (a shipped name or a TOML file)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--images", default=str(harness.ROOT / "docs" / "images"),
                   help="where the editing examples of the retuned arm go")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    run_arm = functools.partial(ablate_sphere.run_arm, config=args.config, arms=ARMS, reference=REFERENCE)
    extra = {"config": args.config, "cfg_scale": ablate_sphere.CFG_SCALE, "reference": REFERENCE}

    def body() -> Path:
        out = harness.run_arms(args, f"sphere_{Path(args.data).name}", ARMS, run_arm, lambda ds: extra)
        res = json.loads(out.read_text())
        ref = [a for a in res["arms"] if a["arm"] == REFERENCE]
        if ref:
            res["edit_inputs"] = {"A": A, "B": B}
            res["edits"] = make_edits(ref[0]["checkpoint"], args.data, harness.paths(args, res["experiment"])[0],
                                      Path(args.images), args.device)
        return harness.write_json(out, res)

    return harness.report(body)


if __name__ == "__main__":
    sys.exit(main())
