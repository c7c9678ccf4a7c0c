"""SphereAR inference speed against flow-head steps and sampler (paper Fig. 7), with the quality each buys.

For a trained AR checkpoint (default: the spherical arm of the MNIST posterior ablation at the same budget),
samples `per_class` images per class with CFG 3 for every (sampler, head steps) pair and reports seconds per
image (batch 100, decoding included) next to class accuracy, Inception FID and dFID. The paper's point: the
flow head dominates the cost, so fewer head steps buy speed.

    python benchmarks/ablate_speed.py --budget cpu
    python benchmarks/ablate_speed.py --ckpt runs/ar-mnist_tiny --data data/mnist28 --head-steps 1,10,100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SAMPLERS = ("euler", "heun", "euler_maruyama")
CFG = 3.0


def measure(args) -> Path:
    """Every (sampler, head steps) cell for the checkpoint; writes and returns the result JSON."""
    from spheregen.data.datasets import ImageDataset
    from spheregen.errors import UserError
    from spheregen.generation import load_generator

    budget = harness.get_budget(args.budget, args.set)
    ckpt = args.ckpt or str(harness.ROOT / "runs" / "ablate" / f"posterior_{Path(args.data).name}-{args.budget}"
                            / "ar-spherical")
    if not Path(ckpt).exists():
        raise UserError(f"no AR checkpoint at {ckpt}; run benchmarks/ablate_posterior.py --data {args.data} "
                        f"--budget {args.budget} first, or pass --ckpt")
    ds = ImageDataset(args.data)
    model = load_generator(ckpt, device=args.device)
    labels = harness.class_labels(ds.num_classes, budget.per_class)
    name = f"speed_{Path(args.data).name}"
    runs, out = harness.paths(args, name)
    cells = harness.Cells(runs, budget)
    rows = []
    for sampler in [s for s in args.samplers.split(",") if s]:
        for steps in [int(s) for s in args.head_steps.split(",") if s]:
            def cell(sampler=sampler, steps=steps) -> dict:
                opts = {"cfg": CFG, "cfg_schedule": "constant", "sampler": sampler, "steps": steps}
                model.generate_images(labels[:2], [0, 1], opts)  # warm-up
                images, sec = harness.generate_all(model, labels, budget.seed, opts)
                return {"sampler": sampler, "head_steps": steps, "seconds_per_image": sec,
                        **harness.score(images, labels, args.data, budget, args.device)}

            rows.append(cells.get(f"{sampler}_{steps}", cell))
    return harness.write_json(out, harness.header(name, args.budget, budget, {
        "data": args.data, "ckpt": str(ckpt), "cfg": CFG, "num_classes": ds.num_classes, "batch_size": 100,
        "rows": rows}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/mnist28", help="dataset the checkpoint was trained on")
    p.add_argument("--ckpt", help="AR checkpoint or run dir (default: the posterior ablation's spherical arm)")
    p.add_argument("--head-steps", default="1,5,25,100")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    harness.add_common_args(p)
    args = p.parse_args(argv)
    return harness.report(lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
