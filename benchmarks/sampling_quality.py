"""Images/s against quality of SphereAR's samplers (issue 20): the Euclidean (rectified-flow) head with Euler, Heun
and Euler-Maruyama at 1-100 head steps; the few-step MeanFlow head (models/meanflow_head.py) trained from scratch
at 1, 2 and 4 Euler steps (average velocities), plus its own 100-step Euler-Maruyama; and a MeanFlow head
distilled from the trained Euclidean one with its transformer frozen (`spheregen train distill`, configs/distill/
meanflow_tiny.toml) at 1, 2 and 4 Euler steps.

The two AR models are trained at the same budget on the same spherical tokenizer's latents, in the folder the flow
ablation uses (benchmarks/ablate_flow.py: runs/ablate/flow_<data>-<budget>/), so its tokenizer, latents and
Euclidean AR model are shared when they exist (and trained here when not); the distilled head trains on top of the
Euclidean one (its transformer and AR budget unchanged, only the head moves). Every cell: `per_class` images per
class (image k from seed `seed + k`), CFG 2 with the constant schedule (the CFG of benchmarks/seed_spread.py),
batch 100, decoding included; images/s (this process's threads), Inception FID, class accuracy, dFID. The
verdict: the few-step cells with <= 2 head evaluations per token against the Euclidean head's 100-step
Euler-Maruyama cell (the authors' default sampler), within 2 sd of benchmarks/results/seed_spread_<data>_<budget>.json.

Speed is measured apart from the cells, side by side in one process (`--speed-threads`, medians of
`--speed-repeats` alternating runs of one batch of all the cell's labels, decoding included): the authors'
sampling loop (benchmarks/authors_sampler.py, Euler-Maruyama 100 steps) on the Euclidean model against
spheregen's samplers on each model.

    OMP_NUM_THREADS=1 python benchmarks/sampling_quality.py --data data/mnist28            # --budget cpu
    python benchmarks/sampling_quality.py --data data/mnist28 --speed-threads 2            # cells cached: speed only
    python benchmarks/sampling_quality.py --markdown benchmarks/results/sampling_quality_mnist28_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from ablate_posterior import AR_CONFIG, tokenizer_config  # noqa: E402

CFG = 2.0
GRID = {"euclidean": [(s, n) for s in ("euler", "heun", "euler_maruyama") for n in (1, 2, 5, 25, 100)],
        "meanflow": [("euler", 1), ("euler", 2), ("euler", 4), ("euler_maruyama", 100)],
        "distilled": [("euler", 1), ("euler", 2), ("euler", 4)], "folded": [("euler", 1), ("euler", 2), ("euler", 4)]}
FEW_STEP = ("meanflow", "distilled", "folded")  # heads whose cells with <= 2 evaluations face the quality bar
# the distilled heads (spheregen/configs/distill/): CFG on the student's two rows, or folded into the student
DISTILL_CONFIGS = {"distilled": "meanflow_tiny", "folded": "meanflow_folded_tiny"}
# the side-by-side speed arms: name -> (head, sampler, steps); "authors" runs benchmarks/authors_sampler.py
SPEED_ARMS = {"authors": ("euclidean", "euler_maruyama", 100), "spheregen": ("euclidean", "euler_maruyama", 100),
              **{f"{h}_{n}": (h, "euler", n) for h in FEW_STEP for n in (1, 2)}}
IMAGES = harness.ROOT / "docs" / "images"


def evaluations(sampler: str, steps: int) -> int:
    """Head evaluations per token (Heun: 2N - 1, Euler-Maruyama: N + 1)."""
    return {"euler": steps, "heun": 2 * steps - 1, "euler_maruyama": steps + 1}[sampler]


def distill_tag(overrides: list[str]) -> str:
    """The folder suffix of distilled runs trained with config overrides ("" without), e.g. -steps1500_lr2.5e-4."""
    keys = [o.partition("=")[0].rpartition(".")[2] + o.partition("=")[2] for o in overrides]  # train.lr=1e-4 -> lr1e-4
    return "".join(("-" if i == 0 else "_") + k for i, k in enumerate(keys))


def train_models(data: str, runs: Path, budget: harness.Budget, device: str, ds,
                 heads: tuple[str, ...] = FEW_STEP, distill_set: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """The shared spherical tokenizer and latents, one AR model per trained head (trained or reused), and the
    heads distilled from the Euclidean one (with the config overrides `distill_set`); of the few-step heads,
    only `heads`."""
    from spheregen.cli.demo import run_spheregen, train_or_resume

    dev = ["--device", device]
    tok = train_or_resume("tokenizer", tokenizer_config(ds.image_size, ds.channels), runs / "tokenizer-spherical",
                          "--data", data, "--set", "model.posterior=spherical", "--set", "train.eval_every=0",
                          "--set", f"train.ckpt_every={budget.tokenizer_steps}", *dev, steps=budget.tokenizer_steps)
    latents = runs / "latents-spherical"
    if not (latents / "meta.json").is_file():
        run_spheregen("encode", "--tokenizer", str(tok), "--data", data, "--split", "train", "--out", str(latents),
                      *dev)
    ars = {flow: train_or_resume("ar", AR_CONFIG, runs / f"ar-{flow}", "--data", data, "--latents", str(latents),
                                 "--set", f"model.flow={flow}", "--set", f"train.ckpt_every={budget.ar_steps}", *dev,
                                 steps=budget.ar_steps) for flow in ("euclidean", "meanflow")
           if flow == "euclidean" or flow in heads}
    steps = [int(o.partition("=")[2]) for o in distill_set if o.startswith("train.steps=")]
    sets = [a for o in distill_set if not o.startswith("train.steps=") for a in ("--set", o)]
    for name, config in [(n, c) for n, c in DISTILL_CONFIGS.items() if n in heads]:
        ars[name] = train_or_resume("distill", config, runs / f"ar-{name}{distill_tag(list(distill_set))}",
                                    "--teacher", str(ars["euclidean"]), "--latents", str(latents), *sets, *dev,
                                    steps=steps[-1] if steps else None)
    return tok, ars


def side_by_side(models: dict, labels: list[int], repeats: int) -> dict:
    """images/s of each SPEED_ARMS arm on one batch of `labels` (decoding included), the arms alternating in this
    process; medians of `repeats` runs after one warm-up each, and the ratio to the authors' loop."""
    from authors_sampler import authors_sample

    lab, seeds = torch.tensor(labels), list(range(len(labels)))

    def arm(name: str):
        flow, sampler, steps = SPEED_ARMS[name]
        model = models[flow]
        if name == "authors":
            return lambda: model._decoder.decode(authors_sample(model, lab, CFG, steps), project=True)
        opts = {"cfg": CFG, "cfg_schedule": "constant", "sampler": sampler, "steps": steps}
        return lambda: model.generate_images(lab, seeds, opts)

    runs = harness.alternate({name: arm(name) for name, (flow, _, _) in SPEED_ARMS.items() if flow in models},
                             repeats)
    base = statistics.median(runs["authors"])
    arms = {}
    for name, r in runs.items():
        head, sampler, steps = SPEED_ARMS[name]
        med = statistics.median(r)
        arms[name] = {"head": head, "sampler": sampler, "steps": steps, "median_s": med,
                      "images_per_s": len(labels) / med, "vs_authors": base / med, "runs_s": [round(x, 4) for x in r]}
    return {"threads": torch.get_num_threads(), "batch": len(labels), "repeats": repeats,
            "hardware": harness.hardware(), "date": time.strftime("%Y-%m-%d %H:%M"), "arms": arms}


