"""After a demo's training: the guidance sweep (a few CFG scales and schedules, each scored on a few hundred
samples by the dataset's classifier: class accuracy and domain FID against the held-out split) and report.md
(loss curves, reconstruction PSNR, the grid, the metrics next to the same metrics on real images, time per
stage, the sweep)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np

from spheregen.eval.evaluate import evaluate, plot_metric_curve
from spheregen.generation import class_labels, sample_images

# candidates of the sweep (fields of ARSampling / SphereEncoderSampling); the first is unguided
AR_BASE = {"sampler": "euler_maruyama", "steps": 25}
AR_CANDIDATES = [{"cfg": 1.0}, {"cfg": 1.0, "temperature": 0.8}, {"cfg": 2.0, "cfg_schedule": "constant"},
                 {"cfg": 3.0, "cfg_schedule": "constant"}, {"cfg": 5.0, "cfg_schedule": "constant"},
                 {"cfg": 3.0, "cfg_schedule": "linear"}, {"cfg": 6.0, "cfg_schedule": "linear"}]
SPHERE_BASE: dict = {}
SPHERE_CANDIDATES = [{"steps": 1}, {"steps": 4}, {"steps": 4, "cfg": 2.0, "cfg_position": "pixel"},
                     {"steps": 4, "cfg": 3.0, "cfg_position": "pixel"}]
ACC_TOLERANCE = 0.02  # the best trade-off: lowest domain FID among settings within this of the best accuracy
SWEEP_SEED = 0  # the acceptance checks sample from seed 1000 on: the pick is not scored on its own samples


def candidates(model_type: str) -> list[dict]:
    base, cands = (AR_BASE, AR_CANDIDATES) if model_type == "ar" else (SPHERE_BASE, SPHERE_CANDIDATES)
    return [{**base, **c} for c in cands]


def score_samples(model, data_dir: str | Path, options: dict, per_class: int, seed: int = SWEEP_SEED,
                  batch_size: int = 100) -> dict:
    """Class accuracy and domain FID (classifier features, against the held-out split) of `per_class` samples
    of every class (sample k uses seed `seed + k`)."""
    labels = class_labels(list(range(model.num_classes)), per_class)
    images = sample_images(model, labels, seed, batch_size, options, progress=False)
    res = evaluate(images, data_dir, metrics=("acc", "dfid"), labels=np.asarray(labels), ref_split="test")
    return {"options": options, "n": len(labels), "acc": res["acc"], "dfid": res["dfid"]}


def sweep_guidance(model, data_dir: str | Path, per_class: int, done: list[dict] | None = None,
                   save: Callable[[list[dict]], None] | None = None,
                   say: Callable[[str], None] = print) -> list[dict]:
    """Score every candidate setting of the model's type; rows already in `done` are kept (a killed sweep
    resumes), each new row is passed to `save`."""
    rows = list(done or [])
    for options in candidates(model.model_type):
        if any(r["options"] == options for r in rows):
            continue
        rows.append(score_samples(model, data_dir, options, per_class))
        say(f"sweep: {describe(options)}: class accuracy {rows[-1]['acc']:.3f}, domain FID {rows[-1]['dfid']:.2f} "
            f"({rows[-1]['n']} samples)")
        if save is not None:
            save(rows)
    return rows


def pick_best(rows: list[dict], tolerance: float = ACC_TOLERANCE) -> dict:
    """The lowest domain FID among the rows whose class accuracy is within `tolerance` of the best."""
    best_acc = max(r["acc"] for r in rows)
    return min((r for r in rows if r["acc"] >= best_acc - tolerance), key=lambda r: r["dfid"])


def describe(options: dict) -> str:
    cfg = options.get("cfg", 1.0)
    guide = "no guidance" if cfg == 1.0 else f"CFG {cfg:g}"
    if cfg != 1.0 and "cfg_schedule" in options:
        guide += f" {options['cfg_schedule']}"
    if cfg != 1.0 and "cfg_position" in options:
        guide += f" ({options['cfg_position']})"
    temperature = f", temperature {options['temperature']:g}" if options.get("temperature", 1.0) != 1.0 else ""
    return f"{guide}, {options.get('steps', '?')} steps{temperature}"


def real_reference(data_dir: str | Path, n: int, classifier_acc: float | None) -> dict:
    """The same metrics on real images: the classifier's accuracy on the held-out split, and the domain FID of
    n training images against the held-out split (n as for the samples: FID depends on n)."""
    res = evaluate(data_dir, data_dir, metrics=("dfid",), max_n=n, samples_split="train", ref_split="test")
    return {"acc": classifier_acc, "dfid": res["dfid"], "n": res["n_samples"]}


# ---------------------------------------------------------------------------------------------- report


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return vals[-1] if vals else None


def loss_curve(run_dir: Path, out_png: Path, title: str) -> Path | None:
    """The training loss against the step, from the run's metrics.csv."""
    rows = [r for r in read_metrics(run_dir) if r.get("loss") not in (None, "")]
    if not rows:
        return None
    return plot_metric_curve([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], "step", "loss",
                             out_png, title=title)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                          for r in rows]


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def time_lines(plan: dict, timings: dict) -> list[str]:
    planned = {s["name"]: s["expected_s"] for s in plan.get("stages", [])}
    if "sweep" in plan:
        planned["sweep"] = plan["sweep"]["expected_s"]
    rows = [[name, _fmt(planned[name] / 60 if name in planned else None, ".1f"), f"{sec / 60:.1f}"]
            for name, sec in timings.items()]
    rows.append(["total", _fmt(plan.get("budget_s", 0) / 60, ".1f"), f"{sum(timings.values()) / 60:.1f}"])
    return _table(["stage", "planned min", "actual min"], rows)


