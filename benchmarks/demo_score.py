"""Class accuracy of a demo's generator, as the acceptance of issue 18 measures it: 50 samples per class from
seeds 1000 on (image k uses seed 1000 + k), scored by the dataset's classifier (DATA/classifier, trained once),
at the checkpoint's default sampling settings (from the demo's sweep), unguided (the same settings with CFG 1)
and, for SphereAR, at the old demo grid's CFG 3 linear; plus the classifier's accuracy on real held-out images.

    python benchmarks/demo_score.py --run runs/demo/ar --data data/mnist28 --out benchmarks/results/demo_mnist.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SEED = 1000


def settings(model) -> dict[str, dict]:
    default = dict(model.default_sampling)
    out = {"default": default, "unguided": {**default, "cfg": 1.0}}
    if model.model_type == "ar":
        out["cfg3_linear_25"] = {**default, "cfg": 3.0, "cfg_schedule": "linear", "steps": 25}
    return out


def measure(args) -> Path:
    from spheregen.data.datasets import ImageDataset
    from spheregen.eval.classifier import class_accuracy, get_classifier
    from spheregen.generation import load_generator

    model = load_generator(args.run)
    ds = ImageDataset(args.data)
    classifier, config, _ = get_classifier(args.data)
    labels = harness.class_labels(ds.num_classes, args.per_class)
    result = {"experiment": "demo_score", "hardware": harness.hardware(), "run": str(args.run), "data": args.data,
              "per_class": args.per_class, "seeds": f"{SEED}-{SEED + len(labels) - 1}",
              "real_heldout_acc": config.get("test_accuracy"), "settings": {}}
    for name, options in settings(model).items():
        images, s_per_img = harness.generate_all(model, labels, SEED, options)
        acc = class_accuracy(images, np.asarray(labels), classifier)
        result["settings"][name] = {"options": options, "acc": acc, "s_per_image": s_per_img}
        print(f"{name} {options}: class accuracy {acc:.3f} ({len(labels)} samples)", flush=True)
    return harness.write_json(Path(args.out), result)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the demo's generator run (runs/demo/ar or .../sphere_encoder)")
    p.add_argument("--data", required=True, help="its dataset directory (the demo's DIR/dataset for a folder)")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--out", required=True, help="result JSON")
    return harness.report(lambda: measure(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
