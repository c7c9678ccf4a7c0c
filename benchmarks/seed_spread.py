"""How much a table cell moves with the seeds alone: one SphereAR checkpoint, one CFG scale, several disjoint
seed sets of the budget's size, each scored like a cell of the posterior ablation.

The spread is the yardstick for the ablation tables: two arms whose cells differ by less than it are not told
apart by this budget.

    python benchmarks/seed_spread.py --data data/mnist28 --budget cpu      # the spherical arm, CFG 2, 5 seed sets
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def measure(args) -> Path:
    from spheregen.data.datasets import ImageDataset
    from spheregen.generation import load_generator

    budget = harness.get_budget(args.budget, args.set)
    ckpt = args.ckpt or str(harness.ROOT / "runs" / "ablate" / f"posterior_{Path(args.data).name}-{args.budget}"
                            / "ar-spherical")
    ds = ImageDataset(args.data)
    model = load_generator(ckpt, device=args.device)
    labels = harness.class_labels(ds.num_classes, budget.per_class)
    opts = {"cfg": args.cfg, "cfg_schedule": "constant", "sampler": "euler_maruyama", "steps": budget.head_steps}
    runs, out = harness.paths(args, f"seed_spread_{Path(args.data).name}")
    cells = harness.Cells(runs, budget)
    rows = []
    for k in range(args.sets):
        seed = budget.seed + k * len(labels)  # disjoint seed sets: image i of set k uses seed + k * n + i

        def cell(seed=seed) -> dict:
            images, _ = harness.generate_all(model, labels, seed, opts)
            return {"seed": seed, **harness.score(images, labels, args.data, budget, args.device)}

        rows.append(cells.get(f"{Path(ckpt).name}_cfg{args.cfg:g}_seed{seed}", cell))
    spread = {m: {"mean": statistics.mean(r[m] for r in rows), "sd": statistics.stdev(r[m] for r in rows),
                  "min": min(r[m] for r in rows), "max": max(r[m] for r in rows)}
              for m in ("fid", "acc", "dfid") if all(r.get(m) is not None for r in rows)}
    for m, s in spread.items():
        print(f"{m}: mean {s['mean']:.3f}, sd {s['sd']:.3f}, range {s['min']:.3f}-{s['max']:.3f}")
    return harness.write_json(out, harness.header(f"seed_spread_{Path(args.data).name}", args.budget, budget, {
        "ckpt": ckpt, "data": args.data, "num_classes": ds.num_classes, "cfg": args.cfg, "rows": rows,
        "spread": spread}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/mnist28", help="dataset the checkpoint was trained on")
    p.add_argument("--ckpt", help="AR checkpoint or run dir (default: the posterior ablation's spherical arm)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--sets", type=int, default=5, help="number of disjoint seed sets (at least 2)")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    if args.sets < 2:
        p.error("--sets must be at least 2 to measure a spread")
    return harness.report(lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
