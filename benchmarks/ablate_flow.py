"""Flow-head ablation: SphereAR's Euclidean rectified flow against Riemannian flow matching on the sphere.

SphereAR's "Future work" proposes Riemannian Flow Matching (Chen & Lipman 2023), whose trajectories stay on the
hypersphere. Both arms share one spherical tokenizer and its latent cache, the AR config and budget; only
`model.flow` differs:

    arm          model.flow    path / start                                      paper
    euclidean    euclidean     straight line from N(0, I) in R^d, then N_R      Sec. 3.2, Eq. 7-9
    riemannian   riemannian    great circle from the uniform law on S^{d-1}(R)  Future work (RFM)

Each arm is sampled with the deterministic solver of its flow ("euler": straight Euler steps for the Euclidean
head, exp-map steps for the Riemannian one; the Riemannian head has no SDE sampler), constant CFG, and scored
(Inception FID, class accuracy, classifier-feature dFID) at every CFG scale of the budget (head steps of the
budget), and at 1, 5, 25, 100 head steps (up to 4x the budget's) with CFG 2. Seed noise: the CFG-2 cell on
SEED_SETS disjoint seed sets per arm; benchmarks/seed_spread.py's spread (the Euclidean head, euler_maruyama,
5 sets) is shown beside it.

    python benchmarks/ablate_flow.py --data data/mnist28                   # --budget cpu
    python benchmarks/ablate_flow.py --data data/emoji32 --set ar_steps=400
    python benchmarks/ablate_flow.py --markdown benchmarks/results/flow_mnist28_cpu.json   # the results section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from ablate_posterior import AR_CONFIG, tokenizer_config  # noqa: E402

ARMS = {"euclidean": "euclidean", "riemannian": "riemannian"}  # arm: model.flow
SAMPLER = "euler"
STEPS = (1, 5, 25, 100)
STEPS_CFG = 2.0  # the CFG of the head-steps sweep and of the seed sets (seed_spread.py measures CFG 2 too)
SEED_SETS = 5  # as benchmarks/seed_spread.py
IMAGES = harness.ROOT / "docs" / "images"


def steps_grid(budget: harness.Budget) -> list[int]:
    return sorted({s for s in STEPS if s <= 4 * budget.head_steps} | {budget.head_steps})


def shared_latents(data: str, runs: Path, budget: harness.Budget, device: str, ds) -> tuple[Path, Path]:
    """The spherical tokenizer both arms share, and its latent cache (trained / encoded once)."""
    from spheregen.cli.demo import run_spheregen, train_or_resume

    tok = train_or_resume("tokenizer", tokenizer_config(ds.image_size, ds.channels), runs / "tokenizer-spherical",
                          "--data", data, "--set", "model.posterior=spherical", "--set", "train.eval_every=0",
                          "--set", f"train.ckpt_every={budget.tokenizer_steps}", "--device", device,
                          steps=budget.tokenizer_steps)
    latents = runs / "latents-spherical"
    if not (latents / "meta.json").is_file():
        run_spheregen("encode", "--tokenizer", str(tok), "--data", data, "--split", "train", "--out", str(latents),
                      "--device", device)
    return tok, latents


def run_arm(arm: str, data: str, runs: Path, budget: harness.Budget, device: str, ds) -> dict:
    """Train (or reuse) the arm's AR model on the shared latents, then fill its cells."""
    from spheregen.cli.demo import train_or_resume
    from spheregen.generation import load_generator

    tok, latents = shared_latents(data, runs, budget, device, ds)
    ar = train_or_resume("ar", AR_CONFIG, runs / f"ar-{arm}", "--data", data, "--latents", str(latents),
                         "--set", f"model.flow={ARMS[arm]}", "--set", f"train.ckpt_every={budget.ar_steps}",
                         "--device", device, steps=budget.ar_steps)
    model = load_generator(str(ar), device=device)
    cells = harness.Cells(runs / f"ar-{arm}", budget)
    labels = harness.class_labels(ds.num_classes, budget.per_class)

    def cell(cfg: float, steps: int, seed_set: int = 0) -> dict:
        key = f"cfg{cfg:g}_steps{steps}" + (f"_set{seed_set}" if seed_set else "")
        seed = budget.seed + seed_set * len(labels)  # disjoint seed sets, as seed_spread.py

        def compute() -> dict:
            opts = {"cfg": cfg, "cfg_schedule": "constant", "sampler": SAMPLER, "steps": steps}
            images, sec = harness.generate_all(model, labels, seed, opts)
            if not seed_set:
                harness.save_examples(images, ds.num_classes, budget.per_class, runs / "grids" / f"{arm}_{key}.png")
            return {"cfg": cfg, "steps": steps, "seed": seed, **harness.score(images, labels, data, budget, device),
                    "seconds_per_image": sec}

        return cells.get(key, compute)

    cfg_cells = [cell(c, budget.head_steps) for c in budget.cfgs]
    step_cells = [cell(STEPS_CFG, s) for s in steps_grid(budget)]
    seed_cells = [cell(STEPS_CFG, budget.head_steps, k) for k in range(SEED_SETS)]
    return {"arm": arm, "flow": ARMS[arm], "tokenizer": str(tok), "ar": str(ar), "cfg_cells": cfg_cells,
            "step_cells": step_cells, "seed_cells": seed_cells, "seed_spread": spread(seed_cells)}


