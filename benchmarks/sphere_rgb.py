"""Sphere Encoder on RGB emoji: the retuned tiny config against its old settings, scored at 1, 2, 4 and 6 steps.

Both arms train configs/sphere/emoji32_tiny.toml for the same steps and are scored as in ablate_sphere.py
(Inception FID, class accuracy of the dataset's classifier, classifier-feature dFID; real held-out images at the
same n are the floor); the retuned arm is also sampled at 4 steps with CFG at each position and with fresh noise.

    arm       alpha  latent BN  w_lat_con  encoder LR
    retuned   85     yes        1          1x          (the config as shipped; as mnist_tiny.toml)
    old       80     no         0.1        0.1x        (the config before the MNIST retune)

    python benchmarks/sphere_rgb.py --set sphere_steps=1500 --set per_class=30   # ~45 CPU-minutes, 1 thread
"""

from __future__ import annotations

import argparse
import functools
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/emoji32", help="RGB dataset directory (built by `spheregen data emoji`)")
    p.add_argument("--config", default=CONFIG, help="Sphere Encoder config (a shipped name or a TOML file)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    run_arm = functools.partial(ablate_sphere.run_arm, config=args.config, arms=ARMS, reference=REFERENCE)
    extra = {"config": args.config, "cfg_scale": ablate_sphere.CFG_SCALE, "reference": REFERENCE}
    return harness.report(lambda: harness.run_arms(args, f"sphere_{Path(args.data).name}", ARMS, run_arm,
                                                   lambda ds: extra))


if __name__ == "__main__":
    sys.exit(main())