def sweep_lines(rows: list[dict], best: dict | None) -> list[str]:
    body = [[describe(r["options"]) + (" **(default)**" if r is best else ""), f"{r['acc']:.3f}", f"{r['dfid']:.2f}",
             str(r["n"])] for r in rows]
    return _table(["setting", "class accuracy", "domain FID", "samples"], body)


def write_report(out: Path, info: dict, name: str = "report") -> Path:
    """NAME.md (and NAME.json) from `info`: data (str), plan, timings, runs {stage: run dir}, recon (psnr, ssim), grid,
    sweep rows, best row, real reference, seconds overall."""
    lines = ["# spheregen demo report", "", info["data"], "", "## Time per stage", ""]
    lines += time_lines(info["plan"], info["timings"])
    lines += ["", f"Wall time from the start (bootstrap included when given): {info['wall_s'] / 60:.1f} min "
              f"of a {info['plan'].get('minutes', 0):g} min budget.", "", "## Training", ""]
    for stage, run_dir in info["runs"].items():
        png = loss_curve(Path(run_dir), out / f"loss_{stage}.png", f"{stage} training loss")
        if png is not None:
            lines += [f"![{stage} loss]({png.name})", ""]
    if info.get("recon"):
        psnr, ssim = info["recon"]
        lines += [f"Reconstruction of held-out images: PSNR {_fmt(psnr, '.2f')} dB, SSIM {_fmt(ssim, '.4f')}.", ""]
    lines += ["## Samples", "", f"Default sampling settings: {info['default']}.", "",
              f"![samples]({Path(info['grid']).name})", ""]
    best, real = info.get("best"), info.get("real")
    if best is not None and real is not None:
        lines += _table(["", "class accuracy", "domain FID vs held-out", "images"],
                        [["samples (default settings)", f"{best['acc']:.3f}", f"{best['dfid']:.2f}", str(best["n"])],
                         ["real images", _fmt(real["acc"], ".3f") + " (held-out)", f"{real['dfid']:.2f} (train)",
                          str(real["n"])]])
        lines += ["", "## Guidance sweep", "", f"Seeds {SWEEP_SEED}+; the default is the lowest domain FID within "
                  f"{ACC_TOLERANCE} of the best class accuracy.", ""] + sweep_lines(info["sweep"], best)
    else:
        lines += ["No class accuracy or domain FID: the data has fewer than 2 classes, so there is no classifier."]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({k: v for k, v in info.items() if k != "data"}, indent=2,
                                                default=str))
    return path