def spread(rows: list[dict]) -> dict:
    return {m: {"mean": statistics.mean(r[m] for r in rows), "sd": statistics.stdev(r[m] for r in rows),
                "min": min(r[m] for r in rows), "max": max(r[m] for r in rows)}
            for m in ("fid", "acc", "dfid") if len(rows) > 1 and all(r.get(m) is not None for r in rows)}


# -- the results section ------------------------------------------------------------------------------------
def noise_sd(res: dict, metric: str) -> float:
    """The yardstick for a gap between the arms: the larger of the two arms' pooled seed-set sd and
    seed_spread.py's sd (when its file exists), for `metric`."""
    sds = [a["seed_spread"][metric]["sd"] for a in res["arms"] if metric in a.get("seed_spread", {})]
    pooled = (sum(s * s for s in sds) / len(sds)) ** 0.5 if sds else 0.0
    other = (res.get("seed_spread_file") or {}).get(metric, {}).get("sd", 0.0)
    return max(pooled, other)


def call(gap: float, sd: float, lower_is_better: bool = True) -> str:
    """'riemannian better' / 'worse' when the gap (riemannian - euclidean) is at least 2 sd, else 'noise'."""
    if abs(gap) < 2 * sd:
        return "within noise"
    return "riemannian better" if (gap < 0) == lower_is_better else "riemannian worse"


def comparison_table(res: dict, key: str, x: str) -> tuple[list[str], dict]:
    from results_page import f, table

    arms = {a["arm"]: a for a in res["arms"]}
    e, r = arms["euclidean"][key], arms["riemannian"][key]
    sd_f, sd_a = noise_sd(res, "fid"), noise_sd(res, "acc")
    rows, tally = [], {}
    for ce, cr in zip(e, r):
        fid_call = call(cr["fid"] - ce["fid"], sd_f)
        acc_call = call(cr["acc"] - ce["acc"], sd_a, lower_is_better=False) if ce.get("acc") is not None else "n/a"
        tally[(ce["cfg"], ce["steps"])] = fid_call
        rows.append([f"{ce[x]:g}", f(ce["fid"]), f(cr["fid"]), f(cr["fid"] - ce["fid"]), fid_call,
                     f(ce.get("acc"), ".3f"), f(cr.get("acc"), ".3f"), acc_call, f(ce["dfid"]), f(cr["dfid"]),
                     f(ce["seconds_per_image"], ".3f"), f(cr["seconds_per_image"], ".3f")])
    head = [x, "FID eucl.", "FID riem.", "ΔFID", "FID verdict", "acc eucl.", "acc riem.", "acc verdict",
            "dFID eucl.", "dFID riem.", "s/img eucl.", "s/img riem."]
    return [table(head, rows)], tally


