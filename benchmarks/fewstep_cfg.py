"""Does a few-step head need its own guidance scale? (issue 20)

A MeanFlow head distilled with CFG on two rows combines the cond and null rows' *average* velocities over an
interval of 1/n; at 1-2 evaluations that is weaker guidance than the same scale applied at every one of 100 steps.
This sweeps the CFG scale of a few-step head at 1 and 2 evaluations on the sampling_quality.py seeds (selection),
then checks the chosen scale on a fresh seed set against the 100-step Euler-Maruyama default at CFG 2 on the same
fresh seeds (confirmation: the selection cannot have picked seed noise there). Writes
benchmarks/results/fewstep_cfg_<data>_<budget>.json.

    OMP_NUM_THREADS=1 python benchmarks/fewstep_cfg.py --data data/emoji32 --head distilled --cfgs 2,3,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

REF = {"cfg": 2.0, "cfg_schedule": "constant", "sampler": "euler_maruyama", "steps": 100}
FRESH_SEED = 10_000  # the confirmation seeds: image k from 10000 + k, disjoint from the selection's 0 + k


def cell(model, labels: list[int], seed: int, opts: dict, args, budget) -> dict:
    images, sec = harness.generate_all(model, labels, seed, opts)
    return {**opts, "seed": seed, "images_per_s": 1.0 / sec,
            **harness.score(images, labels, args.data, budget, args.device)}


def choose(rows: list[dict], evals: int) -> dict:
    """The swept cell for `evals` Euler steps with the best accuracy - FID / 100: accuracy first, FID breaking
    near-ties (a rough joint score; unlabelled data: FID alone)."""
    return max((r for r in rows if r["steps"] == evals), key=lambda r: (r.get("acc") or 0) - r["fid"] / 100)


def measure(args) -> Path:
    from spheregen.data.datasets import ImageDataset
    from spheregen.generation import load_generator

    budget = harness.get_budget(args.budget, args.set)
    ds = ImageDataset(args.data)
    data = Path(args.data).name
    runs = Path(args.runs) if args.runs else harness.ROOT / "runs" / "ablate" / f"flow_{data}-{args.budget}"
    head, ref = load_generator(str(runs / f"ar-{args.head}")), load_generator(str(runs / "ar-euclidean"))
    labels = harness.class_labels(ds.num_classes, budget.per_class)
    sweep = [cell(head, labels, budget.seed, {"cfg": float(c), "cfg_schedule": "constant", "sampler": "euler",
                                              "steps": n}, args, budget)
             for n in (1, 2) for c in args.cfgs.split(",")]
    for row in sweep:
        print(f"selection: {row['steps']} evals, CFG {row['cfg']:g}: FID {row['fid']:.1f}, acc {row.get('acc')}")
    best = {n: choose(sweep, n) for n in (1, 2)}
    confirm = [cell(ref, labels, FRESH_SEED, REF, args, budget)] + \
        [cell(head, labels, FRESH_SEED, {k: best[n][k] for k in ("cfg", "cfg_schedule", "sampler", "steps")}, args,
              budget) for n in (1, 2)]
    for row in confirm:
        print(f"confirmation: {row['sampler']} {row['steps']}, CFG {row['cfg']:g}: FID {row['fid']:.1f}, "
              f"acc {row.get('acc')}")
    name = f"fewstep_cfg_{data}"
    out = Path(args.out) if args.out else harness.RESULTS / f"{name}_{args.budget}.json"
    return harness.write_json(out, harness.header(name, args.budget, budget, {
        "data": args.data, "head": str(runs / f"ar-{args.head}"), "selection": sweep,
        "chosen": {n: best[n]["cfg"] for n in best}, "confirmation": confirm, "fresh_seed": FRESH_SEED}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/emoji32")
    p.add_argument("--head", default="distilled", help="the run folder ar-<head> of sampling_quality.py's models")
    p.add_argument("--cfgs", default="2,3,4", help="CFG scales to sweep at 1 and 2 evaluations")
    harness.add_common_args(p)
    return harness.report(lambda: measure(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