def measure(args) -> Path:
    from spheregen.data.datasets import ImageDataset
    from spheregen.generation import load_generator

    budget = harness.get_budget(args.budget, args.set)
    ds = ImageDataset(args.data)
    name = f"sampling_quality_{Path(args.data).name}"
    tag = args.budget + ("-custom" if args.set else "")
    runs = Path(args.runs) if args.runs else harness.ROOT / "runs" / "ablate" / f"flow_{Path(args.data).name}-{tag}"
    args.distill_tag = distill_tag(args.distill_set)  # distilled with overrides: their own folders and file
    out = Path(args.out) if args.out else harness.RESULTS / f"{name}_{tag}{args.distill_tag}.json"
    heads = tuple(h for h in args.heads.split(",") if h)
    tok, ars = train_models(args.data, runs, budget, args.device, ds, heads, tuple(args.distill_set))
    labels = harness.class_labels(ds.num_classes, budget.per_class)
    rows = []
    for flow, grid in [(f, g) for f, g in GRID.items() if f in ars]:
        model = load_generator(str(ars[flow]), device=args.device)
        cells = harness.Cells(runs / f"quality-{flow}{args.distill_tag if flow in DISTILL_CONFIGS else ''}", budget)
        for sampler, steps in grid:
            def cell(sampler=sampler, steps=steps, model=model, flow=flow) -> dict:
                opts = {"cfg": CFG, "cfg_schedule": "constant", "sampler": sampler, "steps": steps}
                model.generate_images(labels[:2], [0, 1], opts)  # warm-up
                images, sec = harness.generate_all(model, labels, budget.seed, opts)
                return {"flow": flow, "sampler": sampler, "steps": steps, "evals": evaluations(sampler, steps),
                        "images_per_s": 1.0 / sec, **harness.score(images, labels, args.data, budget, args.device)}

            rows.append(cells.get(f"{sampler}_{steps}", cell))
    speeds = []
    if args.speed_repeats:
        torch.set_num_threads(args.speed_threads)
        models = {flow: load_generator(str(ars[flow]), device=args.device) for flow in ars}
        cells = harness.Cells(runs / f"quality-speed{args.distill_tag}", budget)
        for n in speed_batches(args.speed_batches, len(labels)):
            batch = [labels[i * len(labels) // n] for i in range(n)]  # spread over the classes
            key = f"speed_threads{args.speed_threads}" + ("" if n == len(labels) else f"_batch{n}")
            speeds.append(cells.get(key, lambda batch=batch: side_by_side(models, batch, args.speed_repeats)))
    spread_file = harness.RESULTS / f"seed_spread_{Path(args.data).name}_{args.budget}.json"
    spread = json.loads(spread_file.read_text())["spread"] if spread_file.is_file() else None
    return harness.write_json(out, harness.header(name, args.budget, budget, {
        "data": args.data, "num_classes": ds.num_classes, "cfg": CFG, "cfg_schedule": "constant", "batch_size": 100,
        "tokenizer": str(tok), "ar": {k: str(v) for k, v in ars.items()}, "ar_config": AR_CONFIG,
        "distill_configs": DISTILL_CONFIGS, "seed_spread": spread, "seed_spread_file": str(spread_file),
        "distill_overrides": args.distill_set, "rows": rows, "speeds": speeds}))


def speed_batches(spec: str, n_labels: int) -> list[int]:
    """--speed-batches: a comma list of batch sizes, "all" meaning one batch of every cell label."""
    return [n_labels if b == "all" else min(int(b), n_labels) for b in spec.split(",") if b]


# -- the results section ------------------------------------------------------------------------------------
def verdicts(res: dict) -> list[dict]:
    """Each few-step cell with <= 2 evaluations against the Euclidean 100-step Euler-Maruyama cell: FID at most
    2 sd worse, accuracy at most 2 sd lower (sd of the seed-spread file); its images/s ratio to that cell, and
    to the authors' loop side by side (`vs_authors`, None without a speed measurement)."""
    ref = next(r for r in res["rows"] if r["flow"] == "euclidean" and r["sampler"] == "euler_maruyama"
               and r["steps"] == 100)
    sd = res.get("seed_spread") or {}
    out = []
    for r in res["rows"]:
        if r["flow"] not in FEW_STEP or r["evals"] > 2:
            continue
        fid_ok = r["fid"] <= ref["fid"] + 2 * sd["fid"]["sd"] if "fid" in sd else None
        acc_ok = (r["acc"] >= ref["acc"] - 2 * sd["acc"]["sd"]) if "acc" in sd and r.get("acc") is not None else None
        arm = f"{r['flow']}_{r['steps']}" if r["sampler"] == "euler" else None
        out.append({"cell": r, "ref": ref, "fid_ok": fid_ok, "acc_ok": acc_ok,
                    "speedup": r["images_per_s"] / ref["images_per_s"],
                    "vs_authors": {sp["batch"]: sp["arms"][arm]["vs_authors"] for sp in speed_runs(res)
                                   if arm in sp["arms"]}})
    return out


def speed_runs(res: dict) -> list[dict]:
    """The side-by-side measurements of a result file (older files hold one, as `speed`)."""
    return res.get("speeds") or ([res["speed"]] if res.get("speed") else [])


def speed_table(res: dict) -> list[str]:
    """The side-by-side images/s tables, one per batch size, or nothing when the run measured none."""
    from results_page import f, table

    out = []
    for speed in speed_runs(res):
        rows = [[name, a["head"], a["sampler"], a["steps"], f(a["median_s"], ".3f"), f(a["images_per_s"], ".1f"),
                 f"{a['vs_authors']:.2f}x"] for name, a in speed["arms"].items()]
        out += [f"Side by side in one process ({speed['hardware']}, {speed['date']}): one batch of {speed['batch']} "
                f"images per run, decoding included, medians of {speed['repeats']} alternating runs; `authors` is "
                "benchmarks/authors_sampler.py (Euler-Maruyama 100) on the Euclidean model.", "",
                table(["arm", "head", "sampler", "head steps", "s / batch", "images/s", "vs authors"], rows), ""]
    return out


def plot(res: dict, path: Path) -> Path:
    """FID and class accuracy against images/s, one line per head and sampler, labelled with head steps."""
    fig = harness.figure((10, 4.2))
    for i, (m, label) in enumerate([("fid", "FID"), ("acc", "class accuracy")]):
        ax = fig.add_subplot(1, 2, i + 1)
        for flow, sampler in dict.fromkeys((r["flow"], r["sampler"]) for r in res["rows"]):
            rows = [r for r in res["rows"] if (r["flow"], r["sampler"]) == (flow, sampler) and r.get(m) is not None]
            ax.plot([r["images_per_s"] for r in rows], [r[m] for r in rows], marker="o", label=f"{flow} {sampler}")
            for r in rows:
                ax.annotate(str(r["steps"]), (r["images_per_s"], r[m]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel="images / s (log)", ylabel=label, xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = f"{Path(res['data']).name}: images/s against quality (CFG {res['cfg']:g}; labels: head steps)"
    return harness.save_figure(fig, title, path, dpi=80)


def section(res: dict) -> list[str]:
    from results_page import f, settings, table

    data = Path(res["data"]).name
    b = res["budget_values"]
    img = plot(res, IMAGES / f"sampling_quality_{data}_{res['budget']}.png")
    rows = [[r["flow"], r["sampler"], r["steps"], r["evals"], f(r["images_per_s"], ".2f"), f(r["fid"]),
             f(r.get("acc"), ".3f"), f(r["dfid"])] for r in res["rows"]]
    overrides = res.get("distill_overrides") or []
    distilled = f"distilled heads trained with {', '.join(overrides)}; " if overrides else ""
    out = [f"### {data}" + (f" ({', '.join(overrides)})" if overrides else ""), "",
           settings(res, f"AR {b['ar_steps']} steps ({res['ar_config']}) per head on the same latents, {distilled}"
                         f"CFG {res['cfg']:g} constant, batch 100, decoding included, images/s on 1 thread; "), "",
           table(["head", "sampler", "head steps", "evals / token", "images/s", "FID", "acc", "dFID"], rows), "",
           f"![images/s against quality, {data}](images/{img.name})", ""]
    out += speed_table(res)
    sd = res.get("seed_spread") or {}
    for v in verdicts(res):
        c, ref = v["cell"], v["ref"]
        ok = "meets" if v["fid_ok"] and v["acc_ok"] else "does not meet"
        fast = ", ".join(f"{x:.1f}x the authors' loop side by side at batch {b}" for b, x in v["vs_authors"].items()) \
            or f"{v['speedup']:.1f}x the images/s of that cell"
        name = {"distilled": "distilled MeanFlow (CFG on two rows)", "folded": "distilled MeanFlow (CFG folded in)",
                "meanflow": "MeanFlow from scratch"}[c["flow"]]
        out.append(f"- **{name}, {c['evals']} evaluation(s) per token:** FID {c['fid']:.1f} vs {ref['fid']:.1f} "
                   f"(100-step Euler-Maruyama, Euclidean head), accuracy {f(c.get('acc'), '.3f')} vs "
                   f"{f(ref.get('acc'), '.3f')}; 2 sd of seed noise: FID {2 * sd.get('fid', {}).get('sd', 0):.1f}, "
                   f"accuracy {2 * sd.get('acc', {}).get('sd', 0):.3f} → **{ok}** the quality bar, at {fast}.")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/mnist28", help="dataset directory: MNIST-28 (data/mnist28) or emoji-32")
    p.add_argument("--markdown", nargs="+", metavar="JSON",
                   help="print the results section of these result files (and write their plots), run nothing")
    p.add_argument("--speed-threads", type=int, default=torch.get_num_threads(),
                   help="threads of the side-by-side speed measurement (default: this process's)")
    p.add_argument("--speed-repeats", type=int, default=3, help="alternating timed runs per speed arm (0: none)")
    p.add_argument("--speed-batches", default="all",
                   help="batch sizes of the speed measurement, a comma list (all: one batch of every cell label)")
    p.add_argument("--distill-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a distillation config value (as `spheregen train --set`); the distilled runs and "
                        "their cells then live in their own folders")
    p.add_argument("--heads", default=",".join(FEW_STEP),
                   help=f"few-step heads to train and measure, a comma list of {', '.join(FEW_STEP)} (the Euclidean "
                        "head, the reference, always runs)")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    if any(h not in FEW_STEP for h in args.heads.split(",") if h):
        p.error(f"--heads takes a comma list of {', '.join(FEW_STEP)}, got {args.heads!r}")
    if args.markdown:
        print("\n".join(line for res in args.markdown for line in section(json.loads(Path(res).read_text()))))
        return 0
    return harness.report(lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