def plot(res: dict, path: Path) -> Path:
    """FID and class accuracy against CFG and against head steps, bars = +-1 sd of each arm's seed sets."""
    fig = harness.figure((9, 6.5))
    panels = [("cfg_cells", "cfg", "fid", "FID"), ("cfg_cells", "cfg", "acc", "class accuracy"),
              ("step_cells", "steps", "fid", "FID"), ("step_cells", "steps", "acc", "class accuracy")]
    for i, (key, x, m, label) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        for arm in res["arms"]:
            cells = [c for c in arm[key] if c.get(m) is not None]
            sd = arm.get("seed_spread", {}).get(m, {}).get("sd", 0.0)
            ax.errorbar([c[x] for c in cells], [c[m] for c in cells], yerr=sd, marker="o", capsize=3,
                        label=arm["arm"])
        xlabel = "CFG scale (head steps %d)" % res["budget_values"]["head_steps"] if x == "cfg" else \
            f"head steps (CFG {STEPS_CFG:g})"
        ax.set(xlabel=xlabel, ylabel=label, xscale="log" if x == "steps" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = f"{Path(res['data']).name}: Euclidean vs Riemannian flow head (bars: ±1 sd over seed sets)"
    return harness.save_figure(fig, title, path, dpi=90)


def section(res: dict) -> list[str]:
    """The docs/results.md section of one dataset: settings, seed noise, the two tables, the plot, verdicts."""
    from results_page import f, settings

    data = Path(res["data"]).name
    b = res["budget_values"]
    img = plot(res, IMAGES / f"flow_{data}_{res['budget']}.png")
    out = [f"### {data}", "", settings(res, f"tokenizer {b['tokenizer_steps']} steps ({res['tokenizer_config']}), "
                                       f"AR {b['ar_steps']} steps ({res['ar_config']}), sampler {SAMPLER}, "
                                       "constant CFG; "), ""]
    if res.get("real"):
        out += [f"Real held-out images at the same n: FID {res['real']['fid']:.1f}, class accuracy "
                f"{f(res['real'].get('acc'), '.3f')}.", ""]
    parts = [f"{a['arm']} FID {a['seed_spread']['fid']['mean']:.1f} ± {a['seed_spread']['fid']['sd']:.1f}, acc "
             f"{a['seed_spread']['acc']['mean']:.3f} ± {a['seed_spread']['acc']['sd']:.3f}"
             for a in res["arms"] if "acc" in a.get("seed_spread", {})]
    other = res.get("seed_spread_file")
    extra = (f"; benchmarks/seed_spread.py (Euclidean, euler_maruyama, 5 sets): FID sd {other['fid']['sd']:.1f}, "
             f"acc sd {other['acc']['sd']:.3f}") if other else ""
    n_sets = min(len(a["seed_cells"]) for a in res["arms"])
    out += [f"Seed noise, CFG {STEPS_CFG:g} at {b['head_steps']} head steps on {n_sets} disjoint seed sets per "
            f"arm (mean ± sd): {'; '.join(parts)}{extra}. A verdict needs a gap of 2 sd of the larger: FID "
            f"{2 * noise_sd(res, 'fid'):.1f}, accuracy {2 * noise_sd(res, 'acc'):.3f}.", ""]
    cfg_table, t1 = comparison_table(res, "cfg_cells", "cfg")
    step_table, t2 = comparison_table(res, "step_cells", "steps")
    out += [f"Against CFG ({b['head_steps']} head steps):", ""] + cfg_table + [""]
    out += [f"Against head steps (CFG {STEPS_CFG:g}):", ""] + step_table + ["", f"![flow heads, {data}](images/"
                                                                              f"{img.name})", ""]
    out += ["s/img is the wall time per image of each cell (sampling and decoding, batch 100) as it ran, the arms "
            "not side by side on a shared machine: a rough cost, not a speed comparison.", ""]
    best = {a["arm"]: min(a["cfg_cells"] + a["step_cells"], key=lambda c: c["fid"]) for a in res["arms"]}
    calls = list({**t1, **t2}.values())  # one verdict per distinct cell (CFG 2 at the budget's steps is in both)
    tally = {k: calls.count(k) for k in set(calls)}
    out += [f"- **Best FID:** euclidean {best['euclidean']['fid']:.1f} (CFG {best['euclidean']['cfg']:g}, "
            f"{best['euclidean']['steps']} steps), riemannian {best['riemannian']['fid']:.1f} (CFG "
            f"{best['riemannian']['cfg']:g}, {best['riemannian']['steps']} steps).",
            f"- **FID verdicts over the {sum(tally.values())} distinct cells:** "
            + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())) + ".", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/mnist28", help="dataset directory: MNIST-28 (data/mnist28) or emoji-32")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--markdown", nargs="+", metavar="JSON",
                   help="print the results section of these result files (and write their plots), run nothing")
    harness.add_common_args(p)
    args = p.parse_args(argv)
    if args.markdown:
        print("\n".join(line for res in args.markdown for line in section(json.loads(Path(res).read_text()))))
        return 0

    def extra(ds) -> dict:
        spread_file = harness.RESULTS / f"seed_spread_{Path(args.data).name}_{args.budget}.json"
        other = json.loads(spread_file.read_text())["spread"] if spread_file.is_file() and not args.set else None
        return {"image_size": ds.image_size, "tokenizer_config": tokenizer_config(ds.image_size, ds.channels),
                "ar_config": AR_CONFIG, "sampler": SAMPLER, "cfg_schedule": "constant", "steps_cfg": STEPS_CFG,
                "seed_sets": SEED_SETS, "seed_spread_file": other}

    return harness.report(lambda: harness.run_arms(args, f"flow_{Path(args.data).name}", ARMS, run_arm, extra))


if __name__ == "__main__":
    sys.exit(main())
